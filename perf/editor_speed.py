"""Speed and memory of the LoRA image editor (Emirdagi et al.): seconds per LoRA training step (Eq. 5, batch 1) and
per sampled slice (one seed and the ens-10 of Eq. 4) for each conditioning, with the base model's forward (no
adapter) as the reference in the same run, and peak memory. Then the VAE: seconds to encode and to decode one image
with the suite's 2D image convolutions (``backbone.image_convolutions``) against diffusers' causal 3D convolutions
(the reference) in the same run, and the largest difference between their outputs.

* ``--backbone standin`` (default): the smoke benchmark's stand-in architecture at 256 x 256 on this machine's CPU
  (random weights: the cost does not depend on them), peak resident memory of the process.
* ``--backbone full --device cuda``: Qwen-Image-Edit-2511's transformer config (60 blocks, 24 x 128) with random
  weights in bf16 at 512 x 512, one LoRA training step (gradient checkpointing, rank 64) and one sampling step
  (one transformer call), s/step and peak GPU memory (the paper trained on H100s). The transformer's inputs are
  random tensors of the real shapes (the 7B instruction encoder is not built); the VAE table builds the release's
  VAE config (base width 96) with random weights.

Usage: ``python perf/editor_speed.py [--backbone standin|full] [--device cpu|cuda] [--size 256] [--repeats 3]
[--layers 60]``.
"""
from __future__ import annotations

import argparse
import resource

from timing import seconds_per_call


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="standin", choices=("standin", "full"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=None, help="slice side (default 256 stand-in, 512 full)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="sampling steps per slice")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks of --backbone full (60)")
    args = parser.parse_args()
    import torch
    from peft import LoraConfig

    from marbench.methods.editor.backbone import (
        BACKBONES,
        LORA_TARGET_MODULES,
        EditorBackbone,
        Instruction,
        build_backbone,
    )

    torch.manual_seed(0)
    device = torch.device(args.device)
    size = args.size or (512 if args.backbone == "full" else 256)
    dtype = torch.bfloat16 if args.backbone == "full" else torch.float32
    if args.backbone == "full":
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

        spec = dict(BACKBONES["full"]["transformer"])
        spec["num_layers"] = args.layers or spec["num_layers"]
        transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, **spec)
        # only the transformer runs: a small VAE supplies the latent statistics, no instruction encoder is built
        backbone = EditorBackbone(transformer.to(device, dtype), AutoencoderKLQwenImage(base_dim=8), None, None)
        sampled = False
    else:
        backbone = build_backbone("standin").to(device)
        sampled = True
    transformer = backbone.transformer.requires_grad_(False)
    text_dim = transformer.config.joint_attention_dim

    def clock(fn, repeats=args.repeats):  # peak GPU memory counts the timed calls only
        return seconds_per_call(fn, repeats, device,
                                torch.cuda.reset_peak_memory_stats if device.type == "cuda" else None)

    side = size // 16
    tokens = side * side
    instruction = Instruction(torch.randn(1, 96, text_dim, device=device, dtype=dtype),
                              torch.ones(1, 96, dtype=torch.long, device=device))
    layouts = {"none": [(1, side, side)], "multi": [(1, side, side)] * 6, "grid": [(1, side, 3 * side // 2)]}
    def measure(layout: str, cond_shapes: list) -> tuple:
        shapes = [(1, side, side)] + cond_shapes
        cond = torch.randn(1, sum(h * w for _, h, w in cond_shapes), 64, device=device, dtype=torch.float32)
        x = torch.randn(1, tokens, 64, device=device)
        sigma = torch.full((1,), 0.5, device=device)
        with torch.no_grad():
            base = clock(lambda: backbone.velocity(x, cond, shapes, instruction, sigma))
        transformer.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=list(LORA_TARGET_MODULES)),
                                adapter_name=layout)
        transformer.set_adapter(layout)
        transformer.to(device, dtype)
        params = [p for n, p in transformer.named_parameters() if "lora_" in n and f".{layout}." in n]
        for p in params:
            p.requires_grad_(True)
        optimiser = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        transformer.enable_gradient_checkpointing()
        target = torch.randn(1, 16, 2 * side, 2 * side, device=device)

        def train_step():
            optimiser.zero_grad(set_to_none=True)
            backbone.flow_matching_loss(target, cond, shapes, instruction).backward()
            optimiser.step()

        step = clock(train_step)
        transformer.disable_gradient_checkpointing()
        per_slice = ens10 = float("nan")
        with torch.no_grad():
            one_call = clock(lambda: backbone.velocity(x, cond, shapes, instruction, sigma))
            if sampled:
                noise = torch.randn(10, tokens, 64, device=device)
                per_slice = clock(lambda: backbone.sample(cond, shapes, instruction, noise[:1], args.steps), 1)
                ens10 = clock(lambda: backbone.sample(cond.expand(10, -1, -1), shapes, instruction, noise,
                                                      args.steps), 1)
        for p in params:
            p.requires_grad_(False)
        transformer.delete_adapters(layout)
        return layout, sum(h * w for _, h, w in shapes), base, one_call, step, per_slice, ens10

    rows = [measure(layout, cond_shapes) for layout, cond_shapes in layouts.items()]

    if device.type == "cuda":
        peak = f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    else:
        peak = f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    blocks = len(transformer.transformer_blocks)
    print(f"LoRA editor, {args.backbone} transformer ({blocks} blocks) at {size} x {size}, rank 64, {dtype}, {device} "
          f"({torch.get_num_threads()} threads); {peak}")
    print("| conditioning | image tokens | base forward s | LoRA forward s (ratio) | training step s (ratio) | "
          f"sampled slice s ({args.steps} steps) | ens-10 slice s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for layout, n, base, one, step, per_slice, ens10 in rows:
        print(f"| {layout} | {n} | {base:.3f} | {one:.3f} ({one / base:.2f}) | {step:.3f} ({step / base:.1f}) | "
              f"{per_slice:.2f} | {ens10:.2f} |")
    vae_table(args.backbone, size, device, dtype, clock)


def vae_table(backbone: str, size: int, device, dtype, clock) -> None:
    """Encode and decode one ``size`` x ``size`` image with ``ImageCausalConv3d`` and with diffusers'
    ``QwenImageCausalConv3d`` (the same weights), seconds each and their ratio."""
    import copy

    import torch
    from diffusers import AutoencoderKLQwenImage

    from marbench.methods.editor.backbone import BACKBONES, image_convolutions

    spec = BACKBONES[backbone]["vae"]
    torch.manual_seed(0)
    fast = AutoencoderKLQwenImage(z_dim=16, attn_scales=[], temperal_downsample=[False, True, True],
                                  base_dim=spec["base_dim"], dim_mult=list(spec["dim_mult"]),
                                  num_res_blocks=spec["num_res_blocks"]).to(device, dtype).eval()
    image_convolutions(fast)
    reference = copy.deepcopy(fast)
    image_convolutions(reference, enabled=False)
    x = torch.rand(1, 3, 1, size, size, device=device, dtype=dtype) * 2 - 1
    timings = {}
    with torch.no_grad():
        z = fast.encode(x).latent_dist.mode()
        for name, vae in (("2D", fast), ("3D", reference)):
            timings[name] = (clock(lambda vae=vae: vae.encode(x)), clock(lambda vae=vae: vae.decode(z)))
        diff = max(float((fast.encode(x).latent_dist.mode() - reference.encode(x).latent_dist.mode()).abs().max()),
                   float((fast.decode(z).sample - reference.decode(z).sample).abs().max()))
    (e2, d2), (e3, d3) = timings["2D"], timings["3D"]
    print(f"\nVAE ({backbone}: base width {spec['base_dim']}) at {size} x {size}, one image, {dtype}, {device}; "
          f"largest output difference {diff:.1e}")
    print("| convolutions | encode s | decode s |")
    print("|---|---:|---:|")
    print(f"| diffusers' causal 3D (reference) | {e3:.3f} | {d3:.3f} |")
    print(f"| 2D image convolutions | {e2:.3f} ({e3 / e2:.1f}x) | {d2:.3f} ({d3 / d2:.1f}x) |")


if __name__ == "__main__":
    main()
