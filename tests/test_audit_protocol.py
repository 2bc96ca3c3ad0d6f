"""run_audit's protocol: splits, manifests, bad input, plugins, report files."""

import json

import pytest
import torch

from smplora_plugin.audit import Attack, AuditError, AuditSamples, available_attacks, run_audit
from smplora_plugin.audit.synthetic import MemorizingTarget, synthetic_captions, synthetic_pool
from smplora_plugin.plugins import hookimpl

CFG = {"n_boot": 100, "draws": 1, "timesteps": [100, 300], "batch_size": 64}


def _run(mem, non, target=None, **kw):
    target = target or MemorizingTarget(mem if isinstance(mem, torch.Tensor) else mem.images, strength=1.0)
    kw.setdefault("attacks", ["loss", "loss_calibrated"])
    return run_audit(target, mem, non, config=CFG, progress=False, num_threads=1, **kw)


def test_report_files_and_manifest(tmp_path):
    pool = synthetic_pool(48, seed=3)
    caps = synthetic_captions(48, seed=3)
    rep = _run(AuditSamples(pool[:24], caps[:24]), AuditSamples(pool[24:], caps[24:]),
               target=MemorizingTarget(pool[:24], captions=caps[:24]),
               attacks=["loss", "loss_calibrated", "clid", "blind"], out_dir=tmp_path,
               utility={"ratio_to_plain_lora": 1.02},
               manifest_sets={"member_defense": ["d1", "d2"]}, info={"steps_per_image": 400})
    d = json.loads((tmp_path / "report.json").read_text())
    assert d["splits"] == {"member_calibration": 12, "nonmember_calibration": 12, "member_eval": 12,
                           "nonmember_eval": 12}
    assert d["utility"]["ratio_to_plain_lora"] == 1.02 and "heldout_denoising_loss" in d["utility"]
    assert d["info"]["steps_per_image"] == 400
    assert d["max_over_attacks"]["auc"]["attack"] in ("loss", "loss_calibrated", "clid")
    md = (tmp_path / "report.md").read_text()
    assert "ratio_to_plain_lora" in md and "For comparison with the SMP-LoRA paper" in md
    assert (tmp_path / "roc.png").stat().st_size > 1000
    assert (tmp_path / "per_timestep_auc.png").stat().st_size > 1000
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert set(man["sets"]) == {"member_calibration", "nonmember_calibration", "member_eval", "nonmember_eval",
                                "member_defense"}
    assert len(man["sets"]["member_eval"]) == 12
    # report.write (for callers that set out_dir=None and add utility afterwards) writes the manifest too
    rep.utility["quality"] = {"accuracy": 0.91234, "fd": 1.5}
    paths = rep.write(tmp_path / "again")
    assert json.loads(paths["manifest"].read_text())["sets"] == man["sets"]
    assert "quality: accuracy 0.9123, fd 1.5000" in (tmp_path / "again" / "report.md").read_text()


def test_split_is_by_identity_and_seeded():
    pool = synthetic_pool(40, seed=4)
    ids = [f"person{i // 2}" for i in range(20)]  # two images per identity
    mem = AuditSamples(pool[:20], ids=ids)
    non = AuditSamples(pool[20:])
    rep1 = _run(mem, non, out_dir=None)
    rep2 = _run(mem, non, out_dir=None)
    assert rep1.attacks["loss"]["auc"] == rep2.attacks["loss"]["auc"]
    from smplora_plugin.audit.protocol import split_calibration

    cal, ev = split_calibration(mem, 0.5, 0, "member")
    assert not set(cal.ids) & set(ev.ids) and len(cal) + len(ev) == 20
    from collections import Counter

    assert set(Counter(cal.ids).values()) == {2} and set(Counter(ev.ids).values()) == {2}  # identities stay whole


def test_member_also_in_nonmembers_is_refused(tmp_path):
    pool = synthetic_pool(30, seed=5)
    non = torch.cat([pool[15:29], pool[:1]])  # the first member is also a "non-member"
    with pytest.raises(AuditError, match="both"):
        _run(pool[:15], non, out_dir=tmp_path)
    assert not (tmp_path / "manifest.json").exists()


def test_defense_set_overlap_is_refused():
    pool = synthetic_pool(30, seed=5)
    mem = AuditSamples(pool[:15], ids=[f"m{i}" for i in range(15)])
    non = AuditSamples(pool[15:], ids=[f"n{i}" for i in range(15)])
    with pytest.raises(AuditError, match="m3"):
        _run(mem, non, manifest_sets={"member_defense": ["m3"]})


def test_too_few_samples_and_bad_arguments():
    pool = synthetic_pool(30, seed=6)
    with pytest.raises(AuditError, match="at least 4"):
        _run(pool[:6], pool[6:12])
    with pytest.raises(AuditError, match="both calibration"):
        _run(pool[:10], pool[10:20], calibration_members=pool[20:25])
    with pytest.raises(AuditError, match="needs captions"):
        _run(pool[:10], pool[10:20], attacks=["clid"])
    with pytest.raises(AuditError, match="unknown audit config"):
        run_audit(MemorizingTarget(pool[:10]), pool[:10], pool[10:20], config={"nope": 1})
    with pytest.raises(AuditError, match="not an AuditTarget"):
        run_audit(object(), pool[:10], pool[10:20])
    with pytest.raises(AuditError, match="captions for"):
        AuditSamples(pool[:3], ["a", "b"])
    with pytest.raises(AuditError, match=r"must be in \[-1, 1\]"):
        AuditSamples((pool[:3] + 1) * 127.5)


def test_explicit_calibration_sets():
    pool = synthetic_pool(40, seed=7)
    t = MemorizingTarget(pool[:20])
    rep = run_audit(t, pool[:10], pool[20:30], calibration_members=pool[10:20], calibration_nonmembers=pool[30:40],
                    attacks=["loss"], config=CFG, progress=False)
    assert rep.splits["member_calibration"] == 10 and rep.attacks["loss"]["auc"] > 0.9


class _NormAttack(Attack):
    """Plugin attack for the test: the latent norm (carries no membership signal here)."""

    title = "latent norm"

    def candidates(self, ctx):
        return {"norm": ctx.latents.flatten(1).norm(dim=1).double().numpy()}


class _Plugin:
    @hookimpl
    def smplora_register_attacks(self, register):
        register("latent_norm", _NormAttack)


def test_third_party_attack_via_hook(monkeypatch):
    from smplora_plugin.audit.attacks import registry as attacks_mod

    monkeypatch.setattr(attacks_mod, "_EXTRA", {})  # keep the registration local to this test
    reg = available_attacks(load_plugins=False, plugins=[_Plugin()])
    assert reg["latent_norm"] is _NormAttack
    pool = synthetic_pool(40, seed=8)
    rep = _run(pool[:20], pool[20:], attacks=["loss", "latent_norm"])
    assert set(rep.attacks) == {"loss", "latent_norm"}
    lo, hi = rep.attacks["latent_norm"]["auc_ci95"]
    assert lo <= 0.5 <= hi
    with pytest.raises(AuditError, match="taken by a built-in"):
        available_attacks(load_plugins=False, plugins=[type("P", (), {"smplora_register_attacks": hookimpl(
            lambda self, register: register("loss", _NormAttack))})()])


def test_scores_are_common_random_numbers():
    # the base model sees exactly the draws of the adapter: with adapter == base the delta is exactly 0
    pool = synthetic_pool(24, seed=9)
    t = MemorizingTarget(pool[:12], strength=0.0)
    rep = _run(pool[:12], pool[12:], target=t)
    assert rep.attacks["loss_calibrated"]["auc"] == 0.5
    assert rep.utility["heldout_denoising_loss"] == rep.utility["heldout_denoising_loss_base"]


def test_side_by_side_table():
    from smplora_plugin.audit.report import side_by_side

    pool = synthetic_pool(32, seed=10)
    exposed = _run(pool[:16], pool[16:], target=MemorizingTarget(pool[:16], strength=1.0), utility={"ratio": 1.0})
    clean = _run(pool[:16], pool[16:], target=MemorizingTarget(pool[:16], strength=0.0), utility={"ratio": 1.1})
    table = side_by_side({"plain LoRA": exposed, "SMP-LoRA": clean.to_dict()})
    lines = table.splitlines()
    assert lines[0] == "| | plain LoRA | SMP-LoRA |"
    row = next(line for line in lines if line.startswith("| **max AUC"))
    assert row.count("|") == 4 and "1.000 (loss" in row
    verdict = next(line for line in lines if line.startswith("| **verdict**"))
    assert "**leaks**" in verdict.split("|")[2] and "leaks" not in verdict.split("|")[3]
    assert any(line.startswith("| ratio | 1.0000 | 1.1000 |") for line in lines)


def test_identical_pixels_under_different_ids_are_refused(tmp_path):
    pool = synthetic_pool(30, seed=12)
    mem = AuditSamples(pool[:15], ids=[f"m{i}" for i in range(15)])
    non = AuditSamples(torch.cat([pool[15:29], pool[4:5]]), ids=[f"n{i}" for i in range(15)])  # n14 is m4
    with pytest.raises(AuditError, match=r"'n14'.*same pixels as 'm4'|'m4'.*same pixels as 'n14'"):
        _run(mem, non, out_dir=tmp_path)
    assert not (tmp_path / "manifest.json").exists()
    # also across explicit calibration and evaluation sets
    with pytest.raises(AuditError, match="same pixels"):
        run_audit(MemorizingTarget(pool[:10]), AuditSamples(pool[:5], ids=list("abcde")), pool[20:25],
                  calibration_members=AuditSamples(pool[:5], ids=list("fghij")), calibration_nonmembers=pool[25:30],
                  attacks=["loss"], config=CFG, progress=False)


def test_near_duplicates_across_sets_are_warned_about(capsys):
    pool = synthetic_pool(32, seed=13)
    g = torch.Generator().manual_seed(0)
    near = (pool[3:4] + 0.01 * torch.randn(pool[3:4].shape, generator=g)).clamp(-1, 1)  # member 3, nearly
    non = torch.cat([pool[16:31], near])
    rep = _run(pool[:16], non)
    (w,) = rep.info["warnings"]
    assert w.startswith("1 near-duplicate image pair(s)") and "sha256:" in w
    assert w in rep.verdict["warnings"]
    assert "near-duplicate" in capsys.readouterr().err
    clean = _run(pool[:16], pool[16:])
    assert "warnings" not in clean.info
    off = run_audit(MemorizingTarget(pool[:16]), pool[:16], non, attacks=["loss"], progress=False,
                    config={**CFG, "near_duplicate_mse": 0.0})
    assert "warnings" not in off.info
    with pytest.raises(AuditError, match="near_duplicate_mse"):
        run_audit(MemorizingTarget(pool[:16]), pool[:16], non, config={**CFG, "near_duplicate_mse": -1.0})


@pytest.mark.parametrize("bad, match", [
    ({"clid_fractions": [0.3, 1.2]}, "clid_fractions"), ({"sima_p": 0}, "sima_p"), ({"secmi_t": [100, 5]}, "secmi_t"),
    ({"clid_alphas": [-0.1]}, "clid_alphas"), ({"clid_max_words": 0}, "clid_max_words"), ({"pia_timesteps": []}, "pia"),
])
def test_bad_attack_settings_are_refused_before_any_work(bad, match, tmp_path):
    pool = synthetic_pool(20, seed=14)
    with pytest.raises(AuditError, match=match):
        run_audit(MemorizingTarget(pool[:10]), pool[:10], pool[10:], config={**CFG, **bad}, out_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_single_secmi_t_is_accepted():
    from smplora_plugin.audit import AuditConfig

    assert AuditConfig.from_dict({"secmi_t": 100}).secmi_t == (100,)
