#!/usr/bin/env python
"""Build the tiny Stable-Diffusion-style pipeline and digit image folders used by the diffusers example.

Everything is generated offline (random, seeded weights; scikit-learn's digits rendered to PNG):

    python examples/diffusers/make_tiny_pipeline.py --out /tmp/tiny --digits 16 --holdout 16

writes ``/tmp/tiny/pipeline`` (diffusers format), ``/tmp/tiny/train`` and ``/tmp/tiny/holdout`` (disjoint
image folders with ``metadata.jsonl`` and ``.txt`` captions such as "a handwritten digit 3"); with ``--pool``
also ``/tmp/tiny/pool``, both sets in one folder: the pool of ``smplora references prepare``.
"""

import argparse
import json
from pathlib import Path

from smplora_plugin.tiny_sd import TinySDConfig, save_tiny_pipeline, write_digit_images


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="Output folder.")
    p.add_argument("--digits", type=int, default=16, help="Training images (unique digits) to write.")
    p.add_argument("--holdout", type=int, default=16, help="Held-out images (disjoint from the training ones).")
    p.add_argument("--resolution", type=int, default=32, help="Image side in pixels (multiple of 8).")
    p.add_argument("--unet_channels", type=int, nargs="+", default=[16, 32], help="UNet block widths.")
    p.add_argument("--cross_attention_dim", type=int, default=32, help="Text-encoder width.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    p.add_argument("--pool", action="store_true",
                   help="Also write pool/: the training and held-out images together (for reference LoRAs).")
    args = p.parse_args(argv)
    out = Path(args.out)
    cfg = TinySDConfig(resolution=args.resolution, unet_channels=tuple(args.unet_channels),
                       cross_attention_dim=args.cross_attention_dim, seed=args.seed)
    save_tiny_pipeline(out / "pipeline", cfg)
    train = write_digit_images(out / "train", n=args.digits, start=0, size=args.resolution)
    held = (write_digit_images(out / "holdout", n=args.holdout, start=args.digits, size=args.resolution)
            if args.holdout else [])
    facts = {"pipeline": str(out / "pipeline"), "train": str(out / "train"), "n_train": len(train),
             "holdout": str(out / "holdout"), "n_holdout": len(held)}
    if args.pool:  # the same files (names, pixels, captions) as train/ and holdout/, in one folder
        pool = write_digit_images(out / "pool", n=args.digits + args.holdout, start=0, size=args.resolution)
        facts.update(pool=str(out / "pool"), n_pool=len(pool))
    print(json.dumps(facts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
