"""The Qwen-Image-Edit instruction encoder (``marbench.methods.editor.instruction``) on its tiny offline stand-in."""

import shutil

import pytest
import torch
from transformers import Qwen2VLProcessor

from marbench.methods.editor.instruction import (
    PROMPT_TEMPLATE_ENCODE,
    PROMPT_TEMPLATE_ENCODE_START_IDX,
    QWEN_SPECIAL_TOKENS,
    TINY_PATCH_SIZE,
    build_tiny_processor,
    encode_instruction,
    format_instruction,
    instruction_inputs,
    load_instruction_encoder,
    prompt_template_encode_start_idx,
    save_tiny_instruction_encoder,
    tiny_text_encoder,
)

PROMPT = "Remove the metal artifacts from image 1."
# Model config attribute of each special token the model reads.
CONFIG_IDS = {"<|image_pad|>": "image_token_id", "<|video_pad|>": "video_token_id",
              "<|vision_start|>": "vision_start_token_id", "<|vision_end|>": "vision_end_token_id"}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A tiny encoder saved in the snapshot layout and loaded back: ``(folder, model, processor)``."""
    folder = save_tiny_instruction_encoder(tmp_path_factory.mktemp("encoder") / "snapshot", seed=0)
    model, processor = load_instruction_encoder(folder)
    return folder, model, processor


def _images(n, size=(32, 48), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, *size, generator=g) for _ in range(n)]


def test_processor_round_trip_and_ids(tmp_path):
    built = build_tiny_processor(tmp_path / "processor")
    loaded = Qwen2VLProcessor.from_pretrained(tmp_path / "processor", local_files_only=True)
    assert loaded.tokenizer.get_vocab() == built.tokenizer.get_vocab()
    assert loaded.image_processor.patch_size == TINY_PATCH_SIZE and loaded.image_processor.merge_size == 2
    text = format_instruction(PROMPT, 2)
    assert loaded.tokenizer(text)["input_ids"] == built.tokenizer(text)["input_ids"]
    model = tiny_text_encoder()
    for token in QWEN_SPECIAL_TOKENS:
        ids = loaded.tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] < model.config.text_config.vocab_size, token
        if token in CONFIG_IDS:
            assert ids[0] == getattr(model.config, CONFIG_IDS[token]), token
    assert loaded.image_token_id == model.config.image_token_id
    assert model.config.vision_config.patch_size == TINY_PATCH_SIZE
    # Each word of the system prompt is one token, as with Qwen's tokenizer: the same prefix length as diffusers.
    assert prompt_template_encode_start_idx(loaded) == PROMPT_TEMPLATE_ENCODE_START_IDX == 64


def test_template_matches_diffusers():
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None,
                                     transformer=None)
    assert pipe.prompt_template_encode == PROMPT_TEMPLATE_ENCODE
    assert pipe.prompt_template_encode_start_idx == PROMPT_TEMPLATE_ENCODE_START_IDX


@pytest.mark.parametrize("n_images", [0, 1, 6])
def test_encode_shapes_and_image_tokens(encoder, n_images):
    _, model, processor = encoder
    images = _images(n_images)
    embeds, mask = encode_instruction(model, processor, PROMPT, images)
    inputs = instruction_inputs(processor, PROMPT, images)
    ids = inputs["input_ids"][0]
    drop = prompt_template_encode_start_idx(processor)
    n_tokens = 0
    if n_images:
        grid = inputs["image_grid_thw"]
        assert grid.tolist() == [[1, 32 // TINY_PATCH_SIZE, 48 // TINY_PATCH_SIZE]] * n_images
        n_tokens = int(grid.prod(dim=1).sum()) // processor.image_processor.merge_size ** 2
        assert n_tokens == n_images * 32 * 48 // 16 ** 2
    assert int((ids == model.config.image_token_id).sum()) == n_tokens
    assert int((ids == model.config.vision_start_token_id).sum()) == n_images
    prefix = processor.tokenizer(PROMPT_TEMPLATE_ENCODE.split("{}")[0], add_special_tokens=False)["input_ids"]
    assert ids[:drop].tolist() == prefix
    assert embeds.shape == (1, ids.numel() - drop, model.config.text_config.hidden_size)
    assert embeds.dtype == torch.float32 and torch.isfinite(embeds).all()
    assert mask.shape == embeds.shape[:2] and mask.dtype == torch.long and bool(mask.all())
    # The kept tokens are the diffusers pipeline's: hidden_states[-1] of the full model from index drop on.
    with torch.no_grad():
        out = model(**{k: v for k, v in inputs.items()}, output_hidden_states=True, use_cache=False)
    torch.testing.assert_close(embeds[0], out.hidden_states[-1][0, drop:])


def test_batch_matches_single(encoder):
    _, model, processor = encoder
    images = _images(3, size=(64, 32), seed=1)
    single_a, _ = encode_instruction(model, processor, PROMPT, images[:2])
    single_b, _ = encode_instruction(model, processor, "Denoise.", images[2:])
    batch, mask = encode_instruction(model, processor, [PROMPT, "Denoise."], [images[:2], images[2:]])
    assert batch.shape[0] == 2 and mask.sum(1).tolist() == [single_a.shape[1], single_b.shape[1]]
    torch.testing.assert_close(batch[0, : single_a.shape[1]], single_a[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch[1, : single_b.shape[1]], single_b[0], atol=1e-5, rtol=1e-4)
    assert not batch[1, single_b.shape[1]:].any()


def test_images_change_the_embeddings(encoder):
    _, model, processor = encoder
    a, _ = encode_instruction(model, processor, PROMPT, _images(1, seed=0))
    b, _ = encode_instruction(model, processor, PROMPT, _images(1, seed=1))
    assert a.shape == b.shape and not torch.allclose(a, b)
    grey = _images(1, seed=2)[0][:1]
    c, _ = encode_instruction(model, processor, PROMPT, [grey])
    d, _ = encode_instruction(model, processor, PROMPT, [grey.expand(3, -1, -1)])
    assert torch.equal(c, d)


def test_deterministic(encoder, tmp_path):
    folder, model, processor = encoder
    again = tiny_text_encoder(seed=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(tiny_text_encoder(seed=1).model.language_model.embed_tokens.weight,
                           again.model.language_model.embed_tokens.weight)
    other = build_tiny_processor(tmp_path / "processor")
    assert other.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    images = _images(2)
    e1, m1 = encode_instruction(model, processor, PROMPT, images)
    e2, m2 = encode_instruction(again, other, PROMPT, images)
    assert torch.equal(e1, e2) and torch.equal(m1, m2)


def test_tokenizer_folder_fallback(encoder, tmp_path):
    folder, model, processor = encoder
    copy = shutil.copytree(folder, tmp_path / "snapshot")
    (copy / "tokenizer").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.move(copy / "processor" / name, copy / "tokenizer" / name)
    model2, processor2 = load_instruction_encoder(copy)
    assert processor2.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    e1, _ = encode_instruction(model, processor, PROMPT, _images(1))
    e2, _ = encode_instruction(model2, processor2, PROMPT, _images(1))
    assert torch.equal(e1, e2)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_instruction_encoder(tmp_path / "nowhere")
    message = str(err.value)
    for part in (str(tmp_path / "nowhere"), "text_encoder/", "processor/", "tokenizer/",
                 "https://huggingface.co/Qwen/Qwen-Image-Edit-2511", "huggingface-cli download"):
        assert part in message
    (tmp_path / "half" / "processor").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="lacks text_encoder/"):
        load_instruction_encoder(tmp_path / "half")


def test_tokenizer_without_image_pad(encoder, tmp_path):
    folder, _, _ = encoder
    copy = shutil.copytree(folder, tmp_path / "snapshot")
    shutil.rmtree(copy / "processor")
    tokens = [t for t in QWEN_SPECIAL_TOKENS if t != "<|image_pad|>"]
    build_tiny_processor(copy / "processor", special_tokens=tokens)
    with pytest.raises(ValueError) as err:
        load_instruction_encoder(copy)
    message = str(err.value)
    assert "<|image_pad|>" in message and str(copy / "processor") in message
    assert "expected" in message and "found" in message


def test_bad_images(encoder):
    _, model, processor = encoder
    with pytest.raises(ValueError, match=r"multiples of patch_size \* merge_size = 16.*found 40 x 48"):
        encode_instruction(model, processor, PROMPT, [torch.rand(3, 40, 48)])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        encode_instruction(model, processor, PROMPT, [torch.rand(3, 32, 32) * 255])
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        encode_instruction(model, processor, PROMPT, [torch.rand(1, 3, 32, 32)])
    with pytest.raises(ValueError, match="2 prompts but 1 image lists"):
        encode_instruction(model, processor, [PROMPT, PROMPT], [[]])
    # Opting in lets the processor snap the sides to the grid: 44 x 48 -> 48 x 48 (nearest multiples of 16).
    inputs = instruction_inputs(processor, PROMPT, [torch.rand(3, 44, 48)], resize_to_grid=True)
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 6]]
