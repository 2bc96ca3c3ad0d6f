"""Check that a plain LoRA learns the Twemoji style on the emoji data set, and that it leaks.

    python scripts/emoji/check_style_lora.py [--members 32 128] [--epochs 10 30 100] [--seed 0] [--threads 1]

For each member count and number of epochs (passes over the members at batch 32, the demo's LoRA
recipe otherwise: rank 8, lr 1e-3), one plain LoRA is trained from the shipped emoji base on a
seeded member draw; it prints the style shares (the share of samples the shipped style classifier
puts in the Twemoji style, at the members' captions and at unseen captions) next to the base's,
the held-out and member denoising losses, and the AUC and TPR@1%FPR of the loss and base-calibrated
loss attacks (members vs as many unseen Twemoji non-members; attacks tuned on half of each).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    import torch

    from smplora_plugin.audit import AuditSamples, run_audit
    from smplora_plugin.demo import emoji
    from smplora_plugin.demo.datasets import get_dataset
    from smplora_plugin.demo.model import TinyLDM
    from smplora_plugin.demo.pipeline import _member_halves
    from smplora_plugin.demo.target import TinyLDMTarget
    from smplora_plugin.demo.train import train_lora

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, nargs="+", default=[32, 128])
    p.add_argument("--epochs", type=int, nargs="+", default=[10, 30, 100])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", type=int, default=100, help="samples per caption set for the style shares")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    loaded = emoji.load_base_model()
    if loaded is None:
        raise SystemExit("no shipped emoji base: python -m smplora_plugin.demo.make_assets --dataset emoji")
    base, clf = loaded
    cfg = get_dataset("emoji").model_config
    base_sd = base.base_state_dict()
    rows = []
    for m in args.members:
        splits = emoji.draw_members(m, seed=args.seed, nonmembers=2 * m)
        members, pool = splits["member"], splits["nonmember_eval"]
        nm_cal, nm_eval = pool.subset(range(m)), pool.subset(range(m, 2 * m))
        m_cal, m_eval = _member_halves(members, args.seed)
        util = dict(n=args.samples, seed=args.seed)
        b = emoji.style_utility(base, clf, members.captions, nm_eval, **util)
        print(f"M={m} base: style share members {b['style_share_members']:.3f} unseen {b['style_share_unseen']:.3f} "
              f"FD {b['frechet_distance']:.2f} KID {b['kernel_distance']:.4f}", flush=True)
        for ep in args.epochs:
            steps = max(1, round(ep * m / min(32, m)))
            model = TinyLDM(cfg, seed=0)
            model.load_base_state_dict(base_sd)
            model.add_lora(8, seed=args.seed)
            t0 = time.time()
            train_lora(model, members, steps=steps, lr=1e-3, batch_size=32, seed=args.seed, progress=False)
            model.requires_grad_(False)
            u = emoji.style_utility(model, clf, members.captions, nm_eval, **util)
            rep = run_audit(TinyLDMTarget(model), AuditSamples(m_eval.images, m_eval.captions, m_eval.ids),
                            AuditSamples(nm_eval.images, nm_eval.captions, nm_eval.ids),
                            calibration_members=AuditSamples(m_cal.images, m_cal.captions, m_cal.ids),
                            calibration_nonmembers=AuditSamples(nm_cal.images, nm_cal.captions, nm_cal.ids),
                            attacks=["loss", "loss_calibrated"], config={"seed": args.seed}, progress=False,
                            out_dir=None).to_dict()
            att = {k: (round(a["auc"], 3), a["tpr_at_1pct_fpr"]) for k, a in rep["attacks"].items()}
            row = {"members": m, "epochs": ep, "steps": steps, "seconds": round(time.time() - t0, 1),
                   "style_share_members": u["style_share_members"], "style_share_unseen": u["style_share_unseen"],
                   "base_style_share_members": b["style_share_members"],
                   "base_style_share_unseen": b["style_share_unseen"],
                   "frechet_distance": round(u["frechet_distance"], 3),
                   "kernel_distance": round(u["kernel_distance"], 4),
                   "heldout_loss": rep["utility"].get("heldout_denoising_loss"),
                   "member_loss": rep["utility"].get("member_denoising_loss"),
                   "verdict": (rep.get("verdict") or {}).get("verdict"), "attacks_auc_tpr1": att}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
