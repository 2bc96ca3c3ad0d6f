"""The diffusers shim alone: args, holdout batches, bad input, accumulation, accelerate checkpoint hooks."""

import argparse
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("accelerate")
pytest.importorskip("sklearn")
pytest.importorskip("PIL")

from smplora_plugin import PrivacyRegularizer as CoreRegularizer  # noqa: E402
from smplora_plugin.errors import ConfigError, HoldoutError, StateError  # noqa: E402
from smplora_plugin.integrations.diffusers import (  # noqa: E402
    STATE_FILENAME, HoldoutImages, PrivacyRegularizer, add_privacy_args, instance_half, privacy_config_from_args,
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
    assert isinstance(reg, PrivacyRegularizer) and isinstance(reg, CoreRegularizer)
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
                 "--train_batch_size", "2", "--train_data_dir", str(folders / "train"), *argv)
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
            loss = reg.step(loss, reg.features(pred, target), reg.nonmember_features(forward),
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
    assert {"ce_m", "att_acc"} <= set(reg.progress_postfix())


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
