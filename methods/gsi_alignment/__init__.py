"""Building blocks of the Latent GSI Alignment framework of Han, Guo, Chen, Lyu, Jin & Shen, "Reducing CT Metal
Artifacts by Learning Latent Space Alignment with Gemstone Spectral Imaging Data".

Pipeline (Sec. 3.1, Eq. 3-5): the ordinary slice stack is encoded by the artifact-reducing VAE's encoder ``E`` to
``z_n``, the alignment network maps it to ``z_bar_n = F(z_n)`` resembling the GSI latent ``z_g``, and the GSI
decoder gives the output ``S_p = D_g(z_bar_n)``.

Modules, one concept each:

* ``vae``: the artifact-reducing VAE (Sec. 3.2, Eq. 6-7): multi-slice encoder, decoders ``D_n`` and ``D_g``, the
  volume aggregation augmentation, the 25 % GSI / 75 % clean batch rule of ``D_g``, the VAE loss and the HU scale.
* ``alunet``: the alignment network ALU-Net (Sec. 3.3, Eq. 8-9) with the metal-mask and implant-type priors, and
  its plain variant (Table 1).
* ``losses``: the information invariant loss (Sec. 3.4, Eq. 10-12) and the alignment objective (Eq. 13, Sec. 5.1).
* ``method``: the registered method ``gsi-alignment`` (``GSIAlignment``): the two training stages, the Table 1
  ablation variants and the paper-vs-ours tables.

Each module's docstring walks through its equations and lists its departures and readings.
"""
from .alunet import IMPLANT_TYPES, METAL_THRESHOLD_HU, ALUNet, implant_one_hot, mask_to_grid, metal_mask
from .losses import (
    ALPHA,
    BETA,
    AlignmentLoss,
    InvarianceEncoders,
    contrastive_distances,
    contrastive_objective,
    information_invariant_loss,
    pool_embedding,
    total_loss,
)
from .method import SCALES, VARIANTS, GSIAlignment, PretrainRecipe, pretrain, pretrained
from .vae import (
    ARVAE,
    AUGMENTATIONS,
    DISPLAY_WINDOW,
    GSI_FRACTION,
    HU_RANGE,
    KL_WEIGHT,
    centre_slice,
    decoder_batch_mix,
    hu_to_unit,
    unit_to_hu,
    vae_loss,
    volume_aggregation_augment,
)

__all__ = [
    "ALPHA",
    "ARVAE",
    "AUGMENTATIONS",
    "BETA",
    "DISPLAY_WINDOW",
    "GSI_FRACTION",
    "HU_RANGE",
    "IMPLANT_TYPES",
    "KL_WEIGHT",
    "METAL_THRESHOLD_HU",
    "ALUNet",
    "GSIAlignment",
    "PretrainRecipe",
    "SCALES",
    "VARIANTS",
    "AlignmentLoss",
    "InvarianceEncoders",
    "centre_slice",
    "contrastive_distances",
    "contrastive_objective",
    "decoder_batch_mix",
    "hu_to_unit",
    "implant_one_hot",
    "information_invariant_loss",
    "mask_to_grid",
    "metal_mask",
    "pool_embedding",
    "pretrain",
    "pretrained",
    "total_loss",
    "unit_to_hu",
    "vae_loss",
    "volume_aggregation_augment",
]
