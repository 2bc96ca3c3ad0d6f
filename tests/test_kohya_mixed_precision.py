"""The kohya shim under sd-scripts' bf16 modes (--mixed_precision bf16, --full_bf16), against the stand-in.

The stand-in follows sd-scripts: ``Accelerator(mixed_precision=...)``, the frozen base model in
``weight_dtype``, the LoRA network cast to bf16 with ``--full_bf16``, the denoiser called under
``accelerator.autocast()`` and the loss taken on ``pred.float()``. fp16 (``--full_fp16``) needs a GPU:
accelerate's CPU autocast is bf16 only.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from test_kohya_standin import _clean_kohya_modules, data, kohya_args, parse, standin  # noqa: F401

from smplora_plugin import PrivacyRegularizer

PRIV = ["--privacy", "smplora", "--privacy_feature_grid", "4", "--privacy_attacker_hidden", "8"]


def dtypes(path):
    with safe_open(str(path), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def spied_trainer(seen, lora_out):
    """A private stand-in trainer that records the dtypes of its LoRA's outputs (``lora_out``) and, for each
    ``reg.features`` call, of the prediction, the base prediction and the features (``seen``)."""
    tn = standin()
    from smplora_plugin.integrations.kohya import private_trainer_class

    class Spy(private_trainer_class(tn.NetworkTrainer)):
        def assert_extra_args(self, *a, **kw):
            out = super().assert_extra_args(*a, **kw)
            reg = self.privacy_regularizer
            features = reg.features

            def spy(pred, target, timesteps=None, reference=None):
                feats = features(pred, target, timesteps, reference=reference)
                seen.append((pred.dtype, None if reference is None else reference.dtype, feats.dtype))
                return feats

            reg.features = spy
            return out

        def post_process_network(self, args, accelerator, network, *rest, **kw):
            network.lora_up.register_forward_hook(lambda m, a, o: lora_out.append((m.weight.dtype, o.dtype)))
            return super().post_process_network(args, accelerator, network, *rest, **kw)

    return Spy()


@pytest.mark.parametrize("preset, full_bf16", [("paper", True), ("robust", True), ("paper", False)])
def test_bf16_run_keeps_features_attacker_and_state_in_fp32(data, tmp_path, preset, full_bf16):  # noqa: F811
    seen, lora_out = [], []
    trainer = spied_trainer(seen, lora_out)
    out = tmp_path / "out"
    args = parse(*kohya_args(data, out, "--max_train_steps", "4", "--save_every_n_steps", "2", "--save_state",
                             "--mixed_precision", "bf16", *(["--full_bf16"] if full_bf16 else [])),
                 *PRIV, "--privacy_preset", preset, "--privacy_holdout_dir", str(data / "holdout"))
    trainer.train(args)
    reg = trainer.privacy_regularizer
    # one attacker update per step that carries privacy rows (batch 2: every step at fraction 1, every
    # other step at robust's 0.25, the fraction taken over steps)
    assert reg.attacker_updates == sum(reg.config.privacy_rows(2, k) > 0 for k in range(4))
    assert reg.attacker_updates == (2 if preset == "robust" else 4)
    calibrated = preset == "robust"
    # the LoRA (bf16 weights with --full_bf16) ran under bf16 autocast; accelerate's prepared model hands back
    # fp32 outputs (as for sd-scripts' prepared UNet), and the loss maps are fp32
    assert set(lora_out) == {(torch.bfloat16 if full_bf16 else torch.float32, torch.bfloat16)}
    assert seen and all(p == f == torch.float32 for p, _, f in seen)
    assert all((r is not None) == calibrated for _, r, _ in seen)        # the LoRA-off replay, when calibrated
    assert {p.dtype for p in reg.attacker.parameters()} == {torch.float32}
    assert dtypes(out / "lora.safetensors") == {torch.bfloat16 if full_bf16 else torch.float32}
    for state in (out / "lora-step00000002.smplora_state", out / "lora.smplora_state",
                  out / "lora-state" / "smplora_state.safetensors"):
        assert dtypes(state) <= {torch.float32, torch.uint8}        # fp32 tensors (uint8: the RNG state)
    for logs in trainer.step_logs:
        assert all(math.isfinite(v) for v in logs.values())
        # avr_loss / loss/current show kohya's denoising loss, not the SMP ratio
        assert logs["loss/current"] == pytest.approx(logs["smplora/adaptation_loss"], rel=1e-6)
    assert trainer.step_logs[-1]["smplora/regularized_loss"] < trainer.step_logs[-1]["smplora/adaptation_loss"]


def test_bf16_resume_loads_the_saved_state_bit_exactly(data, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "out"
    bf16 = ["--mixed_precision", "bf16", "--full_bf16"]
    priv = [*PRIV, "--privacy_holdout_dir", str(data / "holdout")]
    from smplora_plugin.integrations.kohya import make_private_trainer

    tn = standin()
    make_private_trainer(tn.NetworkTrainer).train(parse(*kohya_args(data, out, "--max_train_steps", "2",
                                                                     "--save_state", *bf16), *priv))
    state_file = out / "lora-state" / "smplora_state.safetensors"
    saved = PrivacyRegularizer.load(state_file).state_dict()
    loaded = []
    original = PrivacyRegularizer.load_state_dict

    def record(self, state):
        original(self, state)
        loaded.append(self.state_dict())

    monkeypatch.setattr(PrivacyRegularizer, "load_state_dict", record)
    trainer = make_private_trainer(tn.NetworkTrainer)
    trainer.train(parse(*kohya_args(data, tmp_path / "out2", "--max_train_steps", "2", "--resume",
                                    str(out / "lora-state"), *bf16), *priv))
    assert loaded, "the resumed run did not load the attacker state"
    got = loaded[-1]
    assert got.keys() == saved.keys()
    for key, value in got.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == saved[key].dtype and torch.equal(value, saved[key]), key
        else:
            assert value == saved[key], key
    reg = trainer.privacy_regularizer
    assert reg.attacker_updates == 4 and {p.dtype for p in reg.attacker.parameters()} == {torch.float32}
