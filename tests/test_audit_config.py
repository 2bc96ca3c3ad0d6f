"""AuditConfig and the attacks' own option sets; run_audit's CPU settings, manifest and import structure."""

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import smplora_plugin.audit as audit_pkg
from smplora_plugin.audit import Attack, AuditConfig, AuditError, ScoreContext, run_audit
from smplora_plugin.audit import types as audit_types
from smplora_plugin.audit.attacks import SimAAttack, SimAOptions
from smplora_plugin.audit.attacks.sima import sima_statistic
from smplora_plugin.audit.config import register_options
from smplora_plugin.audit.engine import cpu_settings
from smplora_plugin.audit.synthetic import FormulaTarget, MemorizingTarget, synthetic_pool

# the flat fields of AuditConfig before the attacks owned their settings: still accepted and reported
OLD_FIELDS = {
    "seed", "batch_size", "timesteps", "draws", "sima_timesteps", "sima_p", "pia_timesteps", "pia_p", "secmi_t",
    "secmi_step", "clid_timesteps", "clid_fractions", "clid_max_words", "clid_alphas", "flip_average",
    "near_duplicate_mse", "map_grid", "mlp_hidden", "mlp_dropout", "mlp_lr", "mlp_weight_decay", "mlp_max_epochs",
    "mlp_patience", "mlp_fit_fraction", "n_boot", "cv_folds",
}
CFG = {"n_boot": 100, "draws": 1, "timesteps": [100, 300]}


def test_old_field_names_map_to_the_attack_options():
    old = AuditConfig(seed=3, sima_p=2.0, secmi_t=100, mlp_lr=0.01)
    new = AuditConfig(seed=3, attack_options={"sima": {"p": 2.0}, "secmi": {"t": 100}, "mlp": {"lr": 0.01}})
    assert old == new and old.attack_options["sima"] == {"p": 2.0}
    assert old.sima_p == 2.0 and old.secmi_t == (100,) and old.pia_p == 4.0  # read back through the options
    assert old.options("secmi").t == (100,) and old.options("sima", p=3.0).p == 3.0
    old.clid_max_words = 8  # a write goes to the option set too
    assert old.attack_options["clid"] == {"max_words": 8}


def test_to_dict_keeps_the_old_flat_fields_and_round_trips():
    cfg = AuditConfig.from_dict({"seed": 2, "sima_timesteps": [0, 50], "pia_p": 3.0})
    d = cfg.to_dict()
    assert set(d) == OLD_FIELDS
    assert d["sima_timesteps"] == [0, 50] and d["pia_p"] == 3.0 and d["secmi_t"] == [100, 150, 200]
    assert AuditConfig.from_dict(d).to_dict() == d


def test_unknown_fields_and_options_are_refused():
    with pytest.raises(AuditError, match="unknown audit config field"):
        AuditConfig(sima_q=1)
    with pytest.raises(AuditError, match=r"unknown option\(s\) \['q'\] for 'sima'"):
        AuditConfig(attack_options={"sima": {"q": 1}}).validate()
    with pytest.raises(AuditError, match="no attack has options named 'nope'"):
        AuditConfig(attack_options={"nope": {}}).validate()
    with pytest.raises(AuditError, match="unknown option"):
        SimAAttack(q=1)  # refused when the attack is made, before any model work
    with pytest.raises(AuditError, match="sima_p"):
        SimAAttack(p=0)


def test_instance_options_override_the_config_options():
    target = FormulaTarget((1, 4, 4), seed=3)
    images = synthetic_pool(6, (1, 4, 4), seed=11)
    cfg = AuditConfig(seed=1, draws=1, attack_options={"sima": {"timesteps": (0, 40)}})
    ctx = ScoreContext(target, images, None, cfg, progress=False)
    cands = SimAAttack(p=2.0).candidates(ctx)
    assert list(cands) == ["t=0", "t=40"]
    p2 = sima_statistic(ctx, options=SimAOptions(timesteps=(0, 40), p=2.0))
    np.testing.assert_array_equal(-cands["t=40"], p2[:, 1])
    assert not np.allclose(p2, sima_statistic(ctx))  # the config's p = 4 is another statistic


@register_options("test_scaled_loss")
@dataclass
class _ScaledLossOptions:
    scale: float = 1.0


class _ScaledLoss(Attack):
    """A new attack with its own options: no change to the engine or the config needed."""

    name = "scaled_loss"
    option_set = "test_scaled_loss"

    def candidates(self, ctx):
        return {"mean": -self.settings(ctx).scale * ctx.loss_grid(True).mean((1, 2))}


def test_a_new_attack_brings_its_own_options():
    pool = synthetic_pool(24, seed=5)
    target = MemorizingTarget(pool[:12], strength=1.0)
    rep = run_audit(target, pool[:12], pool[12:], attacks=[_ScaledLoss(scale=2.0), "loss"], progress=False,
                    config={**CFG, "attack_options": {"test_scaled_loss": {"scale": 5.0}}})
    # the instance's scale (2) overrides the config's (5)
    np.testing.assert_allclose(rep.scores["scaled_loss"].eval_scores, 2.0 * rep.scores["loss"].eval_scores)
    assert rep.config["attack_options"] == {"test_scaled_loss": {"scale": 5.0}}
    with pytest.raises(AuditError, match="unknown option"):
        _ScaledLoss(shift=1.0)


def test_cpu_settings_are_restored_even_after_an_error():
    before = torch.get_num_threads()
    want = 2 if before != 2 else 3
    with pytest.raises(RuntimeError):
        with cpu_settings(want):
            assert torch.get_num_threads() == want
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_the_manifest_is_written_once(tmp_path, monkeypatch):
    calls = []
    real = audit_types.write_manifest
    monkeypatch.setattr(audit_types, "write_manifest", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    pool = synthetic_pool(20, seed=6)
    rep = run_audit(MemorizingTarget(pool[:10]), pool[:10], pool[10:], attacks=["loss"], config=CFG,
                    progress=False, out_dir=tmp_path)
    assert calls == [tmp_path / "manifest.json"] and rep.manifest == str(tmp_path / "manifest.json")
    assert rep.to_dict()["timesteps"]["secmi"] == [[100, 150, 200], 10]


def _sibling_imports(path: Path):
    """(audit module, inside a function?) of every run-time ``from .x import ...`` in ``path``."""
    out = []

    def visit(node, in_func):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", "") == "TYPE_CHECKING":
                continue  # annotations only, never imported at run time
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                mods = [child.module] if child.module else [a.name for a in child.names]
                out.extend((m.split(".")[0], in_func) for m in mods)
            visit(child, in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
    visit(ast.parse(path.read_text()), False)
    return out


def test_no_import_cycles_between_protocol_report_references_and_types():
    root = Path(audit_pkg.__file__).parent
    imports = {m: _sibling_imports(root / f"{m}.py") for m in ("protocol", "report", "references", "types")}
    assert {m for m, _ in imports["types"]} == {"report"}  # the plain types need only the renderer
    assert imports["report"] == []
    for name, found in imports.items():
        body = [m for m, in_func in found if in_func and m in imports]
        assert not body, f"{name}.py imports {body} inside a function"
    assert "protocol" not in {m for m, _ in imports["references"]}
