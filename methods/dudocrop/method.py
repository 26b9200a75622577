"""``dudocrop``: the registered DuDoCROP method (Zhang et al., "Dual-Domain CLIP-Assisted Residual Optimization
Perception Model for Metal Artifact Reduction"): three cascaded training stages (Eq. 17, Algorithm 1) and the test
pipeline of Algorithm 2, with the rows of its Table V, Fig. 12 and Table II ablations as arguments.

Stages (one Lightning fit; the stage of a step follows from ``global_step`` and ``stage_steps``, so a run resumed
from a checkpoint continues in the right stage):

1. **DuDoCLIP** (``clip.DuDoCLIP``, Sec. III.B.1, Eq. 2-3): the control net is fitted by the dual-domain
   contrastive loss on metal-affected images ``X_ma`` and sinograms ``Y_ma`` against the content captions ``T1``
   and the QSPD metal captions ``T2`` (``captions``; or a user's caption file); AdamW, lr 2e-5 (Sec. IV.B.2).
   Skipped when neither embedding guides the IR-SDEs (Fig. 12's baseline).
2. **Dual-domain IR-SDE** (``irsde.IRSDE`` with ``unet.ConditionalUNet``, Sec. III.B.2, Eq. 4-9): the
   sinogram-domain model ``Theta1`` restores ``Y_ma`` towards ``Y_ref`` and the image-domain model ``Theta2``
   ``X_ma`` towards ``X_ref``, each guided by the frozen DuDoCLIP's image embedding ``e^{I1}`` (cross-attention)
   and control embedding ``e^{I2}`` (added to the time embedding) of its own domain's full input; L1 loss of
   Eq. 9 on random crops (images also randomly rotated by multiples of 90 degrees), AdamW 2e-4, betas
   (0.9, 0.99), cosine annealing (Sec. IV.B.2). Both models step together under one optimiser. Every
   sinogram crop of a slice with metal is centred on its metal trace (where Eq. 10 uses the model).
3. **One-step residual optimisation** (``refinement``, Sec. III.C, Eq. 10-16): the frozen ``Theta1``, ``Theta2``
   give ``Y_p`` (Eq. 10), ``X'_p = FBP(Y_p)`` and ``X_p = Norm_{X'_p}(eps_Theta2(X_ma))`` (Eq. 11-12) for
   training slices; the residual-domain IR-SDE ``Theta3`` (no embeddings: "the conventional IR-SDE") restores
   ``X_p - X'_p`` towards ``X_p - X_ref`` (Eq. 16).

Inference (Algorithm 2), batched over slices with one network call per reverse step and domain (the projector
runs only for the metal trace, Eq. 10 and the FBP): sample ``Theta1`` from ``Y_ma``, ``Theta2`` from ``X_ma``,
Eq. 10-12, sample ``Theta3`` from ``X_p - X'_p``, Eq. 13-15: ``X_o = alpha X^_p + beta X'_p``. ``output``
selects the row of Table V: ``image`` (``eps_Theta2(X_ma)``, w/o normalisation), ``image-norm`` (``X_p``, Eq. 12),
``sinogram`` (``FBP(eps_Theta1(Y_ma))``, w/o fidelity), ``sinogram-fidelity`` (``X'_p``), ``fusion`` (Eq. 15 with
``X^_p = X_p``, no residual refinement) and ``full`` (Eq. 13-15). Each row trains only the models its output uses.

Representation (Sec. IV.A: "attenuation normalised to [0, 1]"): images enter the networks as the CT window
[-1024, 3072] HU mapped to [0, 1] (``window``: the metal saturates at 1; its pixels are put back at the end);
sinograms as line integrals divided by ``line_integral_scale``; residuals in the image networks' unit
(attenuation differences over ``mu_water * 4.096``, the window's width). Outputs return through the same maps.

Departures and readings:

* Texts: deterministic templates from the metal mask, tissue labels and category instead of LLaVA-v1.5-13b
  (``captions``), or a user's caption file (``caption_file``); ``prompts="direct"`` is Table II's "w/o prompt
  engineering".
* Weights: CLIP from a local file with its sha256 (``clip_weights``); without one a seeded random CLIP, marked
  ``random`` in the record. The smoke benchmark uses a smaller CLIP of the same architecture (``clip_cfg``) and
  small IR-SDE networks, short schedules and ``T`` (the configs state them); the paper: ViT-B-32, ``T = 100``,
  70,000 iterations per IR-SDE.
* Eq. 15's ``alpha``, ``beta`` and Eq. 13's ``k`` are "manually adjusted" in the paper, values not given:
  arguments (defaults 0.5, 0.5, 0.5).
* Stage 3 trains on the residuals of the first ``residual_slices`` training slices it meets (their priors are
  sampled once and kept; the paper does not say how many), not on every slice of every epoch: each prior costs
  two full reverse processes.
* Sampling noise is drawn per slice from a generator seeded by the slice id, so a slice's output does not depend
  on the other slices of its batch, and two evaluations agree bit for bit.
* Every IR-SDE samples with the reference's start noise of std ``lambda`` (see ``irsde``); the smoke scale uses
  ``irsde``'s posterior sampler, because Euler-Maruyama of Eq. 5 diverges at its ``T = 4``. The posterior
  sampler's last step returns ``predicted_x0`` at ``t = 1``, which multiplies the noise network's error by
  ``sqrt(v_1) exp(gbar_1)``; ``exp(gbar_1)`` is 7.2 at ``T = 2``, 2.6 at 3 and 1.7 at 4 (cosine schedule,
  ``eps = 0.005``), so the smoke networks' errors swamp the image below ``T = 4`` (a smoke run at ``T = 2`` gave
  image-domain outputs of -45,000 to 82,000 HU).
* The U-Net predicts ``F_0 - mu`` and the noise follows from it (``DuDoCROP.noise``: the noise of ``F_t`` under
  ``F_0 = mu + r_Theta``); its output layer starts at zero, so the untrained model returns its input, as the
  suite's other learned methods start from theirs. The reference's network predicts the noise directly, whose
  error the posterior sampler's ``F^_0`` multiplies by ``sqrt(v_t) exp(gbar_t)`` (39 at ``t = T = 4``).
* The smoke and tiny scales train with ``IRSDE.loss(kind="x0")``: Eq. 9 of the posterior sampler's step with
  every ``t`` weighted alike (the paper scale: Eq. 9 of the Euler step). Measured on the smoke benchmark, 150
  steps of the sinogram model alone, 4 test slices (their uncorrected FBPs: 99-1,430 HU RMSE):
  - a noise-predicting network and Eq. 9: the samples kept noise of 2.3 line-integral units where
    ``Y_ma = Y_ref`` (outside the metal trace; 0.7 ``lambda``); their FBPs 1,550-1,810 HU;
  - this network and loss: 0.01 units there, but no gain in the trace (half of the crops on it); 99-1,430 HU;
  - and every crop on the trace (``_crop``): 0.1-0.3 units outside it; inside it, on the three slices with large
    implants, 1.5-4.4 units from ``Y_ref`` where ``Y_ma`` is 5.8-7.9 away; 104-1,140 HU.
  The image model alone went from 650-790 HU to 92-470 HU.
* ``X'_p = FBP(Y_p)`` is clipped to the image networks' window (``WINDOW_HU``), as every image is when
  normalised to Sec. IV.A's [0, 1]. Eq. 11 maps onto the minimum and maximum of ``X'_p``: unclipped, the
  leftover metal streaks of a smoke sinogram model set them (-27,000 to 58,000 HU on one slice), and Eq. 12 put
  the whole image on that range (an image-domain row's error was 3,300 HU).
* The inference metal mask is the dataset's by default (``metal_mask_source="threshold"``: the paper's
  thresholding of clinical data); the metal trace is ``fp(mask) > 0``.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace

import torch
import torch.nn as nn

from marbench.converters import hu_to_mu, mu_to_hu, window
from marbench.datasets.batch import Batch
from marbench.method import MARMethod, MethodCard, PaperTable
from marbench.physics import CTPhysics, Projector

from .captions import PROMPT_MODES, CaptionFile, batch_captions
from .clip import DEFAULT_MODEL, DuDoCLIP
from .irsde import IRSDE, LOSSES, SAMPLERS
from .refinement import data_fidelity_priors, fuse_priors
from .unet import ConditionalUNet

__all__ = ["DuDoCROP", "OUTPUTS", "SCALES", "STAGES"]

OUTPUTS = ("image", "image-norm", "sinogram", "sinogram-fidelity", "fusion", "full")
STAGES = ("clip", "sde", "residual")
# the IR-SDE models each output samples (Table V: single-domain rows use one domain; Eq. 12 needs X'_p)
_DOMAINS = {"image": ("image",), "image-norm": ("image", "sinogram"), "sinogram": ("sinogram",),
            "sinogram-fidelity": ("sinogram",), "fusion": ("image", "sinogram"),
            "full": ("image", "sinogram", "residual")}
_OUTPUT_SUFFIX = {"image": "-image-sde", "image-norm": "-image-sde-norm", "sinogram": "-sino-sde",
                  "sinogram-fidelity": "-sino-sde-fidelity", "fusion": "-fusion", "full": ""}
_EMBEDDING_SUFFIX = {(True, True): "", (True, False): "-image-embedding", (False, True): "-control-embedding",
                     (False, False): "-no-embedding"}
# CT window of the image networks (Sec. IV.A's [0, 1] attenuation): the 12-bit range of stored CT
WINDOW_HU = (-1024.0, 3072.0)

_PAPER = ("Zhang et al., 'Dual-Domain CLIP-Assisted Residual Optimization Perception Model for Metal Artifact "
          "Reduction' (DuDoCROP)")
_TABLE_V_ROWS = (
    ("dudocrop-image-sde-no-embedding", "Image-domain IR-SDE (w/o Normalization)"),
    ("dudocrop-image-sde-norm-no-embedding", "Image-domain IR-SDE (w/ Normalization)"),
    ("dudocrop-sino-sde-no-embedding", "Sino-domain IR-SDE (w/o Fidelity)"),
    ("dudocrop-sino-sde-fidelity-no-embedding", "Sino-domain IR-SDE (w/ Fidelity)"),
    ("dudocrop-fusion", "Dual-domain Priors Fusion"),
    ("dudocrop", "Residual Refining (w/ Normalization) + Dual-domain Priors Fusion"),
)
_TABLE_V = {  # PSNR, SSIM, LPIPS x 100 (mean over the body test set)
    "Image-domain IR-SDE (w/o Normalization)": (32.91, 0.646, 4.76),
    "Image-domain IR-SDE (w/ Normalization)": (36.21, 0.953, 1.01),
    "Sino-domain IR-SDE (w/o Fidelity)": (23.81, 0.926, 8.49),
    "Sino-domain IR-SDE (w/ Fidelity)": (39.74, 0.951, 3.90),
    "Dual-domain Priors Fusion": (42.57, 0.979, 0.48),
    "Residual Refining (w/ Normalization) + Dual-domain Priors Fusion": (44.32, 0.979, 0.40),
}
_SMOKE_NOTE = ("paper: a body CT set at 512 x 512, ViT-B-32 CLIP fine-tuned from pre-trained weights, T = 100 and "
               "70,000 iterations per IR-SDE on a GPU; ours: the synthetic smoke benchmark at 256 x 256 with a "
               "random small CLIP, small IR-SDE networks and a short CPU schedule (configs/bench/dudocrop*.yaml)")


# Sizes and schedules by scale, one table (pyiqa's default-settings table): ``paper`` (Sec. IV.B.2: ViT-B-32,
# T = 100, the reference U-Net, 256 x 256 crops, lr 2e-5 / 2e-4; the step counts read from its epochs and
# iterations), ``smoke`` (the CPU smoke benchmark of `make bench`: a 4-layer CLIP of width 128, T = 4 with the
# posterior sampler (Euler-Maruyama is unstable at so few steps, see ``irsde``; fewer steps diverge, see the
# module docstring), a 4-channel U-Net of five levels so that its spatial transformer sees 1/16 of the sinogram,
# 64 x 64 crops and 180 steps, halved from 360 for the bench budget of issue #16) and ``tiny`` (tests and the
# contract instance).
SMOKE_CLIP_CFG = {"embed_dim": 512,
                  "vision_cfg": {"image_size": 224, "layers": 4, "width": 128, "patch_size": 32, "head_width": 32},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4}}
TINY_CLIP_CFG = {"embed_dim": 32,
                 "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "patch_size": 32, "head_width": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
SCALES = {
    "paper": {"T": 100, "sampler": "euler", "sde_loss": "eq9", "base": 64, "mults": (1, 2, 4, 8),
              "transformer_levels": 1, "head_dim": 32, "crop": 256,
              "stage_steps": (15000, 70000, 70000), "clip_lr": 2e-5, "sde_lr": 2e-4, "residual_slices": 3003,
              "clip_cfg": None},
    "smoke": {"T": 4, "sampler": "posterior", "sde_loss": "x0", "base": 4, "mults": (1, 2, 4, 4, 8),
              "transformer_levels": 1, "head_dim": 4, "crop": 64,
              "stage_steps": (10, 150, 20), "clip_lr": 1e-4, "sde_lr": 2e-3, "residual_slices": 4,
              "clip_cfg": SMOKE_CLIP_CFG},
    "tiny": {"T": 2, "sampler": "posterior", "sde_loss": "x0", "base": 4, "mults": (1, 2), "transformer_levels": 1,
             "head_dim": 4, "crop": 32,
             "stage_steps": (2, 2, 2), "clip_lr": 1e-3, "sde_lr": 1e-3, "residual_slices": 2,
             "clip_cfg": TINY_CLIP_CFG},
}


def _rows(batch: Batch, rows) -> Batch:
    """The sub-batch of ``rows`` (a LongTensor or list of indices): tensors indexed, per-slice lists picked."""
    rows = [int(i) for i in rows]
    return {k: (v[rows] if isinstance(v, torch.Tensor) else [v[i] for i in rows]) for k, v in batch.items()}


def _slice_seed(slice_id: str, domain: str, seed: int) -> int:
    digest = hashlib.sha256(f"{slice_id}|{domain}|{seed}".encode()).hexdigest()
    return int(digest[:15], 16)


class DuDoCROP(MARMethod):
    """DuDoCROP (see the module docstring).

    Args:
        output: the row's output, one of ``OUTPUTS`` (Table V).
        image_embedding, control_embedding: guide the image- and sinogram-domain IR-SDEs by DuDoCLIP's ``e^{I1}``
            (cross-attention) / ``e^{I2}`` (time embedding) (Fig. 12).
        prompts: ``"qspd"`` (prompt engineering: content + QSPD captions) or ``"direct"`` (Table II's "w/o
            prompt engineering").
        caption_file: a JSON caption file (``captions.CaptionFile``) used instead of the templates.
        scale: the row of ``SCALES`` (``paper``, ``smoke``, ``tiny``) that sets every size and schedule argument
            left ``None`` below.
        clip_model, clip_cfg, clip_weights, clip_sha256: DuDoCLIP's open_clip architecture, an optional smaller
            config of it, a local weight file and its sha256 (``clip.DuDoCLIP``).
        T, lambda_255, sde_eps: the IR-SDE (paper: 100, 50, reference eps 0.005).
        sampler: ``"euler"`` (Eq. 5, the paper's) or ``"posterior"`` (``IRSDE.sample``: stable at few steps).
        sde_loss: ``"eq9"`` (Eq. 9, the paper's) or ``"x0"`` (``IRSDE.loss``: Eq. 9 of the posterior sampler's
            step with every ``t`` weighted alike).
        base, mults, transformer_levels, head_dim: the conditional U-Net of each IR-SDE (reference: 64,
            (1, 2, 4, 8), 1, 32).
        crop: training crop size (paper: 256); images and sinograms smaller than it are used whole.
        stage_steps: optimiser steps of the stages ``(clip, sde, residual)``; a stage the row does not use gets
            none, and the trainer's ``max_steps`` must equal the sum of the used ones.
        clip_lr, sde_lr: AdamW learning rates (paper: 2e-5, 2e-4).
        residual_slices: training slices whose priors stage 3 samples and keeps.
        k, alpha, beta: Eq. 13 and Eq. 15 factors in [0, 1].
        line_integral_scale: sinograms are divided by it for the sinogram IR-SDE.
        metal_mask_source, metal_threshold_hu: ``"dataset"`` or ``"threshold"`` (``ma_image > threshold``).
        sample_seed: seed of the per-slice sampling noise.
    Raises:
        ValueError: an unknown ``output``/``prompts``/``scale``/``sampler``/``sde_loss``/``metal_mask_source``; factors
            outside [0, 1]; negative or missing stage steps; ``trainer.max_steps`` not the sum of the used
            stages (at ``fit``).
    """

    card = MethodCard(
        name="dudocrop", paper=_PAPER,
        inputs=("ma_image", "ma_sinogram", "metal_mask", "geometry", "slice_id"), trainable=True,
        training_inputs=("gt_image", "gt_sinogram", "tissue_labels", "fov_mm", "anatomy", "category"),
        departures=("captions from templates over the metal mask, tissue labels and category (or a caption file) "
                    "instead of LLaVA-v1.5-13b",
                    "CLIP weights from a local file; without one a seeded random CLIP (smoke: a smaller CLIP of "
                    "the same architecture)",
                    "smoke scale: small IR-SDE networks, few steps T, short stage schedules (see the config)",
                    "k, alpha, beta not given in the paper: arguments (0.5 each by default)",
                    "stage 3 trains on the priors of the first residual_slices training slices",
                    "sampling noise seeded per slice id"),
    )
    paper_tables = (
        PaperTable(name="dudocrop-ablation", source=_PAPER + ", Table V (body test set)", protocol="aapm-hu",
                   rows=_TABLE_V_ROWS,
                   values={k: {"psnr": v[0], "ssim": v[1]} for k, v in _TABLE_V.items()},
                   order_metric="psnr", note=_SMOKE_NOTE + "; PSNR/SSIM on the AAPM scale of the aapm-hu protocol"),
        PaperTable(name="dudocrop-ablation-lpips", source=_PAPER + ", Table V (LPIPS x 100 / 100)",
                   protocol="perceptual", rows=_TABLE_V_ROWS,
                   values={k: {"lpips": v[2] / 100} for k, v in _TABLE_V.items()}, order_metric="lpips",
                   note=_SMOKE_NOTE),
        PaperTable(name="dudocrop-prompts", source=_PAPER + ", Table II (perceptual indicators of DuDoCLIP)",
                   protocol="perceptual-indicators",
                   rows=(("dudocrop-direct-prompts", "w/o prompt engineering"), ("dudocrop", "w/ prompt engineering")),
                   values={"w/o prompt engineering": {"pi_q": 0.48, "pi_s": 0.13},
                           "w/ prompt engineering": {"pi_q": 0.36, "pi_s": 0.10}},
                   order_metric="pi_q", note=_SMOKE_NOTE + "; the paper's PI values are on its own metal sweeps"),
    )

    def __init__(self, output: str = "full", image_embedding: bool = True, control_embedding: bool = True,
                 prompts: str = "qspd", caption_file: str | None = None, scale: str = "paper",
                 clip_model: str = DEFAULT_MODEL, clip_cfg: dict | None = None, clip_weights: str | None = None,
                 clip_sha256: str | None = None, T: int | None = None, sampler: str | None = None,
                 sde_loss: str | None = None, lambda_255: float = 50.0,
                 sde_eps: float = 0.005, base: int | None = None, mults: tuple[int, ...] | None = None,
                 transformer_levels: int | None = None, head_dim: int | None = None, crop: int | None = None,
                 stage_steps: tuple[int, int, int] | None = None, clip_lr: float | None = None,
                 sde_lr: float | None = None, residual_slices: int | None = None, k: float = 0.5,
                 alpha: float = 0.5, beta: float = 0.5, line_integral_scale: float = 16.0,
                 metal_mask_source: str = "dataset", metal_threshold_hu: float = 2000.0, sample_seed: int = 0):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"dudocrop: unknown output {output!r}; expected one of {OUTPUTS}")
        if prompts not in PROMPT_MODES:
            raise ValueError(f"dudocrop: unknown prompts {prompts!r}; expected one of {PROMPT_MODES}")
        if metal_mask_source not in ("dataset", "threshold"):
            raise ValueError(f"dudocrop: metal_mask_source must be 'dataset' or 'threshold', found "
                             f"{metal_mask_source!r}")
        for name, value in (("k", k), ("alpha", alpha), ("beta", beta)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"dudocrop: {name} must be in [0, 1], found {value}")
        if scale not in SCALES:
            raise ValueError(f"dudocrop: unknown scale {scale!r}; expected one of {sorted(SCALES)}")
        self.save_hyperparameters()
        # the scale's table fills every size left unset; the resolved values are the record's hyperparameters
        given = {"T": T, "sampler": sampler, "sde_loss": sde_loss, "base": base, "mults": mults,
                 "transformer_levels": transformer_levels, "head_dim": head_dim, "crop": crop,
                 "stage_steps": stage_steps, "clip_lr": clip_lr, "sde_lr": sde_lr,
                 "residual_slices": residual_slices, "clip_cfg": clip_cfg}
        for key, value in given.items():
            self.hparams[key] = SCALES[scale][key] if value is None else value
        hp = self.hparams
        hp.mults, hp.stage_steps = tuple(int(m) for m in hp.mults), tuple(int(n) for n in hp.stage_steps)
        if hp.sampler not in SAMPLERS:
            raise ValueError(f"dudocrop: unknown sampler {hp.sampler!r}; expected one of {SAMPLERS}")
        if hp.sde_loss not in LOSSES:
            raise ValueError(f"dudocrop: unknown sde_loss {hp.sde_loss!r}; expected one of {LOSSES}")
        if len(hp.stage_steps) != 3 or min(hp.stage_steps) < 0:
            raise ValueError(f"dudocrop: stage_steps must be three non-negative step counts {STAGES}, found "
                             f"{hp.stage_steps}")
        self.automatic_optimization = False
        self.domains = _DOMAINS[output]
        self.uses_clip = bool(image_embedding or control_embedding)
        self.card = self._row_card(output, image_embedding, control_embedding, prompts, metal_mask_source)
        used = {"clip": self.uses_clip, "sde": True, "residual": "residual" in self.domains}
        self.schedule = [(s, n) for s, n in zip(STAGES, hp.stage_steps, strict=True) if used[s]]

        self.clip = (DuDoCLIP(clip_model, clip_weights, clip_sha256, model_cfg=hp.clip_cfg)
                     if self.uses_clip else None)
        context_dim = self.clip.embed_dim if self.clip is not None else 512
        self.sde = IRSDE(T=hp.T, lambda_255=lambda_255, eps=sde_eps)

        def network(guided: bool) -> ConditionalUNet:
            return ConditionalUNet(1, hp.base, hp.mults, context_dim=context_dim,
                                   use_image_context=guided and image_embedding,
                                   use_control=guided and control_embedding,
                                   transformer_levels=hp.transformer_levels, head_dim=hp.head_dim)

        self.nets = nn.ModuleDict({d: network(d != "residual") for d in self.domains})
        for net in self.nets.values():  # the noise of "F_0 = mu" at initialisation (see ``noise``)
            nn.init.zeros_(net.final_conv.weight)
            nn.init.zeros_(net.final_conv.bias)
        self._captions = CaptionFile(caption_file) if caption_file else None
        self._text_cache: dict[str, torch.Tensor] = {}
        self._residual_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _row_card(output, image_embedding, control_embedding, prompts, metal_mask_source) -> MethodCard:
        name = ("dudocrop" + _OUTPUT_SUFFIX[output] + _EMBEDDING_SUFFIX[(bool(image_embedding),
                                                                        bool(control_embedding))]
                + ("-direct-prompts" if prompts == "direct" else ""))
        card = replace(DuDoCROP.card, name=name)
        if output == "image":  # the image-domain IR-SDE alone reads neither the sinogram nor the geometry
            card = replace(card, inputs=("ma_image", "metal_mask", "slice_id"))
        if metal_mask_source == "threshold":
            card = replace(card, inputs=tuple(k for k in card.inputs if k != "metal_mask"), puts_metal_back=False)
        return card

    @classmethod
    def contract_instance(cls) -> "DuDoCROP":
        return cls(scale="tiny")

    def weights_info(self) -> dict[str, str]:
        if self.clip is None:
            return {}
        info = self.clip.weights_info()
        cfg = self.hparams.clip_cfg
        if cfg is not None:  # a smaller config of the named architecture: say so beside its weights
            v = cfg["vision_cfg"]
            note = f"smaller config: visual width {v['width']}, {v['layers']} layers"
            info = {f"{k} ({note})": digest for k, digest in info.items()}
        return info

    # -- representation ----------------------------------------------------------------------------------------
    @staticmethod
    def image_to_unit(hu: torch.Tensor) -> torch.Tensor:
        """``(B, 1, N, N)`` HU -> the image networks' [0, 1] (the window ``WINDOW_HU``)."""
        return window(hu, *WINDOW_HU)

    @staticmethod
    def unit_to_mu(unit: torch.Tensor, mu_water_per_mm: float) -> torch.Tensor:
        """Inverse of ``image_to_unit`` into attenuation (mm^-1)."""
        low, high = WINDOW_HU
        return hu_to_mu(low + unit * (high - low), mu_water_per_mm)

    @staticmethod
    def residual_unit(mu_water_per_mm: float) -> float:
        """Attenuation (mm^-1) of one unit of the image networks' scale (the window's width)."""
        return mu_water_per_mm * (WINDOW_HU[1] - WINDOW_HU[0]) / 1000.0

    # -- DuDoCLIP ----------------------------------------------------------------------------------------------
    def _embeddings(self, x01: torch.Tensor) -> dict[str, torch.Tensor]:
        """The U-Net conditions of one domain's ``(B, 1, H, W)`` inputs in [0, 1]: DuDoCLIP's frozen embeddings."""
        if self.clip is None:
            return {}
        with torch.no_grad():
            e1, e2 = self.clip.encode_image(x01)
        cond = {}
        if self.hparams.image_embedding:
            cond["image_embedding"] = e1
        if self.hparams.control_embedding:
            cond["control_embedding"] = e2
        return cond

    def _text_embeddings(self, texts: list[str]) -> torch.Tensor:
        new = sorted({t for t in texts if t not in self._text_cache})
        if new:
            for text, e in zip(new, self.clip.encode_text(new), strict=True):
                self._text_cache[text] = e.detach()
        return torch.stack([self._text_cache[t].to(self.device) for t in texts])

    def _inputs(self, batch: Batch, domain: str, key: str = "ma") -> torch.Tensor:
        if domain == "image":
            return self.image_to_unit(batch[f"{key}_image"])
        return batch[f"{key}_sinogram"] / self.hparams.line_integral_scale

    def clip_loss(self, batch: Batch) -> torch.Tensor:
        """Eq. 3 on one batch: both domains' metal-affected inputs against their captions."""
        images, texts = {}, {}
        for domain in ("image", "sinogram"):
            t1, t2 = batch_captions(batch, domain, self.hparams.prompts, self._captions)
            images[domain] = self.clip.encode_image(self._inputs(batch, domain))
            texts[domain] = (self._text_embeddings(t1), self._text_embeddings(t2))
        return self.clip.contrastive_loss(images, texts)

    # -- IR-SDE training -----------------------------------------------------------------------------------------
    def noise(self, domain: str, xt: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """``eps_Theta(F_t, mu, t)``: the noise of the state ``F_t`` under ``F_0 = mu + r_Theta(F_t, mu, t, e^{I1},
        e^{I2})`` (Eq. 6: ``(F_t - m_t) / sqrt(v_t)``), with ``r_Theta`` the domain's U-Net, whose output
        convolution starts at zero.

        The network predicts the clean state's difference to ``mu``; ``IRSDE.predicted_x0`` returns
        ``mu + r_Theta`` exactly. A network predicting the noise itself has its error multiplied by
        ``sqrt(v_t) exp(gbar_t)`` in ``F^_0`` (39 at ``t = T = 4``); the untrained model is the exact reverse
        process towards ``F_0 = mu`` (it returns the metal-affected input), as the suite's other learned methods
        start from their inputs. Every noise function can be written so: training learns the same function.
        """
        return self.sde.true_noise(xt, mu + self.nets[domain](xt, mu, t, **cond), mu, t)

    def _crop(self, x0: torch.Tensor, mu: torch.Tensor, rotate: bool,
              focus: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A random ``crop x crop`` window per slice of ``x0`` and ``mu`` (``(B, 1, H, W)``), for images also
        rotated by a multiple of 90 degrees. With a bool ``focus`` ``(B, 1, H, W)`` (the metal trace), the window of
        a slice with a trace is centred on one of its pixels: the sinogram model restores the trace, and Eq. 10
        uses it nowhere else (uniform windows seldom hold much of it; with half of the windows on the trace, 150
        smoke steps left the sampled trace as far from ``Y_ref`` as ``Y_ma`` was, with all of them 2-3x closer)."""
        h, w = x0.shape[-2:]
        c = self.hparams.crop
        ch, cw = min(c, h), min(c, w)
        pairs = []
        for i in range(x0.shape[0]):
            if focus is not None and focus[i].any():
                pixels = focus[i, 0].nonzero()
                r, q = pixels[int(torch.randint(0, len(pixels), ()))].tolist()
                top, left = min(max(r - ch // 2, 0), h - ch), min(max(q - cw // 2, 0), w - cw)
            else:
                top, left = int(torch.randint(0, h - ch + 1, ())), int(torch.randint(0, w - cw + 1, ()))
            pair = [s[i:i + 1, :, top:top + ch, left:left + cw] for s in (x0, mu)]
            if rotate:
                quarter = int(torch.randint(0, 4, ()))
                pair = [torch.rot90(s, quarter, dims=(-2, -1)) for s in pair]
            pairs.append(pair)
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    def _sde_loss(self, domain: str, x0: torch.Tensor, mu: torch.Tensor, cond: dict, rotate: bool,
                  focus: torch.Tensor | None = None) -> torch.Tensor:
        x0, mu = self._crop(x0, mu, rotate, focus)
        t = self.sde.random_timesteps(x0.shape[0], device=x0.device)
        xt = self.sde.sample_xt(x0, mu, t, torch.randn_like(x0))
        return self.sde.loss(self.noise(domain, xt, mu, t, **cond), xt, x0, mu, t, kind=self.hparams.sde_loss)

    def sde_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Eq. 9 for the image- and sinogram-domain IR-SDEs the row uses: ``{domain: loss}``."""
        out = {}
        for domain in ("image", "sinogram"):
            if domain in self.nets:
                mu = self._inputs(batch, domain, "ma")
                focus = batch.get("metal_trace") if domain == "sinogram" else None
                out[domain] = self._sde_loss(domain, self._inputs(batch, domain, "gt"), mu, self._embeddings(mu),
                                             rotate=domain == "image", focus=focus)
        return out

    def residual_loss(self, batch: Batch) -> torch.Tensor:
        """Eq. 16: the residual-domain IR-SDE on ``X_p - X'_p`` towards ``X_p - X_ref`` of cached training slices."""
        self._cache_residuals(batch)
        ids = sorted(self._residual_cache)
        pick = torch.randint(0, len(ids), (batch["ma_image"].shape[0],))
        mu = torch.stack([self._residual_cache[ids[i]][0] for i in pick.tolist()]).to(self.device)
        x0 = torch.stack([self._residual_cache[ids[i]][1] for i in pick.tolist()]).to(self.device)
        return self._sde_loss("residual", x0, mu, {}, rotate=True)

    @torch.no_grad()
    def _cache_residuals(self, batch: Batch) -> None:
        room = self.hparams.residual_slices - len(self._residual_cache)
        new = [i for i, s in enumerate(batch["slice_id"]) if s not in self._residual_cache][:max(room, 0)]
        if not new and self._residual_cache:
            return
        if not new:
            raise ValueError("dudocrop: residual_slices must be >= 1 for the residual stage")
        sub = _rows(batch, new)
        for projector, idx in self.physics.groups(sub):
            part = _rows(sub, idx)
            _, x_pp, x_p = self._priors(part, projector, part["metal_mask"])
            unit = self.residual_unit(projector.geometry.mu_water_per_mm)
            x_ref = hu_to_mu(part["gt_image"], projector.geometry.mu_water_per_mm)
            for j, slice_id in enumerate(part["slice_id"]):
                self._residual_cache[slice_id] = (((x_p[j] - x_pp[j]) / unit).cpu(), ((x_p[j] - x_ref[j]) / unit).cpu())

    # -- Lightning -----------------------------------------------------------------------------------------------
    def stage_at(self, step: int) -> str:
        """The stage (one of ``STAGES``) of optimiser step ``step`` (0-based); the last stage after the schedule."""
        for stage, n in self.schedule:
            if step < n:
                return stage
            step -= n
        return self.schedule[-1][0]

    def on_fit_start(self) -> None:
        expected = sum(n for _, n in self.schedule)
        found = self.trainer.max_steps
        if found != expected:
            raise ValueError(f"dudocrop {self.card.name}: trainer.max_steps must be the sum of the used stages "
                             f"{dict(self.schedule)} = {expected}, found {found}")

    def configure_optimizers(self):
        optimizers, schedulers = [], []
        for stage, n in self.schedule:
            if stage == "clip":
                opt = torch.optim.AdamW(self.clip.trainable_parameters(), lr=self.hparams.clip_lr)
            else:
                nets = [d for d in self.nets if (d == "residual") == (stage == "residual")]
                params = [p for d in nets for p in self.nets[d].parameters()]
                opt = torch.optim.AdamW(params, lr=self.hparams.sde_lr, betas=(0.9, 0.99))
                schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(n, 1)))
            optimizers.append(opt)
        return optimizers, schedulers

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        stage = self.stage_at(self.global_step)
        position = [s for s, _ in self.schedule].index(stage)
        optimizers = self.optimizers()
        opt = optimizers[position] if isinstance(optimizers, list) else optimizers
        n = batch["ma_image"].shape[0]
        if stage == "clip":
            loss = self.clip_loss(batch)
            parts = {"con": loss}
        elif stage == "sde":
            parts = self.sde_losses(batch)
            loss = sum(parts.values())
        else:
            loss = self.residual_loss(batch)
            parts = {"residual": loss}
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        if stage != "clip":
            schedulers = self.lr_schedulers()
            schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
            schedulers[position - (1 if self.uses_clip else 0)].step()
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=n)
        self.log_dict({f"train_{stage}_{k}": v.detach() for k, v in parts.items()}, batch_size=n)
        return loss

    # -- inference -----------------------------------------------------------------------------------------------
    def _sample(self, domain: str, mu: torch.Tensor, cond: dict, slice_ids: list[str]) -> torch.Tensor:
        generators = [torch.Generator(mu.device).manual_seed(_slice_seed(s, domain, self.hparams.sample_seed))
                      for s in slice_ids]
        return self.sde.sample(mu, lambda xt, m, t, **c: self.noise(domain, xt, m, t, **c), cond,
                               generator=generators, sampler=self.hparams.sampler)

    def _priors(self, batch: Batch, projector: Projector, metal: torch.Tensor):
        """``(Y_p, X'_p, X_p)`` of Eq. 10-12 for one geometry's slices (``X_p`` None without the image model;
        ``Y_p`` is ``FBP``-ready line integrals, ``X'_p``/``X_p`` attenuation in mm^-1)."""
        ids = list(batch["slice_id"])
        mu_w = projector.geometry.mu_water_per_mm
        y01 = self._inputs(batch, "sinogram")
        y_sde = self._sample("sinogram", y01, self._embeddings(y01), ids) * self.hparams.line_integral_scale
        x_sde = None
        if "image" in self.nets:
            x01 = self._inputs(batch, "image")
            x_sde = self.unit_to_mu(self._sample("image", x01, self._embeddings(x01), ids), mu_w)
        window_mu = tuple(hu_to_mu(v, mu_w) for v in WINDOW_HU)
        if x_sde is None:
            y_p, x_pp, _ = data_fidelity_priors(projector, batch["ma_sinogram"], y_sde, metal,
                                                torch.zeros_like(batch["ma_image"]), image_range=window_mu)
            return y_p, x_pp, None
        return data_fidelity_priors(projector, batch["ma_sinogram"], y_sde, metal, x_sde, image_range=window_mu)

    def reconstruct(self, batch: Batch, projector: Projector | None, metal: torch.Tensor) -> torch.Tensor:
        """The row's output image ``(B, 1, N, N)`` in mm^-1 for one geometry's slices (``projector`` None only for
        ``output="image"``, whose ``mu_water`` is then the batch geometry's)."""
        output, ids = self.hparams.output, list(batch["slice_id"])
        if output == "image":
            x01 = self._inputs(batch, "image")
            return self.unit_to_mu(self._sample("image", x01, self._embeddings(x01), ids),
                                   projector.geometry.mu_water_per_mm)
        if output == "sinogram":
            y01 = self._inputs(batch, "sinogram")
            y_sde = self._sample("sinogram", y01, self._embeddings(y01), ids) * self.hparams.line_integral_scale
            return projector.fbp(y_sde)
        _, x_pp, x_p = self._priors(batch, projector, metal)
        if output == "sinogram-fidelity":
            return x_pp
        if output == "image-norm":
            return x_p
        if output == "fusion":
            return self.hparams.alpha * x_p + self.hparams.beta * x_pp
        unit = self.residual_unit(projector.geometry.mu_water_per_mm)
        refined = self._sample("residual", (x_p - x_pp) / unit, {}, ids) * unit
        return fuse_priors(x_p, x_pp, refined, self.hparams.k, self.hparams.alpha, self.hparams.beta)

    def inference_metal_mask(self, batch: Batch) -> torch.Tensor:
        """The bool ``(B, 1, N, N)`` metal mask inference uses (see ``metal_mask_source``)."""
        if self.hparams.metal_mask_source == "threshold":
            return batch["ma_image"] > self.hparams.metal_threshold_hu
        return batch["metal_mask"]

    def restore(self, batch: Batch, physics: CTPhysics) -> torch.Tensor:
        ma = batch["ma_image"]
        metal = self.inference_metal_mask(batch)
        out = torch.empty_like(ma)
        if self.hparams.output == "image" and "geometry" not in batch:
            # the image-domain row needs no projector; water's attenuation cancels in HU -> mu -> HU
            x01 = self._inputs(batch, "image")
            unit = self._sample("image", x01, self._embeddings(x01), list(batch["slice_id"]))
            low, high = WINDOW_HU
            out = low + unit * (high - low)
        else:
            for p, idx in physics.groups(batch):
                mu = self.reconstruct(_rows(batch, idx), p, metal[idx])
                out[idx] = mu_to_hu(mu, p.geometry.mu_water_per_mm)
        return torch.where(metal, ma, out)


