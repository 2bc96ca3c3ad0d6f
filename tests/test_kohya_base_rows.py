"""kohya `robust` at the privacy fraction: the calibrated base forward runs the denoiser on the privacy rows only,
for any denoiser signature (positional UNet arguments, DiT keyword arguments with ids and guidance, output objects,
post-processed predictions), draws nothing from the trainer's random generators, and gives the prediction of the
whole-batch replay on the rows it keeps."""

from __future__ import annotations

from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch
from test_kohya_calibrated import PRIV, spy_class
from test_kohya_standin import _clean_kohya_modules, data, kohya_args, parse, standin  # noqa: F401

from smplora_plugin.errors import SmploraError
from smplora_plugin.integrations.kohya import base_forward as bf

ROBUST_EVERY = ("--privacy_preset", "robust", "--privacy_nonmember_every", "1")


def recording_trainer(tn, base=None):
    """A spy trainer whose denoiser records the leading size of every call made while SMP-LoRA captures."""

    class Recording(spy_class(tn, base=base)):
        def load_target_model(self, args, weight_dtype, accelerator):
            version, te, vae, unet = super().load_target_model(args, weight_dtype, accelerator)
            trainer, original = self, unet.forward

            def forward(*a, **kw):
                run = trainer._smplora
                if run is not None and run.capturing:
                    sizes = [t.shape[0] for t in bf.tensors((a, kw)) if t.ndim >= 1]
                    trainer.denoiser_calls.append(dict(sizes=sizes, grad=torch.is_grad_enabled(),
                                                       m=trainer._network.multiplier))
                return original(*a, **kw)

            unet.forward = forward
            self.denoiser_calls = []
            return version, te, vae, unet

    return Recording


def train(tn, cls, data, out, *extra, steps=3, batch=4):  # noqa: F811
    trainer = cls()
    trainer.train(parse(*kohya_args(data, out, "--max_train_steps", str(steps), "--train_batch_size", str(batch)),
                        *PRIV, "--privacy_holdout_dir", str(data / "holdout"), *extra))
    return trainer


def test_base_forward_runs_on_the_privacy_rows_only(data, tmp_path):  # noqa: F811
    tn = standin()
    trainer = train(tn, recording_trainer(tn), data, tmp_path / "out", *ROBUST_EVERY)
    calls = trainer.denoiser_calls
    training = [c for c in calls if c["grad"]]
    assert len(training) == 3 and all(c["sizes"] == [4, 4] and c["m"] == 1.0 for c in training)
    # per step: member base forward, held-out base forward, held-out forward; each on ceil(0.25 * 4) = 1 row
    no_grad = [c for c in calls if not c["grad"]]
    assert len(no_grad) == 9 and all(c["sizes"] == [1, 1] for c in no_grad)
    assert [c["m"] for c in no_grad] == [0.0, 0.0, 1.0] * 3


def test_at_batch_one_the_privacy_forwards_run_on_every_fourth_step_only(data, tmp_path):  # noqa: F811
    """privacy_fraction 0.25 over steps: at batch 1 steps 0 and 4 carry the privacy term, with their base forward
    and held-out forwards; steps 1-3 run the training forward alone (reg.step(loss, None))."""
    tn = standin()
    trainer = train(tn, recording_trainer(tn), data, tmp_path / "out", *ROBUST_EVERY, steps=5, batch=1)
    calls = [(c["grad"], c["m"]) for c in trainer.denoiser_calls]
    privacy_step = [(False, 0.0), (True, 1.0), (False, 0.0), (False, 1.0)]   # base, training, held-out base, held-out
    assert calls == privacy_step + [(True, 1.0)] * 3 + privacy_step
    assert all(c["sizes"] == [1, 1] for c in trainer.denoiser_calls)
    reg = trainer.privacy_regularizer
    assert reg.global_step == 5 and reg.attacker_updates == 2


def test_fraction_one_runs_the_base_forward_on_the_whole_batch(data, tmp_path):  # noqa: F811
    tn = standin()
    trainer = train(tn, recording_trainer(tn), data, tmp_path / "out", *ROBUST_EVERY, "--privacy_fraction", "1",
                    steps=2)
    assert all(c["sizes"] == [4, 4] for c in trainer.denoiser_calls)


def test_base_forward_draws_nothing_from_the_trainer_rngs(data, tmp_path):  # noqa: F811
    """The training forwards of a calibrated run see the same noisy inputs and timesteps, step after step, as
    those of the same run without calibration, and the generators end in the same state."""
    tn = standin()
    runs = {}
    for name, extra in [("calibrated", ()), ("raw", ("--no-privacy_calibrated",))]:
        trainer = train(tn, spy_class(tn), data, tmp_path / name, *ROBUST_EVERY, *extra, steps=4)
        runs[name] = ([c for c in trainer.unet_calls if c["grad"]], torch.get_rng_state())
    (cal, cal_rng), (raw, raw_rng) = runs["calibrated"], runs["raw"]
    assert len(cal) == len(raw) == 4
    for a, b in zip(cal, raw):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["t"], b["t"])
    assert torch.equal(cal_rng, raw_rng)


# ---------------------------------------------------------------------------- a DiT-like trainer (SD3 / FLUX)
SampleOutput = namedtuple("SampleOutput", ["sample"])


class Output:
    """An output object with an attribute, like sd-scripts' own UNet output."""

    def __init__(self, sample):
        self.sample = sample


class TinyDiT(torch.nn.Module):
    """Keyword arguments like FLUX: packed image tokens, per-sample ids, text, timesteps, guidance, and a
    shared positional table of leading size 1 that must not be cut."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.txt = torch.nn.Linear(4, 4)

    def forward(self, img, img_ids, txt, timesteps, guidance, pe, mode="flux"):
        b = img.shape[0]
        assert img_ids.shape[0] == txt.shape[0] == timesteps.shape[0] == guidance.shape[0] == b
        assert pe.shape[0] == 1 and mode == "flux"
        h = self.proj(img) + self.txt(txt.mean(1, keepdim=True)) + pe[..., None] * 0.01
        h = h + (timesteps.float() / 1000 + guidance / 10)[:, None, None] + img_ids[..., None].float() * 1e-3
        return Output(h)


def dit_trainer(tn):
    class DiTTrainer(tn.NetworkTrainer):
        guidance = 3.5

        def load_target_model(self, args, weight_dtype, accelerator):
            torch.manual_seed(1234)
            return "dit", [], None, TinyDiT()

        def get_noise_pred_and_target(self, args, accelerator, noise_scheduler, latents, batch, text_encoder_conds,
                                      unet, network, weight_dtype, train_unet, is_train=True):
            b = latents.shape[0]
            noise = torch.randn_like(latents)
            t = torch.randint(1, 1000, (b,), device=latents.device)
            sigma = (t.float() / 1000)[:, None, None, None]
            noisy = (1 - sigma) * latents + sigma * noise
            img = noisy.flatten(2).transpose(1, 2)                     # (B, 64, 4) tokens
            ids = torch.arange(img.shape[1]).expand(b, -1)
            txt = latents.mean((2, 3))[:, None, :].expand(b, 3, 4)
            with torch.set_grad_enabled(is_train):
                out = unet(img=img, img_ids=ids, txt=txt, timesteps=t, guidance=torch.full((b,), self.guidance),
                           pe=torch.ones(1, img.shape[1]), mode="flux")
                raw = out.sample.transpose(1, 2).reshape_as(latents) + self._network(noisy)
                pred = raw * (-sigma) + noisy                           # SD3 / FLUX-style preconditioning
            return pred, latents, t, None

    return DiTTrainer


def test_dit_keyword_arguments_are_cut_and_the_kept_rows_match_the_whole_batch_replay(data, tmp_path):  # noqa: F811
    tn = standin()
    cls = recording_trainer(tn, base=dit_trainer(tn))
    quarter = train(tn, cls, data, tmp_path / "quarter", *ROBUST_EVERY, steps=2)
    whole = train(tn, cls, data, tmp_path / "whole", *ROBUST_EVERY, "--privacy_fraction", "1", steps=2)
    base_calls = [c for c in quarter.denoiser_calls if not c["grad"] and c["m"] == 0.0]
    # img, img_ids, txt, timesteps, guidance cut to 1 row; the shared table pe (leading size 1) left as it is
    assert len(base_calls) == 4 and all(c["sizes"] == [1, 1, 1, 1, 1, 1] for c in base_calls)
    assert all(c["sizes"] == [4, 4, 4, 4, 4, 1] for c in whole.denoiser_calls)
    # step 1: same LoRA, same draws; the member's base prediction (after the trainer's preconditioning) is the
    # whole-batch replay's first row, up to the rounding of a 1-row against a 4-row matmul
    member_q, member_w = quarter.feature_calls[0], whole.feature_calls[0]
    assert member_q["reference"].shape[0] == 1 and member_w["reference"].shape[0] == 4
    torch.testing.assert_close(member_q["reference"], member_w["reference"][:1], rtol=0, atol=1e-6)
    assert torch.equal(member_q["pred"], member_w["pred"][:1])


def test_a_replay_whose_denoiser_inputs_differ_is_refused(data, tmp_path):  # noqa: F811
    """The shim compares the cut inputs of the replay with the training forward's on the rows it keeps: here only
    the guidance differs (same noise, timesteps and target), and only that comparison can tell."""
    tn = standin()
    DiT = dit_trainer(tn)

    class Drifting(DiT):
        calls = 0

        def get_noise_pred_and_target(self, args, accelerator, noise_scheduler, latents, batch, text_encoder_conds,
                                      unet, network, weight_dtype, train_unet, is_train=True):
            Drifting.calls += 1   # the replay comes first: the training forward (2nd call) gets another guidance
            self.guidance = 3.5 if Drifting.calls % 2 else 4.0
            return super().get_noise_pred_and_target(args, accelerator, noise_scheduler, latents, batch,
                                                     text_encoder_conds, unet, network, weight_dtype, train_unet,
                                                     is_train=is_train)

    from smplora_plugin.integrations.kohya import private_trainer_class

    args = parse(*kohya_args(data, tmp_path / "out", "--max_train_steps", "1", "--train_batch_size", "4"), *PRIV,
                 "--privacy_holdout_dir", str(data / "holdout"), "--privacy_preset", "robust")
    with pytest.raises(SmploraError, match="drew different noise or timesteps"):
        private_trainer_class(Drifting)().train(args)


# ---------------------------------------------------------------------------- units
def test_take_and_spread_rows_over_argument_and_output_structures():
    idx = torch.tensor([0, 2])
    args = (torch.arange(8.0).view(4, 2), [torch.ones(4, 3), None], {"y": torch.zeros(4), "pe": torch.ones(1, 5)},
            torch.tensor(7.0), "text")
    cut = bf.take_rows(args, idx, 4)
    assert torch.equal(cut[0], torch.tensor([[0.0, 1.0], [4.0, 5.0]])) and cut[1][0].shape == (2, 3)
    assert cut[1][1] is None and cut[2]["y"].shape == (2,) and cut[2]["pe"] is args[2]["pe"]
    assert cut[3] is args[3] and cut[4] == "text" and args[0].shape == (4, 2)   # input unchanged
    for out in (torch.ones(2, 3), SampleOutput(torch.ones(2, 3)), Output(torch.ones(2, 3)),
                {"sample": torch.ones(2, 3)},
                SimpleNamespace(sample=torch.ones(2, 3), note="n")):
        spread = bf.spread_rows(out, idx, 4)
        sample = spread if isinstance(spread, torch.Tensor) else (
            spread["sample"] if isinstance(spread, dict) else spread.sample)
        assert torch.equal(sample, torch.tensor([[1.0] * 3, [0.0] * 3, [1.0] * 3, [0.0] * 3]))
        assert type(spread) is type(out)
    assert bf.leading_size((("a",), {"x": torch.zeros(3, 2)})) == 3 and bf.leading_size(("a", 1)) is None


def test_cut_forward_restores_the_module_and_passes_other_sizes_through():
    class Net(torch.nn.Module):
        def forward(self, x, scale=1.0):
            return x * scale

    net, record = Net(), []
    x = torch.arange(4.0)[:, None].repeat(1, 2)
    with bf.cut_forward(net, [1, 3], 4, record):
        out = net(x, scale=2.0)
        other = net(torch.ones(3, 2))                     # another leading size: run whole
    assert torch.equal(out, torch.tensor([[0.0, 0.0], [2.0, 2.0], [0.0, 0.0], [6.0, 6.0]]))
    assert torch.equal(other, torch.ones(3, 2)) and len(record) == 1 and record[0][0][0].shape == (2, 2)
    assert "forward" not in vars(net) and torch.equal(net(x), x)
    seen = []
    with bf.record_inputs(net, 4, seen):
        net(x), net(torch.ones(2, 2))
    assert len(seen) == 1 and bf.same_inputs(record, seen, [1, 3], 4)
    assert not bf.same_inputs(record, [((x + 1,), {})], [1, 3], 4) and not bf.same_inputs(record, [], [1, 3], 4)
