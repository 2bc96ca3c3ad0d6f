"""The report's exposure view: members ranked by the headline attack, near-copy flags, exposure.png."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from smplora_plugin.audit import AuditError, AuditReport, AuditSamples, run_audit
from smplora_plugin.audit import metrics as M
from smplora_plugin.audit.attacks import GenerationAttack
from smplora_plugin.audit.attacks.generation import NearestGenerated
from smplora_plugin.audit.exposure import attach_exposure, compute_exposure, near_copy_threshold, rank_text, share_below
from smplora_plugin.audit.pooled import AuditRun, run_audit_pooled
from smplora_plugin.audit.report import render_exposure
from smplora_plugin.audit.synthetic import MemorizingTarget, synthetic_captions, synthetic_pool
from smplora_plugin.audit.verdict import AttackScores

FAST = {"n_boot": 50, "draws": 1, "timesteps": [100, 300]}


def _report(member_scores, nonmember_scores, *, cal_non=(0.0, 2.0), member_ids=None, config=None, generated=None,
            attacks=("loss",), info=None, splits=None):
    """A hand-made single-run report whose headline attack is ``loss``."""
    m, n = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    ev = np.concatenate([m, n])
    labels = np.concatenate([np.ones(m.size, int), np.zeros(n.size, int)])
    cal = np.concatenate([[5.0, 6.0], np.asarray(cal_non, float)])
    cal_labels = np.concatenate([np.ones(2, int), np.zeros(len(cal_non), int)])
    ids = list(member_ids) if member_ids is not None else [f"m{i}.png" for i in range(m.size)]
    auc = M.auc(m, n)
    return AuditReport(
        title="hand-made", attacks={a: {"title": f"{a} title", "auc": auc, "uses_model": True} for a in attacks},
        max_over_attacks={}, utility={},
        splits=splits or {"member_calibration": 2, "nonmember_calibration": len(cal_non), "member_eval": m.size,
                          "nonmember_eval": n.size},
        null_band=(0.4, 0.6), config=dict(config or {}), timesteps={}, passes={}, info=dict(info or {}), seconds=0.0,
        manifest=None, roc={"loss": ([0.0, 1.0], [0.0, 1.0])},
        manifest_sets={"member_eval": ids, "nonmember_eval": [f"n{i}.png" for i in range(n.size)]},
        verdict={"headline": {"attack": "loss"}},
        scores={"loss": AttackScores(ev, cal, cal_labels)}, eval_labels=labels, generated=generated)


def _section(rep):
    return "\n".join(render_exposure(rep.to_dict()["exposure"]))


def _generated(mse):
    n = len(mse)
    return NearestGenerated("pixels", np.asarray(mse, float), torch.zeros(n, 1, 4, 4, dtype=torch.uint8),
                            torch.full((n, 1, 4, 4), 255, dtype=torch.uint8), generated=8)


def test_ranks_handle_ties_as_halves_and_order_is_deterministic():
    members = [3.0, 1.0, 2.0, 2.0]
    non = [0.0, 1.0, 2.0, 5.0]
    ex = compute_exposure(_report(members, non, member_ids=["c.png", "b.png", "d.png", "a.png"]))
    # 3 beats 0, 1, 2 of 4; 2 beats 0, 1 and ties 2; 1 beats 0 and ties 1
    assert [(m.id, m.rank, m.nonmember_share_below) for m in ex.members] == [
        ("c.png", 1, 0.75), ("a.png", 2, 0.625), ("d.png", 3, 0.625), ("b.png", 4, 0.375)]  # tied 2s: by id
    assert ex.members[0].rank_text == "more member-like than 75.0% of non-members"
    # calibrated with the calibration non-members' scores 0 and 2: mean 1, std 1
    assert [m.calibrated_score for m in ex.members] == [2.0, 1.0, 1.0, 0.0]
    # the mean share over the members is the attack's AUC (Mann-Whitney)
    assert np.mean([m.nonmember_share_below for m in ex.members]) == pytest.approx(M.auc(np.array(members),
                                                                                          np.array(non)))
    again = compute_exposure(_report(members, non, member_ids=["c.png", "b.png", "d.png", "a.png"]))
    assert [m.id for m in again.members] == [m.id for m in ex.members]
    assert rank_text(0.996) == "more member-like than 99.6% of non-members"
    assert share_below(np.array([7.0]), np.array([7.0, 7.0])).tolist() == [0.5]


def test_top_k_comes_from_the_config_or_the_call():
    rep = _report(np.arange(12.0), np.arange(20.0) - 5)
    ex = compute_exposure(rep)
    assert ex.top_k == 8 and [m.score for m in ex.top] == list(np.arange(11.0, 3.0, -1))
    assert len(compute_exposure(rep, top_k=3).top) == 3
    rep4 = _report(np.arange(12.0), np.arange(20.0) - 5, config={"attack_options": {"exposure": {"top_k": 4}}})
    attach_exposure(rep4)
    block = rep4.to_dict()["exposure"]
    assert block["top_k"] == 4 and len(block["members"]) == 12
    assert _section(rep4).count("more member-like than") == 4  # the table lists the top 4 only


@pytest.mark.parametrize("k", [0, -1, True, 2.5, "8"])
def test_bad_k_is_refused_before_anything_is_written(k, tmp_path):
    with pytest.raises(AuditError, match="top_k.*whole number >= 1"):
        compute_exposure(_report([1.0, 2.0], [0.0, 1.0]), top_k=k)
    rep = _report([1.0, 2.0], [0.0, 1.0], config={"attack_options": {"exposure": {"top_k": k}}})
    with pytest.raises(AuditError, match="top_k"):
        attach_exposure(rep)
    assert rep.exposure is None
    pool = synthetic_pool(16, seed=1)
    out = tmp_path / "out"
    with pytest.raises(AuditError, match="top_k"):  # refused with the config, before any model work
        run_audit(MemorizingTarget(pool[:8]), pool[:8], pool[8:], attacks=["loss"], out_dir=out, progress=False,
                  load_plugins=False, config={**FAST, "attack_options": {"exposure": {"top_k": k}}})
    assert not out.exists()
    with pytest.raises(AuditError, match="near_copy_quantile"):
        compute_exposure(_report([1.0], [0.0]), quantile=0.5)


def test_near_copy_threshold_is_the_lower_quantile_of_calibration_nonmembers():
    rng = np.random.default_rng(0)
    cal = rng.permutation(np.arange(1.0, 101.0))
    assert near_copy_threshold(cal, 0.01) == 1.0 and near_copy_threshold(cal, 0.05) == 5.0
    for q in (0.01, 0.05, 0.2):
        assert (cal < near_copy_threshold(cal, q)).mean() <= q  # at most q of them are flagged
    members = [0.5, 9.0, 4.0, 30.0]
    ev_non = np.concatenate([[0.1, 2.0, 4.9], np.linspace(6.0, 90.0, 47)])
    mse = np.concatenate([[50.0, 60.0], cal, members, ev_non])  # context order: member_cal, nonmember_cal, ...
    rep = _report([4.0, 3.0, 2.0, 1.0], np.linspace(-1, 1, 50), cal_non=np.zeros(100), generated=_generated(mse),
                  config={"attack_options": {"exposure": {"near_copy_quantile": 0.05}}})
    ex = compute_exposure(rep)
    assert ex.threshold == 5.0 and ex.n_calibration_nonmember == 100
    assert ex.nonmembers_flagged == 3 and ex.nonmember_flag_share == pytest.approx(0.06)
    assert [(m.distance, m.near_copy) for m in ex.members] == [(0.5, True), (9.0, False), (4.0, True), (30.0, False)]
    assert ex.members_flagged == 2
    attach_exposure(rep)
    md = _section(rep)
    assert "## Exposure: the most exposed members" in md
    assert "5% quantile (lower) of the same distance over the 100 calibration non-members" in md
    assert "**3 of 50 evaluation non-members are flagged (6.0%)**" in md and "2 of 4 evaluation members" in md
    assert "| 1 | `m0.png` | " in md and "| **NEAR-COPY** |" in md and "a heuristic, not a proof" in md


def test_without_generated_samples_the_ranking_works_and_says_why(tmp_path):
    rep = _report([2.0, 1.0, 0.5], [0.0, 0.7, 3.0])
    ex = compute_exposure(rep)
    assert [m.rank for m in ex.members] == [1, 2, 3] and all(m.distance is None for m in ex.members)
    assert ex.threshold is None and "the generation attack did not run" in ex.no_distance_reason
    skipped = _report([2.0, 1.0], [0.0, 3.0], info={"skipped_attacks": {"generation": "needs decode"}})
    assert "skipped (needs decode)" in compute_exposure(skipped).no_distance_reason
    ran = _report([2.0, 1.0], [0.0, 3.0], attacks=("loss", "generation"))
    assert "not kept" in compute_exposure(ran).no_distance_reason


def test_exposure_png_without_generation_shows_the_member_files(tmp_path):
    pool = synthetic_pool(16, seed=2)
    files = []
    for i, x in enumerate(pool):  # the audited images as files: their ids are paths, as with smplora audit
        files.append(tmp_path / f"img_{i:02d}.png")
        Image.fromarray(((x[0].numpy() + 1) * 127.5).round().astype(np.uint8)).save(files[-1])
    ids = [str(f) for f in files]
    rep = run_audit(MemorizingTarget(pool[:8]), AuditSamples(pool[:8], ids=ids[:8]),
                    AuditSamples(pool[8:], ids=ids[8:]), attacks=["loss"], config=FAST, progress=False,
                    load_plugins=False, num_threads=1)
    attach_exposure(rep)
    paths = rep.write(tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "No near-copy check: the generation attack did not run" in md and "with their ranks only" in md
    assert f"`{rep.exposure.members[0].id}`" in md and rep.exposure.members[0].id in ids[:8]
    assert paths["exposure"] == tmp_path / "out" / "exposure.png"
    with Image.open(paths["exposure"]) as im:
        tall = im.size[1]
    rep.config = {**rep.config, "attack_options": {"exposure": {"top_k": 1}}}
    attach_exposure(rep)
    with Image.open(rep.write(tmp_path / "one")["exposure"]) as im:
        assert im.size[1] < tall  # one row instead of four


def _memorised(n=32, seed=4):
    pool = synthetic_pool(n, seed=seed)
    caps = synthetic_captions(n, seed=seed)
    ids = [f"img_{i:02d}.png" for i in range(n)]
    half = n // 2
    target = MemorizingTarget(pool[:half], captions=caps[:half])
    members = AuditSamples(pool[:half], caps[:half], ids[:half])
    return target, members, AuditSamples(pool[half:], caps[half:], ids[half:])


def test_write_report_draws_exposure_and_the_section_from_a_real_audit(tmp_path):
    target, mem, non = _memorised()
    rep = run_audit(target, mem, non, attacks=["loss", GenerationAttack(per_caption=2, steps=4)], config=FAST,
                    progress=False, load_plugins=False, num_threads=1, out_dir=tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "exposure.png").is_file()
    d = json.loads((out / "report.json").read_text())
    block = d["exposure"]
    head = d["verdict"]["headline"]["attack"]
    assert block["attack"] == head and len(block["members"]) == 8 and block["n_nonmember"] == 8
    assert {m["id"] for m in block["members"]} == set(rep.manifest_sets["member_eval"])
    assert np.mean([m["nonmember_share_below"] for m in block["members"]]) == pytest.approx(d["attacks"][head]["auc"])
    # the memorising target's LoRA generates its members at their captions: every member is a near copy, while
    # the threshold sits at the closest calibration non-member
    assert block["distance_space"] == "latents" and block["generated_per_caption"] == 2
    assert all(m["near_copy"] for m in block["members"]) and block["members_flagged"] == 8
    assert block["nonmembers_flagged"] <= 8 and block["n_calibration_nonmember"] == 8
    md = (out / "report.md").read_text()
    assert "## Exposure: the most exposed members" in md and "evaluation non-members are flagged" in md
    assert f"`{block['members'][0]['id']}`" in md
    assert "_kept" not in (out / "report.json").read_text()
    # with flip averaging the generation attack keeps one set of samples too (it used to fail to average them)
    flip = run_audit(target, mem, non, attacks=[GenerationAttack(per_caption=2, steps=4)],
                     config={**FAST, "flip_average": True}, progress=False, load_plugins=False, num_threads=1)
    assert flip.generated is not None and flip.exposure.threshold is not None


def test_pooled_reports_rank_per_run(tmp_path):
    runs = []
    for i in range(2):
        target, mem, non = _memorised(n=24, seed=10 + i)
        runs.append(AuditRun(target, mem, non, name=f"lora{i}"))
    rep = run_audit_pooled(runs, attacks=["loss"], config=FAST, progress=False, load_plugins=False,
                           out_dir=tmp_path / "pooled")
    d = rep.to_dict()
    assert d["exposure"]["ranked"].startswith("per run") and len(d["exposure"]["runs"]) == 2
    assert d["exposure"]["runs"][0]["most_exposed"]["rank"] == 1
    md = (tmp_path / "pooled" / "report.md").read_text()
    assert "## Exposure: the most exposed members" in md and "Ranked per run" in md
    assert not (tmp_path / "pooled" / "exposure.png").exists()
    for i, name in enumerate(rep.run_names()):
        folder = tmp_path / "pooled" / f"run_{i + 1:02d}_{name}"
        assert (folder / "exposure.png").is_file()
        assert "No near-copy check: the generation attack did not run" in (folder / "report.md").read_text()
