"""``lora-editor``: the LoRA image editor on Qwen-Image-Edit (Emirdagi et al., "Leveraging Image Editing Foundation
Models for Data-Efficient CT Metal Artifact Reduction", arXiv 2604.05934), with the rows of its Tables 1-4.

The method (Sec. 2):

* Representation (Sec. 2.5, ``conditioning``): HU windowed to [-500, 1300], 8 bit, grey as RGB, at the slice's
  native size; the output returns through the inverse window, so it lies in [-500, 1300] HU, and its metal pixels
  are the input's (the window saturates metal, Sec. 2.5; the AAPM protocols score images with the metal).
* Restoration (Eq. 1, 3): ``I^ = D(F_theta([E(I_src), E(r_1..r_5)], T))``: the flow-matching MMDiT samples the
  target latent conditioned on the VAE latents of the edit image(s) and on the Qwen2.5-VL embedding of the
  instruction ``T`` with the same images (``backbone``); ``conditioning`` chooses ``none`` (the reference-free
  ``F(I_src, T)``), ``multi`` (six-image call) or ``grid`` (2 x 3 tiles), Sec. 2.3.
* LoRA (Eq. 2): peft adapters ``W0 x + (alpha / r) B A x`` on the 12 module types of every block
  (``backbone.LORA_TARGET_MODULES``), rank ``r`` (64), ``alpha = r`` and the remaining DiffSynth-Studio defaults
  (peft's initialisation: A Kaiming-uniform, B zero; the paper's text says Gaussian A, "following standard
  practice", and DiffSynth's defaults, which we follow); only the LoRA parameters train.
* Training (Eq. 5, Sec. 2.5): flow-matching SFT on the clean target's latents (``EditorBackbone.flow_matching_loss``,
  DiffSynth's sigma sampling and loss weight), AdamW lr 1e-4, weight decay 0.01, batch 1, no scheduler, gradient
  checkpointing; 750 steps over ``train_pairs`` = N pairs repeated ceil(750 / N) times (each repeat in a fresh
  seeded order).
* Self-ensembling (Eq. 4): ``ensemble`` = M samples with seeds ``s_n`` averaged in pixel space (the decoded
  [0, 1] images).
* Rows: ``lora=False`` is the zero-shot row (no adapter, no training); ``output="vae-ceiling"`` is the reference
  point of Sec. 4.3 (the clean target encoded and decoded, no diffusion).

Data protocol (Sec. 3.1; CT-EditMAR): the N training pairs are a prefix of one seeded permutation of the datamodule's
``train`` part (so the N = 16 pairs are among the N = 32 ones, as ``marbench.datasets.splits.make_editmar_split``
draws them), fixed across training seeds; the datamodule's training batches only clock Lightning's steps (the
trainer's ``max_steps`` is the step budget). References are metal-free training slices of the slice's category
(the ``train`` part's ``gt_image``; with a ``references`` file of ``marbench splits editmar``, the listed ones),
five per slice chosen by ``conditioning.pick_references``.

Backbones (``scale``): ``paper`` loads a local Qwen-Image-Edit-2511 snapshot (``base``: its folder; nothing
downloads; 40 sampling steps and true CFG 4 with the negative prompt " " as the model card's example);
``smoke`` uses the pre-trained stand-in of the benchmark split (``standin``: a small model of the same
architecture, pre-trained on edits that are not MAR), 4 sampling steps, no CFG; ``tiny`` a random tiny model
(tests). Records name the backbone (``weights_info``: ``stand-in <sha256>`` or the snapshot's digest) and the LoRA
adapter's sha256.

Departures:

* Sampling runs at the native slice size; the diffusers Edit pipelines resize every condition image to ~1 MP.
* The Qwen2.5-VL condition images are the edit images themselves; the Edit-Plus pipeline gives the VL encoder
  384 x 384-area copies (its processor rounds sides to its patch grid either way).
* Sampling noise is seeded per slice id and ensemble seed, so outputs do not depend on the batch.
* The paper's prompts are quoted in part (Sec. 2.3); ``conditioning.PROMPTS`` completes them.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from marbench.datasets.batch import Batch
from marbench.method import MARMethod, MethodCard, PaperTable, put_metal_back
from marbench.physics import CTPhysics

from .backbone import LORA_TARGET_MODULES, EditorBackbone, build_backbone, folder_sha256, load_backbone, unpack
from .conditioning import MODES, N_REFERENCES, PROMPTS, condition_images, hu_to_rgb, pick_references, rgb_to_hu

__all__ = ["LoRAEditor", "OUTPUTS", "SCALES", "LORA_WEIGHT_NAME"]

OUTPUTS = ("edit", "vae-ceiling")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Sampling and backbone by scale (one table): ``paper`` (the real snapshot; the 2511 model card's 40 steps and
# true CFG 4 with negative prompt " "), ``smoke`` (the stand-in, 4 steps, no CFG; 8 before the bench budget of
# issue #16), ``tiny`` (tests).
SCALES = {
    "paper": {"backbone": "snapshot", "steps": 40, "true_cfg_scale": 4.0},
    "smoke": {"backbone": "standin", "steps": 4, "true_cfg_scale": 1.0},
    "tiny": {"backbone": "tiny", "steps": 2, "true_cfg_scale": 1.0},
}
NEGATIVE_PROMPT = " "

_PAPER = ("Emirdagi et al., 'Leveraging Image Editing Foundation Models for Data-Efficient CT Metal Artifact "
          "Reduction' (arXiv 2604.05934)")
_NOTE = ("paper: Qwen-Image-Edit-2511 (20B) with LoRA on the 1,000-slice CT-MAR test set at 512 x 512, trained on "
         "H100s; ours: a stand-in backbone (a small model of the same architecture pre-trained on non-MAR edits "
         "of the smoke training split, not the paper's model) on the synthetic smoke benchmark at 256 x 256, 8 "
         "sampling steps, no CFG: compare orders, not values")
# Tables 1-4: PSNR, SSIM, FID, FID-Rad, LPIPS, LPIPS-Rad
_VALUES = {
    "Qwen-Image-Edit Zero-Shot": (4.21, 0.1325, 193.66, 0.832, 0.3706, 0.7609),
    "LoRA (N=128, r=64, no refs)": (31.61, 0.8717, 5.81, 0.0038, 0.1062, 0.0437),
    "LoRA (N=128, r=64, multi-refs)": (34.60, 0.8829, 4.91, 0.0031, 0.0926, 0.0371),
    "LoRA (N=128, r=64, multi-refs, ens-10)": (35.51, 0.8966, 5.33, 0.0037, 0.0972, 0.0391),
    "VAE ceiling": (38.57, 0.9313, 0.74, 0.0002, 0.0375, 0.0080),
    "N=16": (28.25, 0.8272, 7.18, 0.0050, 0.1232, 0.0649),
    "N=32": (30.14, 0.8535, 5.91, 0.0038, 0.1033, 0.0432),
    "N=64": (31.41, 0.8681, 5.22, 0.0033, 0.0951, 0.0388),
    "N=128": (31.61, 0.8717, 5.81, 0.0038, 0.1062, 0.0437),
    "r=16": (25.60, 0.7603, 9.45, 0.0073, 0.2049, 0.1320),
    "r=32": (26.85, 0.7792, 7.85, 0.0057, 0.1773, 0.0985),
    "r=64": (31.61, 0.8717, 5.81, 0.0038, 0.1062, 0.0437),
    "r=128": (30.49, 0.8588, 7.48, 0.0056, 0.1076, 0.0552),
    "None": (31.61, 0.8717, 5.81, 0.0038, 0.1062, 0.0437),
    "Grid": (28.18, 0.8256, 7.31, 0.0040, 0.1083, 0.0539),
    "Multi": (34.60, 0.8829, 4.91, 0.0031, 0.0926, 0.0371),
}
_TABLES = {
    "editor-main": ("Table 1 (1,000-slice CT-MAR test set)", (
        ("lora-editor-zero-shot", "Qwen-Image-Edit Zero-Shot"), ("lora-editor", "LoRA (N=128, r=64, no refs)"),
        ("lora-editor-multi", "LoRA (N=128, r=64, multi-refs)"),
        ("lora-editor-multi-ens10", "LoRA (N=128, r=64, multi-refs, ens-10)"),
        ("lora-editor-vae-ceiling", "VAE ceiling"))),
    "editor-train-size": ("Table 2 (training set size, r = 64, no references)", (
        ("lora-editor-n16", "N=16"), ("lora-editor-n32", "N=32"), ("lora-editor-n64", "N=64"),
        ("lora-editor", "N=128"))),
    "editor-rank": ("Table 3 (LoRA rank, N = 128, no references)", (
        ("lora-editor-r16", "r=16"), ("lora-editor-r32", "r=32"), ("lora-editor", "r=64"),
        ("lora-editor-r128", "r=128"))),
    "editor-conditioning": ("Table 4 (reference conditioning, N = 128, r = 64)", (
        ("lora-editor", "None"), ("lora-editor-grid", "Grid"), ("lora-editor-multi", "Multi"))),
}


def _paper_tables() -> tuple[PaperTable, ...]:
    tables = []
    for name, (source, rows) in _TABLES.items():
        labels = [label for _, label in rows]
        tables.append(PaperTable(name=name, source=f"{_PAPER}, {source}", protocol="editmar", rows=rows,
                                 values={k: {"psnr": _VALUES[k][0], "ssim": _VALUES[k][1]} for k in labels},
                                 order_metric="psnr", note=_NOTE))
        tables.append(PaperTable(name=f"{name}-perceptual", source=f"{_PAPER}, {source}", protocol="perceptual",
                                 rows=rows,
                                 values={k: {"fid": _VALUES[k][2], "fid_rad": _VALUES[k][3], "lpips": _VALUES[k][4],
                                             "lpips_rad": _VALUES[k][5]} for k in labels},
                                 order_metric="lpips", note=_NOTE))
    return tuple(tables)


def _seed_of(*parts) -> int:
    return int(hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:15], 16)


class LoRAEditor(MARMethod):
    """The LoRA image editor (see the module docstring).

    Args:
        conditioning: ``none``, ``multi`` or ``grid`` (Sec. 2.3).
        lora: adapt the backbone with LoRA and train (``False``: the zero-shot row).
        rank: LoRA rank r (Table 3: 16, 32, 64, 128); ``alpha``: its scale numerator (``None``: ``rank``).
        train_pairs: N training pairs (Table 2: 16, 32, 64, 128).
        lr, weight_decay: AdamW (1e-4, 0.01).
        ensemble: M samples averaged (Eq. 4); ``ensemble_seeds``: their seeds (default ``0..M-1``).
        output: ``edit`` or ``vae-ceiling`` (the clean target through the VAE, Sec. 4.3).
        scale: ``paper``, ``smoke`` or ``tiny`` (``SCALES``): backbone and sampling defaults.
        base: the local Qwen-Image-Edit(-2511) snapshot folder (``paper`` scale); ``base_dtype``: its weights'
            dtype (``bfloat16`` as released and trained by DiffSynth-Studio, or ``float32``).
        steps, true_cfg_scale: sampling steps and true CFG scale (``None``: the scale's).
        gradient_checkpointing: recompute block activations in training (Sec. 2.5).
        lora_weights, lora_sha256: a trained adapter (diffusers/peft LoRA safetensors) and its digest, loaded
            instead of training (a reviewer's re-run of a published row).
        references: a reference file of ``marbench splits editmar`` (``<case> <ref1> ... <ref5>``); ``None``: the
            datamodule's training part.
        pair_seed: the permutation whose prefixes are the N-pair subsets (fixed across training seeds).
        sample_seed: offset of the ensemble seeds.
    Raises:
        ValueError: unknown ``conditioning``, ``output`` or ``scale``; non-positive rank, N or M; ``paper`` scale
            without ``base``.
    """

    card = MethodCard(
        name="lora-editor", paper=_PAPER, inputs=("ma_image", "metal_mask", "slice_id", "category"),
        trainable=True, training_inputs=("gt_image",),
        metal="window [-500, 1300] HU saturates metal; metal-mask pixels take the input's values (metal put back)",
        departures=("CPU benchmark: a stand-in backbone of the same architecture pre-trained on non-MAR edits of "
                    "the training split (not Qwen-Image-Edit-2511's weights)",
                    "sampling at the native slice size (the diffusers pipelines resize conditions to ~1 MP)",
                    "prompts completed from the parts the paper quotes",
                    "sampling noise seeded per slice id and ensemble seed"),
    )
    paper_tables = _paper_tables()
    test_time_args = ("ensemble", "ensemble_seeds", "sample_seed")

    def __init__(self, conditioning: str = "none", lora: bool = True, rank: int = 64, alpha: float | None = None,
                 train_pairs: int = 128, lr: float = 1e-4, weight_decay: float = 0.01, ensemble: int = 1,
                 ensemble_seeds: list[int] | None = None, output: str = "edit", scale: str = "paper",
                 base: str | None = None, base_dtype: str = "bfloat16", steps: int | None = None,
                 true_cfg_scale: float | None = None, gradient_checkpointing: bool = True,
                 lora_weights: str | None = None, lora_sha256: str | None = None, references: str | None = None,
                 pair_seed: int = 0, sample_seed: int = 0):
        super().__init__()
        if conditioning not in MODES:
            raise ValueError(f"lora-editor: unknown conditioning {conditioning!r}; expected one of {MODES}")
        if output not in OUTPUTS:
            raise ValueError(f"lora-editor: unknown output {output!r}; expected one of {OUTPUTS}")
        if scale not in SCALES:
            raise ValueError(f"lora-editor: unknown scale {scale!r}; expected one of {sorted(SCALES)}")
        for name, value in (("rank", rank), ("train_pairs", train_pairs), ("ensemble", ensemble)):
            if int(value) < 1:
                raise ValueError(f"lora-editor: {name} must be >= 1, found {value}")
        if steps is not None and int(steps) < 2:
            raise ValueError(f"lora-editor: steps must be >= 2, found {steps}")
        if ensemble_seeds is not None and len(ensemble_seeds) != ensemble:
            raise ValueError(f"lora-editor: {ensemble} ensemble seeds expected, found {len(ensemble_seeds)}")
        if base_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"lora-editor: base_dtype must be 'bfloat16' or 'float32', found {base_dtype!r}")
        if scale == "paper" and not base:
            raise ValueError("lora-editor: the paper scale needs `base`, the folder of a local Qwen-Image-Edit-2511 "
                             "snapshot (https://huggingface.co/Qwen/Qwen-Image-Edit-2511)")
        self.save_hyperparameters()
        hp = self.hparams
        hp.steps = SCALES[scale]["steps"] if steps is None else int(steps)
        hp.true_cfg_scale = SCALES[scale]["true_cfg_scale"] if true_cfg_scale is None else float(true_cfg_scale)
        self.seeds = list(ensemble_seeds) if ensemble_seeds is not None else [sample_seed + m for m in range(ensemble)]
        self.trains = bool(lora) and output == "edit" and lora_weights is None
        self.card = self._row_card()
        self.backbone: EditorBackbone | None = None
        self._backbone_digest = ""
        self._pending_state: dict | None = None
        self._pool: dict[str, dict[str, torch.Tensor]] | None = None  # category -> slice id -> (1, H, W) HU
        self._reference_file: dict[str, list[str]] | None = None  # read on first use
        self._pairs: list[dict] = []
        self._cache: dict[str, tuple] = {}
        if SCALES[scale]["backbone"] == "tiny":  # no data needed: build now (tests, the contract instance)
            self._attach(build_backbone("tiny", seed=0), "random")

    def _row_card(self) -> MethodCard:
        hp = self.hparams
        if hp.output == "vae-ceiling":
            return replace(self.card, name="lora-editor-vae-ceiling", inputs=("gt_image",), trainable=False,
                           training_inputs=(), puts_metal_back=False, metal="no metal (the metal-free target)",
                           paper="(reference point of " + _PAPER + ", Sec. 4.3: the clean target through the VAE)")
        if not hp.lora:
            name = "lora-editor-zero-shot"
        else:
            name = "lora-editor" + ("" if hp.conditioning == "none" else f"-{hp.conditioning}")
            name += "" if hp.train_pairs == 128 else f"-n{hp.train_pairs}"
            name += "" if hp.rank == 64 else f"-r{hp.rank}"
            name += "" if hp.ensemble == 1 else f"-ens{hp.ensemble}"
        return replace(self.card, name=name, trainable=self.trains)

    @classmethod
    def contract_instance(cls) -> "LoRAEditor":
        return cls(scale="tiny", rank=4, train_pairs=2)

    # -- backbone ----------------------------------------------------------------------------------------------
    def _attach(self, backbone: EditorBackbone, digest: str) -> None:
        from peft import LoraConfig

        backbone.requires_grad_(False)
        if self.hparams.lora and self.hparams.output == "edit":
            hp = self.hparams
            config = LoraConfig(r=hp.rank, lora_alpha=hp.alpha if hp.alpha is not None else hp.rank,
                                target_modules=list(LORA_TARGET_MODULES))
            backbone.transformer.add_adapter(config)
        self.backbone, self._backbone_digest = backbone, digest
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)
        if self.hparams.lora_weights:
            self.load_lora(self.hparams.lora_weights, self.hparams.lora_sha256)

    def setup(self, stage: str | None = None) -> None:
        if self.backbone is None:
            kind = SCALES[self.hparams.scale]["backbone"]
            if kind == "snapshot":
                dtype = getattr(torch, self.hparams.base_dtype)
                self._attach(load_backbone(self.hparams.base, dtype), folder_sha256(Path(self.hparams.base)))
            else:
                from .standin import standin_backbone

                backbone, sha = standin_backbone(self._datamodule())
                self._attach(backbone, f"stand-in {sha}")

    def _datamodule(self):
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "dataset"):
            raise ValueError("lora-editor: the stand-in backbone, the training pairs and the reference pool come "
                             "from the datamodule's 'train' part; run it under a Trainer with a datamodule of the "
                             "suite (AAPMCTMARDataModule)")
        return dm

    def weights_info(self) -> dict[str, str]:
        info = {"backbone": self._backbone_digest or "not built"}
        if self.backbone is not None and self.hparams.lora and self.hparams.output == "edit":
            with tempfile.TemporaryDirectory() as tmp:
                info["lora (peft safetensors)"] = self.save_lora(tmp)
        return info

    # -- LoRA state: checkpoints hold the adapters only (the backbone is frozen and loaded from its folder) -----
    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        return type(state)((k, v) for k, v in state.items() if "lora_" in k)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.backbone is None:  # adapters exist once the backbone is built (``setup``): apply them then
            self._pending_state = dict(state_dict)
            return None
        own = set(self.state_dict())
        found = set(state_dict)
        if strict and own != found:
            raise RuntimeError(f"lora-editor: the state holds {len(found)} LoRA tensors, the model "
                               f"{len(own)}; missing {sorted(own - found)[:3]}, unexpected {sorted(found - own)[:3]}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def save_lora(self, folder: str | Path) -> str:
        """Write the adapter as diffusers LoRA safetensors (``folder/pytorch_lora_weights.safetensors``: peft's
        state dict under the ``transformer.`` prefix as the Qwen-Image pipelines' ``save_lora_weights`` writes it,
        read by their ``lora_state_dict`` / ``load_lora_into_transformer``, and the LoRA config as
        ``lora_adapter_metadata``); returns its sha256.

        The config is written with sorted keys and target modules (peft keeps them in a set, whose order changes
        between processes), and as the only metadata entry (safetensors writes several in hash-map order), so the
        same adapter always gives the same file and digest.
        """
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save

        from marbench.files import atomic_write

        transformer = self.backbone.transformer
        state = {f"transformer.{k}": v.detach().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
        config = transformer.peft_config["default"].to_dict()
        config["target_modules"] = sorted(config["target_modules"])
        metadata = {"lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True, default=str)}
        payload = save(state, metadata=metadata)
        atomic_write(Path(folder) / LORA_WEIGHT_NAME, payload)
        return hashlib.sha256(payload).hexdigest()

    def load_lora(self, path: str | Path, sha256: str | None = None) -> None:
        """Load an adapter written by ``save_lora`` (a folder or the safetensors file), checking its sha256.

        Raises:
            FileNotFoundError: no such file; ValueError: another digest, or tensors that do not fit the adapter.
        """
        from safetensors.torch import load_file

        from marbench.files import sha256_file

        path = Path(path)
        file = path / LORA_WEIGHT_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"LoRA adapter {file} not found; expected a file written by save_lora "
                                    f"({LORA_WEIGHT_NAME})")
        if sha256 is not None and sha256_file(file) != sha256.lower():
            raise ValueError(f"{file}: sha256 {sha256_file(file)} differs from the expected {sha256}")
        state = {k.removeprefix("transformer."): v for k, v in load_file(file).items()}
        current = self.backbone.transformer.state_dict()
        own = {k.replace(".default", ""): k for k in current if "lora_" in k}
        wrong = sorted(set(state) ^ set(own)) or [k for k in state if state[k].shape != current[own[k]].shape]
        if wrong:
            raise ValueError(f"{file}: expected {len(own)} LoRA tensors of rank {self.hparams.rank} on "
                             f"{len(LORA_TARGET_MODULES)} module types per block, found {len(state)} that differ "
                             f"(e.g. {wrong[:2]})")
        self.backbone.transformer.load_state_dict({own[k]: v for k, v in state.items()}, strict=False)

    # -- data: pairs and references ----------------------------------------------------------------------------
    @staticmethod
    def _read_references(path: str) -> dict[str, list[str]]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"reference file {path} not found; write it with `marbench splits editmar`")
        out = {}
        for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
            text = line.split("#", 1)[0].split()
            if not text:
                continue
            if len(text) != 1 + N_REFERENCES:
                raise ValueError(f"{path}:{number}: expected '<case> <ref1> ... <ref{N_REFERENCES}>', found "
                                 f"{len(text)} fields")
            out[text[0]] = text[1:]
        return out

    def set_reference_pool(self, pool: dict[str, dict[str, torch.Tensor]]) -> None:
        """The clean reference slices: category -> slice id -> ``(1, H, W)`` HU (metal-free)."""
        self._pool = pool

    def _reference_pool(self) -> dict[str, dict[str, torch.Tensor]]:
        if self._pool is None:
            train = self._datamodule().dataset("train", ("gt_image",))
            pool: dict[str, dict[str, torch.Tensor]] = {}
            for i in range(len(train)):
                item = train[i]
                pool.setdefault(item["category"], {})[item["slice_id"]] = item["gt_image"]
            self._pool = pool
        return self._pool

    def _clean_slices(self, ids: list[str]) -> list[torch.Tensor]:
        """The metal-free images ``(1, H, W)`` HU of cases of the datamodule's root, by id (a reference file's
        cases need not be in any part of the split: the CT-EditMAR pools draw from every non-test slice)."""
        from marbench.datasets.aapm import AAPMCTMARDataset
        from marbench.datasets.aapm_format import discover_cases

        dm = self._datamodule()
        found = {c.case_id: c for a, g in dm.geometries.items() for c in discover_cases(dm.root, a, g)}
        missing = [i for i in ids if i not in found]
        if missing:
            raise ValueError(f"{self.hparams.references}: reference case(s) {missing} not found under {dm.root}")
        data = AAPMCTMARDataset(dm.root, [found[i] for i in ids], ("gt_image",))
        return [data[k]["gt_image"] for k in range(len(ids))]

    def references(self, slice_id: str, category: str) -> torch.Tensor | None:
        """The five clean references of a slice ``(5, 3, H, W)`` in the editor's representation (``None`` for
        ``none`` conditioning).

        Raises:
            ValueError: fewer than five references of the category (expected vs found).
        """
        if self.hparams.conditioning == "none":
            return None
        pool = self._reference_pool()
        if self.hparams.references and self._reference_file is None:
            self._reference_file = self._read_references(self.hparams.references)
        if self._reference_file is not None and slice_id in self._reference_file:
            images = self._clean_slices(self._reference_file[slice_id])
        else:
            members = pool.get(category, {})
            ids = pick_references(slice_id, list(members), N_REFERENCES, self.hparams.pair_seed)
            images = [members[r] for r in ids]
        return hu_to_rgb(torch.stack(images).to(self.device))

    def _conditioned(self, slice_id: str, category: str, ma_hu: torch.Tensor) -> tuple:
        """Condition tokens ``(1, L_c, 64)``, ``img_shapes``, the instruction and the condition images of one
        slice (cached by id)."""
        if slice_id in self._cache:
            return self._cache[slice_id]
        source = hu_to_rgb(ma_hu[None].to(self.device))[0]
        images = condition_images(self.hparams.conditioning, source, self.references(slice_id, category))
        cond, shapes = self.backbone.condition(images, source.shape[-2:])
        entry = (cond, shapes, self.backbone.instruction(PROMPTS[self.hparams.conditioning], images), images)
        self._cache[slice_id] = entry
        return entry

    def _training_pairs(self) -> list[dict]:
        if not self._pairs:
            train = self._datamodule().dataset("train", ("ma_image", "gt_image"))
            n = self.hparams.train_pairs
            if len(train) < n:
                raise ValueError(f"lora-editor: train_pairs={n} but the datamodule's training part has "
                                 f"{len(train)} slices")
            order = np.random.default_rng(self.hparams.pair_seed).permutation(len(train))[:n]
            for i in sorted(int(j) for j in order):
                item = train[i]
                with torch.no_grad():
                    target = self.backbone.encode(hu_to_rgb(item["gt_image"][None].to(self.device)))
                self._pairs.append({"slice_id": item["slice_id"], "category": item["category"],
                                    "ma_image": item["ma_image"], "target": target})
        return self._pairs

    # -- training ----------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.hparams.gradient_checkpointing:
            self.backbone.transformer.enable_gradient_checkpointing()

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def pair_at(self, step: int) -> dict:
        """The training pair of optimiser step ``step``: the N pairs repeated, each repeat in an order drawn from
        the run's seed and the repeat's index (Sec. 2.5: the dataset repeated ceil(750 / N) times)."""
        pairs = self._training_pairs()
        repeat, k = divmod(step, len(pairs))
        seed = _seed_of("order", self._run_seed(), repeat)
        return pairs[int(np.random.default_rng(seed).permutation(len(pairs))[k])]

    @staticmethod
    def _run_seed() -> int:
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if not self.trains:
            raise ValueError(f"{self.card.name}: this row does not train (zero-shot, VAE ceiling or loaded LoRA)")
        pair = self.pair_at(self.global_step)
        cond, shapes, instruction, _ = self._conditioned(pair["slice_id"], pair["category"], pair["ma_image"])
        g = torch.Generator().manual_seed(_seed_of("noise", self._run_seed(), self.global_step))
        loss = self.backbone.flow_matching_loss(pair["target"], cond, shapes, instruction, g)
        self.log("train/flow_matching", loss, prog_bar=True, batch_size=1)
        return loss

    def on_train_end(self) -> None:
        if self.hparams.gradient_checkpointing:
            self.backbone.transformer.disable_gradient_checkpointing()

    # -- inference ---------------------------------------------------------------------------------------------
    def restore(self, batch: Batch, physics: CTPhysics) -> torch.Tensor:
        if self.backbone is None:
            raise ValueError("lora-editor: the backbone is built in setup(); call it (a Trainer does) first")
        hp = self.hparams
        if hp.output == "vae-ceiling":
            with torch.no_grad():
                rgb = self.backbone.decode(self.backbone.encode(hu_to_rgb(batch["gt_image"])))
            return rgb_to_hu(rgb)
        out = []
        for i, slice_id in enumerate(batch["slice_id"]):
            out.append(self.restore_slice(slice_id, batch["category"][i], batch["ma_image"][i]))
        return put_metal_back(torch.stack(out), batch)

    @torch.no_grad()
    def restore_slice(self, slice_id: str, category: str, ma_hu: torch.Tensor) -> torch.Tensor:
        """One slice ``(1, H, W)`` HU -> its restored ``(1, H, W)`` HU: the mean of the M decoded samples (Eq. 4)."""
        hp = self.hparams
        cond, shapes, instruction, images = self._conditioned(slice_id, category, ma_hu)
        # the pipeline's negative prompt is encoded with the same condition images
        negative = self.backbone.instruction(NEGATIVE_PROMPT, images) if hp.true_cfg_scale > 1.0 else None
        h, w = shapes[0][1], shapes[0][2]
        noise = torch.stack([torch.randn((h * w, 64), generator=torch.Generator().manual_seed(_seed_of(slice_id, s)))
                             for s in self.seeds]).to(self.device)
        m = noise.shape[0]
        tokens = self.backbone.sample(cond.expand(m, -1, -1), shapes, instruction, noise, hp.steps,
                                      hp.true_cfg_scale, negative)
        rgb = self.backbone.decode(unpack(tokens, 2 * h, 2 * w))
        return rgb_to_hu(rgb.mean(dim=0, keepdim=True))[0]

