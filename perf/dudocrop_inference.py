"""Where DuDoCROP's inference (Algorithm 2) spends its time, per stage and per slice, for a batch of slices sampled
together: DuDoCLIP's embeddings of both domains, the sinogram-domain IR-SDE, the image-domain IR-SDE, the
data-fidelity priors (metal trace, Eq. 10, FBP, Eq. 11-12) and the residual IR-SDE with Eq. 13-15; and inside the
three samplers, the share of the noise networks against the SDE arithmetic (everything else of a reverse step).

The smoke geometry (``aapm_body_256``: 256 x 256 images, 500 views x 450 detector channels), an untrained model of
the given scale (the cost does not depend on the weights), batch 8 by default, on this machine's CPU or, with
``--device cuda``, a GPU. The paper reports 125 s per slice for the full method on its GPU (Table V).

Usage: ``python perf/dudocrop_inference.py [--scale smoke] [--batch 8] [--device cpu]``.
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", default="smoke")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torch

    from marbench.methods.dudocrop import DuDoCROP
    from marbench.methods.dudocrop.method import _rows
    from marbench.physics import preset

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = DuDoCROP(scale=args.scale).to(device).eval()
    geometry = preset("aapm_body_256")
    projector = model.physics.projector("aapm_body_256")
    n, b = geometry.image_shape[0], args.batch
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    body = (((yy - n / 2) / (0.4 * n)) ** 2 + ((xx - n / 2) / (0.45 * n)) ** 2 < 1).float().to(device)
    metal = torch.zeros(b, 1, n, n, dtype=torch.bool, device=device)
    for i in range(b):
        cy, cx = 96 + 8 * i, 100 + 6 * i
        metal[i, 0, cy - 4:cy + 4, cx - 5:cx + 5] = True
    mu = 0.02 * body + 0.5 * metal.float()
    batch = {"ma_image": (mu / 0.02 - 1) * 1000, "ma_sinogram": projector.fp(mu), "metal_mask": metal,
             "geometry": ["aapm_body_256"] * b, "slice_id": [f"perf/{i}" for i in range(b)]}

    network_seconds = [0.0]
    for net in model.nets.values():
        net.register_forward_pre_hook(lambda m, i: m.__dict__.__setitem__("_t", time.perf_counter()))
        net.register_forward_hook(
            lambda m, i, o: network_seconds.__setitem__(0, network_seconds[0] + time.perf_counter() - m._t))

    def clock(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    part = _rows(batch, range(b))
    rows = []
    with torch.no_grad():
        model.reconstruct(_rows(batch, [0]), projector, metal[:1])  # warm-up: matrices mapped, threads started
        y01, x01 = model._inputs(part, "sinogram"), model._inputs(part, "image")
        (cond_y, cond_x), t_clip = clock(lambda: (model._embeddings(y01), model._embeddings(x01)))
        rows.append(("DuDoCLIP embeddings (both domains)", t_clip, 0.0))
        for domain, x, cond in (("sinogram", y01, cond_y), ("image", x01, cond_x)):
            network_seconds[0] = 0.0
            sample, t = clock(lambda d=domain, x=x, c=cond: model._sample(d, x, c, part["slice_id"]))
            rows.append((f"{domain} IR-SDE (T = {model.sde.T})", t, network_seconds[0]))
            if domain == "sinogram":
                y_sde = sample * model.hparams.line_integral_scale
            else:
                x_sde = model.unit_to_mu(sample, geometry.mu_water_per_mm)
        from marbench.methods.dudocrop import data_fidelity_priors, fuse_priors
        (y_p, x_pp, x_p), t_fid = clock(lambda: data_fidelity_priors(projector, batch["ma_sinogram"], y_sde, metal,
                                                                     x_sde))
        rows.append(("metal trace, Eq. 10, FBP, Eq. 11-12", t_fid, 0.0))
        unit = model.residual_unit(geometry.mu_water_per_mm)
        network_seconds[0] = 0.0
        _, t_res = clock(lambda: fuse_priors(x_p, x_pp, model._sample("residual", (x_p - x_pp) / unit, {},
                                                                      part["slice_id"]) * unit,
                                             model.hparams.k, model.hparams.alpha, model.hparams.beta))
        rows.append((f"residual IR-SDE (T = {model.sde.T}) and Eq. 13-15", t_res, network_seconds[0]))

    total = sum(t for _, t, _ in rows)
    print(f"DuDoCROP inference, scale {args.scale}, batch {b}, {device} ({torch.get_num_threads()} threads)")
    print("| stage | s per slice | share | networks s/slice | SDE arithmetic and rest s/slice |")
    print("|---|---:|---:|---:|---:|")
    for name, t, net_t in rows:
        rest = t - net_t if net_t else t
        print(f"| {name} | {t / b:.3f} | {100 * t / total:.0f} % | {net_t / b:.3f} | {rest / b:.3f} |")
    print(f"| **all** | **{total / b:.3f}** | 100 % | | |")


if __name__ == "__main__":
    main()
