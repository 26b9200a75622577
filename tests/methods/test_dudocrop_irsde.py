"""DuDoCROP's IR-SDE (Eq. 4-9) and fixed OSRO operations (Eq. 10-15) against independent references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from marbench.methods.dudocrop import (
    IRSDE,
    data_fidelity_priors,
    fuse_priors,
    image_prior,
    minmax_norm,
    refine_image_prior,
    residual_reference,
    sinogram_prior,
)
from marbench.physics import FanBeamGeometry, Projector, metal_trace


def _states(seed: int = 0, shape=(2, 1, 16, 16), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g, dtype=dtype)
    mu = (x0 + 0.3 * torch.rand(shape, generator=g, dtype=dtype)).clamp(0, 1)  # a "degraded" counterpart
    return x0, mu, g


def _np_cosine_gbar(T: int, eps: float, s: float = 0.008) -> np.ndarray:
    """gbar_t by hand: cosine alphas_cumprod on T + 2 steps, theta_t = 1 - abar(t + 1), dt from exp(-gbar_T) = eps."""
    n = T + 2
    f = np.cos((np.arange(n + 1) / n + s) / (1 + s) * np.pi / 2) ** 2
    theta = 1 - f[1:-1] / f[0]
    partial = np.concatenate([[0.0], np.cumsum(theta[1:])])  # sum_{i=1..t} theta_i
    return partial * (-np.log(eps) / partial[-1])


# -- Eq. 6 ------------------------------------------------------------------------------------------------------------
def test_marginal_constant_theta_matches_eq6_by_hand():
    T, eps, lam = 10, 0.01, 50 / 255
    sde = IRSDE(T=T, lambda_255=50.0, eps=eps, schedule="constant")
    assert sde.lambda_unit == pytest.approx(lam, rel=1e-15)
    x0, mu = torch.full((1, 1, 1, 1), 0.8, dtype=torch.float64), torch.full((1, 1, 1, 1), 0.3, dtype=torch.float64)
    dt = -math.log(eps) / T  # gamma = 1: gbar_t = t dt
    for t in range(T + 1):
        m = 0.3 + (0.8 - 0.3) * math.exp(-t * dt)
        v = lam**2 * (1 - math.exp(-2 * t * dt))
        assert sde.mean(x0, mu, t).item() == pytest.approx(m, rel=1e-13, abs=1e-15)
        assert sde.variance(t).item() == pytest.approx(v, rel=1e-13, abs=1e-15)


def test_cosine_marginal_matches_hand_schedule_and_exact_transitions():
    T, eps, lam = 100, 0.005, 50 / 255
    sde = IRSDE(T=T, lambda_255=50.0, eps=eps)
    gbar = _np_cosine_gbar(T, eps)
    np.testing.assert_allclose(sde.gamma_bars.numpy(), gbar, rtol=1e-12, atol=1e-15)
    assert sde.gamma_bars[0] == 0 and math.exp(-float(sde.gamma_bars[-1])) == pytest.approx(eps, rel=1e-12)
    # composing the exact one-step transitions of Eq. 4 gives Eq. 6's closed form (semigroup property)
    x0, mu = 0.9, 0.2
    m, v = x0, 0.0
    ts = torch.arange(T + 1)
    means = sde.mean(torch.full((T + 1, 1, 1, 1), x0, dtype=torch.float64),
                     torch.full((T + 1, 1, 1, 1), mu, dtype=torch.float64), ts).flatten().numpy()
    variances = sde.variance(ts).numpy()
    for t in range(1, T + 1):
        step = gbar[t] - gbar[t - 1]
        m = mu + (m - mu) * np.exp(-step)
        v = v * np.exp(-2 * step) + lam**2 * (1 - np.exp(-2 * step))
        assert means[t] == pytest.approx(m, rel=1e-12)
        assert variances[t] == pytest.approx(v, rel=1e-11)
    assert variances[-1] == pytest.approx(lam**2 * (1 - eps**2), rel=1e-12)


# -- Eq. 8 ------------------------------------------------------------------------------------------------------------
def test_optimal_reverse_state_is_the_gaussian_posterior_mean():
    sde = IRSDE()
    x0, mu, g = _states(1)
    gbar, lam2 = _np_cosine_gbar(100, 0.005), (50 / 255) ** 2
    for t in (1, 2, 37, 100):
        xt = sde.sample_xt(x0, mu, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        # Bayes by hand: prior x_{t-1} ~ N(m_{t-1}, v_{t-1}); x_t | x_{t-1} ~ N(mu + c (x_{t-1} - mu), s2)
        c = np.exp(-(gbar[t] - gbar[t - 1]))
        s2 = lam2 * (1 - c**2)
        m_prev = mu.numpy() + (x0.numpy() - mu.numpy()) * np.exp(-gbar[t - 1])
        v_prev = lam2 * (1 - np.exp(-2 * gbar[t - 1]))
        if t == 1:  # v_0 = 0: the posterior is the point x0
            expected = x0.numpy()
        else:
            precision = c**2 / s2 + 1 / v_prev
            expected = (c * (xt.numpy() - mu.numpy() * (1 - c)) / s2 + m_prev / v_prev) / precision
        np.testing.assert_allclose(sde.optimal_reverse_state(xt, x0, mu, t).numpy(), expected, rtol=0, atol=1e-12)


def test_optimal_reverse_state_reproduces_the_previous_state():
    sde = IRSDE()
    x0, mu, g = _states(2)
    # t = 1: F*_0 = x0 exactly, whatever x_1
    x1 = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(sde.optimal_reverse_state(x1, x0, mu, 1), x0, rtol=0, atol=1e-15)
    # noise-free chain: x_{t-1} = m_{t-1}(x0), x_t = mu + (x_{t-1} - mu) e^{-gamma'_t} (the transition of Eq. 4 with
    # zero noise, built from x_{t-1} as in the derivation), then Eq. 8 returns x_{t-1}
    for t in (2, 50, 100):
        x_prev = sde.mean(x0, mu, t - 1)
        xt = mu + (x_prev - mu) * math.exp(-float(sde.thetas[t]) * sde.dt)
        torch.testing.assert_close(sde.optimal_reverse_state(xt, x0, mu, t), x_prev, rtol=0, atol=1e-14)
    # batched t (one step per slice) equals per-slice calls
    t = torch.tensor([3, 90])
    xt = sde.sample_xt(x0, mu, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    both = sde.optimal_reverse_state(xt, x0, mu, t)
    for b in range(2):
        torch.testing.assert_close(both[b:b + 1], sde.optimal_reverse_state(xt[b:b + 1], x0[b:b + 1], mu[b:b + 1],
                                                                            int(t[b])), rtol=0, atol=0)


def test_reverse_step_with_true_noise_is_close_to_the_optimum():
    sde = IRSDE()
    x0, mu, g = _states(3)
    t = torch.tensor([10, 60])
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = sde.sample_xt(x0, mu, t, noise)
    torch.testing.assert_close(sde.true_noise(xt, x0, mu, t), noise, rtol=0, atol=1e-12)
    true_loss = sde.loss(noise, xt, x0, mu, t)
    zero_loss = sde.loss(torch.zeros_like(noise), xt, x0, mu, t)
    assert true_loss < 0.05 * zero_loss  # Euler step with the true score vs Eq. 8: only discretisation error


def test_x0_loss_is_the_posterior_steps_eq9_divided_by_its_coefficient():
    sde = IRSDE(T=4)
    x0, mu, g = _states(4)
    gbar = _np_cosine_gbar(4, 0.005)
    for step in range(1, 5):
        t = torch.full((2,), step)
        xt = sde.sample_xt(x0, mu, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)  # an imperfect network's prediction
        x0_hat = sde.predicted_x0(xt, mu, noise, t)
        # Eq. 8's mean at the estimate (the posterior sampler's step) against Eq. 8 at the truth
        step_error = (sde.optimal_reverse_state(xt, x0_hat, mu, t) - sde.optimal_reverse_state(xt, x0, mu, t)).abs()
        g_step = gbar[step] - gbar[step - 1]
        b_t = (1 - math.exp(-2 * g_step)) / (1 - math.exp(-2 * gbar[step])) * math.exp(-gbar[step - 1])
        loss = sde.loss(noise, xt, x0, mu, t, kind="x0")
        assert math.isclose(float(loss), float(step_error.mean()) / b_t, rel_tol=1e-9)
        assert math.isclose(float(loss), float((x0_hat - x0).abs().mean()), rel_tol=1e-12)
        true = sde.true_noise(xt, x0, mu, t)
        assert float(sde.loss(true, xt, x0, mu, t, kind="x0")) < 1e-9
    with pytest.raises(ValueError, match="unknown kind 'l2'"):
        sde.loss(noise, xt, x0, mu, t, kind="l2")


# -- Eq. 9 ------------------------------------------------------------------------------------------------------------
class _TinyNoiseNet(nn.Module):
    def __init__(self, T: int, width: int = 16):
        super().__init__()
        self.T = T
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
                                  nn.SiLU(), nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, x, mu, t, scale=None):
        tc = (t.to(x.dtype) / self.T).view(-1, 1, 1, 1).expand_as(x)
        out = self.body(torch.cat([x - mu, mu, tc], 1))
        return out if scale is None else out * scale.view(-1, 1, 1, 1)


def test_tiny_network_overfits_one_batch():
    torch.manual_seed(0)
    sde = IRSDE()
    x0, mu, g = _states(0, dtype=torch.float32)
    t = torch.tensor([30, 70])
    xt = sde.sample_xt(x0, mu, t, torch.randn(x0.shape, generator=g))
    net = _TinyNoiseNet(sde.T)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(300):
        loss = sde.loss(net(xt, mu, t), xt, x0, mu, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] >= 5 * np.mean(losses[-10:]), (losses[0], losses[-10:])


# -- sampling ---------------------------------------------------------------------------------------------------------
def test_reverse_sde_with_true_score_returns_the_clean_image():
    sde = IRSDE()
    x0, mu, _ = _states(4)

    def true_noise(x, m, t):  # the exact score of p_t(x | x0) (Eq. 6), as noise
        return sde.true_noise(x, x0, m, t)

    out = sde.sample(mu, true_noise, generator=torch.Generator().manual_seed(0))
    # the remaining error is the last step's noise sigma_1 sqrt(dt) ~ 0.0037 (~1 on the 0-255 scale)
    last_std = float(sde.sigmas[1]) * math.sqrt(sde.dt)
    assert last_std < 0.004
    err = (out - x0).abs()
    assert (mu - x0).abs().mean() > 0.1
    assert err.mean() < 0.006 and err.max() < 0.03, (err.mean(), err.max())


def test_reverse_sde_with_true_score_tracks_the_forward_marginals():
    """Euler-Maruyama steps of Eq. 5 (drift and injected noise sigma_t sqrt(dt) z) keep the states on Eq. 6's
    marginal N(m_t, v_t): 16384 pixels of one x0 started from N(m_T, v_T)."""
    sde = IRSDE()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((1, 1, 128, 128), 0.7, dtype=torch.float64)
    mu = torch.full_like(x0, 0.2)
    x = sde.sample_xt(x0, mu, sde.T, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    for t in range(sde.T, 20, -1):
        z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        x = sde.reverse_step(x, mu, sde.true_noise(x, x0, mu, t), t, z)
        if t - 1 in (50, 20):  # Euler error grows towards t = 0 (+2% std at t = 50, +5% at t = 20)
            assert x.mean().item() == pytest.approx(sde.mean(x0, mu, t - 1).mean().item(), abs=0.01)
            ratio = x.std().item() / math.sqrt(sde.variance(t - 1).item())
            assert 0.95 < ratio < 1.1, (t - 1, ratio)


def test_posterior_sampler_with_true_noise_returns_the_clean_image_for_few_steps():
    """With the exact noise the posterior sampler's F^_0 is F_0 at every step, and its last step (posterior variance
    0 at t = 1) lands on it; Euler-Maruyama at T = 4 is far off (steps with gamma'_t > 2)."""
    for T in (2, 4, 100):
        sde = IRSDE(T=T)
        x0, mu, _ = _states(3)

        def true_noise(x, m, t, sde=sde, x0=x0):
            return sde.true_noise(x, x0, m, t)

        out = sde.sample(mu, true_noise, generator=torch.Generator().manual_seed(0), sampler="posterior")
        assert torch.allclose(out, x0, atol=1e-9), (T, float((out - x0).abs().max()))
        assert float(sde.posterior_variance(1)) == 0.0
    euler = IRSDE(T=4).sample(mu, lambda x, m, t: IRSDE(T=4).true_noise(x, x0, m, t),
                              generator=torch.Generator().manual_seed(0))
    assert (euler - x0).abs().mean() > 0.05


def test_posterior_variance_is_the_gaussian_conditional_variance():
    """Var(F_{t-1} | F_t, F_0) from the joint Gaussian of the two marginals (Eq. 6 and the transition
    F_t = mu + (F_{t-1} - mu) a_t + N(0, lambda^2 (1 - a_t^2)), a_t = exp(-gamma'_t)) by numpy."""
    sde = IRSDE(T=10)
    lam2 = sde.lambda_unit**2
    for t in (1, 2, 5, 10):
        v_prev = lam2 * (1 - np.exp(-2 * float(sde.gamma_bars[t - 1])))
        a = np.exp(-float(sde.thetas[t]) * sde.dt)
        cov = np.array([[v_prev, a * v_prev], [a * v_prev, a * a * v_prev + lam2 * (1 - a * a)]])
        conditional = cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1]
        assert float(sde.posterior_variance(t)) == pytest.approx(conditional, rel=1e-9, abs=1e-15)
    with pytest.raises(ValueError, match="unknown sampler"):
        sde.sample(torch.zeros(1, 1, 4, 4), lambda x, m, t: x, sampler="ddim")


def test_sampler_is_deterministic_and_batch_invariant():
    sde = IRSDE(T=20)
    x0, mu, _ = _states(5, shape=(3, 1, 12, 12))
    torch.manual_seed(1)
    net = _TinyNoiseNet(sde.T).double().eval()
    scale = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)  # a per-slice conditioning passed through cond

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    a = sde.sample(mu, net, cond={"scale": scale}, generator=gens([7, 8, 9]))
    b = sde.sample(mu, net, cond={"scale": scale}, generator=gens([7, 8, 9]))
    assert torch.equal(a, b)
    c = sde.sample(mu, net, cond={"scale": scale}, generator=gens([7, 8, 10]))
    assert torch.equal(a[:2], c[:2]) and not torch.equal(a[2], c[2])  # a slice's noise is its own generator's
    for i, seed in enumerate([7, 8, 9]):
        one = sde.sample(mu[i:i + 1], net, cond={"scale": scale[i:i + 1]}, generator=gens([seed]))
        torch.testing.assert_close(one, a[i:i + 1], rtol=0, atol=1e-12)
    single = torch.Generator().manual_seed(3)
    d = sde.sample(mu, net, cond={"scale": scale}, generator=single)
    e = sde.sample(mu, net, cond={"scale": scale}, generator=torch.Generator().manual_seed(3))
    assert torch.equal(d, e)


def test_irsde_bad_input_raises():
    sde = IRSDE(T=10)
    x0, mu, _ = _states(6)
    with pytest.raises(ValueError, match=r"expected the shape of x0 \(2, 1, 16, 16\), found \(2, 1, 8, 8\)"):
        sde.mean(x0, mu[..., :8, :8], 3)
    with pytest.raises(ValueError, match=r"expected time steps in \[1, 10\], found \[0, 0\]"):
        sde.optimal_reverse_state(x0, x0, mu, 0)
    with pytest.raises(ValueError, match=r"expected t of shape \(2,\)"):
        sde.mean(x0, mu, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="expected 2 generators"):
        sde.sample(mu, lambda x, m, t: x, generator=[torch.Generator()])
    with pytest.raises(ValueError, match=r"expected noise_fn to return \(2, 1, 16, 16\), found \(2, 1, 8, 8\)"):
        sde.sample(mu, lambda x, m, t: x[..., :8, :8])
    with pytest.raises(ValueError, match="lambda_255"):
        IRSDE(lambda_255=0.0)


# -- Eq. 10-15 --------------------------------------------------------------------------------------------------------
GEOMETRY = FanBeamGeometry(n_views=32, n_channels=40, image_size=24, fov_mm=150.0, channel_pitch_mm=6.0,
                           channel_offset=-1.25)


@pytest.fixture(scope="module")
def projector():
    return Projector(GEOMETRY, backend="raysampling")


def test_sinogram_prior_keeps_measured_data_outside_the_trace_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    ma = torch.rand(2, 1, 8, 10, generator=g) * 3.0
    sde_out = torch.rand(2, 1, 8, 10, generator=g) * 3.0
    trace = torch.rand(2, 1, 8, 10, generator=g) > 0.7
    y_p = sinogram_prior(ma, sde_out, trace)
    assert torch.equal(y_p[~trace], ma[~trace]) and torch.equal(y_p[trace], sde_out[trace])


def test_data_fidelity_priors_with_suite_physics(projector):
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(2, 1, 24, 24, dtype=torch.bool)
    mask[0, 0, 10:13, 8:11] = True
    mask[1, 0, 14:16, 12:15] = True
    image = torch.rand(2, 1, 24, 24, generator=g) * 0.02
    ma = projector.fp(image + mask * 0.2)
    sde_sino = projector.fp(image)
    sde_image = torch.rand(2, 1, 24, 24, generator=g)
    y_p, x_p_prime, x_p = data_fidelity_priors(projector, ma, sde_sino, mask, sde_image)
    trace = metal_trace(projector, mask)
    assert trace.any() and (~trace).any()
    assert torch.equal(y_p[~trace], ma[~trace]) and torch.equal(y_p[trace], sde_sino[trace])
    torch.testing.assert_close(x_p_prime, projector.fbp(y_p), rtol=0, atol=0)
    for b in range(2):
        assert x_p[b].min() == x_p_prime[b].min() and x_p[b].max() == x_p_prime[b].max()
    # X'_p clipped to the image networks' range: Eq. 11's minimum and maximum come from the clipped image
    low, high = float(x_p_prime.quantile(0.1)), float(x_p_prime.quantile(0.9))
    _, clipped, x_p = data_fidelity_priors(projector, ma, sde_sino, mask, sde_image, image_range=(low, high))
    torch.testing.assert_close(clipped, x_p_prime.clamp(low, high), rtol=0, atol=0)
    for b in range(2):
        assert x_p[b].min() == clipped[b].min() and x_p[b].max() == clipped[b].max()
    with pytest.raises(ValueError, match="low < high"):
        data_fidelity_priors(projector, ma, sde_sino, mask, sde_image, image_range=(high, low))


def test_minmax_norm_eq11():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1, 9, 7, generator=g, dtype=torch.float32) * 5 + 2
    ref = torch.rand(3, 1, 9, 7, generator=g, dtype=torch.float32) * 0.016 - 0.008
    # a range where (max - min) * 1 + min != max in float32: the naive Eq. 11 misses the maximum by one ulp
    ref[0, 0, 0, :2] = torch.tensor([-0.008883711881935596, 0.008442947641015053])
    out = minmax_norm(x, ref)
    for b in range(3):
        assert out[b].min() == ref[b].min() and out[b].max() == ref[b].max()
        xn, rn = x[b].double().numpy(), ref[b].double().numpy()
        expected = (xn - xn.min()) / (xn.max() - xn.min()) * (rn.max() - rn.min()) + rn.min()
        np.testing.assert_allclose(out[b].numpy(), expected, rtol=0, atol=1e-8)
    flat = minmax_norm(torch.ones(1, 1, 3, 3), ref[:1, :, :3, :3])
    torch.testing.assert_close(flat, torch.full_like(flat, float(ref[0, :, :3, :3].min() + ref[0, :, :3, :3].max())
                                                      / 2))
    torch.testing.assert_close(image_prior(x, ref), out, rtol=0, atol=0)


def test_refinement_and_fusion_eq13_to_15_by_hand():
    g = torch.Generator().manual_seed(3)
    x_p = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64) * 0.04
    x_pp = x_p + 0.005 * torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    x_r = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    k, alpha, beta = 0.6, 0.7, 0.3

    def norm(d, ref):
        return (d - d.min()) / (d.max() - d.min()) * (ref.max() - ref.min()) + ref.min()

    for b in range(2):
        xp, xpp, xr = x_p[b].numpy(), x_pp[b].numpy(), x_r[b].numpy()
        hat = norm(xp - k * norm(xr, xp - xpp), xp)
        expected = alpha * hat + beta * xpp
        np.testing.assert_allclose(refine_image_prior(x_p, x_pp, x_r, k)[b].numpy(), hat, rtol=0, atol=1e-14)
        np.testing.assert_allclose(fuse_priors(x_p, x_pp, x_r, k, alpha, beta)[b].numpy(), expected, rtol=0,
                                   atol=1e-14)
    torch.testing.assert_close(refine_image_prior(x_p, x_pp, x_r, 0.0), x_p, rtol=0, atol=1e-15)
    torch.testing.assert_close(residual_reference(x_p, x_pp), x_p - x_pp, rtol=0, atol=0)


def test_refinement_bad_input_raises(projector):
    ma = torch.rand(2, 1, 32, 40)
    with pytest.raises(ValueError, match=r"expected the shape of ma_sinogram \(2, 1, 32, 40\), found \(2, 1, 32, 39\)"):
        sinogram_prior(ma, ma[..., :39], torch.zeros(2, 1, 32, 40, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"metal_trace: expected shape \(B, 1, 32, 40\).*found \(2, 1, 30, 40\)"):
        sinogram_prior(ma, ma, torch.zeros(2, 1, 30, 40, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"metal_trace: expected a bool mask, found dtype torch.float32"):
        sinogram_prior(ma, ma, torch.zeros(2, 1, 32, 40))
    mask = torch.zeros(2, 1, 24, 24, dtype=torch.bool)
    wrong = torch.rand(2, 1, 30, 40)  # a sinogram of another geometry than the projector's
    with pytest.raises(ValueError, match=r"ma_sinogram: expected shape \(B, 1, 32, 40\).*found \(2, 1, 30, 40\)"):
        data_fidelity_priors(projector, wrong, wrong, mask, torch.rand(2, 1, 24, 24))
    with pytest.raises(ValueError, match=r"metal_mask: expected shape \(B, 1, 24, 24\).*found \(2, 1, 20, 20\)"):
        data_fidelity_priors(projector, ma, ma, mask[..., :20, :20], torch.rand(2, 1, 24, 24))
    with pytest.raises(ValueError, match=r"expected the shape of x \(2, 1, 4, 4\), found \(2, 1, 4, 5\)"):
        minmax_norm(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 5))
    x = torch.rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"k: expected a factor in \[0, 1\], found 1.5"):
        fuse_priors(x, x, x, 1.5, 0.5, 0.5)
    with pytest.raises(ValueError, match=r"beta: expected a factor in \[0, 1\], found -0.1"):
        fuse_priors(x, x, x, 0.5, 0.5, -0.1)


def test_the_smoke_scale_has_enough_steps_that_the_last_posterior_step_does_not_amplify_network_errors():
    """The posterior sampler's last step returns ``predicted_x0`` at t = 1: an error e of the noise network moves
    the output by ``sqrt(v_1) exp(gbar_1) e``. ``exp(gbar_1)`` from the cosine schedule written out here
    (Nichol & Dhariwal's abar on T + 2 points, theta_t = 1 - abar(t + 1), dt = -ln(eps) / sum theta_1..T)."""
    from marbench.methods.dudocrop.method import SCALES

    def gain(T: int, eps: float = 0.005, s: float = 0.008) -> float:
        n = T + 2
        abar = [math.cos((i / n + s) / (1 + s) * math.pi / 2) ** 2 for i in range(n + 1)]
        theta = [1 - a / abar[0] for a in abar[1:-1]]  # t = 0..T
        dt = -math.log(eps) / sum(theta[1:])
        return math.exp(theta[1] * dt)

    for T in (2, 3, 4, 100):
        sde = IRSDE(T=T)
        assert math.exp(float(sde.gamma_bars[1])) == pytest.approx(gain(T), rel=1e-9)
    assert gain(2) > 7 and gain(4) < 2  # T = 2 smoke runs gave outputs of -45,000 to 82,000 HU
    assert gain(SCALES["smoke"]["T"]) < 2
