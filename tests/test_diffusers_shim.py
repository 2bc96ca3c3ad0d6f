"""The diffusers shim alone: args, holdout batches, bad input, accumulation, accelerate checkpoint hooks, and the
delegate's explicit per-step row count."""

import argparse
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("accelerate")
pytest.importorskip("sklearn")
pytest.importorskip("PIL")

from smplora_plugin import PrivacyConfig  # noqa: E402
from smplora_plugin import PrivacyRegularizer as CoreRegularizer  # noqa: E402
from smplora_plugin.errors import ConfigError, FeatureError, HoldoutError, StateError  # noqa: E402
from smplora_plugin.integrations.diffusers import (  # noqa: E402
    STATE_FILENAME,
    HoldoutImages,
    PrivacyRegularizer,
    adapters_disabled,
    add_privacy_args,
    instance_half,
    privacy_config_from_args,
    privacy_regularizer_from_args,
)
from smplora_plugin.tiny_sd import write_digit_images  # noqa: E402


def parse(*argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--train_batch_size", type=int, default=3)
    parser.add_argument("--train_data_dir", default=None)
    add_privacy_args(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    write_digit_images(root / "train", n=8, start=0, size=16)
    write_digit_images(root / "holdout", n=10, start=8, size=16)
    return root


@pytest.fixture
def fresh_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def to_tensor_preprocess(examples):
    import numpy as np

    examples["pixel_values"] = [torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1)
                                .permute(2, 0, 1) for im in examples["image"]]
    examples["n_chars"] = [len(c) for c in examples["text"]]
    return examples


def collate(rows):
    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
            "text": [r["text"] for r in rows]}


# ------------------------------------------------------------------------------------------- args
def test_args_map_to_the_core_config(folders):
    args = parse("--privacy", "smplora", "--privacy_holdout_dir", str(folders / "holdout"), "--privacy_alpha", "0.5",
                 "--privacy_beta", "2", "--privacy_k_steps", "3", "--privacy_attacker_lr", "1e-3",
                 "--privacy_attacker_hidden", "32", "16", "--privacy_feature_grid", "8", "--seed", "7")
    reg = PrivacyRegularizer.from_args(args, device="cpu")
    assert isinstance(reg.core, CoreRegularizer) and not isinstance(reg, CoreRegularizer)   # a delegate
    c = reg.config
    assert (c.objective, c.alpha, c.beta, c.k_steps, c.attacker_lr, c.hidden, c.feature_grid, c.seed, c.device) == (
        "smp", 0.5, 2.0, 3, 1e-3, (32, 16), (8, 8), 7, "cpu")
    mp = privacy_config_from_args(parse("--privacy", "mplora", "--privacy_holdout_dir", "x", "--privacy_seed", "2",
                                        "--privacy_feature_grid", "0"))
    assert (mp.objective, mp.seed, mp.feature_grid) == ("mp", 2, None)
    assert PrivacyRegularizer.from_args(parse()) is None                      # --privacy none (default)
    assert privacy_regularizer_from_args(parse("--privacy", "none")) is None
    with pytest.raises(HoldoutError, match="--privacy_holdout_dir"):
        PrivacyRegularizer.from_args(parse("--privacy", "smplora"))
    with pytest.raises(ConfigError, match="beta"):
        PrivacyRegularizer.from_args(parse("--privacy", "smp", "--privacy_holdout_dir", "x", "--privacy_beta", "0"))


def test_an_unknown_privacy_method_is_a_config_error_naming_the_valid_ones(folders):
    """argparse's choices refuse it on the command line; an args object built otherwise (a config file, a
    Namespace) gets the same answer from the shim: a ConfigError, not a HoldoutError, with the valid values."""
    args = argparse.Namespace(privacy="dp-sgd", privacy_holdout_dir=str(folders / "holdout"))
    with pytest.raises(ConfigError, match=r"--privacy 'dp-sgd' is unknown; choose one of none, smplora, smp, "
                                          r"mplora, mp ") as exc:
        privacy_config_from_args(args)
    assert not isinstance(exc.value, HoldoutError)
    for build in (PrivacyRegularizer.from_args, privacy_regularizer_from_args, HoldoutImages.from_args):
        with pytest.raises(ConfigError, match="dp-sgd"):
            build(args)
    assert privacy_config_from_args(argparse.Namespace(privacy="SMPLoRA", privacy_holdout_dir="x")).objective == "smp"


def test_parsed_privacy_args_are_scalars_for_the_trackers(capsys):
    """The official scripts call accelerator.init_trackers(config=vars(args)); tensorboard's hyperparameter
    log takes only None, bool, int, float and str, so no --privacy* value may be a list."""
    args = parse("--privacy", "smplora", "--privacy_holdout_dir", "x", "--privacy_attacker_hidden", "32", "16",
                 "--privacy_preset", "robust", "--privacy_calibrated")
    assert args.privacy_attacker_hidden == "32,16"
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in vars(args).values())
    assert privacy_config_from_args(args).hidden == (32, 16)
    comma = parse("--privacy", "smplora", "--privacy_holdout_dir", "x", "--privacy_attacker_hidden", "64,32")
    assert privacy_config_from_args(comma).hidden == (64, 32)
    for bad in (["0"], ["8", "x"]):
        with pytest.raises(SystemExit):
            parse("--privacy_attacker_hidden", *bad)
        assert "--privacy_attacker_hidden" in capsys.readouterr().err


def test_preset_gives_the_base_values_and_only_given_flags_override_it():
    base = ("--privacy", "smplora", "--privacy_holdout_dir", "x", "--seed", "3")
    paper = privacy_config_from_args(parse(*base))
    assert paper == PrivacyConfig.preset("paper", seed=3)                     # defaults: the core's, untouched
    robust = privacy_config_from_args(parse(*base, "--privacy_preset", "robust"))
    assert (robust.calibrated, robust.alpha, robust.attacker_lr) == (True, 20.0, 1e-3)
    assert robust == PrivacyConfig.preset("robust", seed=3)
    # an explicit flag wins even when it equals the paper default
    mixed = privacy_config_from_args(parse(*base, "--privacy_preset", "ROBUST", "--privacy_alpha", "0.05",
                                           "--no-privacy_calibrated"))
    assert (mixed.calibrated, mixed.alpha, mixed.attacker_lr) == (False, 0.05, 1e-3)
    cal = privacy_config_from_args(parse(*base, "--privacy_calibrated"))
    assert (cal.calibrated, cal.alpha, cal.attacker_lr) == (True, paper.alpha, paper.attacker_lr)
    with pytest.raises(SystemExit):
        parse(*base, "--privacy_preset", "strong")


def test_privacy_fraction_flag_and_the_holdout_batch_it_implies(folders):
    base = ("--privacy", "smplora", "--privacy_holdout_dir", str(folders / "holdout"), "--train_batch_size", "8")
    robust = privacy_config_from_args(parse(*base, "--privacy_preset", "robust"))
    assert robust.privacy_fraction == 0.25
    assert privacy_config_from_args(parse(*base, "--privacy_preset", "robust", "--privacy_fraction", "1")
                                     ).privacy_fraction == 1.0
    assert HoldoutImages.from_args(parse(*base), to_tensor_preprocess, collate).batch_size == 8
    assert HoldoutImages.from_args(parse(*base, "--privacy_preset", "robust"), to_tensor_preprocess, collate
                                   ).batch_size == 2                   # a quarter of --train_batch_size
    assert HoldoutImages.from_args(parse(*base, "--privacy_fraction", "0.5", "--privacy_holdout_batch_size", "3"),
                                   to_tensor_preprocess, collate).batch_size == 3   # an explicit size wins
    with pytest.raises(ConfigError, match="privacy_fraction"):
        privacy_config_from_args(parse(*base, "--privacy_fraction", "0"))


def test_instance_half_keeps_only_the_instance_images():
    pred, target = torch.arange(8.0).reshape(4, 2), -torch.arange(8.0).reshape(4, 2)
    p, t = instance_half(pred, target)
    assert torch.equal(p, pred[:2]) and torch.equal(t, target[:2])
    assert instance_half(pred, with_prior_preservation=False) is pred
    with pytest.raises(ValueError, match="odd"):
        instance_half(pred[:3])


# ------------------------------------------------------------------------------------------- holdout
def test_holdout_cycles_seeded_and_reads_captions(folders):
    h = HoldoutImages(folders / "holdout", batch_size=4, seed=3)
    assert len(h) == 10
    draws = [h.next_indices() for _ in range(5)]        # 20 = two full passes
    assert sorted(draws[0] + draws[1] + draws[2][:2]) == list(range(10))   # a pass is a permutation
    assert draws != [list(range(i * 4, i * 4 + 4)) for i in range(5)]     # shuffled
    again = HoldoutImages(folders / "holdout", batch_size=4, seed=3)
    assert [again.next_indices() for _ in range(5)] == draws              # seeded
    other = HoldoutImages(folders / "holdout", batch_size=4, seed=4)
    assert [other.next_indices() for _ in range(5)] != draws
    rows = next(HoldoutImages(folders / "holdout", batch_size=2, seed=3))   # no preprocess: raw rows
    assert rows[0]["text"].startswith("a handwritten digit ") and rows[0]["image"].size == (16, 16)
    # metadata.jsonl absent -> sidecar .txt captions
    (folders / "holdout_txt").mkdir(exist_ok=True)
    for f in (folders / "holdout").glob("digit_*"):
        shutil.copy(f, folders / "holdout_txt" / f.name)
    a = HoldoutImages(folders / "holdout", batch_size=1)
    b = HoldoutImages(folders / "holdout_txt", batch_size=1)
    assert a.captions == b.captions and len(set(a.captions)) > 1


def test_holdout_uses_the_scripts_preprocessing_and_shards_a_global_draw(folders):
    single = HoldoutImages(folders / "holdout", preprocess=to_tensor_preprocess, collate_fn=collate, batch_size=4,
                           seed=1)
    ranks = [HoldoutImages(folders / "holdout", preprocess=to_tensor_preprocess, collate_fn=collate, batch_size=2,
                           seed=1, process_index=r, num_processes=2) for r in range(2)]
    for _ in range(4):
        s = next(single)
        parts = [next(r) for r in ranks]
        assert s["pixel_values"].shape == (4, 3, 16, 16) and s["pixel_values"].min() >= -1
        assert torch.equal(s["pixel_values"], torch.cat([p["pixel_values"] for p in parts]))
        assert s["text"] == parts[0]["text"] + parts[1]["text"]


def test_holdout_state_round_trip_continues_exactly(folders):
    a = HoldoutImages(folders / "holdout", batch_size=3, seed=2)
    for _ in range(4):
        a.next_indices()
    b = HoldoutImages(folders / "holdout", batch_size=3, seed=2)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [b.next_indices() for _ in range(5)] == [a.next_indices() for _ in range(5)]
    c = HoldoutImages(folders / "holdout", batch_size=2, seed=2)
    before = c.state_dict()
    with pytest.raises(StateError, match="batch_size"):
        c.load_state_dict(a.state_dict())
    assert c.state_dict() == before


def test_bad_holdout_folders_are_refused_with_clear_messages(folders, tmp_path):
    with pytest.raises(HoldoutError, match="does not exist"):
        HoldoutImages(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(HoldoutError, match="contains no images"):
        HoldoutImages(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(folders / "holdout", broken)
    (broken / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(HoldoutError, match=r"cannot be read: .*zz_corrupt\.png"):
        HoldoutImages(broken)
    overlap = tmp_path / "overlap"
    shutil.copytree(folders / "holdout", overlap)
    train_img = sorted((folders / "train").glob("*.png"))[3]
    shutil.copy(train_img, overlap / "renamed_copy.png")        # same bytes under another name
    with pytest.raises(HoldoutError, match=r"byte-identical .*renamed_copy\.png"):
        HoldoutImages(overlap, train_dir=folders / "train")
    HoldoutImages(folders / "holdout", train_dir=folders / "train")  # the clean pair passes
    args = parse("--privacy", "smplora", "--privacy_holdout_dir", str(overlap), "--train_data_dir",
                 str(folders / "train"))
    with pytest.raises(HoldoutError, match="byte-identical"):
        HoldoutImages.from_args(args)
    assert HoldoutImages.from_args(parse()) is None
    unchecked = parse("--privacy", "smplora", "--privacy_holdout_dir", str(folders / "holdout"))
    with pytest.warns(UserWarning, match="not checked against the training images"):
        HoldoutImages.from_args(unchecked)


# ------------------------------------------------------------------------------------------- accelerate
def _tiny_setup(folders, accelerator, *argv):
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 3, padding=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    args = parse("--privacy", "smplora", "--privacy_holdout_dir", str(folders / "holdout"), "--privacy_feature_grid",
                 "4", "--privacy_attacker_hidden", "8", "--privacy_attacker_lr", "1e-2", "--seed", "1",
                 "--train_batch_size", "2", "--train_data_dir", str(folders / "train"),
                 "--privacy_nonmember_every", "1", *argv)  # a held-out draw per update unless argv says otherwise
    reg = PrivacyRegularizer.from_args(args, device=accelerator.device)
    holdout = HoldoutImages.from_args(args, to_tensor_preprocess, collate, accelerator)
    handles = reg.attach(accelerator, holdout)
    train = HoldoutImages(folders / "train", preprocess=to_tensor_preprocess, collate_fn=collate, batch_size=2, seed=9)

    def forward(batch):
        x = batch["pixel_values"]
        return model(x), x

    def one_step():
        batch = next(train)
        with accelerator.accumulate(model):
            pred, target = forward(batch)
            loss = F.mse_loss(pred, target)
            n = reg.privacy_rows(len(pred))
            loss = reg.step(loss, reg.features(pred, target, rows=n), reg.nonmember_features(forward, rows=n),
                            update_attacker=accelerator.sync_gradients)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
        return loss.detach()

    return model, reg, holdout, train, one_step, handles


def test_attacker_updates_once_per_optimizer_step_under_accumulation(folders, fresh_accelerate):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, gradient_accumulation_steps=3)
    model, reg, holdout, _, one_step, _ = _tiny_setup(folders, acc)
    syncs = []
    for _ in range(6):
        one_step()
        syncs.append(acc.sync_gradients)
    assert syncs == [False, False, True, False, False, True]
    assert reg.attacker_updates == 2 and holdout.draws == 2 and reg.global_step == 6
    m = reg.log_dict()
    assert all(isinstance(v, float) for v in m.values()) and m["smplora/attacker_updates"] == 2.0
    assert {"mia_ce", "mia_acc"} <= set(reg.progress_postfix())


def test_loss_display_and_start_up_summary(folders, fresh_accelerate, capsys):
    """reg.step keeps the denoising loss's value (what step_loss / train_loss show) and attach() prints a
    summary box, like kohya's, that says so."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    _, reg, holdout, _, one_step, _ = _tiny_setup(folders, acc)
    text = capsys.readouterr().out
    assert "SMP-LoRA" in text and f"{len(holdout)} images" in text and "NEVER trained on" in text
    assert "step_loss / train_loss stay the script's denoising loss" in text and "mia_ce" in text
    assert all(len(line) <= 78 for line in text.splitlines() if "/" not in line)
    shown = one_step()
    m = reg.metrics()
    assert shown.item() == pytest.approx(m["adaptation_loss"], rel=1e-6)
    assert abs(m["regularized_loss"] - m["adaptation_loss"]) > 1e-3 * m["adaptation_loss"]


def test_held_out_forward_is_amortised_with_nonmember_every(folders, fresh_accelerate):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    _, reg, holdout, _, one_step, _ = _tiny_setup(folders, acc, "--privacy_nonmember_every", "3")
    assert reg.config.nonmember_every == 3
    for _ in range(7):
        one_step()
    assert reg.attacker_updates == 7 and holdout.draws == 3     # fresh non-members at updates 0, 3 and 6


def test_checkpoint_hooks_write_safetensors_and_resume_exactly(folders, tmp_path, fresh_accelerate):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model, reg, holdout, train, one_step, handles = _tiny_setup(folders, acc)
    for _ in range(3):
        one_step()
    acc.save_state(str(tmp_path / "ckpt"))
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert STATE_FILENAME in files and not any(f.startswith("custom_checkpoint") for f in files)
    assert all(m is not reg.attacker for m in acc._models)            # never through accelerator.prepare
    train_state = train.state_dict()
    expected = [one_step() for _ in range(3)]
    expected_attacker = {k: v.clone() for k, v in reg.attacker.state_dict().items()}

    # a fresh regulariser + holdout resumes from the checkpoint and continues identically
    for h in handles:
        h.remove()
    acc2 = Accelerator(cpu=True)
    model2, reg2, holdout2, train2, one_step2, _ = _tiny_setup(folders, acc2)
    acc2.load_state(str(tmp_path / "ckpt"))
    train2.load_state_dict(train_state)
    assert reg2.global_step == 3 and holdout2.draws == holdout.draws - 3
    got = [one_step2() for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    for k, v in reg2.attacker.state_dict().items():
        assert torch.equal(v, expected_attacker[k])

    # a checkpoint without the file: a clear error, nothing changed
    (tmp_path / "ckpt" / STATE_FILENAME).unlink()
    before = {k: v.clone() for k, v in reg2.attacker.state_dict().items()}
    with pytest.raises(StateError, match="saved without --privacy"):
        reg2.load_checkpoint(tmp_path / "ckpt")
    assert all(torch.equal(before[k], v) for k, v in reg2.attacker.state_dict().items())


# ------------------------------------------------------------------------------------------- calibrated features
@pytest.fixture(scope="module")
def peft_unet():
    """A tiny diffusers UNet with a (non-zero) peft LoRA, its inputs, and its outputs before the LoRA was added."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from peft import LoraConfig

    from smplora_plugin.tiny_sd import TinySDConfig, build_components

    torch.manual_seed(0)
    unet = build_components(TinySDConfig())["unet"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    c = torch.randn(2, 5, 32, generator=g)
    x_n = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        before = unet(x, t, c, return_dict=False)[0], unet(x_n, t, c, return_dict=False)[0]
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        torch.nn.init.normal_(next(p for n, p in unet.named_parameters() if "lora_B" in n), std=0.5)
    return unet, (x, t, c, x_n), before


def test_robust_preset_feeds_the_base_prediction_for_members_and_nonmembers(peft_unet):
    unet, (x, t, c, x_n), (base_m, base_n) = peft_unet
    wrapped = torch.nn.DataParallel(unet)                      # .module, as accelerate's DDP wrapping
    args = parse("--privacy", "smplora", "--privacy_preset", "robust", "--privacy_holdout_dir", "x",
                 "--privacy_feature_grid", "4", "--privacy_attacker_hidden", "8", "--seed", "0",
                 "--privacy_nonmember_every", "1")
    reg = PrivacyRegularizer.from_args(args, device="cpu")
    assert reg.config.calibrated
    core = CoreRegularizer(reg.config)

    def predict(latents, n=None):                              # the script's forward: pred, target, base_pred
        target = torch.zeros_like(latents)
        pred = wrapped(latents, t, c, return_dict=False)[0]
        return pred, target, reg.reference(wrapped, n, lambda: wrapped(latents[:n], t[:n], c[:n],
                                                                       return_dict=False)[0])

    n = reg.privacy_rows(len(x))                               # the documented line
    assert reg.config.privacy_fraction == 0.25 and len(x) == 2 and n == 1
    pred, target, ref = predict(x, n)
    assert ref.shape[0] == n
    assert torch.allclose(ref, base_m[:n], atol=1e-5) and not ref.requires_grad   # the LoRA was off ...
    assert not torch.allclose(pred.detach(), base_m, atol=1e-3) and pred.requires_grad  # ... and is back on
    feats = reg.features(pred, target, rows=n, reference=ref)
    assert feats.requires_grad and feats.shape[0] == n         # the privacy term sees the batch's first n
    assert torch.allclose(feats, core.features(pred[:n], target[:n], reference=base_m[:n]), atol=1e-5)
    raw = CoreRegularizer(reg.config.replace(calibrated=False)).features(pred[:n], target[:n])
    assert not torch.allclose(feats, raw, atol=1e-4)           # the reference changed the features
    nm = reg.nonmember_features(predict, batch=x_n, rows=n)    # a held-out batch is used whole
    pred_n = predict(x_n)[0].detach()
    assert nm.shape[0] == len(x_n)
    assert torch.allclose(nm, core.features(pred_n, torch.zeros_like(x_n), reference=base_n), atol=1e-5)
    assert not nm.requires_grad
    # a base prediction of the whole batch (the line before --privacy_fraction) is refused with the fix
    full = reg.reference(wrapped, None, lambda: wrapped(x, t, c, return_dict=False)[0])
    with pytest.raises(FeatureError, match=r"reg\.reference\(unet, n, lambda: unet\(noisy_latents\[:n\]"):
        reg.features(pred, target, rows=n, reference=full)
    with pytest.raises(FeatureError, match="rows=3 but the batch has 2 samples"):
        reg.features(pred, target, rows=3, reference=ref)
    for bad in (-1, 1.0, True, "1"):
        with pytest.raises(FeatureError, match="row count"):
            reg.features(pred, target, rows=bad, reference=ref)

    # a script that forgets the base prediction gets told how to add it, before any state changes
    with pytest.raises(FeatureError, match=r"reg\.reference\(unet"):
        reg.features(pred, target, rows=n)
    with pytest.raises(FeatureError, match="base_pred"):
        reg.nonmember_features(lambda b: predict(b)[:2], batch=x_n, rows=n)
    with pytest.raises(FeatureError, match="shaped like model_pred"):
        reg.nonmember_features(lambda b: (*predict(b)[:2], t), batch=x_n, rows=n)
    assert reg.attacker_updates == 0
    loss = reg.step(F.mse_loss(pred, target), feats, nm)
    assert torch.isfinite(loss) and reg.attacker_updates == 1


def test_a_step_without_privacy_rows_runs_no_base_or_heldout_forward(peft_unet):
    """privacy_fraction over steps: at batch 2 and 0.25, steps 1, 3, ... have no privacy row; the documented
    lines then run no base forward and draw no held-out batch, and reg.step(loss, None) keeps the scale."""
    unet, (x, t, c, x_n), _ = peft_unet
    args = parse("--privacy", "smplora", "--privacy_preset", "robust", "--privacy_holdout_dir", "x",
                 "--privacy_feature_grid", "4", "--privacy_attacker_hidden", "8", "--seed", "0",
                 "--privacy_nonmember_every", "1")
    reg = PrivacyRegularizer.from_args(args, device="cpu")
    base_calls, held_out = [], []

    def predict(latents, n=None):
        pred = unet(latents, t[:len(latents)], c[:len(latents)], return_dict=False)[0]
        return pred, torch.zeros_like(latents), reg.reference(unet, n, lambda: base_calls.append(
            len(latents[:n])) or unet(latents[:n], t[:n], c[:n], return_dict=False)[0])

    def held(batch):
        held_out.append(len(batch))
        return predict(batch)

    rows = []
    for _ in range(4):
        n = reg.privacy_rows(len(x))
        pred, target, ref = predict(x, n)
        feats = reg.features(pred, target, rows=n, reference=ref)
        nm = reg.nonmember_features(held, batch=x_n, rows=n)
        rows.append(None if feats is None else feats.shape[0])
        assert (feats is None) == (ref is None) == (nm is None)
        loss = reg.step(F.mse_loss(pred, target), feats, nm)
        assert loss.requires_grad and torch.isfinite(loss)
    assert rows == [1, None, 1, None] and base_calls == [1, 2, 1, 2]   # member (1 row), held-out (whole): steps 0, 2
    assert held_out == [2, 2] and reg.attacker_updates == 2 and reg.global_step == 4


def test_reference_costs_nothing_without_calibration_and_restores_adapters(peft_unet):
    unet, (x, t, c, _), (base_m, _) = peft_unet
    paper = PrivacyRegularizer(PrivacyConfig(feature_grid=4, hidden=(8,)))

    def boom():
        raise AssertionError("the base forward must not run with calibrated=False")

    assert paper.reference(unet, 2, boom) is None and paper.reference(unet, None, boom) is None
    with torch.no_grad():
        adapted = unet(x, t, c, return_dict=False)[0]
    with pytest.raises(RuntimeError, match="inside"):
        with adapters_disabled(unet):
            raise RuntimeError("inside")
    with torch.no_grad():
        assert torch.equal(unet(x, t, c, return_dict=False)[0], adapted)           # re-enabled after the error
        unet.disable_adapters()                                                     # already off: stays off
        with adapters_disabled(unet):
            pass
        assert torch.allclose(unet(x, t, c, return_dict=False)[0], base_m, atol=1e-5)
        unet.enable_adapters()
    cal = PrivacyRegularizer(PrivacyConfig(feature_grid=4, hidden=(8,), calibrated=True))

    def lora_grads(with_reference):                # peft toggles requires_grad while the LoRA is off
        unet.zero_grad(set_to_none=True)
        pred = unet(x, t, c, return_dict=False)[0]
        if with_reference:
            cal.reference(unet, None, lambda: unet(x, t, c, return_dict=False)[0])
        pred.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters() if "lora" in n and p.grad is not None}

    plain, with_ref = lora_grads(False), lora_grads(True)
    unet.zero_grad(set_to_none=True)
    assert plain and plain.keys() == with_ref.keys() and all(torch.equal(plain[k], with_ref[k]) for k in plain)
    with pytest.raises(FeatureError, match="cannot disable the LoRA of Conv2d"):
        cal.reference(torch.nn.Conv2d(4, 4, 1), 1, lambda: x)
    with pytest.raises(FeatureError, match="not the prediction tensor"):
        cal.reference(unet, 1, lambda: unet(x, t, c, return_dict=False))
    assert cal.reference(unet, 0, boom) is None                # no privacy row this step: no base forward


def test_explicit_rows_make_the_calls_of_a_step_order_free(peft_unet):
    """Each per-step call takes this step's row count, and privacy_rows only reads the step: two regularisers
    fed the same steps, one in the documented order, one held-out first, the base call between, with extra
    privacy_rows calls for other batch sizes, return the same rows, features, losses and attacker."""
    unet, (x, t, c, x_n), _ = peft_unet
    args = parse("--privacy", "smplora", "--privacy_preset", "robust", "--privacy_holdout_dir", "x",
                 "--privacy_feature_grid", "4", "--privacy_attacker_hidden", "8", "--seed", "0",
                 "--privacy_nonmember_every", "1")
    documented, shuffled = (PrivacyRegularizer.from_args(args, device="cpu") for _ in range(2))

    def predict(reg, latents, n=None):
        pred = unet(latents, t[:len(latents)], c[:len(latents)], return_dict=False)[0]
        return pred, torch.zeros_like(latents), reg.reference(unet, n, lambda: unet(
            latents[:n], t[:n], c[:n], return_dict=False)[0])

    def in_order(reg):
        n = reg.privacy_rows(len(x))
        pred, target, base = predict(reg, x, n)
        feats = reg.features(pred, target, rows=n, reference=base)
        return n, pred, target, base, feats, reg.nonmember_features(lambda b: predict(reg, b), batch=x_n, rows=n)

    def out_of_order(reg):
        n = reg.privacy_rows(len(x))
        nm = reg.nonmember_features(lambda b: predict(reg, b), batch=x_n, rows=n)
        others.append(reg.privacy_rows(3))                     # another batch size in between
        pred, target, base = predict(reg, x, n)
        reg.privacy_rows(1)
        feats = reg.features(pred, target, rows=n, reference=base)
        reg.privacy_rows(len(x_n), with_prior_preservation=True)
        return n, pred, target, base, feats, nm

    rows, others = [], []
    for _ in range(4):
        a, b = in_order(documented), out_of_order(shuffled)
        rows.append(a[0])
        assert a[0] == b[0]
        for u, v in zip(a[1:], b[1:]):
            assert (u is None) == (v is None) and (u is None or torch.equal(u.detach(), v.detach()))
        la = documented.step(F.mse_loss(a[1], a[2]), a[4], a[5])
        lb = shuffled.step(F.mse_loss(b[1], b[2]), b[4], b[5])
        assert torch.equal(la.detach(), lb.detach()) and documented.metrics() == shuffled.metrics()
    assert rows == [1, 0, 1, 0] and others == [1, 1, 1, 0] and documented.attacker_updates == 2
    sa, sb = documented.state_dict(), shuffled.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(v, sb[k]) if isinstance(v, torch.Tensor) else v == sb[k] for k, v in sa.items())
