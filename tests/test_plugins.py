"""pluggy hooks: explicit plugins, entry points of an installed distribution, switching them off."""

import importlib
import sys
import textwrap

import pytest
import torch

from smplora_plugin import PluginError, PrivacyRegularizer, hookimpl

from _helpers import SMALL


class Recorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def smplora_before_attacker_update(self, step, member_feats, nonmember_feats):
        self.calls.append(("before", member_feats.shape[0], nonmember_feats.shape[0]))

    @hookimpl
    def smplora_after_attacker_update(self, attacker_loss, attacker_accuracy):
        self.calls.append(("after", float(attacker_loss)))

    @hookimpl
    def smplora_after_regularize(self, denominator, loss):
        self.calls.append(("regularize", float(loss.detach())))

    @hookimpl
    def smplora_on_metrics(self, step, metrics):
        self.calls.append(("metrics", step, metrics["attacker_ce_member"]))

    @hookimpl
    def smplora_file_metadata(self, config):
        return {"smplora.recorder": "yes"}


def _one_step(reg):
    m = torch.rand(3, 2, 4, 4, requires_grad=True)
    return reg.step(torch.tensor(1.0, requires_grad=True), m, torch.rand(2, 2, 4, 4))


def test_explicit_plugin_sees_every_hook_in_order():
    rec = Recorder()
    reg = PrivacyRegularizer(plugins=[rec], **SMALL)
    _one_step(reg)
    assert [c[0] for c in rec.calls] == ["before", "after", "regularize", "metrics"]
    assert rec.calls[0][1:] == (3, 2)
    assert rec.calls[3][1] == 1
    assert reg.file_metadata()["smplora.recorder"] == "yes"
    assert reg.file_metadata()["smplora.method"] == "smp-lora"


def test_feature_hook_first_result_wins_over_default():
    class Halve:
        @hookimpl
        def smplora_extract_features(self, pred, target):
            return ((pred - target) ** 2)[:, :1]  # keep one channel only

    reg = PrivacyRegularizer(plugins=[Halve()], **SMALL)
    feats = reg.features(torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4))
    assert feats.shape == (2, 16)


def test_plugin_with_unknown_hook_is_refused():
    class Bad:
        @hookimpl
        def smplora_no_such_hook(self):
            pass

    with pytest.raises(PluginError, match="does not exist"):
        PrivacyRegularizer(plugins=[Bad()], **SMALL).features(torch.ones(1, 2, 4, 4), torch.ones(1, 2, 4, 4))


def test_metadata_plugin_outside_namespace_is_refused():
    class Bad:
        @hookimpl
        def smplora_file_metadata(self):
            return {"ss_output_name": "x"}

    with pytest.raises(ValueError, match="namespace"):
        PrivacyRegularizer(plugins=[Bad()], **SMALL).file_metadata()


@pytest.fixture
def installed_distribution(tmp_path, monkeypatch):
    """A real distribution on sys.path that declares a `smplora` entry point (as pip would install it)."""
    (tmp_path / "smplora_testplugin.py").write_text(textwrap.dedent('''
        from smplora_plugin import hookimpl
        CALLS = []

        @hookimpl
        def smplora_after_regularize(step, member_ce):
            CALLS.append((step, float(member_ce)))

        @hookimpl
        def smplora_file_metadata():
            return {"smplora.testplugin": "1"}
    '''))
    dist = tmp_path / "smplora_testplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: smplora-testplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[smplora]\ntestplugin = smplora_testplugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.delenv("SMPLORA_DISABLE_PLUGINS", raising=False)
    yield
    sys.modules.pop("smplora_testplugin", None)


def test_entry_point_plugin_of_an_installed_distribution_is_loaded_lazily(installed_distribution):
    reg = PrivacyRegularizer(**SMALL)
    assert "smplora_testplugin" not in sys.modules  # nothing loaded at construction
    _one_step(reg)
    module = sys.modules["smplora_testplugin"]
    assert module.CALLS and module.CALLS[0][0] == 1
    assert reg.file_metadata()["smplora.testplugin"] == "1"


def test_entry_points_switched_off_by_env_and_by_explicit_list(installed_distribution, monkeypatch):
    monkeypatch.setenv("SMPLORA_DISABLE_PLUGINS", "1")
    reg = PrivacyRegularizer(**SMALL)
    _one_step(reg)
    assert reg.plugin_manager.get_plugin("testplugin") is None
    monkeypatch.setenv("SMPLORA_DISABLE_PLUGINS", "testplugin")
    assert PrivacyRegularizer(**SMALL).plugin_manager.get_plugin("testplugin") is None
    monkeypatch.delenv("SMPLORA_DISABLE_PLUGINS")
    assert PrivacyRegularizer(plugins=[], **SMALL).plugin_manager.get_plugin("testplugin") is None
    assert PrivacyRegularizer(load_entry_points=False, **SMALL).plugin_manager.get_plugin("testplugin") is None
    assert PrivacyRegularizer(**SMALL).plugin_manager.get_plugin("testplugin") is not None
