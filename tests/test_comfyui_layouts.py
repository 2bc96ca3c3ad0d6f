"""The node pack on both ComfyUI layouts it supports, and on ComfyUI's newer training options.

The stand-in imitates ComfyUI 783545f6 (2026-08-22) and, with ``layout="3cd7b32f"``, the older
2026-01-07 node: bypass mode (adapters applied by replacing each layer's forward), resolution
buckets, ``training_dtype="none"`` with a GradScaler for fp16, offloading, and a node of an unknown
shape, which must be refused before anything trains.
"""

from __future__ import annotations

import pytest
import torch

from _comfyui import NOW, conditioning, images, latent, train_inputs


@pytest.fixture
def data(comfy):
    model, clip, vae = comfy.model_mod.tiny_components(seed=0)
    return dict(model=model, clip=clip, vae=vae, members=latent(vae, images(6, seed=1)),
                holdout=latent(vae, images(6, seed=2)), positive=conditioning(clip, "a photo"))


def _train(comfy, data, members=None, positive=None, **over):
    kwargs = train_inputs(data["model"], members or [data["members"]], data["positive"], [data["holdout"]],
                          data["positive"], layout=comfy.nodes_train.TrainLoraNode, **over)
    if positive is not None:  # one conditioning list per latent batch (bucket mode's input list)
        kwargs["positive"] = positive
    return comfy.nodes.SmploraTrainLora.execute(**kwargs)


def test_layout_is_read_from_comfyuis_objects(comfy):
    from smplora_plugin.integrations.comfyui.layout import train_layout

    layout = train_layout(comfy.nodes_train)
    if comfy.layout == "3cd7b32f":
        assert layout.model_output == 0 and layout.outputs == {"lora": 1, "loss_map": 2, "steps": 3}
        assert not layout.bypass_mode
    else:
        assert layout.model_output is None and layout.outputs == {"lora": 0, "loss_map": 1, "steps": 2}
        assert layout.bypass_mode and "offloading" in layout.inputs and "checkpoint_depth" in layout.inputs
    assert layout.bucket_mode


@pytest.mark.parametrize("change", ["no_lora_output", "two_int_outputs", "no_fwd_bwd", "fwd_bwd_params", "no_seed"])
def test_an_unknown_train_node_is_refused_before_training(comfy, data, monkeypatch, change):
    nt = comfy.nodes_train
    schema = nt.TrainLoraNode.define_schema()
    if change == "no_lora_output":
        schema.outputs = [o for o in schema.outputs if o.io_type != "LORA_MODEL"]
    elif change == "two_int_outputs":
        schema.outputs = list(schema.outputs) + [schema.outputs[-1]]
    elif change == "no_seed":
        schema.inputs = [i for i in schema.inputs if i.id != "seed"]
    if change in ("no_lora_output", "two_int_outputs", "no_seed"):
        monkeypatch.setattr(nt.TrainLoraNode, "define_schema", classmethod(lambda cls: schema))
    elif change == "no_fwd_bwd":
        for klass in nt.TrainSampler.__mro__:
            if "fwd_bwd" in vars(klass):
                monkeypatch.delattr(klass, "fwd_bwd")
    else:
        def fwd_bwd(self, model_wrap, batch_sigmas, batch_noise, batch_latent, cond, indicies, extra_args, bwd=True):
            raise AssertionError("never called")
        monkeypatch.setattr(nt.TrainSampler, "fwd_bwd", fwd_bwd)
    n_bars = len(nt.PBARS)
    from smplora_plugin.integrations.comfyui.layout import ComfyTrainingError

    kwargs = train_inputs(data["model"], [data["members"]], data["positive"], [data["holdout"]], data["positive"],
                          layout=comfy.nodes_train.TrainLoraNode)
    with pytest.raises(ComfyTrainingError, match=r"supports ComfyUI 3cd7b32f \(2026-01-07, v0\.8\.0\) through "
                                                 r"783545f6 \(2026-08-22, v0\.33\.0\)"):
        comfy.nodes.SmploraTrainLora.execute(**kwargs)
    assert len(nt.PBARS) == n_bars and comfy.written() == []


@NOW
def test_bypass_mode_trains_and_the_privacy_term_sees_the_same_prediction(comfy, data):
    """Bypass mode adds the adapter's output to each layer's output instead of changing its weight: the same
    function, so the privacy term's member maps (and the LoRA it trains) match weight mode; the base
    prediction for calibrated features comes from the layers' original forwards."""
    weight = _train(comfy, data, steps=4, bypass_mode=False).args
    bypass = _train(comfy, data, steps=4, bypass_mode=True).args
    assert set(weight[0]) == set(bypass[0])
    for k in weight[0]:
        assert torch.allclose(weight[0][k], bypass[0][k], atol=1e-5), k
    assert bypass[3]["metrics"]["attacker_updates"] == weight[3]["metrics"]["attacker_updates"] == 2.0
    assert any(float(v.abs().sum()) > 0 for k, v in bypass[0].items() if k.endswith("lora_up.weight"))


@NOW
def test_lora_off_restores_bypassed_forwards(comfy, data):
    from smplora_plugin.integrations.comfyui.training import lora_off

    nt = comfy.nodes_train
    model = data["model"].clone()
    layers = [m for m in model.model.modules() if hasattr(m, "weight_function")]
    gen = torch.Generator().manual_seed(0)
    hooks = []
    for m in layers:
        adapter = nt._TrainAdapter(m.weight, 2, gen).requires_grad_(True)
        with torch.no_grad():
            adapter.lora_up.weight.normal_(generator=gen)
        hooks.append(nt._BypassHook(m, adapter))
        hooks[-1].inject()
    x = torch.randn(2, 4, 4, 4, generator=gen)
    sigma = torch.tensor([1.0, 2.0])
    ctx = data["positive"][0][0].expand(2, -1, -1)
    with torch.no_grad():
        bare = model.model.apply_model(x, sigma, c_crossattn=ctx)
        for h in hooks:
            h.eject()
        truly_bare = model.model.apply_model(x, sigma, c_crossattn=ctx)
        for h in hooks:
            h.inject()
        on = model.model.apply_model(x, sigma, c_crossattn=ctx)
        with lora_off(model.model):
            off = model.model.apply_model(x, sigma, c_crossattn=ctx)
        again = model.model.apply_model(x, sigma, c_crossattn=ctx)
    assert torch.equal(bare, on) and torch.equal(on, again) and not torch.allclose(on, off)
    assert torch.equal(off, truly_bare)
    assert all(m.forward.__self__ is h for m, h in zip(layers, hooks))  # the hooks are back


def test_bucket_mode_trains_on_latents_of_several_sizes(comfy, data):
    small = latent(data["vae"], images(3, seed=5, size=16))
    out = _train(comfy, data, members=[data["members"], small], bucket_mode=True, steps=4,
                 positive=[data["positive"] * 6, data["positive"] * 3])
    lora, loss_map, steps, privacy = out.args
    assert steps == 4 and len(loss_map["loss"]) == 4
    assert privacy["data"]["members"] == 9 and privacy["metrics"]["step"] == 4.0
    assert comfy.nodes_train.PBARS[-1].postfixes[-1].get("mia_acc") is not None


def test_several_sizes_without_bucket_mode_are_refused(comfy, data):
    small = latent(data["vae"], images(3, seed=5, size=16))
    with pytest.raises(ValueError, match="use bucket_mode with ResolutionBucket latents"):
        _train(comfy, data, members=[data["members"], small], bucket_mode=False)


@NOW
def test_training_dtype_none_on_an_fp16_model_uses_comfyuis_grad_scaler(comfy, data):
    model = data["model"].clone()
    model.model = model.model.half()
    data = {**data, "model": model}
    before = len(comfy.nodes_train.SAMPLERS)
    lora, loss_map, steps, privacy = _train(comfy, data, steps=3, training_dtype="none", lora_dtype="fp32").args
    sampler = comfy.nodes_train.SAMPLERS[before]
    assert sampler.grad_scaler is not None and sampler.training_dtype == torch.float16
    assert all(torch.isfinite(torch.tensor(loss_map["loss"]))) and privacy["metrics"]["step"] == 3.0
    assert all(v.dtype == torch.float32 for v in lora.values())


@NOW
def test_offloading_and_checkpoint_depth_pass_through(comfy, data):
    out = _train(comfy, data, steps=2, offloading=True, checkpoint_depth=2, quantized_backward=True)
    assert out.args[2] == 2 and out.args[3]["metrics"]["step"] == 2.0
