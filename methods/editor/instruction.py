"""The instruction encoder of Qwen-Image-Edit(-Plus): a Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration`` with a
``Qwen2VLProcessor``) that turns an editing instruction and its condition images into the prompt embeddings the
diffusion transformer attends to (Emirdagi et al., "Leveraging Image Editing Foundation Models for Data-Efficient CT
Metal Artifact Reduction", Sec. 2.3: the corrupted slice and the reference slices go in as one multi-image prompt).

Conventions taken from diffusers (``diffusers/pipelines/qwenimage/pipeline_qwenimage_edit_plus.py``,
``QwenImageEditPlusPipeline.__init__``, ``._get_qwen_prompt_embeds``, ``._extract_masked_hidden``,
``.encode_prompt``), reproduced by ``encode_instruction``:

* The chat template ``PROMPT_TEMPLATE_ENCODE`` (a fixed system message asking to describe the input image and apply
  the user's edit, then the user turn, then an open assistant turn) wraps the user text.
* Each condition image ``i`` (1-based) is announced in the user turn, before the instruction, by
  ``"Picture {i}: <|vision_start|><|image_pad|><|vision_end|>"`` (``PICTURE_PROMPT_TEMPLATE``); the processor expands
  each ``<|image_pad|>`` into one token per merged vision patch and the vision tower's features replace them.
* The output is the last hidden state of the language model (``hidden_states[-1]``, after the final norm) at the
  non-padding positions, with the first ``prompt_template_encode_start_idx`` tokens dropped (the system turn and
  ``<|im_start|>user\\n``: 64 tokens with Qwen's tokenizer, ``PROMPT_TEMPLATE_ENCODE_START_IDX``); sequences of a batch
  are then right-padded with zeros to the longest, with a ``long`` mask of ones on the kept tokens.

Departures and readings:

* Native image size. The pipeline resizes every condition image to about 384 x 384 pixels of area
  (``CONDITION_IMAGE_SIZE``, ``calculate_dimensions``) before the VL processor, and the processor itself would snap
  sides to multiples of ``patch_size * merge_size`` (``smart_resize``). Our protocol keeps the native size: an image
  goes in as it is, its sides must be multiples of ``patch_size * merge_size`` (28 for Qwen2.5-VL: 14-pixel patches,
  2 x 2 merge; 16 for the tiny processor here), otherwise ``ValueError``. Note that 512 x 512 CT slices are not
  multiples of 28: with the real model pass ``resize_to_grid=True`` (the processor's own ``smart_resize`` to the
  nearest multiple, 504 x 504, bicubic) or crop/pad beforehand. One ``H x W`` image gives
  ``(H / patch_size) * (W / patch_size) / merge_size**2`` image tokens (``H * W / 784`` for the real model,
  ``H * W / 256`` for the tiny one).
* Images are float tensors ``(3, H, W)`` (or ``(1, H, W)``, replicated to RGB) in ``[0, 1]``, not 8-bit PIL images, so
  the processor's ``1/255`` rescale is switched off; its normalisation (OpenAI CLIP mean and std for Qwen2.5-VL) is
  kept. Up to the 8-bit quantisation this is what the pipeline feeds.
* 3D rotary positions. Qwen2.5-VL gives the tokens of an image (temporal, row, column) positions (M-RoPE). In
  transformers 5 the model computes them only when ``mm_token_type_ids`` (returned by the processor) is passed;
  diffusers' ``_get_qwen_prompt_embeds`` does not pass it, so under transformers 5 it silently falls back to 1D
  positions, unlike the transformers-4 encoder Qwen-Image-Edit was trained with. It is passed here.
* Batches are padded on the right whatever the tokenizer's ``padding_side`` (so that, with causal attention and
  positions starting at 0, an instruction encodes the same alone or in a batch). ``encode_prompt`` replaces an
  all-ones mask by ``None``; here the mask is always returned. The encoder runs without gradients (it is frozen in
  the paper's LoRA fine-tuning) and the language-model head is skipped (only hidden states are needed).

Weights: none are downloaded. ``load_instruction_encoder`` reads a local snapshot of Qwen/Qwen-Image-Edit-2511 (its
``text_encoder/`` and ``processor/`` subfolders, the tokenizer also from ``tokenizer/``) or a tiny random encoder of
the same architecture written by ``save_tiny_instruction_encoder`` (``build_tiny_processor``: a byte-level BPE
tokenizer trained offline on a built-in English corpus, 512 text tokens then Qwen2-VL's 14 special tokens in Qwen's
order; ``tiny_text_encoder``: hidden size 32, 2 layers, 2-layer vision tower with 8-pixel patches), which the CPU
tests use.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    BatchFeature,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

__all__ = [
    "PICTURE_PROMPT_TEMPLATE",
    "PROMPT_TEMPLATE_ENCODE",
    "PROMPT_TEMPLATE_ENCODE_START_IDX",
    "QWEN_SPECIAL_TOKENS",
    "TINY_MERGE_SIZE",
    "TINY_PATCH_SIZE",
    "TINY_TEXT_VOCAB_SIZE",
    "TINY_VOCAB_SIZE",
    "build_tiny_processor",
    "encode_instruction",
    "format_instruction",
    "instruction_inputs",
    "load_instruction_encoder",
    "prompt_template_encode_start_idx",
    "save_tiny_instruction_encoder",
    "tiny_text_encoder",
]

#: The special tokens the prompt path needs: end-of-text (padding), the chat turn markers, the vision span markers
#: and the image / video placeholders that ``Qwen2VLProcessor`` expands (it looks up both placeholders' ids).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL's added tokens in the order of Qwen's tokenizer (ids 151643 ... 151656 there): the tiny tokenizer appends
# them in this order after its text vocabulary, so that every special id keeps Qwen's offset from <|endoftext|>.
_QWEN2_VL_ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: The chat template of ``QwenImageEditPlusPipeline`` (``prompt_template_encode``); ``{}`` takes the picture prefixes
#: followed by the instruction.
PROMPT_TEMPLATE_ENCODE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
    "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
#: The announcement of condition image ``i`` (1-based) in the user turn.
PICTURE_PROMPT_TEMPLATE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
#: diffusers' ``prompt_template_encode_start_idx``: the number of tokens of the template before ``{}`` with Qwen's
#: tokenizer. ``prompt_template_encode_start_idx(processor)`` counts them for any tokenizer (64 for the tiny one too).
PROMPT_TEMPLATE_ENCODE_START_IDX = 64

#: Text tokens of the tiny tokenizer (bytes and BPE merges); the special tokens follow, from this id on.
TINY_TEXT_VOCAB_SIZE = 512
#: Embedding rows of the tiny model: the tokenizer's 526 tokens padded up to a multiple of 64, as Qwen pads 151665
#: tokens to 152064 rows.
TINY_VOCAB_SIZE = 576
#: Pixel side of a vision patch and the side (in patches) of the block merged into one token, tiny processor and model.
TINY_PATCH_SIZE = 8
TINY_MERGE_SIZE = 2
_TINY_MIN_PIXELS = 16 * 16
_TINY_MAX_PIXELS = 1024 * 1024

# Qwen2's pre-tokenisation: contractions, letter runs with one leading non-letter, single digits, punctuation runs,
# newlines and spaces (the same split as Qwen2Tokenizer, so the tiny tokenizer cuts text where Qwen's does).
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Training text of the tiny tokenizer. The system prompt is repeated so that each of its words becomes one token, as
# with Qwen's tokenizer: the template prefix is then 64 tokens long for the tiny tokenizer as well.
_TINY_CORPUS = (
    (PROMPT_TEMPLATE_ENCODE.replace("{}", ""),) * 8
    + ("Picture 1: Picture 2: Picture 3: Picture 4: Picture 5: Picture 6: Picture 7: Picture 8: Picture 9: ",) * 4
    + (
        "Remove metal artifacts.",
        "Remove the metal artifacts from the CT scan while keeping the anatomy unchanged.",
        "Image 1 is the CT scan with metal artifacts. Images 2-6 are clean reference CTs of other patients.",
        "The input is a 2x3 grid. Top-left is the CT scan with metal artifacts; the other five cells are clean "
        "reference CTs.",
        "Restore the soft tissue around the implant and suppress the dark and bright streaks.",
        "Computed tomography slices of the abdomen, the pelvis, the head and the chest, windowed from -500 to 1300 HU.",
        "Hip prostheses, dental fillings, spinal screws and surgical clips cause beam hardening and photon starvation.",
        "A radiologist reads the corrected image; bones, vessels, muscle, fat and air should look natural.",
        "Make the streaks disappear, sharpen the edges, reduce the noise and brighten the background slightly.",
        "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!",
        "Numbers: 0 1 2 3 4 5 6 7 8 9, 10, 16, 32, 64, 128, 256, 512, 1024 pixels (width x height).",
        "Translate the picture into a watercolor painting with soft blue and warm orange colors.",
    )
)


def _train_tiny_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # Seeding the 256 byte symbols makes every string encodable, not only the characters seen in the corpus.
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_TEXT_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_TINY_CORPUS, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    if len(vocab) != TINY_TEXT_VOCAB_SIZE:  # the corpus must be rich enough for the special ids to be fixed
        raise RuntimeError(f"the tiny BPE reached {len(vocab)} tokens, expected {TINY_TEXT_VOCAB_SIZE}")
    return vocab, merges


def build_tiny_processor(
    folder: str | Path,
    *,
    patch_size: int = TINY_PATCH_SIZE,
    merge_size: int = TINY_MERGE_SIZE,
    min_pixels: int = _TINY_MIN_PIXELS,
    max_pixels: int = _TINY_MAX_PIXELS,
    special_tokens: Sequence[str] = _QWEN2_VL_ADDED_TOKENS,
) -> Qwen2VLProcessor:
    """A small ``Qwen2VLProcessor`` built offline, saved to ``folder`` (created) and returned.

    Tokenizer: a byte-level BPE (Qwen2's pre-tokenisation) trained with the ``tokenizers`` library on a built-in
    English corpus (the prompt template, CT editing instructions, a few sentences), ``TINY_TEXT_VOCAB_SIZE`` = 512
    text tokens (ids 0-511), then ``special_tokens`` as special added tokens from id 512 on (by default Qwen2-VL's 14,
    in Qwen's order: ``<|endoftext|>`` 512, ``<|im_start|>`` 513, ``<|im_end|>`` 514, ``<|vision_start|>`` 521,
    ``<|vision_end|>`` 522, ``<|image_pad|>`` 524, ``<|video_pad|>`` 525), wrapped as transformers'
    ``Qwen2Tokenizer`` (pad ``<|endoftext|>``, eos ``<|im_end|>``, as Qwen2.5-VL). Deterministic.

    Image processor: ``Qwen2VLImageProcessor`` with ``patch_size`` (8) pixel patches, ``merge_size`` (2) x
    ``merge_size`` patches per token, 2 temporal patches (a still image is repeated), OpenAI CLIP mean/std and, for
    its own resizing, ``min_pixels`` / ``max_pixels`` (256 / 1024^2); a ``Qwen2VLVideoProcessor`` with the same patching
    (the processor requires one).

    ``special_tokens`` other than the default exist to write deliberately broken tokenizers in tests.

    Raises:
        ValueError: a special token is not of the form ``<|...|>`` (it would not be Qwen's).
    """
    if any(not (t.startswith("<|") and t.endswith("|>")) for t in special_tokens):
        raise ValueError(f"special tokens must look like <|name|>, got {list(special_tokens)}")
    vocab, merges = _train_tiny_bpe()
    for token in special_tokens:
        vocab[token] = len(vocab)
    # With the special tokens already in the vocabulary, registering them as added tokens keeps their ids (adding new
    # ones would number them in order of registration, eos and pad first).
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>" if "<|im_end|>" in special_tokens else None,
        pad_token="<|endoftext|>" if "<|endoftext|>" in special_tokens else None,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens], special_tokens=True)
    patching = dict(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2)
    pixels = dict(min_pixels=min_pixels, max_pixels=max_pixels)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**patching, **pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**patching, **pixels),
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(folder)
    return processor


def tiny_text_encoder(
    hidden_size: int = 32,
    layers: int = 2,
    seed: int = 0,
    vocab_size: int = TINY_VOCAB_SIZE,
    *,
    patch_size: int = TINY_PATCH_SIZE,
    merge_size: int = TINY_MERGE_SIZE,
) -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised ``Qwen2_5_VLForConditionalGeneration`` of the real architecture, tiny, in eval mode.

    Language model: ``hidden_size`` (a multiple of 16) with 16-dimensional heads (``hidden_size / 16`` query heads, one
    key/value head: grouped-query attention as Qwen2.5-VL), ``layers`` decoder layers, MLP width ``2 * hidden_size``,
    M-RoPE sections (2, 3, 3) (Qwen's (16, 24, 24) scaled to the head dimension), ``vocab_size`` embedding rows. Vision
    tower: 2 blocks of width 32 (the first windowed, the second global, as Qwen2.5-VL mixes them), ``patch_size``-pixel
    patches, ``merge_size`` x ``merge_size`` merge, windows of 2 x 2 merged tokens, output width ``hidden_size``.
    The special-token ids in the config (image, video, vision start/end, bos, eos) are those of
    ``build_tiny_processor``'s tokenizer; ``patch_size`` and ``merge_size`` must match its image processor.

    Weights depend only on ``seed`` (the global RNG is left as it was). Returns a float32 model on the CPU.

    Raises:
        ValueError: ``hidden_size`` not a positive multiple of 16, ``layers < 1``, or ``vocab_size`` smaller than the
            tiny tokenizer (526 tokens).
    """
    if hidden_size < 16 or hidden_size % 16:
        raise ValueError(f"hidden_size must be a positive multiple of 16 (16-dimensional heads), got {hidden_size}")
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    n_tokens = TINY_TEXT_VOCAB_SIZE + len(_QWEN2_VL_ADDED_TOKENS)
    if vocab_size < n_tokens:
        raise ValueError(f"vocab_size must cover the tiny tokenizer's {n_tokens} tokens, got {vocab_size}")
    ids = {t: TINY_TEXT_VOCAB_SIZE + i for i, t in enumerate(_QWEN2_VL_ADDED_TOKENS)}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=hidden_size // 16,
            num_key_value_heads=1,
            max_position_embeddings=8192,
            rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0, mrope_section=[2, 3, 3]),
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=patch_size,
            spatial_merge_size=merge_size,
            temporal_patch_size=2,
            window_size=2 * merge_size * patch_size,
            fullatt_block_indexes=[1],
            out_hidden_size=hidden_size,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.eval()


def save_tiny_instruction_encoder(
    folder: str | Path, hidden_size: int = 32, layers: int = 2, seed: int = 0
) -> Path:
    """Write a tiny random instruction encoder in the snapshot layout: ``folder/text_encoder`` (``tiny_text_encoder``,
    safetensors) and ``folder/processor`` (``build_tiny_processor``), so that ``load_instruction_encoder(folder)``
    loads it. Returns ``Path(folder)``. Raises as ``tiny_text_encoder``."""
    folder = Path(folder)
    model = tiny_text_encoder(hidden_size=hidden_size, layers=layers, seed=seed)
    build_tiny_processor(folder / "processor")
    model.save_pretrained(folder / "text_encoder")
    return folder


_WEIGHTS_HINT = (
    "Get the weights from https://huggingface.co/Qwen/Qwen-Image-Edit-2511, downloaded with "
    "`huggingface-cli download Qwen/Qwen-Image-Edit-2511 --local-dir <folder>`, or write a tiny random encoder with "
    "save_tiny_instruction_encoder(<folder>)."
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def _single_token_ids(tokenizer, tokens: Sequence[str]) -> dict[str, int | None]:
    """Each token's id if the tokenizer encodes its text as that one token, else None."""
    vocab = tokenizer.get_vocab()
    found = {}
    for token in tokens:
        encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
        found[token] = vocab[token] if token in vocab and encoded == [vocab[token]] else None
    return found


def load_instruction_encoder(
    folder: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor]:
    """Load the instruction encoder of a local Qwen-Image-Edit snapshot or of ``save_tiny_instruction_encoder``.

    Layout (that of ``QwenImageEditPlusPipeline.from_pretrained``, whose components are ``text_encoder``,
    ``tokenizer``, ``processor``, ``transformer``, ``vae``, ``scheduler``): the model from ``folder/text_encoder``,
    the ``Qwen2VLProcessor`` from ``folder/processor``, its tokenizer from there too or, if that folder has no
    tokenizer files, from ``folder/tokenizer``. Only local files are read (``local_files_only=True``).

    Returns ``(model, processor)``: the model in eval mode, weights in ``dtype``, on the CPU.

    Raises:
        FileNotFoundError: ``folder`` or one of the subfolders is missing (the message names the folder, the
            expected subfolders and where to get the weights).
        ValueError: the tokenizer lacks one of ``QWEN_SPECIAL_TOKENS`` as a single token (the message lists the
            missing, expected and found special tokens), or the model's config disagrees with the processor (special
            token ids, patch or merge size).
    """
    folder = Path(folder)
    text_dir, processor_dir, tokenizer_dir = folder / "text_encoder", folder / "processor", folder / "tokenizer"
    if not any((processor_dir / name).is_file() for name in _TOKENIZER_FILES) and tokenizer_dir.is_dir():
        tokenizer_source = tokenizer_dir
    else:
        tokenizer_source = processor_dir
    missing = [d.name + "/" for d in (text_dir, processor_dir) if not d.is_dir()]
    if not folder.is_dir() or missing:
        what = "does not exist" if not folder.is_dir() else f"lacks {', '.join(missing)}"
        raise FileNotFoundError(
            f"No Qwen-Image-Edit instruction encoder in {folder} (it {what}): expected the subfolders text_encoder/ "
            f"(Qwen2_5_VLForConditionalGeneration) and processor/ (Qwen2VLProcessor; its tokenizer may instead be in "
            f"tokenizer/). {_WEIGHTS_HINT}"
        )
    if not any((tokenizer_source / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"No tokenizer in {processor_dir} nor in {tokenizer_dir}: expected one of {', '.join(_TOKENIZER_FILES)}. "
            f"{_WEIGHTS_HINT}"
        )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, local_files_only=True)
    found = _single_token_ids(tokenizer, QWEN_SPECIAL_TOKENS)
    absent = [t for t, i in found.items() if i is None]
    if absent:
        present = sorted(t for t in tokenizer.get_added_vocab() if t.startswith("<|"))
        raise ValueError(
            f"The tokenizer in {tokenizer_source} lacks the special token(s) {absent} that the Qwen-Image-Edit prompt "
            f"needs: expected {list(QWEN_SPECIAL_TOKENS)}, found {present}."
        )
    processor = Qwen2VLProcessor.from_pretrained(processor_dir, tokenizer=tokenizer, local_files_only=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(text_dir, dtype=dtype, local_files_only=True).eval()

    config, vision = model.config, model.config.vision_config
    expected = {
        "image_token_id": found["<|image_pad|>"],
        "video_token_id": found["<|video_pad|>"],
        "vision_start_token_id": found["<|vision_start|>"],
        "vision_end_token_id": found["<|vision_end|>"],
    }
    wrong = {k: (getattr(config, k), v) for k, v in expected.items() if getattr(config, k) != v}
    image_processor = processor.image_processor
    for key, ours in (("patch_size", "patch_size"), ("spatial_merge_size", "merge_size"),
                      ("temporal_patch_size", "temporal_patch_size")):
        if getattr(vision, key) != getattr(image_processor, ours):
            wrong[f"vision_config.{key}"] = (getattr(vision, key), getattr(image_processor, ours))
    if wrong:
        raise ValueError(
            f"The text encoder in {text_dir} does not match the processor in {processor_dir} "
            f"(model value, processor value): {wrong}"
        )
    return model, processor


def prompt_template_encode_start_idx(processor: Qwen2VLProcessor) -> int:
    """The number of tokens of ``PROMPT_TEMPLATE_ENCODE`` before the user text (system turn and
    ``<|im_start|>user\\n``) with ``processor``'s tokenizer: diffusers' ``prompt_template_encode_start_idx``, 64 for
    Qwen's tokenizer and for the tiny one."""
    prefix = PROMPT_TEMPLATE_ENCODE.split("{}")[0]
    return len(processor.tokenizer(prefix, add_special_tokens=False)["input_ids"])


def format_instruction(prompt: str, num_images: int) -> str:
    """The text given to the processor: ``PROMPT_TEMPLATE_ENCODE`` around ``"Picture 1: <|vision_start|>
    <|image_pad|><|vision_end|>"`` ... ``"Picture {num_images}: ..."`` followed by ``prompt``."""
    pictures = "".join(PICTURE_PROMPT_TEMPLATE.format(i + 1) for i in range(num_images))
    return PROMPT_TEMPLATE_ENCODE.format(pictures + prompt)


def _batch(prompt, images) -> tuple[list[str], list[list[torch.Tensor]]]:
    if isinstance(prompt, str):
        if images is not None and not isinstance(images, (list, tuple)):
            raise TypeError(f"images must be a list of (3, H, W) tensors or None, got {type(images).__name__}")
        return [prompt], [list(images or [])]
    prompts = list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompt must be a string or a non-empty list of strings")
    if images is None:
        return prompts, [[] for _ in prompts]
    if not isinstance(images, (list, tuple)) or any(not isinstance(i, (list, tuple)) for i in images):
        raise TypeError("with a list of prompts, images must be a list (one per prompt) of lists of tensors, or None")
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    return prompts, [list(i) for i in images]


def _check_image(image, index: int, factor: int, resize_to_grid: bool) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
        found = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image {index}: expected a (3, H, W) or (1, H, W) tensor, found {found}")
    if not image.is_floating_point():
        raise ValueError(f"image {index}: expected a floating-point tensor in [0, 1], found dtype {image.dtype}")
    lo, hi = image.min().item(), image.max().item()
    if not (0.0 <= lo and hi <= 1.0):
        raise ValueError(f"image {index}: expected values in [0, 1], found [{lo:.4g}, {hi:.4g}]")
    height, width = image.shape[-2:]
    if not resize_to_grid and (height % factor or width % factor):
        raise ValueError(
            f"image {index}: sides must be multiples of patch_size * merge_size = {factor} (images go in at their "
            f"native size), found {height} x {width}; crop or pad it, or pass resize_to_grid=True"
        )
    return image.expand(3, -1, -1).float() if image.shape[0] == 1 else image.float()


def instruction_inputs(
    processor: Qwen2VLProcessor,
    prompt: str | Sequence[str],
    images: Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]] | None = None,
    *,
    resize_to_grid: bool = False,
) -> BatchFeature:
    """The processor's output for ``encode_instruction`` (before the text encoder): for ``B`` prompts,
    ``input_ids``, ``attention_mask`` and ``mm_token_type_ids`` ``(B, S)`` (right-padded; each image's
    ``<|image_pad|>`` expanded to ``prod(image_grid_thw[i]) / merge_size**2`` tokens), and with images
    ``pixel_values`` ``(sum_i prod(image_grid_thw[i]), 3 * 2 * patch_size**2)`` and ``image_grid_thw`` ``(N, 3)``
    (1, H / patch_size, W / patch_size) for the ``N`` images in order. Arguments and errors as ``encode_instruction``.
    """
    prompts, image_lists = _batch(prompt, images)
    image_processor = processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    flat = [
        _check_image(img, n, factor, resize_to_grid)
        for n, img in enumerate(img for per_prompt in image_lists for img in per_prompt)
    ]
    texts = [format_instruction(p, len(i)) for p, i in zip(prompts, image_lists, strict=True)]
    inputs = processor(
        text=texts,
        images=flat or None,
        padding=True,
        padding_side="right",
        return_tensors="pt",
        # [0, 1] floats: no 1/255 rescale; native size unless asked to snap to the grid.
        images_kwargs=dict(do_rescale=False, do_resize=resize_to_grid, input_data_format="channels_first"),
    )
    if flat and not resize_to_grid:
        expected = torch.tensor([[1, img.shape[-2] // image_processor.patch_size,
                                  img.shape[-1] // image_processor.patch_size] for img in flat])
        if not torch.equal(inputs["image_grid_thw"].cpu(), expected):  # the processor must not have resized
            raise RuntimeError(f"the processor changed the image grid: {inputs['image_grid_thw'].tolist()}")
    return inputs


@torch.no_grad()
def encode_instruction(
    model: Qwen2_5_VLForConditionalGeneration,
    processor: Qwen2VLProcessor,
    prompt: str | Sequence[str],
    images: Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]] | None = None,
    *,
    resize_to_grid: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings of an editing instruction and its condition images, as Qwen-Image-Edit-Plus computes them
    (diffusers' ``QwenImageEditPlusPipeline._get_qwen_prompt_embeds`` / ``encode_prompt``; see the module docstring
    for the conventions and the departures: native image size, 3D positions, right padding).

    Args:
        model: the Qwen2.5-VL text encoder (``load_instruction_encoder`` or ``tiny_text_encoder``).
        processor: its ``Qwen2VLProcessor``.
        prompt: one instruction, or a list of ``B`` instructions.
        images: for one instruction, a list of ``K >= 0`` images (``Picture 1`` ... ``Picture K``) or None; for a list
            of instructions, a list of ``B`` such lists (each may be empty) or None. Each image is a float tensor
            ``(3, H, W)`` (``(1, H, W)`` is replicated to RGB) in ``[0, 1]`` at its native size: ``H`` and ``W``
            multiples of ``patch_size * merge_size`` (28 for Qwen2.5-VL, 16 tiny); it gives
            ``H * W / (patch_size * merge_size)**2`` image tokens.
        resize_to_grid: let the processor snap sides to the nearest multiple (``smart_resize``, bicubic) instead of
            raising.

    Returns:
        ``(prompt_embeds, prompt_mask)``: ``(B, L, D)`` in the model's dtype on its device (``D`` the language
        model's hidden size, 3584 for Qwen-Image-Edit), the last hidden states of the kept tokens (template prefix of
        ``prompt_template_encode_start_idx`` tokens dropped), zero-padded to the longest ``L``; ``(B, L)`` ``long``,
        1 on kept tokens, 0 on padding.

    Raises:
        ValueError: an image not ``(3, H, W)``/``(1, H, W)``, not floating point, outside ``[0, 1]``, or (without
            ``resize_to_grid``) with a side not a multiple of ``patch_size * merge_size`` (expected vs found in the
            message); image lists not matching the prompts.
        TypeError: ``prompt`` or ``images`` of the wrong kind.
    """
    inputs = instruction_inputs(processor, prompt, images, resize_to_grid=resize_to_grid)
    device = model.device
    pixel_values = inputs.get("pixel_values")
    grid_thw = inputs.get("image_grid_thw")
    mask = inputs["attention_mask"].to(device)
    # The Qwen2_5_VLModel inside the generation wrapper: its last hidden state is the wrapper's hidden_states[-1]
    # (after the final norm) and the vocabulary projection, useless here, is skipped.
    outputs = model.model(
        input_ids=inputs["input_ids"].to(device),
        attention_mask=mask,
        pixel_values=None if pixel_values is None else pixel_values.to(device, model.dtype),
        image_grid_thw=None if grid_thw is None else grid_thw.to(device),
        mm_token_type_ids=inputs["mm_token_type_ids"].to(device),
        use_cache=False,
    )
    hidden = outputs.last_hidden_state
    drop = prompt_template_encode_start_idx(processor)
    kept = [h[m.bool()][drop:] for h, m in zip(hidden, mask, strict=True)]
    length = max(k.shape[0] for k in kept)
    embeds = hidden.new_zeros(len(kept), length, hidden.shape[-1])
    prompt_mask = torch.zeros(len(kept), length, dtype=torch.long, device=device)
    for b, k in enumerate(kept):
        embeds[b, : k.shape[0]] = k
        prompt_mask[b, : k.shape[0]] = 1
    return embeds.to(model.dtype), prompt_mask
