"""benchmarks/frontier.py: cache keys, resume, Pareto selection, worker scheduling and a tiny end-to-end run."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from tests._helpers import one_thread  # noqa: F401

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = dict(dataset="textures", members=8, steps=3, runs=2, references=2,
            audit={"n_boot": 50, "draws": 1, "timesteps": [100, 300], "mlp_max_epochs": 5},
            attacks=("loss", "loss_calibrated", "lira_online", "rmia"), per_label=1, sample_steps=2)


@pytest.fixture(scope="module")
def fr():
    from benchmarks import frontier

    # opacus installs a top-level ``benchmarks`` package too: the repository's must be the one found
    assert Path(frontier.__file__).parent == BENCH, frontier.__file__
    return frontier


def test_keys_change_with_every_setting_and_only_then(fr):
    rc = fr.Recipe(**TINY)
    spec = fr.row_spec("robust")
    key = fr.settings_key(fr.lora_settings(rc, spec, 0))
    assert key == fr.settings_key(fr.lora_settings(fr.Recipe(**TINY), dict(reversed(list(spec.items()))), 0))
    changed = [fr.lora_settings(rc, spec, 1), fr.lora_settings(rc, fr.row_spec("robust grid16"), 0),
               fr.lora_settings(fr.Recipe(**{**TINY, "steps": 4}), spec, 0),
               fr.lora_settings(fr.Recipe(**{**TINY, "members": 12}), spec, 0),
               fr.lora_settings(fr.Recipe(**{**TINY, "dataset": "digits"}), spec, 0),
               fr.lora_settings(rc, spec, 0, reference=0)]
    assert len({key, *map(fr.settings_key, changed)}) == 1 + len(changed)
    # the audit key follows its LoRA, the audit settings and the references, not unrelated recipe fields
    a = fr.settings_key(fr.audit_settings(rc, spec, 0))
    assert a == fr.settings_key(fr.audit_settings(fr.Recipe(**TINY), spec, 0))
    assert a != fr.settings_key(fr.audit_settings(fr.Recipe(**{**TINY, "audit": {"n_boot": 60}}), spec, 0))
    assert a != fr.settings_key(fr.audit_settings(fr.Recipe(**{**TINY, "references": 4}), spec, 0))
    assert a != fr.settings_key(fr.audit_settings(fr.Recipe(**{**TINY, "steps": 4}), spec, 0))
    assert a == fr.settings_key(fr.audit_settings(fr.Recipe(**{**TINY, "runs": 5}), spec, 0))


def test_audit_cap_draws_a_subset_and_keys_only_where_it_binds(fr):
    full = fr.run_draw(40, 16, 3)
    capped = fr.run_draw(40, 16, 3, audited=8)
    assert capped["member"] == full["member"] and len(capped["member"]) == 16  # the LoRA still trains on all 16
    parts = ("member_cal", "member_eval", "nonmember_cal", "nonmember_eval")
    assert [len(capped[k]) for k in parts] == [4, 4, 4, 4]
    assert set(capped["member_cal"] + capped["member_eval"]) < set(full["member"])
    assert set(capped["nonmember_cal"] + capped["nonmember_eval"]) < set(full["nonmember_cal"] + full["nonmember_eval"])
    assert not set(capped["member_cal"]) & set(capped["member_eval"])
    assert fr.run_draw(40, 16, 3, audited=64) == full  # a cap above M changes nothing
    spec = fr.row_spec("plain")
    key = lambda **kw: fr.settings_key(fr.audit_settings(fr.Recipe(**{**TINY, **kw}), spec, 0))  # noqa: E731
    assert key() == key(audited=8) == key(audited=64)  # M = 8: the cap does not bind, the key stays
    assert key(members=16) != key(members=16, audited=8)
    with pytest.raises(ValueError, match="audited"):
        fr.Recipe(**{**TINY, "audited": 6}).validate()


def test_pareto_keeps_the_non_dominated_points(fr):
    pts = [(0.5, 0.9), (0.6, 0.7), (0.55, 0.8), (0.6, 0.75), (0.4, 0.6), (0.7, 0.95), (0.6, 0.7)]
    front = fr.pareto(pts)
    assert [pts[i] for i in front] == [(0.4, 0.6), (0.6, 0.7), (0.7, 0.95)]
    assert front == [4, 1, 5]  # the duplicate (0.6, 0.7) keeps its first index
    assert fr.pareto([]) == [] and fr.pareto([(0.1, 0.2)]) == [0]


def test_bad_recipe_is_refused(fr):
    with pytest.raises(ValueError, match="multiple of 4"):
        fr.Recipe(**{**TINY, "members": 10}).validate()
    with pytest.raises(ValueError, match="even number"):
        fr.Recipe(**{**TINY, "references": 3}).validate()
    with pytest.raises(ValueError, match="unknown row"):
        fr.row_spec("robust-ish")


def test_tiny_frontier_end_to_end_and_resume(fr, tmp_path):
    pytest.importorskip("sklearn")
    rc = fr.Recipe(**TINY)
    rc.validate()
    cache = fr.Cache(tmp_path / "cache")
    rows = ["untouched", "plain"]
    todo = fr.tasks_for(cache, rc, rows)
    assert [t["task"] for t in todo] == ["reference"] * 2 + ["run"] * 4
    setup = fr._setup(rc.dataset)
    for row in rows:
        for i in range(rc.runs):
            meta = fr.ensure_audit(cache, rc, row, i, setup=setup)
            assert meta["report"]["verdict"]["verdict"] is not None
    memo = [fr.load_report(cache, fr.settings_key(fr.audit_settings(rc, fr.row_spec(r), i)))[1]["reference_eps_memo"]
            for r in rows for i in range(rc.runs)]
    assert memo[0]["misses"] > 0 and all(m["misses"] == 0 and m["hits"] > 0 for m in memo[1:])  # grids reused
    assert fr.tasks_for(cache, rc, rows) == []  # resume: nothing left to do
    assert fr.schedule(cache, rc, rows, jobs=2) == 0  # and no worker is started
    # a cached run is read back, not retrained: its file is untouched by a second call
    key = fr.settings_key(fr.audit_settings(rc, fr.row_spec("plain"), 0))
    stamp = (cache.path("audit", key) / "meta.json").stat().st_mtime_ns
    fr.ensure_audit(cache, rc, "plain", 0, setup=setup)
    assert (cache.path("audit", key) / "meta.json").stat().st_mtime_ns == stamp
    # different member draws per run; references IN for half of them
    pool, _ = fr.audited_pool(rc.dataset, rc.members)
    d0, d1 = fr.run_draw(len(pool), rc.members, 0), fr.run_draw(len(pool), rc.members, 1)
    assert d0["member"] != d1["member"] and not set(d0["member"]) & set(d0["nonmember_cal"] + d0["nonmember_eval"])
    base, _ = fr.pooled_report(cache, rc, "untouched")
    points = [fr.pooled_point(cache, rc, r, baseline=base) for r in rows]
    assert all(p is not None for p in points)
    # the paired verdict against the untouched model on the same draws, on every row but the untouched one
    assert "paired_verdict" not in points[0] and fr._paired(points[0]) == "—"
    assert points[1]["paired_verdict"] in ("leaks beyond the baseline", "no evidence beyond the baseline")
    assert points[1]["paired_attack"] in points[1]["per_attack_auc"] and 0 < points[1]["paired_p"] <= 1
    assert fr.pooled_point(cache, fr.Recipe(**{**TINY, "runs": 3}), "plain") is None  # a partial point is not pooled
    fr.add_gain(points)
    assert points[0]["gain_kept"] in (None, 0.0) and points[1]["n_member_eval"] == rc.runs * rc.members // 2
    assert {"lira_online", "rmia", "loss"} <= set(points[1]["per_attack_auc"])
    text = fr.table(points)
    assert "| 8 | plain | 2 |" in text
    # 8 pooled non-members cannot resolve 1% FPR: the envelope TPR@1%FPR is n/a, not 0%
    assert points[1]["envelope_tpr_1pct"] is None
    assert points[1]["envelope_tpr_1pct_attack"] in points[1]["per_attack_auc"]
    assert fr._env_tpr(points[1]) == "n/a"
    env = {"envelope_tpr_1pct": 0.209, "envelope_tpr_1pct_attack": "lira_offline"}
    assert fr._env_tpr(env) == "20.9% (lira_offline)"
    assert fr._paired({"paired_verdict": "leaks beyond the baseline", "paired_difference": 0.0571,
                       "paired_attack": "clid", "paired_p": 0.0152}) == "**beyond**: +0.057 (clid, p = 0.015)"
    fr.plot(points, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000
    json.dumps(points)


def test_memo_target_serves_repeated_rows_from_disk(fr, tmp_path):
    import torch

    class Inner:
        num_train_timesteps, alphas_cumprod, calls = 10, torch.linspace(0.99, 0.01, 10), 0

        def encode(self, x):
            return x

        def condition(self, caps):
            return torch.ones(len(caps), 2, 3)

        def eps(self, z, t, c, adapter=True):
            Inner.calls += z.shape[0]
            return z * 2 + t.view(-1, 1, 1, 1) + c.sum((1, 2)).view(-1, 1, 1, 1) * float(adapter)

    z, t, c = torch.randn(3, 1, 2, 2), torch.tensor([1, 2, 3]), torch.ones(3, 2, 3)
    m = fr.MemoTarget(Inner(), tmp_path / "memo")
    first = m.eps(z, t, c)
    assert torch.allclose(first, Inner().eps(z, t, c)) and m.misses == 3
    m.flush()
    m2 = fr.MemoTarget(Inner(), tmp_path / "memo")
    calls = Inner.calls
    again = m2.eps(torch.cat([z[[2, 0]], z[:1] + 1]), torch.tensor([3, 1, 1]), torch.ones(3, 2, 3))
    assert Inner.calls == calls + 1 and m2.hits == 2  # two rows from disk, in any batch order; one new
    assert torch.allclose(again[:2], first[[2, 0]])
    assert torch.allclose(m2.eps(z, t, c, adapter=False), Inner().eps(z, t, c, adapter=False))  # never memoised


def test_clipping_alone_trains_without_an_epsilon(fr):
    pytest.importorskip("opacus")
    cfg, base, _ = fr._setup("textures")
    members, _ = fr.audited_pool("textures", 8)
    rc = fr.Recipe(**{**TINY, "steps": 2})
    before = fr._new_model(cfg, base.base_state_dict(), rc.lora_rank, 0).lora_state_dict()
    clipped, facts = fr.train_one(rc, fr.row_spec("clip only"), members, None, 0, cfg, base.base_state_dict())
    assert fr.ROWS["clip only"][0] == "clipping" and facts["epsilon"] is None and facts["steps"] == 2
    after = clipped.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    _, dp = fr.train_one(rc, fr.row_spec("dp-sgd s1"), members, None, 0, cfg, base.base_state_dict())
    assert dp["epsilon"] is not None and 0 < dp["epsilon"] < float("inf")


def _two_rows_differ(fr, row_a, row_b, *, refused):
    """Train ``row_a`` and ``row_b`` for 2 steps on the same draw: their LoRAs must differ; ``refused``
    (a spec) must be refused before training."""
    cfg, base, _ = fr._setup("textures")
    members, defense = fr.audited_pool("textures", 8)
    rc = fr.Recipe(**{**TINY, "steps": 2})
    m1, _ = fr.train_one(rc, fr.row_spec(row_a), members, defense, 0, cfg, base.base_state_dict())
    m2, _ = fr.train_one(rc, fr.row_spec(row_b), members, defense, 0, cfg, base.base_state_dict())
    a, b = m1.lora_state_dict(), m2.lora_state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError) as err:
        fr.train_one(rc, refused, members, defense, 0, cfg, base.base_state_dict())
    return str(err.value)


def test_flip_rows_train_with_mirrored_members(fr):
    assert "flip" in _two_rows_differ(fr, "plain", "plain flip", refused={"kind": "floor", "flip": True})
    assert fr.row_spec("robust flip") == {"kind": "robust", "flip": True}


def test_multiplicity_and_caption_rows_pass_their_levers_to_the_lora_loop(fr):
    assert fr.row_spec("robust flip K4 cap0.3") == {"kind": "robust", "flip": True, "privacy_draws": 4,
                                                    "caption_dropout": 0.3}
    msg = _two_rows_differ(fr, "robust flip", "robust flip K4 cap0.3",
                           refused={"kind": "dpsgd", "noise": 0.3, "clip": 0.05, "caption_dropout": 0.3})
    assert "caption_dropout" in msg


def test_timestep_features_add_t_channels_and_train(fr):
    from smplora_plugin import PrivacyConfig, PrivacyRegularizer

    g = torch.Generator().manual_seed(0)
    pred, target, ref = (torch.randn(4, 2, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([0, 250, 500, 999])
    plain = PrivacyRegularizer(PrivacyConfig.preset("robust", feature_grid=2), load_entry_points=False)
    timed = PrivacyRegularizer(PrivacyConfig.preset("robust", feature_grid=2), plugins=[fr.TimestepChannels(1000)],
                               load_entry_points=False)
    a, b = plain.features(pred, target, t, reference=ref), timed.features(pred, target, t, reference=ref)
    assert a.shape == (4, 8) and b.shape == (4, 8 + 3 * 4)
    assert torch.equal(b[:, :8], a)  # the loss maps are the default's; the t channels follow them, cell by cell
    u = t.float() / 1000
    assert torch.allclose(b[:, 8:12], u[:, None].expand(4, 4))
    assert torch.allclose(b[:, 12:16], torch.sin(torch.pi * u)[:, None].expand(4, 4))
    with pytest.raises(ValueError, match="timesteps"):
        timed.features(pred, target, reference=ref)
    # a different proxy, a different LoRA; a row without a proxy is refused
    msg = _two_rows_differ(fr, "robust flip", "robust flip t-feature", refused={"kind": "plain", "tfeat": True})
    assert "timestep features" in msg


def test_gain_shares_against_untouched_and_plain(fr):
    def pt(row, acc, fd, runs=8):
        return {"dataset": "emoji", "members": 8, "row": row, "classifier_accuracy": acc, "frechet_distance": fd,
                "runs": runs}

    points = [pt("untouched", 0.4, 30.0), pt("plain", 0.6, 10.0), pt("robust", 0.7, 25.0), pt("dp-sgd s1", 0.5, None)]
    fr.add_gain(points)
    got = [(p["gain_kept"], p["fd_gain_kept"]) for p in points]
    assert got[0] == (0.0, 0.0) and got[1] == (1.0, 1.0) and got[3][1] is None
    # more style share than plain, yet samples further from the style: 150% and 25%
    assert got[2][0] == pytest.approx(1.5) and got[2][1] == pytest.approx(0.25)
    assert fr._fd(points[2]) == "25.0 (25.0%)" and fr._fd(points[3]) == "n/a"
    assert fr.pct(-1e-17) == "0.0%" and fr.pct(-0.2) == "-20.0%"
    # plain moved the Fréchet distance by 0.1 of 172 (textures): no share, n/a, not -94615%
    flat = [pt("untouched", 0.536, 171.9), pt("plain", 0.711, 171.8), pt("robust", 0.598, 253.3)]
    fr.add_gain(flat)
    assert flat[2]["gain_kept"] == pytest.approx(0.062 / 0.175) and flat[2]["fd_gain_kept"] is None
    assert fr._fd(flat[2]) == "253.3 (n/a)"
    # plain made the distance worse (digits: 24.9 -> 28.9): no drop to keep
    worse = [pt("untouched", 0.936, 24.9), pt("plain", 0.944, 28.9), pt("robust", 0.865, 40.4)]
    fr.add_gain(worse)
    assert worse[2]["fd_gain_kept"] is None and worse[2]["gain_kept"] is None
    # a row at 8 and 16 runs: shares against the untouched / plain of the same runs; reported at 16
    both = [pt("untouched", 0.4, 30.0), pt("plain", 0.6, 10.0), pt("robust", 0.5, 20.0),
            pt("untouched", 0.4, 30.0, 16), pt("plain", 0.8, 10.0, 16), pt("robust", 0.5, 20.0, 16)]
    fr.add_gain(both)
    assert both[2]["gain_kept"] == pytest.approx(0.5) and both[5]["gain_kept"] == pytest.approx(0.25)
    assert fr.most_runs(both) == both[3:]
    assert fr.most_runs(both[:3] + [both[5]]) == both[:2] + [both[5]]
    # a recipe with canaries is a point set of its own: shares against its own untouched / plain, kept apart
    canary = [{**pt(r, a, f), "canaries": 8} for r, a, f in (("untouched", 0.4, 30.0), ("plain", 0.5, 20.0),
                                                              ("robust", 0.45, 25.0))]
    mixed = both[:3] + canary
    fr.add_gain(mixed)
    assert mixed[2]["gain_kept"] == pytest.approx(0.5) and mixed[5]["gain_kept"] == pytest.approx(0.5)
    assert mixed[5]["fd_gain_kept"] == pytest.approx(0.5) and fr.most_runs(mixed) == mixed


def test_default_cache_is_the_users_cache_folder(fr, monkeypatch, tmp_path):
    monkeypatch.delenv("SMPLORA_FRONTIER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fr.default_cache() == tmp_path / "xdg" / "smplora" / "frontier"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # not absolute: ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fr.default_cache() == tmp_path / "home" / ".cache" / "smplora" / "frontier"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert fr.default_cache() == tmp_path / "home" / ".cache" / "smplora" / "frontier"
    monkeypatch.setenv("SMPLORA_FRONTIER_CACHE", str(tmp_path / "mine"))
    assert fr.default_cache() == tmp_path / "mine"


def test_cache_keys_are_the_ones_existing_caches_hold(fr):
    """The key of a fixed recipe, pinned: a change here would orphan every existing cache entry."""
    import smplora_plugin

    rc = fr.Recipe(**TINY)
    settings = fr.lora_settings(rc, fr.row_spec("plain"), 0)
    # everything but the code facts is pinned here; the code facts follow the shipped model and version
    assert {k: v for k, v in settings.items() if k != "code"} == {
        "dataset": "textures", "members": 8, "steps": 3, "batch_size": 32, "lora_rank": 8, "lora_lr": 1e-3,
        "defense_nonmembers": 64, "spec": {"kind": "plain"}, "run": 0}
    assert settings["code"]["frontier_version"] == fr.FRONTIER_VERSION == 2  # 2: RMIA's tie-break (issue 27)
    assert settings["code"]["smplora"] == smplora_plugin.__version__
    assert fr.settings_key({"b": [1, 2], "a": 0.5}) == fr.settings_key({"a": 0.5, "b": [1, 2]}) == \
        hashlib.sha256(b'{"a":0.5,"b":[1,2]}').hexdigest()[:20]


def test_schedule_trains_missing_references_in_workers_and_counts_failures(fr, tmp_path):
    rc = fr.Recipe(**{**TINY, "steps": 1})
    cache = fr.Cache(tmp_path / "cache")
    lines = []
    assert fr.schedule(cache, rc, [], jobs=2, nice=0, log=lines.append) == 0
    refs = [fr.settings_key(fr.lora_settings(rc, {"kind": "plain"}, 0, reference=r)) for r in range(rc.references)]
    assert all(cache.done("lora", k) for k in refs)  # each worker wrote its reference into the cache
    assert sorted(json.loads(ln.split(": ", 1)[1])["index"] for ln in lines) == [0, 1]
    assert fr.schedule(cache, rc, [], jobs=2, log=lines.append) == 0 and len(lines) == 2  # nothing left to run
    blocked = tmp_path / "a file"
    blocked.write_text("not a folder")  # a worker cannot write its entry under a file: both tasks fail
    lines.clear()
    assert fr.schedule(fr.Cache(blocked), rc, [], jobs=2, nice=0, log=lines.append) == 2
    assert len(lines) == 2 and all(ln.startswith("FAILED {'task': 'reference'") for ln in lines)
    assert "Traceback" in lines[0]  # the worker's traceback comes back with its error
    with pytest.raises(ValueError, match="jobs"):
        fr.schedule(cache, rc, [], jobs=0)


# ---------------------------------------------------------------------------------------------
# issue 23: canaries, tuned DP-SGD, SMP + DP

CANARY = dict(TINY, references=0, attacks=("loss", "loss_calibrated"), canaries=4)


@pytest.fixture(scope="module")
def setup(fr):
    return fr._setup("textures")


def test_canaries_are_fixed_fresh_images_of_four_kinds(fr):
    from smplora_plugin.audit import AuditSamples

    universe, kinds = fr.canary_universe("textures", 8, 4)
    again, kinds2 = fr.canary_universe("textures", 8, 4)
    assert torch.equal(universe.images, again.images) and universe.ids == again.ids and kinds == kinds2
    assert universe.captions == again.captions and len(universe) == 8
    assert kinds == ["duplicate"] * 2 + ["inverted"] * 2 + ["rotated"] * 2 + ["caption-swap"] * 2
    # fresh images: no id and no pixels in common with the audited pool or the defense set
    pool, defense = fr.audited_pool("textures", 8)
    assert not {i.split(":", 1)[1] for i in universe.ids} & set(pool.ids + defense.ids)
    seen = set(AuditSamples(torch.cat([pool.images, defense.images])).pixel_hashes())
    assert not set(AuditSamples(universe.images).pixel_hashes()) & seen
    # the transforms, against the untransformed sources (the split after the pool and the defense set)
    from smplora_plugin.demo.datasets import get_dataset

    sp = get_dataset("textures").splits({"member": 16, "nonmember_defense": fr.DEFENSE_NONMEMBERS,
                                         "nonmember_eval": 8}, 0)
    src = sp["nonmember_eval"]
    assert sp["member"].ids == pool.ids and sp["nonmember_defense"].ids == defense.ids  # the pool is as it was
    assert torch.equal(universe.images[:2], src.images[:2]) and torch.equal(universe.images[2:4], -src.images[2:4])
    assert torch.equal(universe.images[4], torch.rot90(src.images[4], 1, (-2, -1)))
    assert universe.captions[:6] == src.captions[:6]
    assert all(universe.captions[i] != src.captions[i] for i in (6, 7))  # another image's caption
    assert torch.equal(universe.images[6:], src.images[6:])
    # per run: one of each pair a member, the other its non-member; seeded by the run
    d0, d1 = fr.canary_draw(4, 0), fr.canary_draw(4, 1)
    assert d0 == fr.canary_draw(4, 0) and d0 != d1
    for d in (d0, d1):
        assert sorted(d["member"] + d["nonmember"]) == list(range(8))
        assert [m // 2 for m in d["member"]] == [n // 2 for n in d["nonmember"]] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="canaries"):
        fr.Recipe(**{**TINY, "canaries": -1}).validate()
    with pytest.raises(ValueError, match="canaries"):
        fr.canary_universe("textures", 8, 0)


def test_canaries_join_the_training_set_duplicates_twice(fr):
    rc = fr.Recipe(**{**TINY, "canaries": 4})
    old = fr.training_set(fr.Recipe(**TINY), 0)
    new = fr.training_set(rc, 0)
    universe, kinds = fr.canary_universe("textures", 8, 4)
    members = [universe.ids[i] for i in fr.canary_draw(4, 0)["member"]]
    assert new.ids[:len(old)] == old.ids and torch.equal(new.images[:len(old)], old.images)  # the population as before
    extra = new.ids[len(old):]
    dup = [i for i in members if i.startswith("canary-duplicate")]
    assert len(dup) == 1 and extra.count(dup[0]) == 2 and sorted(set(extra)) == sorted(members)
    assert len(extra) == 5
    j = new.ids.index(dup[0])
    assert torch.equal(new.images[j], new.images[j + 1])  # really the same image twice
    # references: each canary in exactly half of them, as the pool's images
    refs = [set(fr.training_set(rc, 0, reference=r).ids) for r in range(rc.references)]
    assert all(sum(c in ids for ids in refs) == rc.references // 2 for c in universe.ids)


def test_canary_and_new_row_keys_change_only_what_they_change(fr):
    rc, on = fr.Recipe(**TINY), fr.Recipe(**{**TINY, "canaries": 4})
    assert fr.Recipe(**{**TINY, "canaries": 0}) == rc
    for row in ("plain", "robust", "dp-sgd s1", "untouched"):
        spec = fr.row_spec(row)
        assert "canaries" not in fr.lora_settings(rc, spec, 0) and "canaries" not in fr.audit_settings(rc, spec, 0)
        assert fr.settings_key(fr.lora_settings(rc, spec, 0)) != fr.settings_key(fr.lora_settings(on, spec, 0))
        assert fr.settings_key(fr.audit_settings(rc, spec, 0)) != fr.settings_key(fr.audit_settings(on, spec, 0))
    ref = lambda r: fr.settings_key(fr.lora_settings(r, {"kind": "plain"}, 0, reference=0))  # noqa: E731
    assert ref(rc) != ref(on)
    # the old DP-SGD rows are what they were; the new settings are keyed
    assert fr.row_spec("dp-sgd s1") == {"kind": "dpsgd", "noise": 1.0, "clip": 0.05}
    new = ["dp-sgd s0.1", "dp-sgd s0.1 c0.2", "dp-sgd s0.1 K4", "dp-sgd s0.1 flip", "dp-sgd s0.1 K4 flip",
           "robust flip dp s0.1 c0.05", "robust whole-batch dp s0.3 c0.05"]
    keys = {fr.settings_key(fr.lora_settings(rc, fr.row_spec(r), 0)) for r in new + ["dp-sgd s0.5", "robust flip"]}
    assert len(keys) == len(new) + 2
    assert fr.ROWS["robust flip dp s0.1 c0.05"][0] in fr.FAMILY_ORDER


def _parts(fr, rc, run):
    from smplora_plugin.audit import AuditSamples

    pool, _ = fr.audited_pool(rc.dataset, rc.members)
    draw = fr.run_draw(len(pool), rc.members, run)
    return {k: AuditSamples(pool.subset(draw[k]).images, pool.subset(draw[k]).captions, pool.subset(draw[k]).ids)
            for k in ("member_cal", "member_eval", "nonmember_cal", "nonmember_eval")}


def test_one_audit_scores_the_canaries_and_reports_the_population_as_run_audit(fr, setup):
    import numpy as np

    from smplora_plugin.audit import AuditSamples, run_audit
    from smplora_plugin.demo.target import TinyLDMTarget

    rc = fr.Recipe(**CANARY)
    cfg, base, _ = setup
    model = fr._new_model(cfg, base.base_state_dict(), rc.lora_rank, 0)
    model.requires_grad_(False)
    parts = _parts(fr, rc, 0)
    universe, _ = fr.canary_universe(rc.dataset, rc.members, rc.canaries)
    d = fr.canary_draw(rc.canaries, 0)
    c = lambda idx: AuditSamples(universe.subset(idx).images, universe.subset(idx).captions,  # noqa: E731
                                 universe.subset(idx).ids)
    audit = {"seed": 0, **rc.audit}
    rep, can, lab = fr.audit_with_canaries(TinyLDMTarget(model), parts, c(d["member"]), c(d["nonmember"]),
                                           attacks=list(rc.attacks), config=audit)
    ref = run_audit(TinyLDMTarget(model), parts["member_eval"], parts["nonmember_eval"],
                    calibration_members=parts["member_cal"], calibration_nonmembers=parts["nonmember_cal"],
                    attacks=list(rc.attacks), config=audit, progress=False, num_threads=1, load_plugins=False)
    assert lab.tolist() == [1] * 4 + [0] * 4 and set(can) == set(rc.attacks) and can["loss"].shape == (8,)
    assert rep.splits == ref.splits and np.array_equal(rep.eval_labels, ref.eval_labels)
    for a in rc.attacks:
        np.testing.assert_allclose(rep.scores[a].eval_scores, ref.scores[a].eval_scores, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(rep.scores[a].cal_scores, ref.scores[a].cal_scores, rtol=1e-9, atol=1e-12)
        assert rep.attacks[a]["auc"] == pytest.approx(ref.attacks[a]["auc"])
    assert rep.verdict["headline"]["auc"] == pytest.approx(ref.verdict["headline"]["auc"])
    assert rep.verdict["verdict"] == ref.verdict["verdict"]
    assert rep.utility["heldout_denoising_loss"] == pytest.approx(ref.utility["heldout_denoising_loss"], rel=1e-9)
    # the canaries' scores are the context's own: an inverted image is far from the base model's data
    assert not np.allclose(can["loss"][:4], can["loss"][4:])


def test_canary_frontier_pools_canaries_next_to_the_population(fr, setup, tmp_path):
    rc = fr.Recipe(**{**CANARY, "steps": 2})
    cache = fr.Cache(tmp_path / "cache")
    for row in ("untouched", "plain"):
        for i in range(rc.runs):
            meta = fr.ensure_audit(cache, rc, row, i, setup=setup)
            assert meta["canaries"]["labels"] == [1] * 4 + [0] * 4 and len(meta["canaries"]["kinds"]) == 8
    lmeta = cache.read("lora", fr.settings_key(fr.lora_settings(rc, fr.row_spec("plain"), 1)))[0]
    assert len(lmeta["trained_ids"]) == rc.members + rc.canaries + 1  # the duplicated canary twice
    base, _ = fr.pooled_report(cache, rc, "untouched")
    cbase, kinds = fr.pooled_canary_report(cache, rc, "untouched")
    assert len(kinds) == rc.runs * 8 and cbase.eval_labels.sum() == rc.runs * 4
    points = [fr.pooled_point(cache, rc, r, baseline=base, canary_baseline=cbase) for r in ("untouched", "plain")]
    for p in points:
        assert p["canaries"] == 4 and p["canary_n_member"] == p["canary_n_nonmember"] == 8
        assert 0 <= p["canary_headline_auc"] <= 1 and set(p["canary_kind_auc"]) <= set(fr.CANARY_KINDS)
        assert p["n_member_eval"] == rc.runs * rc.members // 2  # the population's samples, without the canaries
    assert "canary_paired_verdict" not in points[0] and points[1]["canary_paired_verdict"] in (
        "leaks beyond the baseline", "no evidence beyond the baseline")
    text = fr.table(points)
    assert "canary headline AUC" in text and f"| {points[1]['canary_headline_auc']:.3f} (" in text
    assert "canary" not in fr.table([{k: v for k, v in points[1].items() if not k.startswith("canar")}])
    assert fr.pooled_canary_report(cache, fr.Recipe(**{**CANARY, "steps": 2, "canaries": 0}), "plain") is None


def _old_dpsgd(model, members, *, steps, lr, bs, seed, noise, clip):
    """train_dpsgd as it was before noise multiplicity (the old rows' LoRAs are cached from it)."""
    import torch.nn.functional as F
    from opacus import GradSampleModule

    from benchmarks.privacy_utility import _batches

    gsm = GradSampleModule(model.unet)
    params = [p for p in model.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g_noise = torch.Generator().manual_seed(seed + 1234)
    for z_t, t, cond, eps in _batches(model, members, steps, bs, seed):
        pred = gsm(z_t, t, encoder_hidden_states=cond).sample
        per_sample = F.mse_loss(pred, eps, reduction="none").mean((1, 2, 3))
        opt.zero_grad(set_to_none=True)
        per_sample.sum().backward()
        gs = [p.grad_sample.reshape(len(z_t), -1) for p in params]
        norms = torch.cat(gs, 1).norm(dim=1)
        factor = (clip / (norms + 1e-12)).clamp(max=1.0)
        for p in params:
            clipped = (p.grad_sample * factor.view(-1, *[1] * (p.grad_sample.ndim - 1))).sum(0)
            p.grad = (clipped + torch.randn(p.shape, generator=g_noise) * noise * clip) / len(z_t)
            p.grad_sample = None
        opt.step()
    gsm._close()
    model.unet = gsm._module


def test_noise_multiplicity_one_is_the_old_dp_sgd_and_k_costs_no_epsilon(fr, setup):
    pytest.importorskip("opacus")
    from benchmarks.privacy_utility import train_dpsgd

    cfg, base, _ = setup
    members, _ = fr.audited_pool("textures", 8)
    sd = base.base_state_dict()
    kw = dict(steps=2, lr=1e-3, bs=8, seed=3, noise=0.5, clip=0.05)

    def trained(fn, **extra):
        m = fr._new_model(cfg, sd, 4, 3)
        out = fn(m, members, **kw, **extra)
        return m.lora_state_dict(), out

    old, _ = trained(_old_dpsgd)
    one, eps1 = trained(train_dpsgd, noise_mult=1)
    assert all(torch.equal(old[k], one[k]) for k in old)  # draw for draw, bit for bit
    two, eps2 = trained(train_dpsgd, noise_mult=2)
    flip, eps3 = trained(train_dpsgd, flip=True)
    assert eps1 == eps2 == eps3 and 0 < eps1 < float("inf")  # averaging before clipping: no privacy cost
    assert any(not torch.equal(one[k], two[k]) for k in one) and any(not torch.equal(one[k], flip[k]) for k in one)
    with pytest.raises(ValueError, match="noise_mult"):
        trained(train_dpsgd, noise_mult=0)


def test_smp_dp_rows_train_with_the_cores_dp_sgd_and_record_epsilon(fr, setup):
    cfg, base, _ = setup
    members, defense = fr.audited_pool("textures", 8)
    rc = fr.Recipe(**{**TINY, "steps": 2})
    sd = base.base_state_dict()
    before = fr._new_model(cfg, sd, rc.lora_rank, 0).lora_state_dict()
    model, facts = fr.train_one(rc, fr.row_spec("robust flip dp s0.1 c0.05"), members, defense, 0, cfg, sd)
    after = model.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before) and facts["steps"] == 2
    assert facts["epsilon"] > 0 and facts["epsilon"] < float("inf") and facts["final_loss"] > 0
    _, dp = fr.train_one(rc, fr.row_spec("dp-sgd s0.1 K4 flip"), members, None, 0, cfg, sd)
    assert dp["epsilon"] > 0  # the tuned DP-SGD rows record it too
    with pytest.raises(ValueError, match="needs"):
        fr.train_one(rc, {"kind": "smp_dp", "clip": 0.05}, members, defense, 0, cfg, sd)
    with pytest.raises(ValueError, match="does not take"):
        fr.train_one(rc, {"kind": "dpsgd", "noise": 1.0, "clip": 0.05, "alpha": 2.0}, members, None, 0, cfg, sd)


def test_distill_rows_train_a_student_from_disjoint_teachers(fr):
    err = _two_rows_differ(fr, "plain", "distill s2", refused={"kind": "distill", "shards": 1})
    assert "shards must be an integer >= 2" in err
    assert fr.ROWS["distill s2"][0] == "distill" and "distill" in fr.FAMILY_ORDER


def test_shard_aggregate_rows_average_shard_loras_and_share_them(fr, tmp_path):
    err = _two_rows_differ(fr, "plain", "shard avg s4", refused={"kind": "shard_agg", "shards": 4, "noise": 1.0})
    assert "needs a clip" in err
    cfg, base, _ = fr._setup("textures")
    members, _ = fr.audited_pool("textures", 8)
    rc = fr.Recipe(**{**TINY, "steps": 2})
    memo = fr.ShardMemo(fr.Cache(tmp_path), {"run": 0})
    sd = base.base_state_dict()
    m1, f1 = fr.train_one(rc, {"kind": "shard_agg", "shards": 2}, members, None, 0, cfg, sd, memo=memo)
    assert sum(f1["shard_sizes"]) == len(members) and f1["epsilon"] is None and f1["shard_train_seconds"] > 0
    pytest.importorskip("opacus")
    spec = {"kind": "shard_agg", "shards": 2, "clip": 0.01, "noise": 1.0}
    m2, f2 = fr.train_one(rc, spec, members, None, 0, cfg, sd, memo=memo)
    assert f2["shard_train_seconds"] == 0 and f2["noise_std"] == pytest.approx(0.01) and f2["epsilon"] > 0
    a, b = m1.lora_state_dict(), m2.lora_state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
