"""The mean-reverting IR-SDE of DuDoCROP (Zhang et al., "Dual-Domain CLIP-Assisted Residual Optimization Perception
Model for Metal Artifact Reduction", Sec. III.B.2, Eq. 4-9), after Luo et al., "Image Restoration with
Mean-Reverting Stochastic Differential Equations" (ICML 2023), which the paper builds on (its ref. [44]).

Forward SDE (Eq. 4): ``dF = gamma_t (mu - F) dt + sigma_t dw``, which drifts a clean state ``F_0`` towards the
degraded one ``mu`` (the metal-affected image, sinogram or residual) while adding noise, with the stationary
variance ``lambda^2 = sigma_t^2 / (2 gamma_t)`` fixed. Its marginal is Gaussian (Eq. 6):
``m_t = mu + (F_0 - mu) exp(-gbar_t)``, ``v_t = lambda^2 (1 - exp(-2 gbar_t))`` with ``gbar_t = int_0^t gamma``;
so ``F_t = m_t + sqrt(v_t) eps`` and the score of ``p_t(F | F_0)`` is ``-(F - m_t) / v_t = -eps / sqrt(v_t)``.
A network ``eps_theta(F_t, mu, t)`` predicts ``eps``; the reverse-time SDE (Eq. 5) is integrated with
Euler-Maruyama. Training (Eq. 7-9) matches one reverse Euler step ``F_t - (dF_t)_eps`` to the maximum-likelihood
state ``F*_{t-1}`` of ``p(F_{t-1} | F_t, F_0)`` (Eq. 8) under an L1 loss, ``eta_t = 1`` (Sec. III.C).

Discretisation (from the reference implementation, ``codes/utils/sde_utils.py`` of Algolzw/image-restoration-sde,
class ``IRSDE``): integer steps ``t = 0..T``; ``gamma_t`` (``thetas``) follows the cosine schedule of Nichol &
Dhariwal computed on ``T + 2`` steps, ``theta_t = 1 - abar(t + 1)`` for ``t = 0..T``; ``gbar_t = dt *
sum_{i=1..t} theta_i`` (so ``gbar_0 = 0``), and the step ``dt = -log(eps) / sum_{i=1..T} theta_i`` makes
``exp(-gbar_T) = eps``: ``m_T = mu + eps (F_0 - mu)``; ``sigma_t^2 = 2 lambda^2 theta_t``. The per-step
increment ``gamma'_t`` of Eq. 8 is ``theta_t dt``. Sampling starts from ``mu + lambda z`` (the reference's
``noise_state``) and runs ``t = T..1``, adding ``sigma_t sqrt(dt) z`` at every step.

Scale: the paper's ``lambda = 50`` is on the 0-255 scale of 8-bit images (Sec. IV.B; the reference divides
``max_sigma > 1`` by 255); the states here are images normalised to [0, 1] (Sec. IV.A), so the constructor
takes ``lambda_255`` and the SDE uses ``lambda_unit = lambda_255 / 255``.

Departures and readings:

* The paper writes the score as ``-eps_t / v_t``; the score of ``N(m_t, v_t)`` at ``m_t + sqrt(v_t) eps`` is
  ``-eps / sqrt(v_t)``, which is what the reference uses (``get_score_from_noise``) and what is used here.
* Eq. 7 is written ``argmin -log p(F_{t_i} | F_{t_{i-1}}, F_0)``; Eq. 8 is the mean of the posterior
  ``p(F_{t_{i-1}} | F_{t_i}, F_0)`` (Luo et al., Prop. 3.1), which is what is computed.
* "Sampling from Gaussian noise with a variance of 25" (Sec. IV.B) contradicts ``lambda = 50``; the start noise
  has std ``lambda`` as in the reference (``start_std_255`` of ``sample`` overrides it).
* ``eps = 0.005`` as in the reference's training configs (e.g. ``codes/config/deraining/options/train/
  ir-sde.yml``); the paper does not state it.
* The schedule is held in float64 and its coefficients cast to the states' dtype (the reference: float32).
* ``sample(..., sampler="posterior")`` (not in the paper; for few steps): Euler-Maruyama of Eq. 5 multiplies
  ``F_t - mu`` by about ``1 - gamma'_t`` per step even with the exact score, so it is unstable once a step's
  ``gamma'_t = theta_t dt`` exceeds 2, as at ``T = 4`` (``sum_t gamma'_t = -log eps = 5.3``). The posterior
  sampler instead estimates ``F^_0 = mu + (F_t - mu - sqrt(v_t) eps_theta) exp(gbar_t)`` (Eq. 6 solved for
  ``F_0``) and draws ``F_{t-1}`` from ``p(F_{t-1} | F_t, F^_0)``: mean Eq. 8, variance
  ``lambda^2 (1 - e^{-2 gamma'_t}) (1 - e^{-2 gbar_{t-1}}) / (1 - e^{-2 gbar_t})`` (Gaussian conditioning of
  the Ornstein-Uhlenbeck transition); with the exact noise it returns ``F_0`` for any ``T``. The default stays
  Euler-Maruyama, the reference's.
* ``loss(..., kind="x0")`` (not in the paper; with the posterior sampler): Eq. 9 weighs a step's error by how
  far it moves that step's mean. For the posterior step that weight is ``b_t``, the coefficient of ``F_0 - mu``
  in Eq. 8, 1 at ``t = 1`` and about 0.06 at ``t = T = 4``; a smoke-scale network trained so fits the last
  steps and not the first ones, whose errors the next steps carry on (a smoke sinogram model's ``F^_0`` at
  ``t = 3, 4`` was off by 1.3 sinogram units where ``F_0 = mu``, so the sampled sinograms kept noise of
  0.7 ``lambda``). ``kind="x0"`` divides the posterior step's Eq. 9 by ``b_t``: ``|F^_0 - F_0|`` at every
  ``t``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["IRSDE", "LOSSES", "SAMPLERS", "SCHEDULES", "cosine_thetas"]

SCHEDULES = ("cosine", "constant")
SAMPLERS = ("euler", "posterior")
LOSSES = ("eq9", "x0")

NoiseFn = Callable[..., torch.Tensor]
"""``noise_fn(x_t, mu, t, **cond) -> eps``: ``x_t``, ``mu`` ``(B, C, H, W)``, ``t`` long ``(B,)`` in 1..T; returns
the predicted noise ``(B, C, H, W)``."""


def cosine_thetas(T: int, s: float = 0.008) -> torch.Tensor:
    """The cosine ``theta`` (``gamma_t``) schedule, float64 ``(T + 1,)`` for ``t = 0..T``.

    ``abar(i) = cos^2(pi/2 (i / N + s) / (1 + s)) / abar(0)`` on ``N = T + 2`` steps and ``theta_t = 1 - abar(t + 1)``
    (Nichol & Dhariwal's cosine ``alphas_cumprod``, used as a rate by the IR-SDE reference).
    """
    n = T + 2
    i = torch.arange(n + 1, dtype=torch.float64)
    abar = torch.cos((i / n + s) / (1 + s) * (math.pi / 2)) ** 2
    abar = abar / abar[0]
    return 1.0 - abar[1:-1]


class IRSDE:
    """Mean-reverting SDE (Eq. 4-9) on a discrete grid ``t = 0..T`` (see the module docstring).

    All states (``x0``, ``mu``, ``xt``, noises) are ``(B, C, H, W)`` tensors on the [0, 1] scale the paper normalises
    to; ``t`` is a Python int or a long tensor ``(B,)`` (one step per slice).

    Args:
        T: number of steps (paper: 100).
        lambda_255: stationary std ``lambda`` on the 0-255 scale (paper: 50); ``lambda_unit = lambda_255 / 255``.
        eps: ``exp(-gbar_T)``, how far ``m_T`` is from ``mu`` (reference configs: 0.005).
        schedule: ``"cosine"`` (the paper's) or ``"constant"`` (``gamma_t = 1``, the reference's constant schedule,
            for which ``gbar_t = t dt`` in closed form).
        cosine_offset: the ``s`` of the cosine schedule (0.008).
    Raises:
        ValueError: ``T < 1``, ``lambda_255 <= 0``, ``eps`` outside (0, 1), an unknown schedule.

    Attributes:
        thetas: float64 ``(T + 1,)``, ``gamma_t`` of Eq. 4 (``thetas[0]`` unused).
        dt: the step (float).
        gamma_bars: float64 ``(T + 1,)``, ``gbar_t`` of Eq. 6 (``gamma_bars[0] = 0``, ``exp(-gamma_bars[T]) = eps``).
        sigmas: float64 ``(T + 1,)``, ``sigma_t = sqrt(2 lambda^2 gamma_t)`` of Eq. 4.
        variances: float64 ``(T + 1,)``, ``v_t`` of Eq. 6.
    """

    def __init__(self, T: int = 100, lambda_255: float = 50.0, eps: float = 0.005, schedule: str = "cosine",
                 cosine_offset: float = 0.008):
        if schedule not in SCHEDULES:
            raise ValueError(f"IRSDE: unknown schedule {schedule!r}; expected one of {SCHEDULES}")
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"IRSDE: expected an integer T >= 1, found {T!r}")
        if not lambda_255 > 0:
            raise ValueError(f"IRSDE: expected lambda_255 > 0 (0-255 scale), found {lambda_255!r}")
        if not 0 < eps < 1:
            raise ValueError(f"IRSDE: expected 0 < eps < 1, found {eps!r}")
        self.T = T
        self.lambda_255 = float(lambda_255)
        self.lambda_unit = self.lambda_255 / 255.0
        self.eps = float(eps)
        self.schedule = schedule
        if schedule == "cosine":
            self.thetas = cosine_thetas(T, cosine_offset)
        else:
            self.thetas = torch.ones(T + 1, dtype=torch.float64)
        cum = torch.cumsum(self.thetas, 0) - self.thetas[0]
        self.dt = float(-math.log(eps) / cum[-1])
        self.gamma_bars = cum * self.dt
        self.sigmas = torch.sqrt(2.0 * self.lambda_unit**2 * self.thetas)
        self.variances = self.lambda_unit**2 * -torch.expm1(-2.0 * self.gamma_bars)

    def __repr__(self) -> str:
        return f"IRSDE(T={self.T}, lambda_255={self.lambda_255}, eps={self.eps}, schedule={self.schedule!r})"

    # -- helpers ------------------------------------------------------------------------------------------------
    def _check_t(self, t: int | torch.Tensor, batch: int, low: int) -> torch.Tensor:
        tt = torch.as_tensor(t)
        if tt.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"IRSDE: expected an integer time step (int or long tensor), found dtype {tt.dtype}")
        if tt.ndim == 0:
            tt = tt.expand(batch)
        if tt.shape != (batch,):
            raise ValueError(f"IRSDE: expected t of shape ({batch},) (one step per slice) or a scalar, "
                             f"found {tuple(tt.shape)}")
        lo, hi = int(tt.min()), int(tt.max())
        if lo < low or hi > self.T:
            raise ValueError(f"IRSDE: expected time steps in [{low}, {self.T}], found [{lo}, {hi}]")
        return tt.long().cpu()

    @staticmethod
    def _column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``(B,)`` coefficients as ``(B, 1, 1, 1)`` in ``like``'s dtype and device."""
        return values.to(dtype=like.dtype, device=like.device).view(-1, *([1] * (like.ndim - 1)))

    def _coef(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``values[t]`` as ``(B, 1, 1, 1)`` in ``like``'s dtype and device."""
        return self._column(values[t], like)

    @staticmethod
    def _check_states(**states: torch.Tensor) -> tuple[int, ...]:
        shape = None
        for name, x in states.items():
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"IRSDE: {name}: expected a torch.Tensor (B, C, H, W), found {type(x).__name__}")
            if x.ndim != 4:
                raise ValueError(f"IRSDE: {name}: expected a (B, C, H, W) tensor, found shape {tuple(x.shape)}")
            if not x.is_floating_point():
                raise ValueError(f"IRSDE: {name}: expected a floating-point tensor, found dtype {x.dtype}")
            if shape is None:
                first, shape = name, tuple(x.shape)
            elif tuple(x.shape) != shape:
                raise ValueError(f"IRSDE: {name}: expected the shape of {first} {shape}, found {tuple(x.shape)}")
        return shape

    # -- forward marginal (Eq. 6) -------------------------------------------------------------------------------
    def mean(self, x0: torch.Tensor, mu: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """``m_t = mu + (x0 - mu) exp(-gbar_t)`` (Eq. 6); ``t`` in 0..T. Returns ``(B, C, H, W)``."""
        shape = self._check_states(x0=x0, mu=mu)
        t = self._check_t(t, shape[0], 0)
        return mu + (x0 - mu) * self._coef(torch.exp(-self.gamma_bars), t, x0)

    def variance(self, t: int | torch.Tensor) -> torch.Tensor:
        """``v_t = lambda^2 (1 - exp(-2 gbar_t))`` (Eq. 6), float64 of ``t``'s shape; ``t`` in 0..T."""
        tt = torch.as_tensor(t)
        return self.variances[self._check_t(tt.reshape(-1), tt.numel(), 0).view(tt.shape)]

    def std(self, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``sqrt(v_t)`` as ``(B, 1, 1, 1)`` in ``like``'s dtype/device (``like``: a ``(B, C, H, W)`` state)."""
        t = self._check_t(t, like.shape[0], 0)
        return self._column(torch.sqrt(self.variances[t]), like)

    def sample_xt(self, x0: torch.Tensor, mu: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``F_t = m_t + sqrt(v_t) noise`` (the reparameterisation after Eq. 6); all ``(B, C, H, W)``, ``t`` in 0..T."""
        self._check_states(x0=x0, mu=mu, noise=noise)
        return self.mean(x0, mu, t) + self.std(t, x0) * noise

    def random_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        """Training steps, long ``(batch,)`` uniform in 1..T (the reference's ``generate_random_states``)."""
        return torch.randint(1, self.T + 1, (batch,), generator=generator, device=device)

    def true_noise(self, xt: torch.Tensor, x0: torch.Tensor, mu: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """The noise ``(x_t - m_t) / sqrt(v_t)`` of a state with known ``x0``; ``t`` in 1..T."""
        self._check_states(xt=xt, x0=x0, mu=mu)
        self._check_t(t, xt.shape[0], 1)
        return (xt - self.mean(x0, mu, t)) / self.std(t, xt)

    def score_from_noise(self, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Score ``grad log p_t = -noise / sqrt(v_t)`` (after Eq. 6; the paper's ``/ v_t`` is read as
        ``/ sqrt(v_t)``, see the module docstring); ``t`` in 1..T."""
        self._check_states(noise=noise)
        self._check_t(t, noise.shape[0], 1)
        return -noise / self.std(t, noise)

    # -- reverse process (Eq. 5, 8, 9) --------------------------------------------------------------------------
    def optimal_reverse_state(self, xt: torch.Tensor, x0: torch.Tensor, mu: torch.Tensor,
                              t: int | torch.Tensor) -> torch.Tensor:
        """``F*_{t-1}`` of Eq. 8, the mean of ``p(F_{t-1} | F_t = xt, F_0 = x0)``; ``t`` in 1..T.

        ``(1 - e^{-2 gbar_{t-1}}) / (1 - e^{-2 gbar_t}) e^{-gamma'_t} (xt - mu)
        + (1 - e^{-2 gamma'_t}) / (1 - e^{-2 gbar_t}) e^{-gbar_{t-1}} (x0 - mu) + mu``, ``gamma'_t = theta_t dt``.
        """
        shape = self._check_states(xt=xt, x0=x0, mu=mu)
        t = self._check_t(t, shape[0], 1)
        g_prev, g_now = self.gamma_bars[t - 1], self.gamma_bars[t]
        g_step = self.thetas[t] * self.dt
        denom = -torch.expm1(-2.0 * g_now)
        a = -torch.expm1(-2.0 * g_prev) / denom * torch.exp(-g_step)
        b = -torch.expm1(-2.0 * g_step) / denom * torch.exp(-g_prev)
        return self._column(a, xt) * (xt - mu) + self._column(b, xt) * (x0 - mu) + mu

    def reverse_drift(self, xt: torch.Tensor, mu: torch.Tensor, noise: torch.Tensor,
                      t: int | torch.Tensor) -> torch.Tensor:
        """``(dF_t)_eps = [gamma_t (mu - xt) - sigma_t^2 score] dt`` with ``score = -noise / sqrt(v_t)``: the drift
        of one Euler-Maruyama step of the reverse SDE (Eq. 5); ``noise`` is the network's ``(B, C, H, W)``
        prediction; ``t`` in 1..T."""
        shape = self._check_states(xt=xt, mu=mu, noise=noise)
        t = self._check_t(t, shape[0], 1)
        score = self.score_from_noise(noise, t)
        return (self._coef(self.thetas, t, xt) * (mu - xt) - self._coef(self.sigmas**2, t, xt) * score) * self.dt

    def reverse_mean(self, xt: torch.Tensor, mu: torch.Tensor, noise: torch.Tensor,
                     t: int | torch.Tensor) -> torch.Tensor:
        """``F_t - (dF_t)_eps`` (Eq. 9): the noise-free part of one reverse step; ``t`` in 1..T."""
        return xt - self.reverse_drift(xt, mu, noise, t)

    def reverse_step(self, xt: torch.Tensor, mu: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor,
                     z: torch.Tensor) -> torch.Tensor:
        """One Euler-Maruyama step of Eq. 5 from ``t`` to ``t - 1``: ``reverse_mean + sigma_t sqrt(dt) z``
        (``z`` standard normal, ``(B, C, H, W)``); ``t`` in 1..T."""
        self._check_states(xt=xt, z=z)
        t = self._check_t(t, xt.shape[0], 1)
        return self.reverse_mean(xt, mu, noise, t) + self._coef(self.sigmas, t, xt) * math.sqrt(self.dt) * z

    def predicted_x0(self, xt: torch.Tensor, mu: torch.Tensor, noise: torch.Tensor,
                     t: int | torch.Tensor) -> torch.Tensor:
        """``F^_0 = mu + (F_t - mu - sqrt(v_t) noise) exp(gbar_t)``: Eq. 6 solved for ``F_0``; ``t`` in 1..T."""
        shape = self._check_states(xt=xt, mu=mu, noise=noise)
        t = self._check_t(t, shape[0], 1)
        return mu + (xt - mu - self.std(t, xt) * noise) * self._coef(torch.exp(self.gamma_bars), t, xt)

    def posterior_variance(self, t: int | torch.Tensor) -> torch.Tensor:
        """Variance of ``p(F_{t-1} | F_t, F_0)``, float64 of ``t``'s shape; ``t`` in 1..T (0 at ``t = 1``):
        ``lambda^2 (1 - e^{-2 gamma'_t}) (1 - e^{-2 gbar_{t-1}}) / (1 - e^{-2 gbar_t})``."""
        tt = torch.as_tensor(t)
        t = self._check_t(tt.reshape(-1), tt.numel(), 1)
        g_step = self.thetas[t] * self.dt
        var = (self.lambda_unit**2 * -torch.expm1(-2.0 * g_step) * -torch.expm1(-2.0 * self.gamma_bars[t - 1])
               / -torch.expm1(-2.0 * self.gamma_bars[t]))
        return var.view(tt.shape)

    def posterior_step(self, xt: torch.Tensor, mu: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor,
                       z: torch.Tensor) -> torch.Tensor:
        """One step of the posterior sampler from ``t`` to ``t - 1``: Eq. 8's mean at ``F^_0 = predicted_x0`` plus
        ``sqrt(posterior_variance) z``; ``t`` in 1..T."""
        self._check_states(xt=xt, z=z)
        t = self._check_t(t, xt.shape[0], 1)
        x0 = self.predicted_x0(xt, mu, noise, t)
        return (self.optimal_reverse_state(xt, x0, mu, t)
                + self._column(torch.sqrt(self.posterior_variance(t)), xt) * z)

    def loss(self, noise_pred: torch.Tensor, xt: torch.Tensor, x0: torch.Tensor, mu: torch.Tensor,
             t: int | torch.Tensor, kind: str = "eq9") -> torch.Tensor:
        """The training loss, a scalar differentiable in ``noise_pred`` (Eq. 16 is the same with ``x0 = X_r^ref``,
        ``mu = X_r^in``).

        ``kind="eq9"``: the maximum-likelihood loss of Eq. 9 with ``eta_t = 1``, mean ``|F_t - (dF_t)_eps -
        F*_{t-1}|`` over all elements: the Euler-Maruyama step's mean against Eq. 8. ``kind="x0"`` (for the
        ``posterior`` sampler): mean ``|F^_0 - F_0|`` with ``F^_0 = predicted_x0``. That is Eq. 9 for the
        posterior sampler's step, whose mean is Eq. 8 at ``F^_0`` (its distance to ``F*_{t-1}`` is ``b_t |F^_0 -
        F_0|``, ``b_t`` the coefficient of ``F_0 - mu`` in Eq. 8), divided by ``b_t``: ``b_t`` falls from 1 at
        ``t = 1`` to about 0.06 at ``t = T = 4``, and unweighted every step is fitted alike (see the module
        docstring).

        Raises:
            ValueError: an unknown ``kind``; states or ``t`` as the other methods.
        """
        if kind == "x0":
            return F.l1_loss(self.predicted_x0(xt, mu, noise_pred, t), x0)
        if kind != "eq9":
            raise ValueError(f"IRSDE.loss: unknown kind {kind!r}; expected one of {LOSSES}")
        return F.l1_loss(self.reverse_mean(xt, mu, noise_pred, t), self.optimal_reverse_state(xt, x0, mu, t))

    # -- sampling -----------------------------------------------------------------------------------------------
    @staticmethod
    def _randn(like: torch.Tensor, generators: Sequence[torch.Generator] | torch.Generator | None) -> torch.Tensor:
        if generators is None or isinstance(generators, torch.Generator):
            return torch.randn(like.shape, generator=generators, dtype=like.dtype, device=like.device)
        return torch.cat([torch.randn((1, *like.shape[1:]), generator=g, dtype=like.dtype, device=like.device)
                          for g in generators])

    @torch.no_grad()
    def sample(self, mu: torch.Tensor, noise_fn: NoiseFn, cond: dict | None = None,
               generator: torch.Generator | Sequence[torch.Generator] | None = None,
               start_std_255: float | None = None, sampler: str = "euler") -> torch.Tensor:
        """Reverse-SDE sampling (Eq. 5, Euler-Maruyama, ``t = T..1``) from ``mu + lambda z``.

        Args:
            mu: ``(B, C, H, W)`` degraded states (metal-affected images or sinograms, or residuals) in [0, 1]; the
                ``B`` slices are processed together, one network call per step.
            noise_fn: the noise network as a callable ``noise_fn(x_t, mu, t, **cond)``, ``t`` long ``(B,)``;
                nothing else runs inside the loop.
            cond: extra keyword arguments of ``noise_fn`` (e.g. DuDoCLIP embeddings ``(B, ...)``).
            generator: ``None`` (global RNG), one ``torch.Generator`` (draws ``(B, C, H, W)`` at once), or a
                sequence of ``B`` generators, one per slice, which makes the result of a slice independent of
                its batch (sampling B slices at once equals sampling them one by one with their generators).
                Generators must be on ``mu``'s device.
            start_std_255: std of the start noise on the 0-255 scale (default ``lambda_255``).
            sampler: ``"euler"`` (Eq. 5, the reference's) or ``"posterior"`` (``posterior_step``, stable for few
                steps; see the module docstring).
        Returns:
            ``(B, C, H, W)`` the restored ``F_0``.
        Raises:
            ValueError: ``mu`` not ``(B, C, H, W)``; a generator sequence whose length is not ``B``; a network
                output of another shape.
        """
        self._check_states(mu=mu)
        if sampler not in SAMPLERS:
            raise ValueError(f"IRSDE.sample: unknown sampler {sampler!r}; expected one of {SAMPLERS}")
        step_fn = self.reverse_step if sampler == "euler" else self.posterior_step
        b = mu.shape[0]
        if generator is not None and not isinstance(generator, torch.Generator):
            generator = list(generator)
            if len(generator) != b:
                raise ValueError(f"IRSDE.sample: expected {b} generators (one per slice), found {len(generator)}")
        cond = cond or {}
        start = self.lambda_unit if start_std_255 is None else start_std_255 / 255.0
        x = mu + start * self._randn(mu, generator)
        for step in range(self.T, 0, -1):
            t = torch.full((b,), step, dtype=torch.long, device=mu.device)
            noise = noise_fn(x, mu, t, **cond)
            if not isinstance(noise, torch.Tensor) or noise.shape != x.shape:
                found = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
                raise ValueError(f"IRSDE.sample: expected noise_fn to return {tuple(x.shape)}, found {found}")
            x = step_fn(x, mu, noise, step, self._randn(mu, generator))
        return x
