"""Train the demo's base model and digit classifier on the public pool and write them to ``assets/``.

    python -m smplora_plugin.demo.make_assets [--dataset digits|textures|emoji] \
        [--out smplora_plugin/demo/assets] [--threads 2]

Deterministic (seed 0, fixed public pool). The demo loads these weights when their header
matches its model config and base recipe, and trains them itself otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    from .pipeline import ASSETS, DemoConfig, save_assets, train_assets
    from .quality import classifier_accuracy

    p = argparse.ArgumentParser(prog="python -m smplora_plugin.demo.make_assets", description=__doc__.splitlines()[0])
    from .datasets import NAMES

    p.add_argument("--dataset", choices=NAMES, default="digits", help="which data set's weights to make")
    p.add_argument("--out", default=str(ASSETS), help=f"output folder (default {ASSETS})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DemoConfig(dataset=args.dataset)
    t0 = time.time()
    torch.set_flush_denormal(True)
    model, clf = train_assets(cfg, progress=not args.no_progress)
    paths = save_assets(model, clf, cfg, args.out)
    held = cfg.data.splits({"nonmember_eval": 500}, 0)["nonmember_eval"]
    acc = classifier_accuracy(clf, held.images, held.labels)
    size = sum(pth.stat().st_size for pth in paths.values())
    print(f"wrote {', '.join(str(x) for x in paths.values())} ({size / 1e6:.2f} MB) in {time.time() - t0:.0f} s; "
          f"classifier accuracy on the 500 private-pool images: {acc:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
