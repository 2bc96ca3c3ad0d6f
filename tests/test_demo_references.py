"""`smplora demo --references`: reference LoRAs trained the demo's way, config and CLI wiring."""

import argparse

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")


def test_reference_models_train_on_balanced_halves_of_the_audited_pool():
    from smplora_plugin.audit import AuditSamples
    from smplora_plugin.audit.references import match
    from smplora_plugin.demo.pipeline import DemoConfig, load_assets, reference_models
    from smplora_plugin.demo.target import TinyLDMTarget

    cfg = DemoConfig.quick(members=8, nonmember_calibration=4, nonmember_eval=4, steps=2, references=4)
    cfg.validate()
    splits = cfg.data.splits({"member": 8, "nonmember_defense": 4, "nonmember_calibration": 4, "nonmember_eval": 4},
                             cfg.seed)
    base, _ = load_assets(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        refs = reference_models(cfg, base.base_state_dict(), splits, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert len(refs) == 4 and all(isinstance(m.target, TinyLDMTarget) for m in refs.models)
    audited = splits["member"].ids + splits["nonmember_calibration"].ids + splits["nonmember_eval"].ids
    assert set().union(*(m.trained for m in refs.models)) == set(audited)
    assert not set(splits["nonmember_defense"].ids) & set().union(*(m.trained for m in refs.models))
    pool = splits["member"]
    view = match(refs, AuditSamples(pool.images, pool.captions, pool.ids))
    assert view.mode == "online" and (view.inside.sum(0) == 2).all()
    # different LoRAs: own initialisation and batches
    a, b = (m.target.model.lora_state_dict() for m in refs.models[:2])
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_demo_cli_references_option_resizes_the_audit_pool():
    from smplora_plugin.demo.cli import add_arguments, config_from_args
    from smplora_plugin.demo.pipeline import DemoConfig

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--references", "8", "--members", "32"]))
    assert (cfg.references, cfg.nonmember_calibration, cfg.nonmember_eval) == (8, 16, 16)
    cfg = config_from_args(p.parse_args(["--quick"]))
    assert cfg.references == 0 and cfg.nonmember_eval == DemoConfig.quick().nonmember_eval
    for bad in (1, -2):
        with pytest.raises(ValueError, match="at least 2 reference"):
            DemoConfig(references=bad).validate()


def test_reference_variant_is_validated():
    from smplora_plugin.demo.pipeline import DemoConfig

    with pytest.raises(ValueError, match="reference_variant"):
        DemoConfig(references=4, reference_variant="secret").validate()
