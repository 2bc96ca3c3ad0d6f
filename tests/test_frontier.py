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
    assert settings["code"]["frontier_version"] == 1 and settings["code"]["smplora"] == smplora_plugin.__version__
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
