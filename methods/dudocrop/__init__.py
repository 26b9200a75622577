"""``dudocrop``: Zhang et al., "Dual-Domain CLIP-Assisted Residual Optimization Perception Model for Metal Artifact
Reduction" (DuDoCROP), registered as the method ``dudocrop`` (``method.DuDoCROP``) with the rows of its Table V,
Fig. 12 and Table II ablations.

Modules, one concept each: ``clip`` (DuDoCLIP: frozen CLIP, control net, dual-domain contrastive loss of
Eq. 2-3), ``captions`` (the content and QSPD texts of its prompt engineering, from the metal mask and tissue
labels, or a caption file), ``irsde`` (the mean-reverting IR-SDE of Eq. 4-9), ``unet`` (the conditional noise
network of Fig. 3b), ``refinement`` (the fixed operations of the residual optimisation stage, Eq. 10-15) and
``method`` (the three training stages and the test pipeline, Algorithms 1-2).
"""
from .captions import CaptionFile, batch_captions
from .clip import DuDoCLIP
from .irsde import IRSDE
from .method import OUTPUTS, DuDoCROP
from .refinement import (
    data_fidelity_priors,
    fuse_priors,
    image_prior,
    minmax_norm,
    refine_image_prior,
    residual_reference,
    sinogram_prior,
)
from .unet import ConditionalUNet

__all__ = [
    "IRSDE",
    "OUTPUTS",
    "CaptionFile",
    "ConditionalUNet",
    "DuDoCLIP",
    "DuDoCROP",
    "batch_captions",
    "data_fidelity_priors",
    "fuse_priors",
    "image_prior",
    "minmax_norm",
    "refine_image_prior",
    "residual_reference",
    "sinogram_prior",
]
