"""Image-domain metal mask and inpainting prior, for image-domain methods evaluated without a sinogram.

Emirdagi et al., "Leveraging Image Editing Foundation Models for Data-Efficient CT Metal Artifact Reduction"
(arXiv 2604.05934), Sec. 3.2, evaluates the DeepLesion-trained baselines (OSCNet, ADN) on AAPM images this way:
the metal mask is ``HU > 2000`` dilated by a 7 x 7 elliptical kernel, and the LI image that OSCNet expects is
approximated by OpenCV's TELEA inpainting (Telea, J. Graphics Tools 9(1), 2004) of that mask. The sinogram LI
prior (``marbench.physics.inpainting``) stays the default wherever the dataset has sinograms.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

__all__ = ["threshold_metal_mask", "telea_inpainting"]

# TELEA runs on 16-bit integers: OpenCV 5's float32 path is unstable (values outside the image range on a plain
# ramp), so HU are shifted by this offset and rounded to 1 HU.
_UINT16_HU_OFFSET = 1024.0


def threshold_metal_mask(hu: torch.Tensor, threshold_hu: float = 2000.0, kernel_size: int = 7) -> torch.Tensor:
    """Metal mask ``hu > threshold_hu`` dilated by an elliptical ``kernel_size`` structuring element.

    Args:
        hu: images ``(B, 1, H, W)`` in HU.
    Returns:
        ``(B, 1, H, W)`` bool.
    Raises:
        ValueError: ``hu`` is not ``(B, 1, H, W)`` or ``kernel_size`` is not an odd positive integer.
    """
    if hu.ndim != 4 or hu.shape[1] != 1:
        raise ValueError(f"expected images (B, 1, H, W), found {tuple(hu.shape)}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, found {kernel_size}")
    kernel = torch.from_numpy(cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel_size, kernel_size)))
    metal = (hu > threshold_hu).to(hu.dtype)
    # a binary dilation is a convolution with the structuring element, thresholded at > 0
    hits = torch.nn.functional.conv2d(metal, kernel.to(hu)[None, None], padding=kernel_size // 2)
    return hits > 0.5


def telea_inpainting(hu: torch.Tensor, mask: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """OpenCV TELEA inpainting of ``mask`` in each image, to 1 HU.

    Args:
        hu: images ``(B, 1, H, W)`` in HU, within ``[-1024, 64511]``.
        mask: ``(B, 1, H, W)`` bool, the pixels to fill.
        radius: TELEA's neighbourhood radius in pixels.
    Returns:
        ``(B, 1, H, W)`` HU, equal to ``hu`` (to 1 HU) outside the mask.
    Raises:
        ValueError: shapes differ, or values leave the 16-bit range.
    """
    if hu.shape != mask.shape or hu.ndim != 4 or hu.shape[1] != 1:
        raise ValueError(f"expected images and mask of one shape (B, 1, H, W), found {tuple(hu.shape)} and "
                         f"{tuple(mask.shape)}")
    shifted = hu.detach().cpu().double().numpy()[:, 0] + _UINT16_HU_OFFSET
    if shifted.min() < 0 or shifted.max() > 65535:
        raise ValueError(f"TELEA inpainting works on [-1024, 64511] HU, found [{hu.min().item():.0f}, "
                         f"{hu.max().item():.0f}]")
    masks = mask.detach().cpu().numpy()[:, 0].astype(np.uint8)
    out = np.stack([cv2.inpaint(np.rint(s).astype(np.uint16), m, radius, cv2.INPAINT_TELEA)
                    for s, m in zip(shifted, masks, strict=True)])
    return torch.from_numpy(out.astype(np.float32) - _UINT16_HU_OFFSET)[:, None].to(hu.device, hu.dtype)
