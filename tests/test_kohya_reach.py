"""The pieces of sd-scripts the kohya shim reaches into beyond the trainer hooks (integrations/kohya/reach.py):
each one found in the tested layout (the stand-in, main 48d368fa) and in sd-scripts v0.11's layout where the shim
supports it (tests/kohya_standin/v011_train_network.py: #2353 _build_metadata / self._metadata, #2356 _save_model,
#2355 _run_validation_loop), and each one missing, refused with a KohyaVersionError that names it and the
supported versions, before any training step and before any file is written."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_kohya_standin import STANDIN, _clean_kohya_modules, data, header, kohya_args, launch, parse, standin  # noqa: F401

from smplora_plugin.integrations.kohya import KohyaVersionError, make_private_trainer, private_trainer_class, reach
from smplora_plugin.integrations.kohya.compat import static_check, trainer_source_problems

VOLATILE = {"ss_session_id", "ss_training_started_at", "sshs_model_hash"}


@pytest.fixture(autouse=True)
def _clean_v011_module(_clean_kohya_modules):  # noqa: F811
    yield
    sys.modules.pop("v011_train_network", None)


def priv(data_dir: Path):
    return ["--privacy", "smplora", "--privacy_holdout_dir", str(data_dir / "holdout"), "--privacy_feature_grid", "4",
            "--privacy_attacker_hidden", "8"]


def v011():
    standin()
    import v011_train_network

    return v011_train_network


def counting(cls):
    """The private trainer of ``cls``, counting its training forwards and model loads."""
    class Counting(private_trainer_class(cls)):
        def __init__(self):
            super().__init__()
            self.trained = self.loaded = 0

        def load_target_model(self, *a, **kw):
            self.loaded += 1
            return super().load_target_model(*a, **kw)

        def process_batch(self, *a, **kw):
            self.trained += bool(kw.get("is_train", True))
            return super().process_batch(*a, **kw)

    return Counting


def files_under(path: Path):
    return sorted(p for p in path.rglob("*")) if path.exists() else []


def refused(cls, args, out: Path, *words: str, loaded: bool = True):
    """Train ``cls`` privately on ``args``: refused with every word of ``words`` in the message, no training step,
    no file; ``loaded``: whether the refusal may come after the model was loaded (at the first step)."""
    trainer = counting(cls)()
    with pytest.raises(KohyaVersionError) as err:
        trainer.train(args)
    msg = str(err.value)
    for word in (*words, "48d368fa", "v0.11", "Nothing was trained"):
        assert word in msg, msg
    assert trainer.trained == 0
    assert trainer.loaded <= int(loaded)
    assert files_under(out) == []
    return msg


# ---------------------------------------------------------------------------------------------- supported layouts
def test_save_path_is_found_in_both_layouts():
    tn = standin()
    import sd3_train_network

    v = v011()
    closure = reach.save_path([tn.NetworkTrainer, object])
    assert closure.kind == "closure" and closure.train_code is tn.NetworkTrainer.train.__code__
    assert reach.save_path([sd3_train_network.Sd3NetworkTrainer, tn.NetworkTrainer, object]).kind == "closure"
    assert reach.save_path(list(v.V011NetworkTrainer.__mro__)).kind == "method"


def test_v011_layout_trains_with_kohyas_own_header(data, tmp_path):  # noqa: F811
    """The v0.11 layout: checkpoints through _save_model() carry the attacker state, the header (self._metadata)
    is the one of the same run without privacy, and _run_validation_loop() stays off the holdout."""
    v = v011()
    common = ("--max_train_steps", "4", "--save_every_n_steps", "2")
    plain = v.V011NetworkTrainer()
    plain.train(parse(*kohya_args(data, tmp_path / "plain", *common)))
    trainer = make_private_trainer(v.V011NetworkTrainer)
    trainer.train(parse(*kohya_args(data, tmp_path / "priv", *common), *priv(data)))
    out = tmp_path / "priv"
    for ckpt in ("lora-step00000002", "lora-step00000004", "lora"):
        assert (out / f"{ckpt}.smplora_state").is_file(), ckpt
        assert "smplora.metrics" in header(out / f"{ckpt}.safetensors")
    a, b = header(tmp_path / "plain" / "lora.safetensors"), header(out / "lora.safetensors")
    assert "ss_datasets" not in b and json.loads(b["ss_dataset_dirs"]) == {"2_thing": {"n_repeats": 2, "img_count": 6}}
    assert {k: v for k, v in b.items() if not k.startswith("smplora.") and k not in VOLATILE} == \
        {k: v for k, v in a.items() if k not in VOLATILE}
    assert trainer.validation_batches == 0 and plain.validation_batches == 0   # plain: no validation dataset
    assert trainer.privacy_regularizer.attacker_updates >= 1
    assert (out / "lora_smplora_manifest.json").is_file()


def test_v011_layout_through_the_launcher(data, tmp_path):  # noqa: F811
    assert trainer_source_problems(STANDIN / "v011_train_network.py") == []
    out = tmp_path / "out"
    assert launch("v011_train_network.py", *kohya_args(data, out, "--max_train_steps", "2"), *priv(data)) == 0
    assert "smplora.config" in header(out / "lora.safetensors") and (out / "lora.smplora_state").is_file()


def test_train_util_split_with_reexports_is_supported(data, tmp_path):  # noqa: F811
    """#2372 split train_util.py: a train_util that re-exports what the shim uses works."""
    root = checkout(tmp_path, "from library.image_utils import IMAGE_EXTENSIONS  # re-export\n")
    assert trainer_source_problems(root / "train_network.py") == []
    out = tmp_path / "out"
    rc = launch_in(root, "train_network.py", *kohya_args(data, out, "--max_train_steps", "2"), *priv(data))
    assert rc == 0 and (out / "lora.smplora_state").is_file()


# ---------------------------------------------------------------------------------------------- refused, per piece
def checkout(tmp_path: Path, reexport: str = "") -> Path:
    """A copy of the stand-in whose train_util.py no longer defines IMAGE_EXTENSIONS (moved to
    library/image_utils.py, as #2372 split train_util), re-exported by ``reexport``."""
    root = tmp_path / "sd-scripts"
    shutil.copytree(STANDIN, root, ignore=shutil.ignore_patterns("__pycache__"))
    tu = root / "library" / "train_util.py"
    text = tu.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("IMAGE_EXTENSIONS = "))
    (root / "library" / "image_utils.py").write_text(line + "\n")
    tu.write_text(text.replace(line + "\n", reexport))
    return root


def launch_in(root: Path, *argv: str) -> int:
    from smplora_plugin.integrations.kohya.launcher import main

    return main(["--sd_scripts", str(root), *argv])


def test_train_util_without_a_name_the_shim_uses_is_refused_by_the_launcher(data, tmp_path, capsys):  # noqa: F811
    root = checkout(tmp_path)
    assert trainer_source_problems(root / "train_network.py") == [
        "library/train_util.py has no IMAGE_EXTENSIONS (not even as a re-export)"]
    out = tmp_path / "out"
    rc = launch_in(root, "train_network.py", *kohya_args(data, out), *priv(data))
    err = capsys.readouterr().err
    assert rc == 3 and "IMAGE_EXTENSIONS" in err and "48d368fa" in err and "v0.11" in err, err
    assert "older than" not in err           # a layout change, not an old checkout
    assert "train_network" not in sys.modules and files_under(out) == []   # refused before importing sd-scripts


@pytest.mark.parametrize("module,name", [("train_util", "IMAGE_EXTENSIONS"),
                                         ("config_util", "generate_dreambooth_subsets_config_by_subdirs")])
def test_library_name_missing_at_run_time_is_refused(data, tmp_path, monkeypatch, module, name):  # noqa: F811
    """In-process callers skip the launcher's source check: the run-time lookup refuses the same way."""
    tn = standin()
    import importlib

    monkeypatch.delattr(importlib.import_module(f"library.{module}"), name)
    out = tmp_path / "out"
    refused(tn.NetworkTrainer, parse(*kohya_args(data, out), *priv(data)), out, f"library.{module}.{name}",
            loaded=False)


def test_library_attr_and_network_trainer_lookups(monkeypatch):
    standin()
    from library import train_util

    assert reach.library_attr("train_util", "read_config_from_file") is train_util.read_config_from_file
    monkeypatch.delattr(train_util, "read_config_from_file")
    with pytest.raises(KohyaVersionError, match="library.train_util.read_config_from_file"):
        reach.library_attr("train_util", "read_config_from_file")
    with pytest.raises(KohyaVersionError, match="library.no_such_util: there is no such module"):
        reach.library_attr("no_such_util", "x")
    with pytest.raises(KohyaVersionError, match="train_network.NetworkTrainer"):
        reach.network_trainer(SimpleNamespace())


def test_no_save_path_is_refused_before_anything(data, tmp_path):  # noqa: F811
    """Neither a _save_model() method nor a save_model closure in train(): refused when train() starts."""
    tn = standin()
    v = v011()
    body = {k: val for k, val in vars(v.V011NetworkTrainer).items() if k not in ("_save_model", "__dict__",
                                                                                 "__weakref__")}
    renamed = type("RenamedSave", (tn.NetworkTrainer,), {**body, "_write_checkpoint": v.V011NetworkTrainer._save_model})
    out = tmp_path / "out"
    refused(renamed, parse(*kohya_args(data, out), *priv(data)), out, "the checkpoint save path", "_save_model()",
            loaded=False)


def test_v011_save_model_without_self_metadata_is_refused(data, tmp_path):  # noqa: F811
    v = v011()

    class HeaderElsewhere(v.V011NetworkTrainer):   # _save_model (v0.11) but the header not in self._metadata
        def _build_metadata(self, *a, **kw):
            super()._build_metadata(*a, **kw)
            self._header = self.__dict__.pop("_metadata")

        def _save_model(self, args, ckpt_name, unwrapped_nw, steps, epoch_no):
            unwrapped_nw.save_weights(str(Path(args.output_dir) / ckpt_name), None, self._header)

    out = tmp_path / "out"
    refused(HeaderElsewhere, parse(*kohya_args(data, out), *priv(data)), out, "self._metadata")


@pytest.mark.parametrize("layout", ["48d368fa", "v0.11"])
def test_header_without_the_dataset_list_is_refused(data, tmp_path, monkeypatch, layout):  # noqa: F811
    """kohya's header must list every training dataset (ss_datasets) for the holdout block to be removed; it is
    checked at the first step, in train()'s metadata local (48d368fa) or in self._metadata (v0.11)."""
    tn = standin()
    original = tn.dataset_metadata

    def without_list(*a, **kw):
        out = original(*a, **kw)
        out.pop("ss_datasets", None)
        return out

    monkeypatch.setattr(tn, "dataset_metadata", without_list)
    cls = tn.NetworkTrainer if layout == "48d368fa" else v011().V011NetworkTrainer
    out = tmp_path / "out"
    refused(cls, parse(*kohya_args(data, out), *priv(data)), out, "ss_datasets", "no ss_datasets key")


def test_network_without_a_metadata_argument_is_refused(data, tmp_path, monkeypatch):  # noqa: F811
    tn = standin()

    class NoHeader(tn.TinyLoRANetwork):
        def save_weights(self, file, dtype):
            return super().save_weights(file, dtype, None)

    monkeypatch.setattr(tn, "TinyLoRANetwork", NoHeader)
    out = tmp_path / "out"
    refused(tn.NetworkTrainer, parse(*kohya_args(data, out), *priv(data)), out, "NoHeader.save_weights",
            "no metadata argument")


def test_network_saver_finds_the_header_argument():
    class ByName:
        def save_weights(self, path, metadata=None, dtype=None):
            pass

    class ByPosition:
        def save_weights(self, file, dtype, meta):
            pass

    assert reach.network_saver(ByName())[1:] == ("path", 1, "metadata")
    assert reach.network_saver(ByPosition())[1:] == ("file", 2, "meta")
    unwrapped = ByPosition()
    assert reach.network_saver(object(), SimpleNamespace(unwrap_model=lambda m: unwrapped)).net is unwrapped
    with pytest.raises(KohyaVersionError, match="object.save_weights"):
        reach.network_saver(object())


def test_dataset_without_an_attribute_the_header_needs_is_refused(data, tmp_path):  # noqa: F811
    tn = standin()

    class Moved(tn.NetworkTrainer):   # a dataset class that no longer keeps its tag frequencies
        def assert_extra_args(self, args, train_dataset_group, val_dataset_group):
            for ds in train_dataset_group.datasets:
                del ds.tag_frequency

    out = tmp_path / "out"
    refused(Moved, parse(*kohya_args(data, out), *priv(data)), out, "DreamBoothDataset", "tag_frequency",
            loaded=False)


def test_holdout_block_not_last_is_refused(data, tmp_path):  # noqa: F811
    tn = standin()

    class Reordered(tn.NetworkTrainer):
        def assert_extra_args(self, args, train_dataset_group, val_dataset_group):
            train_dataset_group.datasets.reverse()

    out = tmp_path / "out"
    refused(Reordered, parse(*kohya_args(data, out), *priv(data)), out, "holdout block", loaded=False)


def test_batches_without_custom_attributes_are_refused(data, tmp_path):  # noqa: F811
    tn = standin()

    class Untagged(tn.NetworkTrainer):
        def on_step_start(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train=True):
            batch.pop("custom_attributes", None)

    out = tmp_path / "out"
    refused(Untagged, parse(*kohya_args(data, out, "--reg_data_dir", str(data / "reg")), *priv(data)), out,
            'batch["custom_attributes"]')


def test_missing_validation_option_is_refused(data, tmp_path):  # noqa: F811
    tn = standin()
    args = parse(*kohya_args(data, tmp_path / "out"), *priv(data))
    del args.validate_every_n_epochs
    refused(tn.NetworkTrainer, args, tmp_path / "out", "--validate_every_n_epochs", loaded=False)


def test_save_state_hook_lookup():
    assert reach.save_state_hook(SimpleNamespace(register_save_state_pre_hook=print), None) is print
    assert reach.save_state_hook(SimpleNamespace(), SimpleNamespace(save_state=False)) is None
    with pytest.raises(KohyaVersionError, match="register_save_state_pre_hook"):
        reach.save_state_hook(SimpleNamespace(), SimpleNamespace(save_state=True))


def test_progress_bar_lookup(monkeypatch):
    from weakref import WeakSet

    from tqdm import tqdm

    monkeypatch.setattr(tqdm, "_instances", WeakSet())   # no bar left over from other tests
    main, other = SimpleNamespace(is_local_main_process=True), SimpleNamespace(is_local_main_process=False)
    bar, why = reach.steps_progress_bar(main)
    assert bar is None and "no tqdm bar named 'steps'" in why
    assert reach.steps_progress_bar(other) == (None, None)   # other ranks: kohya opens no bar
    stale = tqdm(range(2), desc="steps", file=io.StringIO())   # left open by an earlier run in this process
    stale.start_t -= 60
    opened = tqdm(range(2), desc="steps", file=io.StringIO())
    try:
        assert reach.steps_progress_bar(main) == (opened, None)
    finally:
        opened.close()
        stale.close()
    monkeypatch.delattr(tqdm, "_instances")
    assert reach.steps_progress_bar(main) == (None, "tqdm keeps no _instances registry")


# ---------------------------------------------------------------------------------------------- from the source
def _variant(tmp_path: Path, name: str, *replacements) -> Path:
    """``name`` from the stand-in, in a folder of its own next to the stand-in's train_network.py, edited."""
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    for f in ("train_network.py", name):
        (folder / f).write_text((STANDIN / f).read_text())
    path = folder / name
    text = path.read_text()
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)
    return path


@pytest.mark.parametrize("name,replacements,problem", [
    ("train_network.py", [("def save_model(", "def write_model("), ("save_model(f", "write_model(f")],
     "no checkpoint save path: neither a save_model() closure in train() (48d368fa) nor a _save_model() method"),
    ("train_network.py", [(", None, to_save)", ")")],
     "train()'s save_model() does not call network.save_weights(file, dtype, metadata)"),
    ("train_network.py", [("metadata = {\"ss_session_id\"", "header = {\"ss_session_id\""),
                          ("self.update_metadata(metadata, args)", "self.update_metadata(header, args)"),
                          ("        metadata.update(dataset_metadata(", "        header.update(dataset_metadata("),
                          ("metadata = {k: str(v) for k, v in metadata.items()}",
                           "header = {k: str(v) for k, v in header.items()}")],
     "train() has no 'metadata' dict (kohya's header) next to its save_model()"),
    ("train_network.py", [("every = args.validate_every_n_epochs", "every = None")],
     "no method reads args.validate_every_n_epochs"),
    ("v011_train_network.py", [("self._metadata = {k: str(v)", "self._header = {k: str(v)")],
     "_save_model() is there but no method sets self._metadata"),
    ("v011_train_network.py", [("unwrapped_nw.save_weights(os.path.join(args.output_dir, ckpt_name), None, to_save)",
                                "unwrapped_nw.save(os.path.join(args.output_dir, ckpt_name))")],
     "_save_model() does not call network.save_weights(file, dtype, metadata)"),
])
def test_source_check_reports_each_piece(tmp_path, name, replacements, problem):
    assert trainer_source_problems(STANDIN / name) == []
    problems = trainer_source_problems(_variant(tmp_path, name, *replacements))
    assert any(p.startswith(problem) for p in problems), problems


def test_static_check_names_the_layout_and_the_versions(tmp_path):
    path = _variant(tmp_path, "train_network.py", ("def save_model(", "def write_model("),
                    ("save_model(f", "write_model(f"))
    with pytest.raises(KohyaVersionError) as err:
        static_check(path)
    msg = str(err.value)
    assert "not the layout smplora-kohya reaches into" in msg and "no checkpoint save path" in msg
    assert "48d368fa" in msg and "v0.11" in msg and "older than" not in msg
    static_check(STANDIN / "train_network.py")
