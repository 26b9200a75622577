"""``dudocrop``: Zhang et al., "Dual-Domain CLIP-Assisted Residual Optimization Perception Model for Metal Artifact
Reduction" (DuDoCROP).

So far its building blocks: ``irsde`` (the mean-reverting IR-SDE of Eq. 4-9: schedule, forward marginal,
optimal reverse state, maximum-likelihood loss, reverse sampler), ``unet`` (the conditional noise network of
Fig. 3b, with the image and control embeddings of DuDoCLIP as optional conditions) and ``refinement`` (the fixed
operations of the residual optimisation stage, Eq. 10-15). DuDoCLIP, the training stages and the registered
method are still to come.
"""
from .irsde import IRSDE
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
    "ConditionalUNet",
    "data_fidelity_priors",
    "fuse_priors",
    "image_prior",
    "minmax_norm",
    "refine_image_prior",
    "residual_reference",
    "sinogram_prior",
]
