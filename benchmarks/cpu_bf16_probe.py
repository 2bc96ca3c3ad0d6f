"""Whether this CPU can time bf16 autocast at SD1.5 size: one fp32 and one bf16 call of the UNet's heaviest ops.

CPUs without native bf16 (AVX512-BF16 / AMX) emulate bf16 convolutions; on them a bf16 SD1.5 step takes
minutes to hours, so ``benchmarks.dp_cost --precisions bf16`` is only worth running where this probe's ratios
are near 1. Run:  python -m benchmarks.cpu_bf16_probe
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def probe(threads: int = 1, seed: int = 0) -> dict:
    """Seconds per call, ``{op: (fp32, bf16)}``, for the ops of a 64x64-latent SD1.5 UNet block."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(1, 320, 64, 64, generator=g), torch.randn(320, 320, 3, 3, generator=g)
    a, b = torch.randn(4096, 320, generator=g), torch.randn(320, 1280, generator=g)
    q = torch.randn(1, 8, 4096, 40, generator=g)
    ops = {"conv3x3 320ch 64x64": lambda: F.conv2d(x, w, padding=1), "matmul 4096x320x1280": lambda: a @ b,
           "group_norm": lambda: F.group_norm(x, 32), "attention 4096 tokens": lambda: F.scaled_dot_product_attention(
               q, q, q)}
    out = {}
    for name, fn in ops.items():
        times = []
        for bf16 in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                fn()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        out[name] = tuple(times)
    return out


def main() -> int:
    print("| op | fp32 s | bf16 autocast s | bf16/fp32 |\n|---|---|---|---|")
    for name, (f32, b16) in probe().items():
        print(f"| {name} | {f32:.3f} | {b16:.3f} | {b16 / f32:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
