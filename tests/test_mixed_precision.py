"""Mixed precision on CPU: bf16 autocast, bf16 weights (kohya --full_bf16), fp16 autocast with a GradScaler.

The raw loop (``PrivacyRegularizer.step``), the diffusers shim under ``Accelerator(mixed_precision="bf16")``
and the kohya stand-in with ``--mixed_precision bf16 [--full_bf16]``: loss-map features and the proxy
attacker stay fp32, the SMP ratio and the gradient reaching a bf16 LoRA are finite, the returned loss keeps
the adaptation loss's dtype, and state files hold fp32 tensors that resume exactly. CUDA fp16 / bf16 are not
run here (no GPU).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402

from smplora_plugin import PrivacyRegularizer, loss_maps  # noqa: E402
from smplora_plugin.tiny_sd import TinySDConfig, build_components  # noqa: E402

from _helpers import one_thread  # noqa: F401,E402  (an autouse fixture)

BF16 = torch.bfloat16
SMALL = TinySDConfig(unet_channels=(8, 16), unet_norm_groups=4, attention_head_dim=4, vae_channels=(8, 8),
                     cross_attention_dim=16, text_layers=1, text_heads=2, text_intermediate=16, max_length=8)
REG = dict(alpha=1.0, k_steps=2, feature_grid=4, hidden=(16,), attacker_lr=1e-2, seed=0, load_entry_points=False)


def lora_unet(dtype=torch.float32, lora_dtype=None):
    """The tiny SD1 UNet with a non-zero peft LoRA; base weights in ``dtype``, the LoRA in ``lora_dtype``."""
    from peft import LoraConfig

    unet = build_components(SMALL)["unet"]
    unet.requires_grad_(False)
    unet.to(dtype)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
            p.data = p.data.to(lora_dtype or dtype)
    return unet, params


def inputs(g, dtype=torch.float32, batch=2):
    x = torch.randn(batch, 4, 8, 8, generator=g)
    noise = torch.randn(batch, 4, 8, 8, generator=g)
    c = torch.randn(batch, SMALL.max_length, SMALL.cross_attention_dim, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return (x + noise).to(dtype), noise.to(dtype), t, c.to(dtype)


def float_dtypes(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()}


# ------------------------------------------------------------------------------------------- raw loop
def test_raw_loop_under_bf16_autocast_keeps_features_and_attacker_in_fp32():
    unet, params = lora_unet()
    opt = torch.optim.SGD(params, lr=1e-2)
    reg, twin = PrivacyRegularizer(**REG), PrivacyRegularizer(**REG)
    seen = []                                   # dtypes in and out of every attacker layer call
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        noisy, noise, t, c = inputs(g)
        with torch.autocast("cpu", dtype=BF16):
            pred = unet(noisy, t, c).sample
            with torch.no_grad():
                pred_nm = unet(noisy.flip(0), t, c).sample
            loss = F.mse_loss(pred.float(), noise)
            member, nonmember = reg.features(pred, noise), reg.features(pred_nm, noise)
            out = reg.step(loss, member, nonmember)
        assert pred.dtype == BF16                                   # autocast is on for the model ...
        assert member.dtype == nonmember.dtype == torch.float32     # ... the features are fp32
        assert out.dtype == loss.dtype == torch.float32 and torch.isfinite(out)
        # the same features and loss outside autocast give bit-identical results: the attacker ran in fp32
        ref = twin.step(loss.detach().requires_grad_(), member.detach().requires_grad_(), nonmember)
        assert torch.equal(ref.detach(), out.detach())
        assert all(torch.equal(a, b) for a, b in zip(reg.attacker.parameters(), twin.attacker.parameters()))
        if step == 0:
            for layer in reg.attacker.layers:
                layer.register_forward_hook(lambda m, a, o: seen.append((a[0].dtype, o.dtype)))
        opt.zero_grad()
        out.backward()
        grads = [p.grad for p in params]
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
        assert sum(float(gr.abs().sum()) for gr in grads) > 0
        opt.step()
    assert seen and set(seen) == {(torch.float32, torch.float32)}
    assert {p.dtype for p in reg.attacker.parameters()} == {torch.float32}


@pytest.mark.parametrize("loss_in_bf16", [False, True])
def test_raw_loop_with_bf16_lora_weights_gives_finite_bf16_gradients(loss_in_bf16):
    unet, params = lora_unet(BF16)
    assert {p.dtype for p in params} == {BF16}
    opt = torch.optim.SGD(params, lr=1e-2)
    reg = PrivacyRegularizer(**REG)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        noisy, noise, t, c = inputs(g, BF16)
        pred = unet(noisy, t, c).sample
        with torch.no_grad():
            pred_nm = unet(noisy.flip(0), t, c).sample
        # kohya and the diffusers scripts take the loss in fp32; a plain bf16 loop may keep it in bf16
        loss = F.mse_loss(pred, noise) if loss_in_bf16 else F.mse_loss(pred.float(), noise.float())
        member = reg.features(pred, noise)
        assert pred.dtype == BF16 and member.dtype == torch.float32
        out = reg.step(loss, member, reg.features(pred_nm, noise))
        assert out.dtype == loss.dtype and torch.isfinite(out)
        # d out / d loss is 1 / (beta + alpha * CE_m + delta): the ratio, taken in fp32
        (d_loss,) = torch.autograd.grad(out, loss, retain_graph=True)
        assert float(d_loss) == pytest.approx(1.0 / reg.metrics()["denominator"], rel=1e-2)
        shown = reg.keep_loss_value(out, loss)
        assert shown.dtype == loss.dtype and torch.equal(shown.detach(), loss.detach())
        opt.zero_grad()
        shown.backward()
        grads = [p.grad for p in params]
        assert all(gr.dtype == BF16 and torch.isfinite(gr).all() for gr in grads)
        assert sum(float(gr.float().abs().sum()) for gr in grads) > 0
        opt.step()
        assert all(torch.isfinite(p).all() for p in params)
    assert {p.dtype for p in reg.attacker.parameters()} == {torch.float32}


def test_fp16_autocast_with_grad_scaler_steps_without_inf():
    """The diffusers scripts' --mixed_precision fp16 layout: fp16 base weights, fp32 LoRA, fp16 autocast and a
    GradScaler (here on CPU)."""
    unet, params = lora_unet(torch.float16, lora_dtype=torch.float32)
    opt = torch.optim.AdamW(params, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    reg = PrivacyRegularizer(**REG)
    g = torch.Generator().manual_seed(2)
    before = [p.detach().clone() for p in params]
    for _ in range(3):
        noisy, noise, t, c = inputs(g)
        with torch.autocast("cpu", dtype=torch.float16):
            pred = unet(noisy, t, c).sample
            with torch.no_grad():
                pred_nm = unet(noisy.flip(0), t, c).sample
            loss = F.mse_loss(pred.float(), noise)
            member = reg.features(pred, noise)
            out = reg.step(loss, member, reg.features(pred_nm, noise), keep_loss_value=True)
        assert pred.dtype == torch.float16 and member.dtype == torch.float32
        assert torch.equal(out.detach(), loss.detach())
        opt.zero_grad()
        scaler.scale(out).backward()
        scaler.unscale_(opt)
        assert all(torch.isfinite(p.grad).all() for p in params)
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == 2.0 ** 16          # no inf/NaN gradient made the scaler back off
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


def test_loss_maps_of_fp16_predictions_are_taken_in_fp32():
    pred = torch.full((1, 4, 8, 8), 300.0, dtype=torch.float16)
    target = torch.zeros(1, 4, 8, 8, dtype=torch.float16)
    assert torch.isinf((pred - target).pow(2)).all()              # 90000 overflows fp16 ...
    maps = loss_maps(pred, target, grid=4)
    assert maps.dtype == torch.float32 and torch.all(maps == 90000.0)   # ... not the fp32 loss map
    with torch.autocast("cpu", dtype=BF16):
        assert loss_maps(pred.to(BF16), target.to(BF16), grid=2).dtype == torch.float32


def test_attacker_is_fp32_when_the_default_dtype_is_bf16(tmp_path):
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(2, 4, 8, 8, generator=g).requires_grad_()
    target = torch.randn(2, 4, 8, 8, generator=g)
    plain = PrivacyRegularizer(**REG)
    expected = plain.step(F.mse_loss(pred, target), plain.features(pred, target), plain.features(target, pred))
    default = torch.get_default_dtype()
    torch.set_default_dtype(BF16)
    try:
        reg = PrivacyRegularizer(**REG)
        out = reg.step(F.mse_loss(pred, target), reg.features(pred, target), reg.features(target, pred))
        reg.save(tmp_path / "state.safetensors")
        again = PrivacyRegularizer.load(tmp_path / "state.safetensors", load_entry_points=False)
    finally:
        torch.set_default_dtype(default)
    assert torch.equal(out, expected)                              # same init, same update as under fp32
    assert {p.dtype for p in reg.attacker.parameters()} == {p.dtype for p in again.attacker.parameters()} == {
        torch.float32}
    assert set(float_dtypes(tmp_path / "state.safetensors").values()) == {torch.float32}
    assert all(torch.equal(a, b) for a, b in zip(reg.attacker.parameters(), again.attacker.parameters()))


def test_state_saved_under_bf16_is_fp32_and_resumes_exactly(tmp_path):
    """Six steps in one go equal three steps, save, load into a new regulariser, three more (bf16 model under
    autocast feeding the features)."""
    unet, _ = lora_unet(BF16)
    g = torch.Generator().manual_seed(4)
    batches = [inputs(g, BF16) for _ in range(6)]

    def run(reg, todo):
        outs = []
        for noisy, noise, t, c in todo:
            with torch.autocast("cpu", dtype=BF16):
                pred = unet(noisy, t, c).sample
                with torch.no_grad():
                    pred_nm = unet(noisy.flip(0), t, c).sample
                loss = F.mse_loss(pred.float(), noise.float())
                outs.append(reg.step(loss, reg.features(pred, noise), reg.features(pred_nm, noise)).detach())
        return outs

    straight = PrivacyRegularizer(**REG)
    expected = run(straight, batches)
    first = PrivacyRegularizer(**REG)
    got = run(first, batches[:3])
    first.save(tmp_path / "state.safetensors")
    dtypes = float_dtypes(tmp_path / "state.safetensors")
    assert any(k.startswith("attacker.") for k in dtypes) and set(dtypes.values()) == {torch.float32}
    resumed = PrivacyRegularizer.load(tmp_path / "state.safetensors", load_entry_points=False)
    got += run(resumed, batches[3:])
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert all(torch.equal(a, b) for a, b in zip(resumed.attacker.parameters(), straight.attacker.parameters()))


def test_state_with_converted_attacker_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from smplora_plugin.errors import StateError

    reg = PrivacyRegularizer(**REG)
    g = torch.Generator().manual_seed(5)
    pred, target = torch.randn(2, 4, 8, 8, generator=g).requires_grad_(), torch.randn(2, 4, 8, 8, generator=g)
    reg.step(F.mse_loss(pred, target), reg.features(pred, target), reg.features(target, pred))
    reg.save(tmp_path / "state.safetensors")
    with safe_open(str(tmp_path / "state.safetensors"), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(tmp_path / "state.safetensors"))
    tensors = {k: v.to(BF16) if k.startswith("attacker.") else v for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / "bf16.safetensors"), meta)
    with pytest.raises(StateError, match="bfloat16, but states are saved in fp32"):
        PrivacyRegularizer.load(tmp_path / "bf16.safetensors", load_entry_points=False)


def test_tiny_sdxl_unet_under_bf16_autocast():
    """SDXL's added text / time conditions under autocast: bf16 prediction, fp32 features, finite LoRA gradients."""
    from peft import LoraConfig

    from smplora_plugin.tiny_xl import TinySDXLConfig, build_sdxl_components

    cfg = TinySDXLConfig()
    unet = build_sdxl_components(cfg)["unet"]
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(6)
    noisy, noise = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, cfg.max_length, cfg.text_dim + cfg.text_dim_2, generator=g)
    cond = {"text_embeds": torch.randn(2, cfg.projection_dim, generator=g),
            "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2)}
    t = torch.tensor([100, 700])
    reg = PrivacyRegularizer(**REG)
    with torch.autocast("cpu", dtype=BF16):
        pred = unet(noisy, t, ctx, added_cond_kwargs=cond).sample
        with torch.no_grad():
            pred_nm = unet(noisy.flip(0), t, ctx, added_cond_kwargs=cond).sample
        loss = F.mse_loss(pred.float(), noise)
        member = reg.features(pred, noise)
        out = reg.step(loss, member, reg.features(pred_nm, noise))
    assert pred.dtype == BF16 and member.dtype == torch.float32 and member.shape == (2, 4 * 4 * 4)
    out.backward()
    assert torch.isfinite(out) and all(torch.isfinite(p.grad).all() for p in params)
    assert sum(float(p.grad.abs().sum()) for p in params) > 0


# ------------------------------------------------------------------------------------------- diffusers shim
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate():
    pytest.importorskip("accelerate")
    fresh_accelerate_state()
    yield
    fresh_accelerate_state()


def _shim_setup(preset):
    """The diffusers script's layout under --mixed_precision bf16: UNet (and so its LoRA) in bf16, prepared
    by accelerate (autocast, fp32 outputs), with the shim's regulariser attached."""
    import argparse

    from accelerate import Accelerator

    from smplora_plugin.integrations.diffusers import PrivacyRegularizer as ShimRegularizer
    from smplora_plugin.integrations.diffusers import add_privacy_args

    acc = Accelerator(cpu=True, mixed_precision="bf16")
    unet, params = lora_unet(BF16)
    opt = torch.optim.SGD(params, lr=1e-2)
    unet, opt = acc.prepare(unet, opt)
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    args = add_privacy_args(parser).parse_args(
        ["--privacy", "smplora", "--privacy_preset", preset, "--privacy_holdout_dir", "unused",
         "--privacy_feature_grid", "4", "--privacy_attacker_hidden", "16", "--privacy_nonmember_every", "1"])
    reg = ShimRegularizer.from_args(args, device=acc.device)
    reg.attach(acc)
    return acc, unet, params, opt, reg


@pytest.mark.parametrize("preset", ["paper", "robust"])
def test_diffusers_shim_under_accelerate_bf16(preset, tmp_path, fresh_accelerate, capsys):
    acc, unet, params, opt, reg = _shim_setup(preset)
    denoiser_dtypes = []
    acc.unwrap_model(unet).conv_in.register_forward_hook(lambda m, a, o: denoiser_dtypes.append(o.dtype))
    g = torch.Generator().manual_seed(7)

    def predict(batch, n=None):                           # the script's forward: pred, target (, base_pred)
        noisy, noise, t, c = batch
        pred = unet(noisy, t, c, return_dict=False)[0]
        base = reg.reference(unet, n, lambda: unet(noisy[:n], t[:n], c[:n], return_dict=False)[0])
        return (pred, noise) if base is None else (pred, noise, base)

    for _ in range(3):
        batch, held_out = inputs(g, BF16, batch=4), inputs(g, BF16, batch=4)
        with acc.accumulate(unet):
            n = reg.privacy_rows(4)                       # this step's privacy rows (explicit in every call)
            pred, target, *base = predict(batch, n)
            loss = F.mse_loss(pred.float(), target.float())
            held_out = tuple(x[:n] for x in held_out)
            out = reg.step(loss, reg.features(pred, target, rows=n, reference=base[0] if base else None),
                           reg.nonmember_features(predict, batch=held_out, rows=n), update_attacker=acc.sync_gradients)
            assert torch.equal(out.detach(), loss.detach()) and out.dtype == torch.float32
            acc.backward(out)
            assert all(p.grad.dtype == BF16 and torch.isfinite(p.grad).all() for p in params)
            opt.step()
            opt.zero_grad()
    assert set(denoiser_dtypes) == {BF16} and pred.dtype == torch.float32      # accelerate's fp32 outputs
    m = reg.metrics()
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values()) and m["attacker_updates"] == 3
    acc.save_state(str(tmp_path / "ckpt"))
    state_file = tmp_path / "ckpt" / "smplora_state.safetensors"
    assert set(float_dtypes(state_file).values()) == {torch.float32}
    saved = reg.state_dict()

    fresh_accelerate_state()
    acc2, _, _, _, reg2 = _shim_setup(preset)
    acc2.load_state(str(tmp_path / "ckpt"))
    loaded = reg2.state_dict()                    # attacker, its optimiser, RNG and non-member bank: bit-exact
    assert reg2.global_step == 3 and loaded.keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) if isinstance(v, torch.Tensor) else v == saved[k] for k, v in loaded.items())


@pytest.mark.slow
def test_diffusers_example_script_trains_under_mixed_precision_bf16(tmp_path):
    """examples/diffusers/train_text_to_image_lora.py (the official script plus the shim's lines) with
    --mixed_precision bf16 and the robust preset: the LoRA trains in bf16 (its mid-run checkpoint is bf16; the
    script casts the final one to fp32), the attacker state is fp32."""
    from test_diffusers_example import SCRIPT, _env, _load_example

    assert _load_example("make_tiny_pipeline").main(["--out", str(tmp_path), "--digits", "8", "--holdout", "8"]) == 0
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--pretrained_model_name_or_path", str(tmp_path / "pipeline"),
           "--train_data_dir", str(tmp_path / "train"), "--resolution", "32", "--center_crop",
           "--train_batch_size", "4", "--max_train_steps", "3", "--checkpointing_steps", "2",
           "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "0", "--rank", "4",
           "--mixed_precision", "bf16", "--privacy", "smplora", "--privacy_preset", "robust",
           "--privacy_holdout_dir", str(tmp_path / "holdout"), "--privacy_feature_grid", "8",
           "--privacy_attacker_hidden", "32", "16", "--output_dir", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("smplora {")]
    metrics = json.loads(line[-1][len("smplora "):])
    assert metrics["attacker_updates"] == 3 and all(math.isfinite(v) for v in metrics.values())
    assert metrics["regularized_loss"] < metrics["adaptation_loss"]          # the SMP ratio, denominator > 1
    assert set(float_dtypes(out / "checkpoint-2" / "pytorch_lora_weights.safetensors").values()) == {BF16}
    for state in (out / "smplora_state.safetensors", out / "checkpoint-2" / "smplora_state.safetensors"):
        assert set(float_dtypes(state).values()) == {torch.float32}
