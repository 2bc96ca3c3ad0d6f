"""SMP-LoRA in a plain PyTorch loop, on a real tiny latent diffusion model.

The model is a diffusers ``UNet2DConditionModel`` (built from a small config) with a peft LoRA,
a small caption encoder ("a handwritten digit 3") and an exact pixel-unshuffle "autoencoder",
on scikit-learn's digits; the demo package supplies the model and the data splits, the loop
below is ordinary user code. It trains the same LoRA twice, without and with ``reg.step``,
then attacks both with two loss attacks of the audit suite.

    python examples/raw_pytorch_loop.py [--steps 400] [--members 16]

Runs in about two minutes on 2 CPU cores (shipped base weights; without them the base is
trained first, which takes several minutes more).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from smplora_plugin import PrivacyRegularizer
from smplora_plugin.audit import AuditSamples, run_audit
from smplora_plugin.demo.data import make_splits
from smplora_plugin.demo.model import TinyLDM, TinyLDMConfig
from smplora_plugin.demo.pipeline import DemoConfig, load_assets, train_assets
from smplora_plugin.demo.target import TinyLDMTarget


def train_lora(base_state, members, nonmembers, *, steps, reg=None, seed=0):
    """The user's training loop: plain LoRA, or SMP-LoRA when ``reg`` is given."""
    model = TinyLDM(TinyLDMConfig())
    model.load_base_state_dict(base_state)
    params = model.add_lora(rank=8, seed=seed)               # peft LoRA on the UNet's attention/FF layers
    unet, scheduler = model.unet.train(), model.scheduler
    opt = torch.optim.AdamW(params, lr=1e-3)
    g, g_nm = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        z, cond = model.encode(members.images), model.text(members.captions)
        z_nm, cond_nm = model.encode(nonmembers.images), model.text(nonmembers.captions)
    for step in range(steps):
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (z.shape[0],), generator=g)
        pred = unet(scheduler.add_noise(z, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)                       # the adaptation loss
        if reg is not None:                                  # SMP-LoRA: two extra lines
            j = torch.randperm(z_nm.shape[0], generator=g_nm)[: z.shape[0]]
            noise_nm = torch.randn(z_nm[j].shape, generator=g_nm)
            t_nm = torch.randint(0, scheduler.config.num_train_timesteps, (len(j),), generator=g_nm)
            with torch.no_grad():
                pred_nm = unet(scheduler.add_noise(z_nm[j], noise_nm, t_nm), t_nm,
                               encoder_hidden_states=cond_nm[j]).sample
            loss = reg.step(loss, reg.features(pred, noise), reg.features(pred_nm, noise_nm))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            shown = ("attacker_acc", "attacker_ce_member", "denominator")
            extra = "" if reg is None else "  " + "  ".join(f"{k}={v:.3f}" for k, v in reg.metrics().items()
                                                            if k in shown)
            print(f"  step {step:4d}  adaptation loss {F.mse_loss(pred.detach(), noise).item():.4f}{extra}", flush=True)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--members", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=10.0)
    ap.add_argument("--attacker-lr", type=float, default=1e-3)
    ap.add_argument("--k-steps", type=int, default=5, help="proxy attacker updates per step")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny ops: 1 is fastest)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    sp = make_splits({"member": args.members, "nonmember_defense": 32, "nonmember_calibration": 64,
                      "nonmember_eval": 128}, seed=0)
    assets = os.environ.get("SMPLORA_DEMO_ASSETS")  # a folder with other base weights (default: the shipped ones)
    loaded = load_assets(DemoConfig(), assets) if assets else load_assets(DemoConfig())
    base = loaded[0] if loaded is not None else train_assets(DemoConfig())[0]
    base_state = base.base_state_dict()
    members, half = sp["member"], args.members // 2
    cal_m, eval_m = members.subset(range(half)), members.subset(range(half, args.members))
    S = lambda d: AuditSamples(d.images, d.captions, d.ids)  # noqa: E731
    for name, reg in (("plain LoRA", None),
                      ("SMP-LoRA", PrivacyRegularizer(alpha=args.alpha, attacker_lr=args.attacker_lr,
                                                      k_steps=args.k_steps, feature_grid=4, seed=0))):
        print(f"{name}:")
        model = train_lora(base_state, members, sp["nonmember_defense"], steps=args.steps, reg=reg)
        rep = run_audit(TinyLDMTarget(model), S(eval_m), S(sp["nonmember_eval"]), calibration_members=S(cal_m),
                        calibration_nonmembers=S(sp["nonmember_calibration"]), attacks=["loss", "loss_calibrated"],
                        config={"n_boot": 200}, progress=False)
        for a, r in rep.attacks.items():
            tpr = "n/a" if r["tpr_at_1pct_fpr"] is None else f"{100 * r['tpr_at_1pct_fpr']:.1f}%"
            print(f"  attack {a:16s} AUC {r['auc']:.3f}  TPR@1%FPR {tpr}")
        print(f"  held-out denoising loss {rep.utility['heldout_denoising_loss']:.4f}")
        if reg is not None:
            print("  proxy attacker: " + ", ".join(f"{k}={v:.3f}" for k, v in reg.metrics().items()))
    print(f"wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
