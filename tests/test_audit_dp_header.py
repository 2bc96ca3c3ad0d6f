"""The audited LoRA's smplora.dp header: the training's formal epsilon beside the audit's empirical lower bound."""

import json

import pytest
import torch
import torch.nn.functional as F

from smplora_plugin.audit import AuditError, AuditRun, run_audit, run_audit_pooled
from smplora_plugin.audit.report import run_folder
from smplora_plugin.audit.synthetic import MemorizingTarget, synthetic_pool
from smplora_plugin.audit.training_dp import LOWER_BOUND_LABEL, read_training_dp
from smplora_plugin.dp import DPGradients
from smplora_plugin.integrations.comfyui.verdict import report_text

from _helpers import TINY_AUDIT, one_thread  # noqa: F401  (one_thread: an autouse fixture)

ATTACKS = ["loss", "blind"]


def _dp(sampling: str) -> DPGradients:
    """A DPGradients after two real steps on a tiny model: its header entry is the one trainers write."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    dp = DPGradients(model, max_grad_norm=1.0, noise_multiplier=1.3, dataset_size=20, expected_batch_size=4,
                     sampling=sampling, generator=torch.Generator().manual_seed(1), method="loop")
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    for _ in range(2):
        dp.accumulate(lambda m, a, b: F.mse_loss(m(a), b), x, y)
        model.zero_grad(set_to_none=True)
        dp.step()
    return dp


def _lora(path, entries=None):
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 3)}, str(path),
              metadata={"ss_network_dim": "2", **(entries or {})})
    return path


def _audit(lora_file=None, out_dir=None, seed=3):
    pool = synthetic_pool(48, (1, 4, 4), seed=seed)
    mem, non = pool[:24], pool[24:]
    return run_audit(MemorizingTarget(mem, strength=1.0), mem, non, attacks=ATTACKS, config=TINY_AUDIT,
                     progress=False, lora_file=lora_file, out_dir=out_dir)


@pytest.mark.parametrize("sampling", ["poisson", "fixed_batch"])
def test_dp_header_is_shown_beside_the_empirical_bound(tmp_path, sampling):
    dp = _dp(sampling)
    lora = _lora(tmp_path / "dp.safetensors", dp.file_metadata())
    rep = _audit(lora, out_dir=tmp_path / "out")
    block = rep.training_dp
    assert block["epsilon"] == pytest.approx(dp.epsilon()) and block["epsilon"] > 0
    assert block["delta"] == pytest.approx(dp.delta)
    assert block["accountant"] == "rdp" and block["sampling"] == sampling and block["steps"] == 2
    assert block["sigma"] == pytest.approx(1.3) and block["clip"] == pytest.approx(1.0)
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["training_dp"]["epsilon"] == pytest.approx(dp.epsilon())
    md = (tmp_path / "out" / "report.md").read_text()
    head = md.split("Rule:")[0]  # in the verdict block, next to the empirical bound
    eps_line = next(i for i, line in enumerate(head.splitlines()) if "Empirical epsilon lower bound" in line)
    dp_line = next(i for i, line in enumerate(head.splitlines()) if "Training DP epsilon" in line)
    assert dp_line == eps_line + 1
    assert f"epsilon {dp.epsilon():.4g} at delta {dp.delta:.3g}, rdp accountant" in head
    assert LOWER_BOUND_LABEL in head
    emp = rep.verdict["epsilon_lower_bound"]["epsilon"]
    assert f"empirical epsilon >= {emp:.2f} at delta = 0" in head
    if sampling == "poisson":
        assert "a formal guarantee computed by the accountant under Poisson sampling at q = 0.2" in head
        assert "not a formal guarantee" not in head
    else:  # fixed batches: the epsilon is flagged as not covered by the run's sampling
        assert "a formal guarantee computed" not in head
        assert ("as if batches were Poisson-sampled at q = 0.2; the run's 'fixed_batch' batches do not satisfy that "
                "assumption, so it is not a formal guarantee for this run") in head
    text = report_text(rep).split("\n\n")[0]  # the ComfyUI node's short text, before the Markdown report
    assert "Training DP epsilon" in text and f"{dp.epsilon():.4g}" in text and LOWER_BOUND_LABEL in text
    assert ("a formal guarantee computed by the accountant" in text) == (sampling == "poisson")


def test_lora_without_dp_header_shows_nothing_new(tmp_path):
    lora = _lora(tmp_path / "plain.safetensors", {"smplora.method": "smp-lora"})
    rep = _audit(lora, out_dir=tmp_path / "out")
    plain = _audit(None)
    assert rep.training_dp is None and "training_dp" not in rep.to_dict()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Training DP" not in md and "formal guarantee" not in md
    assert "Training DP" not in report_text(rep)
    assert "training_dp" not in json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep.markdown().split("Rule:")[0] == plain.markdown().split("Rule:")[0]  # the verdict block unchanged


@pytest.mark.parametrize("entry,words", [("not json", "is not JSON"), ('[1, 2]', "not a JSON object"),
                                         ('{"epsilon": 3.0, "delta": 1e-5}', "lacks accountant, sampling"),
                                         ('{"epsilon": -1, "delta": 1e-5, "accountant": "rdp", '
                                          '"sampling": "poisson"}', "epsilon must be >= 0")])
def test_malformed_dp_header_fails_before_any_work(tmp_path, entry, words):
    lora = _lora(tmp_path / "bad.safetensors", {"smplora.dp": entry})
    with pytest.raises(AuditError, match=words) as err:
        _audit(lora, out_dir=tmp_path / "out")
    assert "remove the smplora.dp header entry" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_missing_lora_file_is_an_audit_error(tmp_path):
    with pytest.raises(AuditError, match="cannot read the header"):
        read_training_dp(tmp_path / "nope.safetensors")


def test_pooled_report_lists_each_runs_training_epsilon(tmp_path):
    dp = _dp("poisson")
    runs = []
    for i, entries in enumerate([dp.file_metadata(), None]):
        pool = synthetic_pool(48, (1, 4, 4), seed=10 + i)
        mem, non = pool[:24], pool[24:]
        runs.append(AuditRun(MemorizingTarget(mem, strength=1.0), mem, non, name=f"r{i}",
                             lora_file=_lora(tmp_path / f"r{i}.safetensors", entries)))
    rep = run_audit_pooled(runs, attacks=ATTACKS, config=TINY_AUDIT, progress=False, out_dir=tmp_path / "out")
    assert [b["run"] for b in rep.training_dp["runs"]] == ["r0"] and rep.training_dp["runs_without"] == ["r1"]
    assert rep.runs[0].training_dp["epsilon"] == pytest.approx(dp.epsilon()) and rep.runs[1].training_dp is None
    md = (tmp_path / "out" / "report.md").read_text().split("Rule:")[0]
    assert "Training DP epsilon per run" in md and "r0: Training DP epsilon" in md
    assert "no smplora.dp entry: r1" in md
    assert "Training DP epsilon" in (tmp_path / "out" / run_folder(0, "r0") / "report.md").read_text()
    assert "Training DP" not in (tmp_path / "out" / run_folder(1, "r1") / "report.md").read_text()


def test_cli_refuses_a_malformed_dp_header_before_loading_the_model(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from smplora_plugin import cli

    def write_pngs(folder, k, seed):
        folder.mkdir()
        rng = np.random.default_rng(seed)
        for i in range(k):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
        return folder

    lora = _lora(tmp_path / "bad.safetensors", {"smplora.dp": "{not json"})
    base = tmp_path / "base"
    base.mkdir()  # exists, but is no model: loading it would fail with another message
    m, n = write_pngs(tmp_path / "m", 4, seed=1), write_pngs(tmp_path / "n", 4, seed=2)
    rc = cli.main(["audit", "--base-model", str(base), "--lora", str(lora), "--members", str(m), "--nonmembers",
                   str(n), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "smplora.dp header entry" in err and "is not JSON" in err
    assert not (tmp_path / "out").exists()
