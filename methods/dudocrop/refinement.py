"""The fixed (non-learned) operations of DuDoCROP's one-step residual optimisation (OSRO) stage (Zhang et al.,
"Dual-Domain CLIP-Assisted Residual Optimization Perception Model for Metal Artifact Reduction", Sec. III.C,
Eq. 10-15, Algorithms 1-2).

* Eq. 10, raw-data fidelity: ``Y_p = eps_Theta1(Y_ma) * M_s + Y_ma * (1 - M_s)``: inside the metal trace ``M_s`` the
  sinogram-domain IR-SDE output, outside the measured metal-affected sinogram (here bit for bit: a select, not
  the arithmetic blend). ``X'_p = FBP(Y_p)`` keeps the scale of the raw data but carries secondary artifacts.
* Eq. 11, ``Norm_delta(Delta) = (Delta - min Delta) / (max Delta - min Delta) (max delta - min delta) + min delta``:
  min-max normalisation of ``Delta`` onto the range of the reference ``delta``.
* Eq. 12, ``X_p = Norm_{X'_p}(eps_Theta2(X_ma))``: the image-domain IR-SDE output moved onto the range of
  ``X'_p`` (the "fidelity" of the raw data's scale).
* Stage-3 training pairs (Alg. 1, OSRD 2): input ``X_r^in = X_p - X'_p``, reference ``X_r^ref = X_p - X_ref``;
  the residual-domain IR-SDE ``eps_Theta3`` restores ``X_r^in`` towards ``X_r^ref`` (Eq. 16), i.e. it estimates
  the error of the image prior ``X_p``.
* Eq. 13, ``X^_p = X_p - k Norm_{(X_p - X'_p)}(X^_r)`` with ``X^_r = eps_Theta3(X_p - X'_p)`` and ``k`` in [0, 1]:
  the refined residual, on the range of the input residual, scaled by ``k`` and removed from ``X_p``.
* Eq. 14, ``X^_p <- Norm_{X_p}(X^_p)``: back onto ``X_p``'s range.
* Eq. 15, ``X_o = alpha X^_p + beta X'_p`` with ``alpha, beta`` in [0, 1] ("manual-adjusted", values not given;
  not constrained to ``alpha + beta = 1``).

Units: ``Y_ma`` and the IR-SDE sinogram must be in the same units (line integrals: de-normalise the sinogram
IR-SDE's [0, 1] output before Eq. 10); ``X'_p = FBP(Y_p)`` is attenuation in mm^-1, and Eq. 12 puts ``X_p`` (and
with Eq. 13-15 ``X_o``) in those units whatever the scale of the image-domain IR-SDE.

Readings: ``min``/``max`` of Eq. 11 are taken per slice (over ``C, H, W``); a constant ``Delta`` (Eq. 11
undefined) maps to the midpoint of ``delta``'s range. The metal trace is the suite's ``fp(metal_mask) > 0``
(``marbench.physics.metal_trace``); the paper thresholds ``Y_ma``.
"""
from __future__ import annotations

import torch

from marbench.physics import Projector, metal_trace
from marbench.physics.validation import check_image, check_mask, check_sinogram

__all__ = ["data_fidelity_priors", "fuse_priors", "image_prior", "minmax_norm", "refine_image_prior",
           "residual_reference", "sinogram_prior"]


def _check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape {tuple(ref.shape)}, found {type(x).__name__}")
    if x.shape != ref.shape:
        raise ValueError(f"{name}: expected the shape of {ref_name} {tuple(ref.shape)}, found {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, found dtype {x.dtype}")


def _check_factor(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a factor in [0, 1], found {value!r}")
    return float(value)


def sinogram_prior(ma_sinogram: torch.Tensor, sde_sinogram: torch.Tensor, trace: torch.Tensor) -> torch.Tensor:
    """Sinogram-domain prior with raw-data fidelity ``Y_p`` (Eq. 10).

    Args:
        ma_sinogram: ``(B, 1, V, C)`` measured metal-affected sinogram ``Y_ma`` (line integrals).
        sde_sinogram: ``(B, 1, V, C)`` sinogram-domain IR-SDE output ``eps_Theta1(Y_ma)``, same units.
        trace: bool ``(B, 1, V, C)`` metal trace ``M_s``.
    Returns:
        ``(B, 1, V, C)``: ``sde_sinogram`` inside the trace, ``ma_sinogram`` outside (bit for bit).
    Raises:
        ValueError: a sinogram that is not ``(B, 1, V, C)`` float and finite, mismatching shapes, a trace that is
            not bool or on another grid or batch.
    """
    if not isinstance(ma_sinogram, torch.Tensor) or ma_sinogram.ndim != 4:
        found = tuple(ma_sinogram.shape) if isinstance(ma_sinogram, torch.Tensor) else type(ma_sinogram).__name__
        raise ValueError(f"ma_sinogram: expected a (B, 1, V, C) tensor, found {found}")
    grid = tuple(ma_sinogram.shape[-2:])
    check_sinogram(ma_sinogram, grid, "ma_sinogram")
    _check_same("sde_sinogram", sde_sinogram, "ma_sinogram", ma_sinogram)
    check_sinogram(sde_sinogram, grid, "sde_sinogram")
    check_mask(trace, grid, "metal_trace", "sinogram")
    if trace.shape[0] != ma_sinogram.shape[0]:
        raise ValueError(f"metal_trace: expected batch {ma_sinogram.shape[0]}, found {trace.shape[0]}")
    return torch.where(trace, sde_sinogram.to(ma_sinogram.dtype), ma_sinogram)


def minmax_norm(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``Norm_delta(Delta)`` of Eq. 11: ``x`` (``Delta``) min-max normalised onto the range of ``reference``
    (``delta``), per slice.

    Args:
        x: ``(B, ...)`` values to normalise.
        reference: ``(B, ...)`` reference, same shape.
    Returns:
        ``x``'s shape: an affine map of each slice whose minimum is exactly ``min(reference)`` and maximum exactly
        ``max(reference)`` (``torch.lerp`` is exact at both ends); a constant slice maps to the midpoint of the
        reference's range.
    Raises:
        ValueError: mismatching shapes, non-float input, fewer than 2 dimensions.
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        found = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"minmax_norm: expected a (B, ...) tensor, found {found}")
    if not x.is_floating_point():
        raise ValueError(f"minmax_norm: expected a floating-point tensor, found dtype {x.dtype}")
    _check_same("minmax_norm reference", reference, "x", x)
    dims = tuple(range(1, x.ndim))
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    ref = reference.to(x.dtype)
    ref_lo, ref_hi = ref.amin(dim=dims, keepdim=True), ref.amax(dim=dims, keepdim=True)
    span = hi - lo
    flat = span == 0
    weight = torch.where(flat, torch.full_like(x, 0.5), (x - lo) / torch.where(flat, torch.ones_like(span), span))
    return torch.lerp(ref_lo, ref_hi, weight)


def image_prior(sde_image: torch.Tensor, sinogram_prior_image: torch.Tensor) -> torch.Tensor:
    """Image-domain prior ``X_p = Norm_{X'_p}(eps_Theta2(X_ma))`` (Eq. 12).

    Args:
        sde_image: ``(B, 1, N, N)`` image-domain IR-SDE output (any scale, e.g. [0, 1]).
        sinogram_prior_image: ``(B, 1, N, N)`` ``X'_p = FBP(Y_p)`` (mm^-1).
    Returns:
        ``(B, 1, N, N)`` on ``X'_p``'s range, per slice.
    Raises:
        ValueError: mismatching shapes.
    """
    return minmax_norm(sde_image, sinogram_prior_image)


def residual_reference(image_prior_mu: torch.Tensor, gt_image_mu: torch.Tensor) -> torch.Tensor:
    """Stage-3 training reference ``X_r^ref = X_p - X_ref`` (Alg. 1, OSRD step 2); the input is
    ``X_r^in = X_p - X'_p``. Both ``(B, 1, N, N)`` in mm^-1.

    Raises:
        ValueError: mismatching shapes.
    """
    _check_same("gt_image", gt_image_mu, "image_prior", image_prior_mu)
    return image_prior_mu - gt_image_mu


def refine_image_prior(image_prior_mu: torch.Tensor, sinogram_prior_image_mu: torch.Tensor,
                       refined_residual: torch.Tensor, k: float) -> torch.Tensor:
    """Updated image prior ``X^_p`` (Eq. 13-14).

    ``X^_p = X_p - k Norm_{(X_p - X'_p)}(X^_r)`` (Eq. 13), then ``X^_p <- Norm_{X_p}(X^_p)`` (Eq. 14).

    Args:
        image_prior_mu: ``(B, 1, N, N)`` ``X_p`` (Eq. 12).
        sinogram_prior_image_mu: ``(B, 1, N, N)`` ``X'_p = FBP(Y_p)``.
        refined_residual: ``(B, 1, N, N)`` ``X^_r``, the residual-domain IR-SDE output for ``X_p - X'_p`` (any
            scale: Eq. 13 moves it onto the range of ``X_p - X'_p``).
        k: residual factor in [0, 1] (``k = 0``: ``X^_p = X_p``).
    Returns:
        ``(B, 1, N, N)`` ``X^_p`` on ``X_p``'s range, per slice.
    Raises:
        ValueError: mismatching shapes; ``k`` outside [0, 1].
    """
    k = _check_factor("k", k)
    _check_same("sinogram_prior_image", sinogram_prior_image_mu, "image_prior", image_prior_mu)
    _check_same("refined_residual", refined_residual, "image_prior", image_prior_mu)
    updated = image_prior_mu - k * minmax_norm(refined_residual, image_prior_mu - sinogram_prior_image_mu)
    return minmax_norm(updated, image_prior_mu)


def fuse_priors(image_prior_mu: torch.Tensor, sinogram_prior_image_mu: torch.Tensor,
                refined_residual: torch.Tensor, k: float, alpha: float, beta: float) -> torch.Tensor:
    """DuDoCROP's output ``X_o = alpha X^_p + beta X'_p`` (Eq. 15) with ``X^_p`` from ``refine_image_prior``
    (Eq. 13-14).

    Args:
        image_prior_mu, sinogram_prior_image_mu, refined_residual, k: as ``refine_image_prior``.
        alpha: weight of the refined image prior ``X^_p``, in [0, 1].
        beta: weight of the sinogram-prior image ``X'_p``, in [0, 1].
    Returns:
        ``(B, 1, N, N)`` ``X_o`` (mm^-1 when the priors are).
    Raises:
        ValueError: mismatching shapes; a factor outside [0, 1].
    """
    alpha, beta = _check_factor("alpha", alpha), _check_factor("beta", beta)
    refined = refine_image_prior(image_prior_mu, sinogram_prior_image_mu, refined_residual, k)
    return alpha * refined + beta * sinogram_prior_image_mu


def data_fidelity_priors(projector: Projector, ma_sinogram: torch.Tensor, sde_sinogram: torch.Tensor,
                         metal_mask: torch.Tensor, sde_image: torch.Tensor, filter_name: str | None = None,
                         image_range: tuple[float, float] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 10-12 on one geometry: ``Y_p``, ``X'_p = FBP(Y_p)`` and ``X_p = Norm_{X'_p}(sde_image)``.

    Args:
        projector: the slices' projector (metal trace ``fp(metal_mask) > 0`` and FBP).
        ma_sinogram: ``(B, 1, V, C)`` measured line integrals ``Y_ma``.
        sde_sinogram: ``(B, 1, V, C)`` sinogram IR-SDE output in line integrals.
        metal_mask: bool ``(B, 1, N, N)`` metal mask on the image grid.
        sde_image: ``(B, 1, N, N)`` image IR-SDE output (any scale).
        filter_name: FBP kernel (``None``: the geometry's default).
        image_range: ``(low, high)`` in mm^-1: ``X'_p`` is clipped to it, as images are when normalised to
            the image networks' [0, 1] (Sec. IV.A); ``None`` keeps the FBP's values. Eq. 11 takes the minimum
            and maximum of ``X'_p``: unclipped, a few pixels of the metal's leftover streaks set them.
    Returns:
        ``(Y_p (B, 1, V, C), X'_p (B, 1, N, N) in mm^-1, X_p (B, 1, N, N) in mm^-1)``.
    Raises:
        ValueError: a sinogram not on the projector's sinogram grid, a mask or image not on its image grid,
            mismatching batches, ``image_range`` with ``low >= high``.
    """
    if image_range is not None and not image_range[0] < image_range[1]:
        raise ValueError(f"data_fidelity_priors: image_range must be (low, high) with low < high, found {image_range}")
    geometry = projector.geometry
    check_sinogram(ma_sinogram, geometry.sinogram_shape, "ma_sinogram")
    check_sinogram(sde_sinogram, geometry.sinogram_shape, "sde_sinogram")
    check_image(sde_image, geometry.image_shape, "sde_image")
    trace = metal_trace(projector, metal_mask)
    if metal_mask.shape[0] != ma_sinogram.shape[0] or sde_image.shape[0] != ma_sinogram.shape[0]:
        raise ValueError(f"data_fidelity_priors: expected batch {ma_sinogram.shape[0]} for metal_mask and sde_image, "
                         f"found {metal_mask.shape[0]} and {sde_image.shape[0]}")
    y_p = sinogram_prior(ma_sinogram, sde_sinogram, trace)
    x_p_prime = projector.fbp(y_p, filter_name)
    if image_range is not None:
        x_p_prime = x_p_prime.clamp(*image_range)
    return y_p, x_p_prime, image_prior(sde_image.to(x_p_prime.dtype), x_p_prime)
