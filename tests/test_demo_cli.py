"""`smplora demo --quick` end to end: reports written, well formed, numbers in range."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    from smplora_plugin.cli import main

    out = tmp_path_factory.mktemp("demo")
    rc = main(["demo", "--quick", "--out", str(out), "--no-progress"])
    return rc, out


from smplora_plugin.audit.verdict import VERDICTS  # noqa: E402


def _in01(x):
    return x is None or 0.0 <= x <= 1.0


@pytest.mark.slow
def test_quick_demo_writes_wellformed_reports(quick_demo, capsys):
    rc, out = quick_demo
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "smplora-demo-summary/1"
    assert summary["base"].startswith("shipped weights")  # CI must not retrain the base
    assert set(summary["variants"]) == {"plain", "smp", "smp-robust"}
    table = (out / "summary.md").read_text()
    assert "plain LoRA" in table and "SMP-LoRA" in table
    # verdict first, then the headline, the epsilon lower bound, the upper envelope, and utility last
    labels = [ln.split("|")[1].strip() for ln in table.splitlines() if ln.startswith("| ")]
    order = ["**verdict**", "**headline AUC** [95% CI]", "headline p-value", "**headline TPR@1%FPR**",
             "empirical epsilon **lower bound**", "*upper envelope: max AUC", "held-out denoising loss"]
    pos = [next(i for i, lab in enumerate(labels) if lab.startswith(o)) for o in order]
    assert pos == sorted(pos), labels
    header = next(ln for ln in table.splitlines() if ln.startswith("| |"))
    assert header.split("|")[2].strip() == "base model (no LoRA)"  # the floor comes first
    lo, hi = summary["null_band_auc95"]
    assert 0 < lo < 0.5 < hi < 1
    for v, col in summary["variants"].items():
        vdir = out / v
        for f in ("report.json", "report.md", "roc.png", "manifest.json", "lora.safetensors", "samples.png"):
            assert (vdir / f).is_file(), (v, f)
        rep = json.loads((vdir / "report.json").read_text())
        assert rep["format"] == "smplora-audit-report/1"
        names = set(rep["attacks"])
        assert {"loss", "loss_calibrated", "secmi", "pia", "sima", "mlp", "clid", "blind"} <= names
        for name, a in rep["attacks"].items():
            assert _in01(a["auc"]) and _in01(a["tpr_at_1pct_fpr"]) and 0.5 <= a["leakage"] <= 1.0, name
            assert a["auc_ci95"][0] <= a["auc"] <= a["auc_ci95"][1], name
        assert col["max_auc"] == max(a["auc"] for a in rep["attacks"].values() if a["uses_model"])
        assert 0.0 <= col["classifier_accuracy"] <= 1.0 and col["frechet_distance"] >= 0.0
        assert col["heldout_loss"] > 0 and col["member_loss"] > 0
    assert summary["variants"]["plain"]["heldout_loss_ratio_to_plain"] == pytest.approx(1.0)
    for col in [*summary["variants"].values(), summary["base_model_audit"]]:
        assert col["verdict"] in VERDICTS
        assert col["headline_auc_ci95"][0] <= col["headline_auc"] <= col["headline_auc_ci95"][1]
        assert 0 < col["headline_p_value"] <= 1 and col["epsilon_lower_bound"] >= 0
        assert col["max_auc"] >= col["headline_auc"]  # the envelope is the maximum over the same attacks
    # the plain LoRA memorises at this size: its verdict must say so, with a positive epsilon lower bound
    assert summary["variants"]["plain"]["verdict"] == "leaks"
    assert summary["variants"]["plain"]["epsilon_lower_bound"] > 0
    # the base model's audit: the same targets through a LoRA that never trained, i.e. the base itself,
    # so the base-calibrated loss is exactly 0 for every sample and its AUC exactly 0.5
    base = summary["base_model_audit"]
    assert base["title"] == "base model (no LoRA)" and base["adaptation_loss_last"] is None
    assert base["attacks"]["loss_calibrated"]["auc"] == 0.5
    assert base["classifier_accuracy"] == summary["base_model_quality"]["classifier_accuracy"]
    assert base["heldout_loss_ratio_to_plain"] > 0
    for f in ("report.json", "report.md", "roc.png", "manifest.json"):
        assert (out / "base" / f).is_file(), f
    assert not (out / "base" / "lora.safetensors").exists()
    assert json.loads((out / "base" / "report.json").read_text())["splits"] == summary["audit_splits"]
    # plain LoRA at the quick size memorises (measured AUC 1.000 against a null band ending near 0.71):
    # one pre-chosen attack's CI must clear the chance band.
    cal = summary["variants"]["plain"]["attacks"]["loss_calibrated"]
    assert cal["auc_ci95"][0] > hi
    assert summary["variants"]["smp"]["heldout_loss_ratio_to_plain"] > 0
    # the demo's manifest keeps every set disjoint, the defense's non-members included
    man = json.loads((out / "smp" / "manifest.json").read_text())
    ids = [e["id"] for lst in man["sets"].values() for e in lst]
    assert "nonmember_defense" in man["sets"]
    assert len(ids) == len(set(ids))


@pytest.mark.slow
def test_quick_demo_files_carry_privacy_metadata(quick_demo):
    from safetensors import safe_open

    rc, out = quick_demo
    with safe_open(str(out / "smp" / "lora.safetensors"), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert any(k.startswith("smplora.") for k in meta) and meta["smplora.demo.variant"] == "smp"
    assert keys and all("lora_" in k for k in keys)
    assert (out / "smp" / "smplora_state.safetensors").is_file()
    with safe_open(str(out / "plain" / "lora.safetensors"), framework="pt") as f:
        assert f.metadata()["smplora.demo.variant"] == "plain"


def test_demo_bad_arguments_fail_before_work(tmp_path, capsys):
    from smplora_plugin.cli import main

    rc = main(["demo", "--members", "3", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "members" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
