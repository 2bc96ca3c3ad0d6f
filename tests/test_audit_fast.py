"""The fast suite (`smplora audit --fast`, `run_audit(attacks="fast")`): the default suite less GSA and the
generation attack, reference attacks added with references, refused with --attacks and as an unknown name."""

from __future__ import annotations

import argparse

import pytest

from smplora_plugin import cli
from smplora_plugin.audit import AuditSamples, run_audit
from smplora_plugin.audit.attacks import DEFAULT_ATTACKS, FAST_ATTACKS, SUITES, resolve_attacks
from smplora_plugin.audit.cli import _attacks
from smplora_plugin.audit.synthetic import MemorizingTarget, synthetic_pool
from smplora_plugin.audit.target import AuditError


def test_fast_is_the_default_suite_less_the_costliest_two():
    assert set(DEFAULT_ATTACKS) - set(FAST_ATTACKS) == {"gsa", "generation"}
    assert [a for a in DEFAULT_ATTACKS if a in FAST_ATTACKS] == list(FAST_ATTACKS)  # the suite's order
    assert SUITES["fast"] == FAST_ATTACKS and SUITES["default"] == DEFAULT_ATTACKS
    names = [a.name for a in resolve_attacks("fast", has_captions=True, load_plugins=False)]
    assert names == list(FAST_ATTACKS)
    # as a suite, attacks that cannot run are left out (CLiD without captions), not refused
    no_caps = [a.name for a in resolve_attacks("fast", has_captions=False, load_plugins=False)]
    assert "clid" not in no_caps and "loss" in no_caps
    with pytest.raises(AuditError, match="suite name is one of"):
        resolve_attacks("quick", has_captions=True, load_plugins=False)


def test_run_audit_with_the_fast_suite():
    pool = synthetic_pool(48, seed=1)
    target = MemorizingTarget(pool[:24], strength=1.0)
    rep = run_audit(target, AuditSamples(pool[:24]), AuditSamples(pool[24:]), attacks="fast", progress=False,
                    num_threads=1, config={"n_boot": 50, "draws": 1, "timesteps": [50, 300], "mlp_max_epochs": 10})
    assert set(rep.attacks) == set(FAST_ATTACKS) - {"clid", "clid_vec"}  # no captions here
    assert rep.verdict["verdict"] == "leaks"


def _args(**kw):
    return argparse.Namespace(**{"fast": False, "attacks": None, **kw})


def test_cli_flag_and_its_conflict(tmp_path, capsys):
    assert _attacks(_args(fast=True)) == "fast"
    assert _attacks(_args(attacks="loss, sima")) == ["loss", "sima"] and _attacks(_args()) is None
    out = tmp_path / "out"
    rc = cli.main(["audit", "--base-model", str(tmp_path), "--lora", str(tmp_path / "x.safetensors"),
                   "--members", str(tmp_path), "--nonmembers", str(tmp_path), "--out", str(out), "--fast",
                   "--attacks", "loss"])
    assert rc == 2 and "--fast" in capsys.readouterr().err and not out.exists()
    from smplora_plugin.audit.cli import list_attacks

    listed = {ln.split()[0]: ln for ln in list_attacks().splitlines()}
    assert "(not in --fast)" in listed["gsa"] and "(not in --fast)" in listed["generation"]
    assert "(not in --fast)" not in listed["loss"]
