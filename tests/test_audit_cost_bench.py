"""benchmarks/audit_cost.py (audit cost at SD1.5 size) runs end to end at a tiny size: its counted passes per
attack are the attacks' documented ones, and it writes rows and the section. No timing is asserted."""

import importlib
import json
from pathlib import Path

import pytest

from _helpers import one_thread  # noqa: F401  (autouse: one torch thread)

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("sklearn")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
WORDS, DISTINCT, N = 3, 2, 16
FAST_FIT = {"n_boot": 50, "mlp_max_epochs": 5, "mlp_patience": 3, "cv_folds": 3}  # no model pass depends on these


def _load():
    mod = importlib.import_module("benchmarks.audit_cost")
    assert Path(mod.__file__).parent == BENCH, mod.__file__  # not opacus' top-level ``benchmarks`` package
    return mod


def _per_sample(rows, label):
    return {k: v / N for k, v in rows[label].items()}


def test_quick_run_counts_the_documented_passes_and_writes_the_section(tmp_path):
    mod = _load()
    out, md = tmp_path / "rows.jsonl", tmp_path / "RESULTS.md"
    assert mod.main(["--quick", "--samples", "8", "--caption-words", str(WORDS), "--distinct-captions", str(DISTINCT),
                     "--repeats", "1", "--config", json.dumps(FAST_FIT), "--out", str(out), "--write",
                     "--results-file", str(md)]) == 0
    rows = {r["phase"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"count", "time", "validate"}
    full = rows["count"]["full"]
    assert full["samples"] == N and full["distinct_captions"] == DISTINCT
    nograd = {label: _per_sample(full["rows"], label)["unet_nograd"] for label in full["rows"]}
    # docs/audit.md's table: grid 10 t x 4 draws (x2 with the base), SimA 20 t, SecMI 200/10 + 1, PIA 50 t + eps(z0, 0),
    # CLiD 3 pairs x (caption + 3 reductions + null) + one per ranked word, generation 2 x 8 x 10 per distinct caption
    want = {"loss": 40, "loss_calibrated": 40, "sima": 20, "secmi": 21, "pia": 51, "clid": 15 + WORDS,
            "generation": 2 * 8 * 10 * DISTINCT / N}
    assert {k: nograd[k] for k in want} == want
    assert all(nograd[k] == 0 for k in ("loss_best_t", "clid_vec", "mlp", "logreg", "gboost", "blind", "quantile",
                                        "gsa", mod.CONTEXT))
    assert _per_sample(full["rows"], "gsa")["unet_grad"] == 4                      # 4 (t, noise) pairs, one backward
    assert _per_sample(full["rows"], "generation")["decode"] == 2 * 8 * DISTINCT / N
    assert _per_sample(full["rows"], mod.CONTEXT)["encode"] == 1
    assert full["engine_passes_per_sample"]["loss"] == 80 and full["engine_passes_per_sample"]["gsa"] == 4
    fast = rows["count"]["fast"]
    assert list(fast["rows"]) == [mod.CONTEXT] + list(mod.FAST)
    tot = {k: sum(r[k] for r in fast["rows"].values()) / N for k in mod.KINDS}
    assert tot == {"unet_nograd": 40 + 40 + 20 + 21 + 51 + 15 + WORDS, "unet_grad": 0, "encode": 1, "decode": 0}
    timing = rows["time"]
    assert set(timing["per_row_s"]) == set(mod.KINDS) and all(v > 0 for v in timing["per_row_s"].values())
    val = rows["validate"]
    vrows = val["rows"]
    # the reduced setting: 1 t x 1 draw, SimA 1 t, SecMI 0 -> 10, PIA eps(z0, 0) + 1 t, CLiD 1 pair x (caption +
    # 1 reduction + null) + 1 ranked word, GSA 1 pair, generation 2 x 1 x 1 step per distinct caption
    assert {k: vrows[k]["unet_nograd"] for k in ("loss", "loss_calibrated", "sima", "secmi", "pia", "clid")} == {
        "loss": 16, "loss_calibrated": 16, "sima": 16, "secmi": 32, "pia": 32, "clid": 64}
    assert vrows["gsa"]["unet_grad"] == 16 and vrows["generation"]["unet_nograd"] == 2 * mod.VALIDATE_CAPTIONS
    assert vrows["generation"]["decode"] == 2 * mod.VALIDATE_CAPTIONS and vrows[mod.CONTEXT]["encode"] == 16
    assert set(val["seconds"]) == set(vrows) | {mod.VERDICT} and all(s >= 0 for s in val["seconds"].values())
    assert val["predicted_s"]["pia"] == pytest.approx(32 * timing["per_row_s"]["unet_nograd"])
    text = md.read_text()
    assert "<!-- audit_cost:start -->" in text and "## Audit cost at SD1.5 scale" in text
    for needle in ("| generation | 20 |", "| **total** |", "`--fast`: loss, loss_calibrated", "measured / predicted",
                   "an extrapolation"):
        assert needle in text


def test_frontier_coverage_of_a_subset(tmp_path):
    mod = _load()
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"headline_attack": "pia", "per_attack_auc": {"loss": 0.6, "pia": 0.7, "gsa": 0.2, "rmia": 0.99}},
        {"headline_attack": "rmia", "per_attack_auc": {"loss": 0.55, "pia": 0.5, "gsa": 0.52, "blind": 0.9}}]))
    cov = mod.frontier_coverage(("loss", "pia"), rows)
    # row 1: gsa's 0.2 is leakage 0.8 (two-sided), so the subset loses 0.1; rmia is a reference attack; blind is not
    assert cov["rows"] == 2 and cov["same_envelope"] == 1 and cov["max_gap"] == pytest.approx(0.1)
    assert cov["headlines"] == 1 and cov["headlines_in_subset"] == 1
    assert mod.frontier_coverage(("loss",), tmp_path / "missing.jsonl") is None


@pytest.mark.parametrize("argv", [["--phases", "count,bogus"], ["--samples", "3"], ["--caption-words", "0"],
                                  ["--config", "[1]"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        _load().main(["--quick", *argv])
