"""Pooled evidence over several LoRAs: standardisation, pooled metrics and verdict, files, errors."""

import json

import numpy as np
import pytest

from smplora_plugin.audit import AuditError, AuditRun, run_audit_pooled
from smplora_plugin.audit import metrics as M
from smplora_plugin.audit.pooled import standardise
from smplora_plugin.audit.synthetic import MemorizingTarget, synthetic_pool
from smplora_plugin.audit.verdict import LEAKS

from _helpers import TINY_AUDIT, one_thread  # noqa: F401  (one_thread: an autouse fixture)

CFG = TINY_AUDIT
ATTACKS = ["loss", "loss_calibrated", "sima", "logreg", "blind"]


def _run(seed, strength, n_side=16, name=None):
    pool = synthetic_pool(2 * n_side, (1, 4, 4), seed=seed)
    mem, non = pool[:n_side], pool[n_side:]
    return AuditRun(MemorizingTarget(mem, strength=strength), mem, non, name=name)


def test_standardise_uses_calibration_nonmembers_only():
    cal = np.array([10.0, 12.0, 0.0, 2.0])
    lab = np.array([1, 1, 0, 0])
    z = standardise(np.array([1.0, 3.0]), cal, lab)
    assert z == pytest.approx([0.0, 2.0])  # mean 1, std 1 of the non-members 0 and 2
    assert standardise(np.array([5.0]), np.array([1.0, 4.0, 4.0]), np.array([1, 0, 0])) == pytest.approx([1.0])


def test_pooled_leaking_runs_end_to_end(tmp_path):
    rep = run_audit_pooled([_run(1, 1.0, name="a"), _run(2, 1.0, name="b")], attacks=ATTACKS, config=CFG,
                           progress=False, out_dir=tmp_path)
    v = rep.verdict
    assert v["verdict"] == LEAKS and [r["verdict"] for r in v["per_run"]] == [LEAKS, LEAKS]
    assert rep.splits["member_eval"] == 16 and v["n_member"] == 16 and v["n_nonmember"] == 16
    # pooled AUC is the AUC of the concatenated standardised scores
    a, b = rep.runs
    ev = []
    for r in (a, b):
        sc = r.scores["loss"]
        ev.append(standardise(sc.eval_scores, sc.cal_scores, sc.cal_labels))
    s, y = np.concatenate(ev), np.concatenate([a.eval_labels, b.eval_labels]).astype(bool)
    assert rep.attacks["loss"]["auc"] == pytest.approx(M.auc(s[y], s[~y]))
    assert rep.attacks["loss"]["calibration"]["per_run_auc"] == [a.attacks["loss"]["auc"], b.attacks["loss"]["auc"]]
    for f in ("report.json", "report.md", "roc.png", "run_01_a/report.json", "run_01_a/manifest.json",
              "run_02_b/report.md", "run_02_b/roc.png"):
        assert (tmp_path / f).is_file(), f
    d = json.loads((tmp_path / "report.json").read_text())
    assert d["pooling"]["n_runs"] == 2 and len(d["runs"]) == 2 and d["verdict"]["verdict"] == LEAKS
    md = (tmp_path / "report.md").read_text()
    order = ["**Verdict: leaks.**", "Pooled over 2 runs", "## Run 1", "## Run 2"]
    assert [md.index(s) for s in order] == sorted(md.index(s) for s in order)


def test_pooled_null_runs_do_not_leak():
    rep = run_audit_pooled([_run(s, 0.0) for s in (5, 6, 7)], attacks=ATTACKS, config=CFG, progress=False)
    assert rep.verdict["verdict"] != LEAKS
    assert rep.run_names() == ["run 1", "run 2", "run 3"]
    assert rep.splits["member_eval"] == 24


def test_pooled_input_errors():
    with pytest.raises(AuditError, match="at least one"):
        run_audit_pooled([])
    with pytest.raises(AuditError, match="AuditRun"):
        run_audit_pooled([object()])
    with pytest.raises(AuditError, match="unique"):
        run_audit_pooled([_run(1, 0.0, name="x"), _run(2, 0.0, name="x")])
