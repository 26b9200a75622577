"""The Qwen-Image-Edit backbone on diffusers: VAE latents, the MMDiT's velocity, the flow-matching loss and the
suite's own sampling loop (Emirdagi et al., "Leveraging Image Editing Foundation Models for Data-Efficient CT Metal
Artifact Reduction", Sec. 2.2-2.5, Eq. 3-5; Qwen-Image-Edit-2511).

Latents (diffusers ``QwenImageEditPlusPipeline._encode_vae_image`` / its decode path): an RGB image ``(B, 3, H, W)``
in [0, 1] goes to [-1, 1], through ``AutoencoderKLQwenImage`` as a one-frame video ``(B, 3, 1, H, W)``, the mean of
the posterior ("argmax") is normalised per channel by the VAE config's ``latents_mean`` / ``latents_std``:
``(B, 16, H/8, W/8)``. The MMDiT reads 2 x 2 patches (``pack``): ``(B, H/16 * W/16, 64)`` tokens.

Edit conditioning (the Edit-Plus convention, DiffSynth-Studio's ``model_fn_qwen_image``): the noisy target tokens
come first, each condition image's tokens are appended along the sequence, ``img_shapes`` lists
``(1, h/2, w/2)`` of the target then of every condition image (their RoPE frame index 1, 2, ...), and only the first
(target) tokens of the output are the velocity. With ``zero_cond_t`` (Qwen-Image-Edit-2511) the condition tokens
are modulated with timestep 0.

Flow matching (Eq. 5; diffusers' sign convention): ``x_sigma = (1 - sigma) z + sigma n`` for the clean latent ``z``
and noise ``n``, the transformer predicts ``v = n - z`` at ``sigma`` (Eq. 5's ``t = 1 - sigma`` and
``x1 - x0 = -v``: the same objective). Training follows DiffSynth-Studio's Qwen-Image recipe
(``FlowMatchScheduler("Qwen-Image")`` with ``training=True``, ``FlowMatchSFTLoss``): a uniform index into 1000
sigmas ``linspace(1, 0, 1001)[:-1]`` shifted exponentially with ``mu = 0.8`` and stretched to the terminal 0.02,
and the loss weighted by the scheduler's bell-shaped ``training_weight`` (mean 1 over the 1000 steps).

Sampling (``sample``): the Edit pipelines' Euler loop on ``FlowMatchEulerDiscreteScheduler`` (sigmas
``linspace(1, 1/n, n)``, the dynamic shift ``mu`` of the target's token count) with optional true CFG
(``true_cfg_scale`` with a negative prompt, the norm-rescaled combination of the pipeline), but at the image's
native size: the pipelines resize every condition image to about one megapixel, the paper's protocol keeps
512 x 512 (Sec. 2.5).

Backbones, one table (``BACKBONES``): ``full`` (Qwen-Image-Edit-2511's transformer and VAE config: 60 blocks of
24 x 128, the joint attention width 3584 of Qwen2.5-VL-7B), ``standin`` (a small model of the same architecture
for the CPU benchmark, pre-trained by ``standin``) and ``tiny`` (tests). ``load_backbone`` reads real weights from
a local snapshot folder; nothing downloads.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

__all__ = ["BACKBONES", "SCHEDULER_CONFIG", "LORA_TARGET_MODULES", "EditorBackbone", "build_backbone",
           "load_backbone", "save_backbone", "image_convolutions", "ImageCausalConv3d", "pack", "unpack",
           "training_sigmas", "training_weights", "folder_sha256", "WHERE_TO_GET"]

WHERE_TO_GET = ("Qwen/Qwen-Image-Edit-2511 from https://huggingface.co/Qwen/Qwen-Image-Edit-2511 "
                "(`huggingface-cli download Qwen/Qwen-Image-Edit-2511 --local-dir <folder>`)")
# The 12 module types of every transformer block that carry a LoRA (Sec. 2.5; DiffSynth-Studio's
# lora/Qwen-Image-Edit-2511.sh --lora_target_modules).
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                       "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1")
# FlowMatchEulerDiscreteScheduler of the Qwen-Image family (scheduler/scheduler_config.json of the releases)
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                    "max_shift": 0.9, "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02,
                    "time_shift_type": "exponential", "invert_sigmas": False, "stochastic_sampling": False,
                    "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_VAE_FACTOR = 8
BACKBONES = {
    "full": {"transformer": {"num_layers": 60, "attention_head_dim": 128, "num_attention_heads": 24,
                             "joint_attention_dim": 3584, "axes_dims_rope": (16, 56, 56), "zero_cond_t": True},
             "vae": {"base_dim": 96, "dim_mult": (1, 2, 4, 4), "num_res_blocks": 2},
             "text": None},
    "standin": {"transformer": {"num_layers": 4, "attention_head_dim": 32, "num_attention_heads": 2,
                                "joint_attention_dim": 64, "axes_dims_rope": (8, 12, 12), "zero_cond_t": True},
                "vae": {"base_dim": 8, "dim_mult": (1, 2, 2, 2), "num_res_blocks": 1},
                "text": {"hidden_size": 64, "layers": 2}},
    "tiny": {"transformer": {"num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 3,
                             "joint_attention_dim": 32, "axes_dims_rope": (8, 12, 12), "zero_cond_t": True},
             "vae": {"base_dim": 8, "dim_mult": (1, 2, 2, 2), "num_res_blocks": 1},
             "text": {"hidden_size": 32, "layers": 1}},
}


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` latents -> ``(B, h/2 * w/2, 4 C)`` tokens of 2 x 2 patches (``_pack_latents``)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latents must have even sides to pack 2 x 2 patches, found {h} x {w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack`` for latents of ``h x w``."""
    b, n, c4 = tokens.shape
    if n != (h // 2) * (w // 2):
        raise ValueError(f"expected {(h // 2) * (w // 2)} tokens for {h} x {w} latents, found {n}")
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def training_sigmas(n: int = 1000, mu: float = 0.8, terminal: float = 0.02) -> torch.Tensor:
    """DiffSynth-Studio's training sigmas of Qwen-Image (``FlowMatchScheduler.set_timesteps_qwen_image`` with
    ``training=True``): ``linspace(1, 0, n+1)[:-1]``, the exponential shift ``e^mu / (e^mu + 1/s - 1)`` and the
    stretch that ends them at ``terminal``; decreasing from 1 to ``terminal``, ``(n,)`` float64."""
    s = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]
    s = math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
    return 1.0 - (1.0 - s) / ((1.0 - s[-1]) / (1.0 - terminal))


def training_weights(sigmas: torch.Tensor) -> torch.Tensor:
    """DiffSynth-Studio's loss weight per training sigma (``FlowMatchScheduler.set_training_weight``): a Gaussian
    bump ``exp(-2 ((1000 s - 500) / 1000)^2)`` less its minimum, scaled to mean 1 over the sigmas."""
    y = torch.exp(-2.0 * ((sigmas * 1000.0 - 500.0) / 1000.0) ** 2)
    y = y - y.min()
    return y * (len(sigmas) / y.sum())


def folder_sha256(folder: Path) -> str:
    """One sha256 over every file of ``folder`` (relative paths and contents, sorted): a weight snapshot's digest."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


@dataclass
class Instruction:
    """Encoded instruction of one call: ``embeds`` ``(1, L, D)``, ``mask`` ``(1, L)``."""

    embeds: torch.Tensor
    mask: torch.Tensor


class EditorBackbone(nn.Module):
    """The frozen Qwen-Image-Edit components of the editor: ``transformer`` (``QwenImageTransformer2DModel``),
    ``vae`` (``AutoencoderKLQwenImage``), ``text_encoder`` (``Qwen2_5_VLForConditionalGeneration``) with its
    ``processor`` (``Qwen2VLProcessor``) and the scheduler config."""

    def __init__(self, transformer: nn.Module, vae: nn.Module, text_encoder: nn.Module, processor,
                 scheduler_config: dict | None = None):
        super().__init__()
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        image_convolutions(vae)
        self.processor = processor
        self.scheduler_config = dict(scheduler_config or SCHEDULER_CONFIG)
        z = vae.config.z_dim
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, z, 1, 1)
                     for v in (vae.config.latents_mean, vae.config.latents_std))
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_std", std, persistent=False)

    # -- latents -----------------------------------------------------------------------------------------------
    def encode(self, rgb: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> normalised latents ``(B, 16, H/8, W/8)`` (posterior mean).

        Raises:
            ValueError: sides not multiples of 16 (8 of the VAE times the 2 x 2 patches).
        """
        h, w = rgb.shape[-2:]
        if h % (2 * _VAE_FACTOR) or w % (2 * _VAE_FACTOR):
            raise ValueError(f"image sides must be multiples of {2 * _VAE_FACTOR}, found {h} x {w}")
        x = (rgb * 2.0 - 1.0).to(self.vae.dtype)[:, :, None]
        z = self.vae.encode(x).latent_dist.mode()[:, :, 0].float()
        return (z - self.latents_mean) / self.latents_std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, 16, h, w)`` -> ``(B, 3, 8 h, 8 w)`` in [0, 1] (the decoder's [-1, 1] output)."""
        z = (latents * self.latents_std + self.latents_mean).to(self.vae.dtype)[:, :, None]
        x = self.vae.decode(z).sample[:, :, 0].float()
        return (x.clamp(-1.0, 1.0) + 1.0) / 2.0

    def condition(self, images: list[torch.Tensor], target_hw: tuple[int, int]) -> tuple[torch.Tensor, list]:
        """The edit images' tokens and ``img_shapes`` for a target image of ``target_hw`` pixels: ``cond``
        ``(1, L_c, 64)`` (the images' packed latents in order) and ``[(1, h/16, w/16)]`` of the target then of
        each image."""
        with torch.no_grad():
            latents = [self.encode(im[None]) for im in images]
        h, w = target_hw
        shapes = [(1, h // 16, w // 16)] + [(1, z.shape[-2] // 2, z.shape[-1] // 2) for z in latents]
        return torch.cat([pack(z) for z in latents], dim=1), shapes

    # -- instruction -------------------------------------------------------------------------------------------
    def instruction(self, prompt: str, images: list[torch.Tensor] | None) -> Instruction:
        """The Qwen2.5-VL embedding of ``prompt`` with the condition ``images`` (``(3, h, w)`` in [0, 1]) as
        "Picture i" (the Edit-Plus prompt, ``instruction.encode_instruction``; the processor rounds each image's
        sides to the vision tower's patch grid, e.g. 512 -> 504 for Qwen2.5-VL, as its own resizing does)."""
        from .instruction import encode_instruction

        with torch.no_grad():
            embeds, mask = encode_instruction(self.text_encoder, self.processor, prompt, images, resize_to_grid=True)
        return Instruction(embeds.float(), mask)

    # -- transformer -------------------------------------------------------------------------------------------
    def velocity(self, x: torch.Tensor, cond: torch.Tensor, shapes: list[tuple[int, int, int]],
                 instruction: Instruction, sigma: torch.Tensor) -> torch.Tensor:
        """The predicted ``v = n - z`` of the target tokens ``x`` ``(B, L, 64)`` at ``sigma`` ``(B,)`` given the
        condition tokens ``cond`` ``(B, L_c, 64)`` and their ``shapes`` (target first, as ``img_shapes``)."""
        b = x.shape[0]
        hidden = torch.cat([x, cond], dim=1).to(self.transformer.dtype)
        embeds = instruction.embeds.expand(b, -1, -1).to(self.transformer.dtype)
        mask = instruction.mask.expand(b, -1)
        out = self.transformer(hidden_states=hidden, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                               timestep=sigma.to(self.transformer.dtype), img_shapes=[shapes] * b,
                               return_dict=False)[0]
        return out[:, : x.shape[1]].float()

    def flow_matching_loss(self, target: torch.Tensor, cond: torch.Tensor, shapes, instruction: Instruction,
                           generator: torch.Generator | None = None) -> torch.Tensor:
        """Eq. 5 for clean target latents ``target`` ``(B, 16, h, w)``: one DiffSynth training sigma per sample,
        the weighted MSE of the velocity over the target tokens only."""
        b = target.shape[0]
        z = pack(target)
        sigmas = training_sigmas().to(z.device)
        weights = training_weights(sigmas)
        idx = torch.randint(0, len(sigmas), (b,), generator=generator, device="cpu").to(z.device)
        sigma = sigmas[idx].float()
        noise = torch.randn(z.shape, generator=generator, device="cpu").to(z.device, z.dtype)
        x = (1.0 - sigma[:, None, None]) * z + sigma[:, None, None] * noise
        v = self.velocity(x, cond, shapes, instruction, sigma)
        per_sample = ((v - (noise - z)) ** 2).mean(dim=(1, 2))
        return (per_sample * weights[idx].float()).mean()

    def sample(self, cond: torch.Tensor, shapes, instruction: Instruction, noise: torch.Tensor, steps: int,
               true_cfg_scale: float = 1.0, negative: Instruction | None = None) -> torch.Tensor:
        """The Edit pipelines' Euler sampling from ``noise`` ``(B, L, 64)`` (packed target tokens) in ``steps``
        steps; true CFG when ``true_cfg_scale > 1`` and a ``negative`` instruction is given. Returns the packed
        clean tokens ``(B, L, 64)``.

        Raises:
            ValueError: fewer than 2 steps (the terminal stretch of the schedule is undefined for one).
        """
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        if steps < 2:
            raise ValueError(f"sampling needs at least 2 steps, found {steps}")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        cfg = self.scheduler_config
        mu = calculate_shift(noise.shape[1], cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"],
                             cfg["max_shift"])  # the Edit pipelines' resolution-dependent shift
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu, device=noise.device)
        x = noise
        for t in scheduler.timesteps:
            sigma = (t / 1000.0).expand(x.shape[0]).to(x.device)
            v = self.velocity(x, cond, shapes, instruction, sigma)
            if true_cfg_scale > 1.0 and negative is not None:
                v_neg = self.velocity(x, cond, shapes, negative, sigma)
                comb = v_neg + true_cfg_scale * (v - v_neg)
                v = comb * (v.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
            x = scheduler.step(v, t, x, return_dict=False)[0]
        return x


class ImageCausalConv3d(QwenImageCausalConv3d):
    """diffusers' ``QwenImageCausalConv3d`` that computes a one-frame input without cached frames as a 2D
    convolution with its kernel's last temporal tap (``image_convolutions``: why); same weights and state dict."""

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        k = self.kernel_size[0]
        if x.shape[2] == 1 and cache_x is None and self._padding[4] == k - 1 and self.dilation == (1, 1, 1) \
                and self.groups == 1:
            # the causal padding puts k - 1 zero frames before the frame: only the last tap meets data
            return F.conv2d(F.pad(x[:, :, 0], self._padding[:4]), self.weight[:, :, -1], self.bias,
                            self.stride[1:])[:, :, None]
        return super().forward(x, cache_x)


def image_convolutions(vae: nn.Module, enabled: bool = True) -> int:
    """Turn the causal 3D convolutions of an ``AutoencoderKLQwenImage`` into ``ImageCausalConv3d`` (in place), so
    that images (one-frame videos) go through 2D convolutions; returns how many were changed. Weights, state dict
    and outputs are unchanged, to float rounding. ``enabled=False`` turns them back into diffusers'
    ``QwenImageCausalConv3d`` (the reference that the tests and ``perf/editor_speed.py`` compare against).

    Why: the VAE encodes an image as a one-frame video, and each causal convolution pads it with
    ``kernel_size[0] - 1`` zero frames before convolving, so a 3 x 3 x 3 kernel spends two thirds of its arithmetic
    (and of its gradient's) on zeros. On the stand-in at 256 x 256 and one CPU thread, encoding an image went from
    0.156 to 0.049 s and decoding from 0.336 to 0.077 s; the LoRA editor pays them for every training pair,
    condition image and ensemble member. Videos (more than one frame) and cached frames keep diffusers' forward.
    """
    source, target = (QwenImageCausalConv3d, ImageCausalConv3d) if enabled else (ImageCausalConv3d,
                                                                                    QwenImageCausalConv3d)
    changed = 0
    for m in vae.modules():
        if type(m) is source:
            m.__class__ = target
            changed += 1
    return changed


def _image_tap_init(vae: nn.Module) -> None:
    """Initialise the VAE's causal 3D convolutions as 2D ones on their last temporal tap.

    A single frame (an image) meets only the last of a kernel's three temporal taps (the causal padding is zero),
    so PyTorch's default initialisation, scaled for all three, shrinks every layer's output and a random VAE of
    this architecture barely trains in a few hundred steps; the released VAE was likewise grown from a 2D one.
    """
    import math

    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, nn.Conv3d) and m.kernel_size[0] > 1:
                tap = torch.empty_like(m.weight[:, :, -1])
                nn.init.kaiming_uniform_(tap, a=math.sqrt(5))
                m.weight.zero_()
                m.weight[:, :, -1] = tap


def build_backbone(size: str, seed: int = 0, folder: Path | None = None) -> EditorBackbone:
    """A backbone of ``BACKBONES[size]`` with random weights (seeded), with the offline tiny tokenizer and
    processor; ``folder`` keeps the processor's files (a temporary folder if ``None``).

    Raises:
        ValueError: an unknown size, or ``full`` (its instruction encoder is Qwen2.5-VL-7B: load it from a
            snapshot with ``load_backbone``).
    """
    import tempfile

    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    from .instruction import build_tiny_processor, tiny_text_encoder

    if size not in BACKBONES:
        raise ValueError(f"unknown backbone size {size!r}; expected one of {sorted(BACKBONES)}")
    spec = BACKBONES[size]
    if spec["text"] is None:
        raise ValueError(f"backbone {size!r} has no stand-in instruction encoder; load the real snapshot "
                         f"({WHERE_TO_GET}) with load_backbone")
    torch.manual_seed(seed)
    tcfg = dict(spec["transformer"])
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16,
                                              **{**tcfg, "axes_dims_rope": tuple(tcfg["axes_dims_rope"])})
    vcfg = dict(spec["vae"])
    vae = AutoencoderKLQwenImage(z_dim=16, attn_scales=[], temperal_downsample=[False, True, True],
                                 base_dim=vcfg["base_dim"], dim_mult=list(vcfg["dim_mult"]),
                                 num_res_blocks=vcfg["num_res_blocks"])
    _image_tap_init(vae)
    folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="marbench-editor-"))
    processor = build_tiny_processor(folder / "processor")
    text_encoder = tiny_text_encoder(hidden_size=spec["text"]["hidden_size"], layers=spec["text"]["layers"],
                                     seed=seed)
    if text_encoder.config.text_config.hidden_size != tcfg["joint_attention_dim"]:
        raise ValueError(f"backbone {size!r}: the instruction encoder's width "
                         f"{text_encoder.config.text_config.hidden_size} differs from joint_attention_dim "
                         f"{tcfg['joint_attention_dim']}")
    return EditorBackbone(transformer, vae, text_encoder, processor).eval()


def save_backbone(backbone: EditorBackbone, folder: Path) -> None:
    """Write ``backbone`` in the snapshot layout of Qwen-Image-Edit (``transformer/``, ``vae/``, ``text_encoder/``,
    ``processor/``, ``scheduler/``) so that ``load_backbone`` reads it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    backbone.transformer.save_pretrained(folder / "transformer")
    backbone.vae.save_pretrained(folder / "vae")
    backbone.text_encoder.save_pretrained(folder / "text_encoder")
    backbone.processor.save_pretrained(folder / "processor")
    FlowMatchEulerDiscreteScheduler.from_config(backbone.scheduler_config).save_pretrained(folder / "scheduler")


def load_backbone(folder: str | Path, dtype: torch.dtype = torch.float32) -> EditorBackbone:
    """The backbone of a local Qwen-Image-Edit(-2509/-2511) snapshot folder (or a saved stand-in), loaded with
    ``local_files_only=True``.

    Raises:
        FileNotFoundError: the folder or one of its component folders is missing (names the expected layout and
            where users get the weights).
        ValueError: a tokenizer without Qwen's special tokens (``instruction.load_instruction_encoder``).
    """
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    from .instruction import load_instruction_encoder

    folder = Path(folder)
    needed = ("transformer", "vae", "scheduler")
    missing = [n for n in needed if not (folder / n).is_dir()]
    if not folder.is_dir() or missing:
        raise FileNotFoundError(f"Qwen-Image-Edit snapshot {folder}: expected the folders {list(needed)} with "
                                f"text_encoder/ and processor/ (or tokenizer/), missing "
                                f"{missing if folder.is_dir() else 'the folder itself'}. Get {WHERE_TO_GET}.")
    transformer = QwenImageTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype,
                                                              local_files_only=True)
    vae = AutoencoderKLQwenImage.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, local_files_only=True)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    text_encoder, processor = load_instruction_encoder(folder, dtype=dtype)
    return EditorBackbone(transformer, vae, text_encoder, processor, dict(scheduler.config)).eval()
