"""DuDoCLIP, the dual-domain CLIP with a control net of DuDoCROP (Zhang et al., "Dual-Domain CLIP-Assisted Residual
Optimization Perception Model for Metal Artifact Reduction", Sec. III.B.1 "DuDoCLIP Architecture with
Visual-Latent Foundation Model", Fig. 2, Eq. 2-3): the image embedding ``e^{I1}`` and control embedding ``e^{I2}``
of a metal-affected image ``X_ma`` or sinogram ``Y_ma`` that guide the IR-SDEs (``unet.ConditionalUNet``).

What the paper says, and how it is realised here:

* A frozen CLIP (ViT-B-32, Sec. IV.B.1) and a "control net", a trainable copy of its image encoder (Fig. 2b); they
  "achieve information interaction through zero convolution". As in DA-CLIP (Luo et al., "Controlling
  Vision-Language Models for Multi-Task Image Restoration", ICLR 2024), which DuDoCLIP follows: the input runs
  through both visual towers; the output of
  every transformer block of the control copy goes through its own zero-initialised ``Linear(width, width)`` and is
  added to the hidden state after the matching block of the frozen tower. The frozen tower, so controlled, gives
  ``e^{I1}`` (the content embedding, paired with the clean-image content description ``T1``); the control copy's own
  pooled, projected output gives ``e^{I2}`` (paired with the metal-feature QSPD tuple ``T2``: quantity, size,
  position, description). At initialisation the zero layers add nothing, so ``e^{I1}`` is the plain CLIP image
  embedding.
* Texts ``T1, T2`` go through the frozen CLIP text encoder: ``e^{T1}, e^{T2}``.
* Eq. 2, for ``N`` pairs ``(a_i, b_i)`` of one domain:
  ``D_con(a, b) = -log( exp(a_i^T b_i / tau) / sum_j exp(a_i^T b_j / tau) )`` with a learnable temperature ``tau``
  (``contrastive_distance``).
* Eq. 3: ``L_con = 1/N sum_i sum_{s=1,2} [ D_con(e_x^{Is}, e_x^{Ts}) + D_con(e_y^{Is}, e_y^{Ts}) ]``, ``x`` the image
  domain, ``y`` the sinogram domain (``DuDoCLIP.contrastive_loss``). One DuDoCLIP (one control net) serves both
  domains, as Fig. 2 trains one model on images and sinograms.
* Only the control net (with its zero layers) and ``tau`` are trained; the CLIP image and text encoders are frozen
  (and kept in eval mode). The paper's schedule (Sec. IV.B.2: batch 200, learning rate 2e-5, 1000 epochs) belongs to
  the training stage, not to this module.

Facts taken from the public DA-CLIP code (Algolzw/daclip-uir, ``da-clip/src/open_clip/daclip_model.py`` class
``DaCLIP`` and ``transformer.py`` class ``ControlTransformer``): the control copy is a deep copy of the CLIP visual
tower; its zero layers are biased ``nn.Linear(width, width)`` on every token, zeroed; the control copy's own stream
is not changed by its zero layers (their outputs only go to the frozen tower); the frozen tower's weights take
gradients for the control path but are never updated; both embeddings are L2-normalised before the loss; the
temperature is a separate trainable ``logit_scale = log(1 / tau)``, ``exp`` of it multiplying the cosine
similarities, as in CLIP.

Departures and readings:

* Eq. 2 is one-directional as written (each image embedding against all text embeddings of its batch), and that is
  what is computed. CLIP and DA-CLIP train with the symmetric loss (the mean of the image-to-text and text-to-image
  cross-entropies); the paper's equation has no text-to-image term.
* Eq. 3's ``1/N sum_i`` is the mean over the ``N`` pairs of a domain (``N`` may differ between domains); the two
  ``s`` terms and the two domains are summed, so a loss over both domains has four terms.
* Embeddings are L2-normalised before the dot products (as CLIP; the paper does not say). ``exp(logit_scale)`` is
  clamped at 100 (``tau >= 0.01``), as CLIP clamps it.
* ``tau`` starts at ``init_temperature`` (0.07, CLIP's initial value). DA-CLIP instead copies the loaded CLIP's
  logit scale (100 for OpenAI's weights): ``init_temperature=0.01`` reproduces that.
* Where the control is added: after each block, the control of block ``i`` to the frozen tower's block ``i``
  (``control_order="corresponding"``, the ControlNet reading of "the copy of the image encoder"). DA-CLIP's code
  pops the list of control states from its end, so there the frozen tower's first block receives the control
  copy's last block and so on; ``control_order="reversed"`` reproduces that.
* Inputs: ``(B, 1, H, W)`` images or sinograms in ``[0, 1]``, any ``H, W``, are resized on both axes to the visual
  tower's input size (224 x 224 for ViT-B-32; bicubic, antialiased, then clamped to ``[0, 1]`` as the 8-bit image of
  CLIP's PIL pipeline would be), grey replicated to RGB, normalised with OpenAI's mean and standard deviation.
  CLIP's own transform resizes the short side and centre-crops; a sinogram (views x detector columns) is not square
  and cropping would drop views or detector columns, and with them part of the metal trace, so it is resized.
* Weights: none are downloaded. ``weights=None`` gives a seeded random CLIP (the control net then copies that
  random visual tower), which is what the CPU tests and smoke runs use, with a small ``model_cfg`` of the same
  architecture (e.g. ``embed_dim`` 512, visual width 64 / 2 layers / patch 32 / 224 px, text width 64 / 2 layers).
  A weight file is checked against a sha256 (given, or known for the file name in ``KNOWN_WEIGHTS``) before it is
  read. OpenAI's TorchScript ``ViT-B-32.pt`` is read with ``torch.jit.load`` and implies QuickGELU (as OpenAI's
  models were trained with it); for OpenAI-trained weights stored as an open_clip state dict, name the model
  ``"ViT-B-32-quickgelu"``. LAION's ``laion2b_s34b_b79k`` weights use the plain GELU of ``"ViT-B-32"``.
* Texts longer than the context (77 tokens for CLIP) are truncated by CLIP's tokenizer, end token kept; long LLaVA
  descriptions lose their tail, as in DA-CLIP.
* Only open_clip's own ViT visual tower with its CLIP text transformer is supported: no patch dropout (the control
  states are added token by token, so both towers must keep the same tokens), no attentional pooling, no timm or
  Hugging Face towers, no ``hf-hub:``/``local-dir:`` names (they would download or read outside the given file).
"""
from __future__ import annotations

import copy
import math
import os
import warnings
import zipfile
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, get_model_config
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer

from marbench.files import sha256_file

__all__ = ["DEFAULT_MODEL", "KNOWN_WEIGHTS", "LOGIT_SCALE_MAX", "DuDoCLIP", "contrastive_distance"]

DEFAULT_MODEL = "ViT-B-32"

# sha256 of public ViT-B-32 weight files, by file name. OpenAI's: the digest is the path component of its download
# URL in openai/CLIP ``clip/clip.py`` (``_MODELS["ViT-B/32"]``), which ``_download`` checks with hashlib.sha256.
KNOWN_WEIGHTS: dict[str, str] = {
    "ViT-B-32.pt": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
}

_OPENAI_URL = ("https://openaipublic.azureedge.net/clip/models/"
               "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt")
_LAION_URL = "https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K (open_clip_pytorch_model.bin)"

# CLIP's cap on the logit scale: tau never below 0.01.
LOGIT_SCALE_MAX = math.log(100.0)

DOMAINS = ("image", "sinogram")


def contrastive_distance(a: torch.Tensor, b: torch.Tensor, logit_scale: float | torch.Tensor) -> torch.Tensor:
    """Eq. 2 averaged over the pairs: ``mean_i -log( exp(s a_i^T b_i) / sum_j exp(s a_i^T b_j) )``, ``s = 1/tau``.

    Args:
        a: ``(N, D)`` query embeddings (image or control embeddings), L2-normalised for cosine similarities.
        b: ``(N, D)`` key embeddings (text embeddings), row ``i`` the positive of ``a_i``, the others its negatives.
        logit_scale: ``1 / tau`` (the exponentiated CLIP logit scale, not its log), a positive float or 0-d tensor.

    Returns:
        A 0-d tensor, differentiable in ``a``, ``b`` and ``logit_scale``.

    Raises:
        ValueError: ``a`` and ``b`` not of the same ``(N, D)`` shape with ``N >= 1``, or ``logit_scale <= 0``.
    """
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] < 1:
        raise ValueError(f"contrastive_distance: expected a and b of one shape (N, D), N >= 1, "
                         f"found {tuple(a.shape)} and {tuple(b.shape)}")
    value = float(logit_scale.detach()) if isinstance(logit_scale, torch.Tensor) else float(logit_scale)
    if not value > 0:
        raise ValueError(f"contrastive_distance: expected logit_scale = 1/tau > 0, found {value}")
    logits = logit_scale * (a @ b.T)
    return (logits.logsumexp(dim=1) - logits.diagonal()).mean()


def _verify_weights(path: str | os.PathLike, sha256: str | None) -> str:
    """The file's sha256 once it matches ``sha256`` (or ``KNOWN_WEIGHTS`` for its name)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"DuDoCLIP weights: {path} not found. Download a ViT-B-32 CLIP weight file and pass its path: OpenAI's "
            f"ViT-B-32.pt from openai/CLIP's release URL {_OPENAI_URL}, or LAION's laion2b_s34b_b79k from "
            f"{_LAION_URL}")
    expected = sha256 if sha256 is not None else KNOWN_WEIGHTS.get(os.path.basename(path))
    if expected is None:
        raise ValueError(f"DuDoCLIP weights: {path} has no known sha256 (known file names: {sorted(KNOWN_WEIGHTS)}); "
                         f"pass sha256= with the digest published for the file")
    expected = expected.strip().lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise ValueError(f"DuDoCLIP weights: expected sha256 as 64 hex digits, found {sha256!r}")
    found = sha256_file(path)
    if found != expected:
        raise ValueError(f"DuDoCLIP weights: sha256 of {path} does not match: expected {expected}, found {found}")
    return found


def _is_torchscript(path: str) -> bool:
    # torch's own test (serialization._is_torchscript_zip): a TorchScript archive records constants.pkl.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.split("/", 1)[-1] == "constants.pkl" for name in z.namelist())


def _read_state_dict(path: str) -> tuple[dict[str, torch.Tensor], bool]:
    """``(state dict, whether the file is an OpenAI TorchScript archive)``, all on the CPU."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(path, device="cpu")), False
    if _is_torchscript(path):
        with warnings.catch_warnings():
            # torch deprecates TorchScript; reading a fixed archive's tensors is unaffected
            warnings.simplefilter("ignore", FutureWarning)
            state = dict(torch.jit.load(path, map_location="cpu").state_dict())
        # OpenAI's archive keeps its hyper-parameters as tensors among the weights.
        for key in ("input_resolution", "context_length", "vocab_size"):
            state.pop(key, None)
        return state, True
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"DuDoCLIP weights: {path} holds no state dict of tensors")
    # checkpoints written from DistributedDataParallel carry a "module." prefix
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}, False


def _model_config(model_name: str, model_cfg: dict | None) -> dict:
    """A checked copy of the open_clip config: ``model_cfg`` if given, else the built-in one of ``model_name``."""
    if model_cfg is None:
        if ":" in model_name:
            # open_clip resolves hf-hub:/local-dir: names by fetching or reading a config elsewhere
            raise ValueError(f"DuDoCLIP: expected a built-in open_clip model name (e.g. {DEFAULT_MODEL!r}), "
                             f"found {model_name!r}")
        cfg = get_model_config(model_name)
        if cfg is None:
            raise ValueError(f"DuDoCLIP: open_clip has no built-in model config {model_name!r}")
    else:
        cfg = copy.deepcopy(dict(model_cfg))
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(cfg)
    if missing:
        raise ValueError(f"DuDoCLIP: model config lacks {sorted(missing)}")
    vision, text = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
    unsupported = []
    if cfg.pop("custom_text", False) or "multimodal_cfg" in cfg:
        unsupported.append("custom text tower / CoCa")
    if vision.get("timm_model_name") or isinstance(vision.get("layers"), (tuple, list)):
        unsupported.append("timm or ResNet visual tower")
    if text.get("hf_model_name") or text.get("hf_tokenizer_name"):
        unsupported.append("Hugging Face text tower or tokenizer")
    if vision.get("patch_dropout", 0.0) > 0:
        unsupported.append("patch dropout")
    if vision.get("attentional_pool", False) or vision.get("pool_type", "tok") not in ("tok", "avg"):
        unsupported.append("attentional or no pooling")
    if unsupported:
        raise ValueError(f"DuDoCLIP: expected open_clip's ViT + text transformer CLIP, found {unsupported} "
                         f"in the config of {model_name!r}")
    cfg["vision_cfg"], cfg["text_cfg"] = vision, text
    return cfg


def _zero_linear(width: int) -> nn.Linear:
    # skip_init: no draw from the global RNG for weights that are zeroed anyway
    layer = nn.utils.skip_init(nn.Linear, width, width)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _tokens(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, S, S)`` -> ``(B, 1 + grid cells, width)``: patches, class token, positions, ``ln_pre``."""
    x = visual.conv1(x).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.ln_pre(visual.patch_dropout(x))


def _blocks(visual: nn.Module, x: torch.Tensor, control: Sequence[torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The transformer blocks on ``(B, L, width)``; ``control[i]`` added after block ``i``. Returns the output
    and every block's own output (before its control is added), both in the tower's layout inside."""
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    hiddens = []
    for i, block in enumerate(visual.transformer.resblocks):
        x = block(x)
        hiddens.append(x)
        if control is not None:
            x = x + control[i]
    if not batch_first:
        x = x.transpose(0, 1)
    return x, hiddens


def _head(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(B, L, width)`` -> ``(B, D)``: ``ln_post`` and pooling in the tower's order, then the projection."""
    def pool(t: torch.Tensor) -> torch.Tensor:
        return t[:, 1:].mean(dim=1) if visual.pool_type == "avg" else t[:, 0]

    pooled = visual.ln_post(pool(x)) if visual.final_ln_after_pool else pool(visual.ln_post(x))
    return pooled @ visual.proj if visual.proj is not None else pooled


class DuDoCLIP(nn.Module):
    """Frozen CLIP + trainable control net (a copy of CLIP's visual tower with zero linears), Sec. III.B.1.

    Args:
        model_name: a built-in open_clip model name (the architecture), ``"ViT-B-32"`` as the paper.
        weights: local path of a CLIP weight file (open_clip state dict ``.bin``/``.pt``/``.safetensors``, or OpenAI's
            TorchScript ``ViT-B-32.pt``); ``None``: seeded random initialisation. Nothing is ever downloaded.
        sha256: the file's expected digest; if ``None``, ``KNOWN_WEIGHTS[basename]``.
        model_cfg: an open_clip model config (``{"embed_dim", "vision_cfg", "text_cfg"}``) that replaces the named
            one, e.g. a small model of the same architecture for CPU runs; ``model_name`` then only labels it.
        init_temperature: the initial ``tau`` of Eq. 2 (``> 0``).
        seed: seed of the random initialisation (the global RNG is left untouched).
        control_order: ``"corresponding"`` (control block ``i`` -> frozen block ``i``) or ``"reversed"``
            (DA-CLIP's code: control block ``L - 1 - i`` -> frozen block ``i``).

    Raises:
        FileNotFoundError: ``weights`` does not exist (the message says where the public files are).
        ValueError: no known digest for the file and no ``sha256``; a digest mismatch (both digests named); a file
            that does not fit the model; an unsupported or unknown model config; ``init_temperature <= 0``.
    """

    def __init__(self, model_name: str = DEFAULT_MODEL, weights: str | os.PathLike | None = None,
                 sha256: str | None = None, model_cfg: dict | None = None, init_temperature: float = 0.07,
                 seed: int = 0, *, control_order: str = "corresponding"):
        super().__init__()
        if not init_temperature > 0:
            raise ValueError(f"DuDoCLIP: expected init_temperature > 0, found {init_temperature}")
        if control_order not in ("corresponding", "reversed"):
            raise ValueError(f"DuDoCLIP: expected control_order 'corresponding' or 'reversed', found {control_order!r}")
        if weights is None and sha256 is not None:
            raise ValueError("DuDoCLIP: sha256 given without weights")
        self.model_name = model_name
        self.control_order = control_order
        cfg = _model_config(model_name, model_cfg)

        state, self._weights_sha256 = None, None
        if weights is not None:
            # the digest is checked before anything in the file is unpickled or loaded
            self._weights_sha256 = _verify_weights(weights, sha256)
            state, openai_archive = _read_state_dict(os.fspath(weights))
            if openai_archive:
                cfg["quick_gelu"] = True

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            clip = CLIP(**cfg)
        if state is not None:
            if "logit_scale" in state and state["logit_scale"].shape != clip.logit_scale.shape:
                state["logit_scale"] = state["logit_scale"].reshape(clip.logit_scale.shape)
            try:
                clip.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise ValueError(f"DuDoCLIP weights: {os.fspath(weights)} does not fit the {model_name!r} "
                                 f"config: {e}") from e
        clip.requires_grad_(False)
        self.clip = clip.eval()

        visual = clip.visual
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise ValueError(f"DuDoCLIP: expected a ViT visual tower, found {type(visual).__name__}")
        self.control = copy.deepcopy(visual).requires_grad_(True)
        self.zero_linears = nn.ModuleList(_zero_linear(visual.transformer.width)
                                          for _ in visual.transformer.resblocks)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self._tokenizer = SimpleTokenizer(context_length=clip.context_length)

    def weights_info(self) -> dict[str, str]:
        """``{"dudoclip-<model_name>": sha256 of the weight file, or "random"}``."""
        return {f"dudoclip-{self.model_name}": self._weights_sha256 or "random"}

    @property
    def embed_dim(self) -> int:
        """Length ``D`` of every embedding (512 for ViT-B-32)."""
        return int(self.clip.visual.output_dim)

    @property
    def temperature(self) -> float:
        """The current ``tau`` of Eq. 2 (after CLIP's clamp)."""
        return 1.0 / float(self.scale().detach())

    def scale(self) -> torch.Tensor:
        """``1 / tau = exp(logit_scale)``, clamped at 100 as CLIP does (0-d, differentiable below the clamp)."""
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    @property
    def _device(self) -> torch.device:
        return self.logit_scale.device

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP's input from ``(B, 1, H, W)`` images or sinograms in ``[0, 1]`` (any ``H, W``): ``(B, 3, S, S)``,
        ``S`` the visual tower's input size (224), resized bicubically (antialiased, both axes: sinograms are not
        cropped), clamped to ``[0, 1]``, grey replicated to RGB and normalised with OpenAI's mean/std.
        On ``x``'s device and dtype.

        Raises:
            ValueError: ``x`` not a ``(B, 1, H, W)`` floating-point tensor.
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 1:
            found = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"DuDoCLIP.preprocess: expected (B, 1, H, W) images or sinograms, found {found}")
        if not x.is_floating_point():
            raise ValueError(f"DuDoCLIP.preprocess: expected a floating-point tensor in [0, 1], found {x.dtype}")
        size = tuple(self.clip.visual.image_size)
        y = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
        mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=y.dtype, device=y.device).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_DATASET_STD, dtype=y.dtype, device=y.device).view(1, 3, 1, 1)
        return (y.expand(-1, 3, -1, -1) - mean) / std

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.preprocess(x.to(self._device) if isinstance(x, torch.Tensor) else x)
        return pre.to(self.clip.visual.conv1.weight.dtype)

    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(e^{I1}, e^{I2})``, each ``(B, D)``, of ``(B, 1, H, W)`` metal-affected images or sinograms in ``[0, 1]``:
        the controlled frozen tower's (content) embedding and the control net's own (metal/degradation) embedding,
        L2-normalised unless ``normalize=False``. Differentiable in the control net.

        Raises:
            ValueError: as ``preprocess``.
        """
        pre = self._input(x)
        control_out, hiddens = _blocks(self.control, _tokens(self.control, pre))
        e2 = _head(self.control, control_out)
        control = [zero(h) for zero, h in zip(self.zero_linears, hiddens, strict=True)]
        if self.control_order == "reversed":
            control = control[::-1]
        frozen_out, _ = _blocks(self.clip.visual, _tokens(self.clip.visual, pre), control)
        e1 = _head(self.clip.visual, frozen_out)
        if normalize:
            e1, e2 = F.normalize(e1, dim=-1), F.normalize(e2, dim=-1)
        return e1, e2

    def encode_image_uncontrolled(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``(B, D)`` plain CLIP image embedding of ``(B, 1, H, W)`` inputs in ``[0, 1]`` through open_clip's own
        forward of the frozen tower (no control), L2-normalised unless ``normalize=False``.

        Raises:
            ValueError: as ``preprocess``.
        """
        out = self.clip.visual(self._input(x))
        out = out[0] if isinstance(out, tuple) else out
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """``(B, D)`` frozen CLIP text embeddings (no gradient) of ``B`` texts (content descriptions or QSPD tuples),
        truncated to the context length, L2-normalised unless ``normalize=False``.

        Raises:
            ValueError: ``texts`` not a non-empty list of strings.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) == 0 \
                or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"DuDoCLIP.encode_text: expected a non-empty list of strings, found {texts!r:.80}")
        tokens = self._tokenizer(list(texts)).to(self._device)
        with torch.no_grad():
            return self.clip.encode_text(tokens, normalize=normalize)

    def contrastive_loss(self, image_embeddings: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                         text_embeddings: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Eq. 3: ``sum over domains and s = 1, 2 of D_con(e^{Is}, e^{Ts})``, each ``D_con`` averaged over the
        ``N`` pairs of its domain (Eq. 2, ``contrastive_distance``), at the current temperature. Embeddings are
        L2-normalised here (a no-op for those of ``encode_*``).

        Args:
            image_embeddings: ``{"image": (e_x^{I1}, e_x^{I2}), "sinogram": (e_y^{I1}, e_y^{I2})}`` (either key or
                both), each ``(N, D)``.
            text_embeddings: the same keys, ``(e^{T1}, e^{T2})``: content descriptions and QSPD tuples, ``(N, D)``.

        Returns:
            A 0-d tensor.

        Raises:
            ValueError: no domain, keys other than ``"image"``/``"sinogram"``, different keys in the two mappings,
                values that are not pairs, or shapes that do not match.
        """
        keys = set(image_embeddings)
        if not keys or keys != set(text_embeddings) or not keys <= set(DOMAINS):
            raise ValueError(f"DuDoCLIP.contrastive_loss: expected the same domains (of {DOMAINS}) in both, found "
                             f"{sorted(image_embeddings)} and {sorted(text_embeddings)}")
        scale = self.scale()
        loss = scale.new_zeros(())
        for domain in DOMAINS:
            if domain not in keys:
                continue
            images, texts = image_embeddings[domain], text_embeddings[domain]
            if len(images) != 2 or len(texts) != 2:
                raise ValueError(f"DuDoCLIP.contrastive_loss: expected (e^I1, e^I2) and (e^T1, e^T2) for {domain!r}, "
                                 f"found {len(images)} and {len(texts)} tensors")
            for e_i, e_t in zip(images, texts, strict=True):
                loss = loss + contrastive_distance(F.normalize(e_i, dim=-1), F.normalize(e_t.to(e_i), dim=-1), scale)
        return loss

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The control net (visual copy and zero linears) and the temperature: what DuDoCLIP fine-tuning updates."""
        return [*self.control.parameters(), *self.zero_linears.parameters(), self.logit_scale]

    def train(self, mode: bool = True) -> DuDoCLIP:
        """As ``nn.Module.train``, but the frozen CLIP stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self
