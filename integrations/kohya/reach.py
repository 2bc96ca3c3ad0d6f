"""Every place smplora-kohya reaches into sd-scripts beyond the ``NetworkTrainer`` hooks, and every change it makes
to sd-scripts' objects: one function each.

Checked on sd-scripts main 48d368fa (2026-02-16) and on the v0.11 layout (v0.11.1, commit 6721028, 2026-06-16) as its
pull requests describe it: that one against a stand-in only (tests/kohya_standin/v011_train_network.py).

Lookups: each function finds its target and, when it is not there, raises :class:`~.compat.KohyaVersionError` naming
the piece and the sd-scripts versions supported, before the first training step and before the shim writes any file,
instead of a wrong header or a crash at the first checkpoint. Targets are found from the objects (``hasattr``,
signatures, the trainer's source), never from a version string. The same pieces are read from the source,
before anything is imported, by :func:`.compat.trainer_source_problems` (the launcher's first check).

Piece by piece (48d368fa / v0.11):

- :func:`library_attr`: ``library.train_util`` / ``config_util`` names the shim uses / v0.11 (#2335, #2345,
  #2372): supported where ``train_util`` still re-exports them, refused otherwise;
- :func:`network_trainer`: ``train_network.NetworkTrainer`` / the same;
- :func:`save_path`: the ``save_model`` closure of ``train()`` / the ``_save_model()`` method (#2356);
- :func:`metadata_dict`: ``train()``'s ``metadata`` local / ``self._metadata`` (#2353 ``_build_metadata()``, #2356);
- :func:`check_header`: ``ss_datasets`` lists every training dataset, the holdout block last / the same;
- :func:`network_saver`: the network's ``save_weights(file, dtype, metadata)`` / the same;
- :func:`dataset_groups`, :func:`holdout_plan`: ``.datasets``, dataset and subset attributes / the same,
  wherever #2335 put the dataset classes (checked on the objects kohya passes, not by module);
- :func:`batch_roles`: ``batch["custom_attributes"]`` carries the subsets' dicts / the same;
- :func:`validation_switch`: ``args.validate_every_n_epochs`` / the same, read by ``_run_validation_loop()``
  (#2355; it now calls ``on_step_start`` before assigning timesteps, which the shim does not depend on);
- :func:`save_state_hook`: accelerate's ``register_save_state_pre_hook`` / the same;
- :func:`steps_progress_bar`: tqdm's bar ``desc="steps"`` / the same. The one piece that only warns when it is
  missing: losing ``mia_ce`` / ``mia_acc`` / ``eps`` on the bar is not worth refusing a run (the trackers still get
  them);
- with DP noise: :func:`dataset_counts`, the training group's ``num_train_images`` (images x repeats) and its
  datasets' ``batch_size``; :func:`training_optimizer`, the optimiser accelerate prepared for the network
  (``accelerator._optimizers``, private: kohya keeps its optimiser in a local of ``train()`` and passes it to no
  hook).

Patches, the shim's only changes to sd-scripts' objects (each made once the lookups above have passed):

- :func:`use_dataset_config`, :func:`seed_validation_split`, :func:`validation_off`: kohya's options
  ``--dataset_config`` (the config with the holdout block, then its kept copy), ``--validation_seed`` (for a
  carve-out without one), ``--validate_every_n_epochs`` (a value no run reaches, to keep kohya's pass off the holdout);
- :func:`tag_roles`: the shim's role tag in each dataset subset's ``custom_attributes`` dict;
- :func:`wrap_save_weights`: the network's ``save_weights``, wrapped for the run (header restored, state saved);
- :func:`add_to_progress_bar`: the bar's ``set_postfix``, wrapped to show ``mia_ce`` / ``mia_acc``.

Not here: the trainer hooks themselves (:mod:`.mixin`), the LoRA switched off through kohya's own
``set_multiplier`` (:func:`.capture.lora_off`), and the denoiser's ``forward`` cut to the privacy rows for the length
of one no-grad replay (:func:`.base_forward.cut_forward`, generic to any ``torch.nn.Module``).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from . import compat, header
from .compat import METADATA_ATTR, METADATA_LOCAL, SAVE_CLOSURE, SAVE_METHOD, TESTED_COMMIT, KohyaVersionError

logger = logging.getLogger("smplora.kohya")

SUPPORTED = (f"smplora-kohya supports kohya sd-scripts v0.10.0 (2026-01-19) up to the layout of main {TESTED_COMMIT} "
             "(2026-02-16, the one it is tested against); of sd-scripts v0.11 (v0.11.1, commit 6721028, 2026-06-16) "
             "it recognises the header in self._metadata (_build_metadata), saves through _save_model() and "
             "validation in _run_validation_loop(), and refuses other changes to the pieces it reaches into. "
             f"Use an sd-scripts checkout with that layout (git checkout {TESTED_COMMIT}) or report the missing piece")


def refuse(piece: str, problem: str) -> KohyaVersionError:
    """The error for a missing piece: what is missing, the versions supported, and that nothing was trained."""
    return KohyaVersionError(f"sd-scripts layout not supported: {piece}: {problem}. {SUPPORTED}. Nothing was trained.")


# ---------------------------------------------------------------------------------------------- library package
def library_attr(module: str, name: str) -> Any:
    """``library.<module>.<name>`` of the sd-scripts being run (``module``: ``train_util`` or ``config_util``).

    #2372 split ``train_util.py`` into modules; a v0.11 ``train_util`` that still re-exports the name is supported."""
    full = f"library.{module}"
    try:
        mod = importlib.import_module(full)
    except ModuleNotFoundError as exc:
        if exc.name not in ("library", full):
            raise
        raise refuse(full, f"there is no such module (needed for {name})") from exc
    if not hasattr(mod, name):
        raise refuse(f"{full}.{name}", f"{Path(getattr(mod, '__file__', full)).name} neither defines nor re-exports it")
    return getattr(mod, name)


def network_trainer(train_network_module) -> type:
    """``train_network.NetworkTrainer``, the base class every kohya LoRA trainer derives from."""
    cls = getattr(train_network_module, "NetworkTrainer", None)
    if not isinstance(cls, type):
        raise refuse("train_network.NetworkTrainer", "train_network.py defines no NetworkTrainer class")
    return cls


# ---------------------------------------------------------------------------------------------- saving and header
class SaveLayout(NamedTuple):
    """How kohya saves a LoRA: ``kind`` ``"closure"`` (48d368fa: ``train()``'s ``save_model`` closure, the header
    dict a local of ``train``, whose code is ``train_code``) or ``"method"`` (v0.11: ``_save_model()``,
    ``self._metadata``)."""

    kind: str
    train_code: Any = None


def _function_ast(fn) -> Optional[ast.FunctionDef]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0] if tree.body else None
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def save_path(classes: Sequence[type]) -> SaveLayout:
    """The save path of a kohya trainer, given the classes of its MRO below the shim's mixin.

    v0.11 (#2356): a ``_save_model`` method that calls ``save_weights``; 48d368fa: the ``train()`` that runs the loop
    (the first one, down the MRO, that does not just call ``super().train()``) defines a ``save_model`` closure that
    calls it. Raises when neither is there (a checkpoint would be saved without the shim seeing it)."""
    for cls in classes:
        fn = vars(cls).get(SAVE_METHOD)
        if callable(fn):
            node = _function_ast(fn)
            if node is not None and not compat.calls_save_weights(node):
                raise refuse(f"{cls.__name__}.{SAVE_METHOD}()", "it does not call network.save_weights(file, dtype, "
                             "metadata), where the shim adds the attacker state and restores kohya's header")
            return SaveLayout("method")
    for cls in classes:
        fn = vars(cls).get("train")
        if not callable(fn):
            continue
        node = _function_ast(fn)
        if node is None:           # no source (a frozen install): the frame lookup of metadata_dict still checks
            return SaveLayout("closure", getattr(fn, "__code__", None))
        closure = compat.nested_function(node, SAVE_CLOSURE)
        if closure is not None and compat.calls_save_weights(closure):
            return SaveLayout("closure", fn.__code__)
        if closure is None and compat.calls_method(node, "train"):   # a wrapper around super().train()
            continue
        break
    names = ", ".join(c.__name__ for c in classes[:3])
    raise refuse("the checkpoint save path", f"{names}: neither a {SAVE_METHOD}() method (v0.11) nor a "
                 f"{SAVE_CLOSURE}() closure in train() ({TESTED_COMMIT}) that calls network.save_weights(file, dtype, "
                 "metadata)")


def metadata_dict(trainer, layout: SaveLayout) -> Dict[str, str]:
    """kohya's header dict, once built (at the first training step): ``self._metadata`` (v0.11), or the
    ``metadata`` local of the ``train()`` call running now (48d368fa: the dict its ``save_model`` closure saves)."""
    if layout.kind == "method":
        md = getattr(trainer, METADATA_ATTR, None)
        if not isinstance(md, dict):
            raise refuse(f"self.{METADATA_ATTR}", f"{type(trainer).__name__} has {SAVE_METHOD}() (v0.11) but "
                         f"{'no' if md is None else 'a ' + type(md).__name__} self.{METADATA_ATTR} dict at the first "
                         "step; the shim restores kohya's header there")
        return md
    frame = sys._getframe(1)
    try:
        while frame is not None and (layout.train_code is None or frame.f_code is not layout.train_code):
            frame = frame.f_back
        md = frame.f_locals.get(METADATA_LOCAL) if frame is not None else None
    finally:
        del frame
    if not isinstance(md, dict):
        raise refuse(f"train()'s '{METADATA_LOCAL}'", "at the first training step no running train() holds the "
                     f"header dict its {SAVE_CLOSURE}() closure saves (is on_step_start called from train()?)")
    return md


def check_header(metadata: Dict[str, str], plan: header.HeaderPlan) -> None:
    """kohya's header lists every training dataset in ``ss_datasets``, the holdout block last, as
    :func:`.header.restore` expects; refused otherwise (the LoRA would carry the holdout block)."""
    n = len(plan.member_datasets) + 1
    try:
        listed = json.loads(metadata["ss_datasets"])
    except (KeyError, TypeError, ValueError):
        listed = None
    if not isinstance(listed, list) or len(listed) != n:
        got = "no ss_datasets key" if "ss_datasets" not in metadata else \
            f"ss_datasets with {len(listed) if isinstance(listed, list) else 'no'} list entries"
        raise refuse("kohya's header (ss_datasets)", f"it has {got}, not one entry for each of the {n} training "
                     "datasets (yours and the privacy holdout's), so the holdout block cannot be removed from it")


class Saver(NamedTuple):
    """The network object kohya saves and where its ``save_weights`` takes the file and the header: positions
    among the arguments after ``self`` and keyword names (``None``: not known)."""

    net: Any
    file_name: Optional[str]
    metadata_index: Optional[int]
    metadata_name: Optional[str]


def network_saver(network, accelerator=None) -> Saver:
    """``accelerator.unwrap_model(network)`` (what kohya saves) and its ``save_weights(file, dtype, metadata)``."""
    unwrap = getattr(accelerator, "unwrap_model", None)
    net = unwrap(network) if unwrap is not None else network
    fn = getattr(net, "save_weights", None)
    if not callable(fn):
        raise refuse(f"{type(net).__name__}.save_weights", "the network has no save_weights(file, dtype, metadata)")
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return Saver(net, None, 2, "metadata")
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    file_name = positional[0].name if positional else None
    if "metadata" in names:
        p = params[names.index("metadata")]
        return Saver(net, file_name, positional.index(p) if p in positional else None, "metadata")
    if len(positional) >= 3:
        return Saver(net, file_name, 2, positional[2].name)
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return Saver(net, file_name, 2, None)
    raise refuse(f"{type(net).__name__}.save_weights", f"it takes ({', '.join(names)}), no metadata argument "
                 "(kohya passes the header as save_weights(file, dtype, metadata))")


# ---------------------------------------------------------------------------------------------- datasets, batches
_DATASET_ATTRS = ("image_data", "subsets")
_HEADER_DATASET_ATTRS = ("tag_frequency", "num_train_images")
_NO_CONFIG_ATTRS = ("enable_bucket", "bucket_no_upscale", "min_bucket_reso", "max_bucket_reso", "bucket_info")
_SUBSET_ATTRS = ("num_repeats", "img_count")


def dataset_groups(train_group, val_group, *, header_restore: bool, user_config: bool) -> None:
    """The dataset objects have what the shim reads: ``image_data`` and ``subsets`` (members / non-members, role
    tags), and, when the header is restored, what :func:`.header.restore` reads. A group without ``.datasets``
    is not one of kohya's (``--dataset_class``) and is reported by :func:`.data.group_images`."""
    for name, group in (("training", train_group), ("validation", val_group)):
        for ds in list(getattr(group, "datasets", None) or []):
            wanted = _DATASET_ATTRS + (_HEADER_DATASET_ATTRS if header_restore else ()) + \
                (_NO_CONFIG_ATTRS if header_restore and not user_config and name == "training" else ())
            lacking = [a for a in wanted if not hasattr(ds, a)]
            for subset in getattr(ds, "subsets", None) or []:
                sub_wanted = _SUBSET_ATTRS + (("image_dir",) if not hasattr(subset, "metadata_file") else ())
                lacking += [f"subsets[].{a}" for a in sub_wanted if not hasattr(subset, a)]
            if lacking:
                raise refuse(f"kohya's {name} {type(ds).__name__}", f"it has no {', '.join(dict.fromkeys(lacking))}")


def holdout_plan(user_config: bool, train_group, val_group, holdout_dir, validation_off: bool) -> header.HeaderPlan:
    """The plan of :func:`.header.restore` for a run whose dataset config the launcher extended with the holdout
    block: kohya's groups must end with that block (no training images; validation images from the holdout)."""
    plan = header.plan(user_config, train_group, val_group, validation_off=validation_off)
    last_val = (list(getattr(val_group, "datasets", None) or []) or [None])[-1]
    root = Path(holdout_dir).resolve() if holdout_dir is not None else None
    val_paths = [str(getattr(i, "absolute_path", None) or getattr(i, "image_key", ""))
                 for i in (getattr(last_val, "image_data", None) or {}).values()]
    ok = (plan is not None and not getattr(plan.holdout_train, "image_data", None) and val_paths
          and (root is None or all(Path(p).resolve().is_relative_to(root) for p in val_paths)))
    if not ok:
        raise refuse("kohya's dataset groups", "the holdout block the launcher added is not the last dataset of "
                     "both groups (empty on the training side, the held-out images on the validation side), so it "
                     "cannot be removed from the LoRA's header")
    return plan


def batch_roles(batch, key: str) -> None:
    """kohya hands each subset's ``custom_attributes`` dict along with every batch (``batch["custom_attributes"]``);
    the shim's member / regularisation / non-member tags travel in them. Checked on the first training batch."""
    if not isinstance(batch, dict):
        return
    attrs = batch.get("custom_attributes")
    if not isinstance(attrs, (list, tuple)) or not attrs or not all(isinstance(a, dict) and key in a for a in attrs):
        raise refuse('batch["custom_attributes"]', "the training batch does not carry its subsets' custom_attributes "
                     "dicts (where the shim tags members, regularisation and held-out images), so regularisation "
                     "images could not be told from members")


def dataset_counts(train_group) -> Tuple[int, int]:
    """``(rows, batch)`` of kohya's training group, as kohya counts them: ``num_train_images`` (member images x
    repeats, regularisation images not counted; kohya's "num train images * repeats") and the largest
    ``batch_size`` of its datasets (the batch of one process's step). DP noise accounts with them."""
    rows = getattr(train_group, "num_train_images", None)
    sizes = [getattr(ds, "batch_size", None) for ds in list(getattr(train_group, "datasets", None) or [])]
    if isinstance(rows, bool) or not isinstance(rows, int) or not sizes or \
            not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes):
        raise refuse(f"kohya's training {type(train_group).__name__}", "it has no num_train_images count or its "
                     "datasets no batch_size, which DP noise needs for its sampling rate (batch / rows)")
    return rows, max(sizes)


def training_optimizer(accelerator, params: Sequence[Any]) -> Any:
    """The optimiser accelerate prepared that trains ``params`` (the LoRA's): found among
    ``accelerator._optimizers``, since kohya's ``train()`` hands it to no hook. Refused when there is not exactly one
    (DP noise is written into the gradients by a pre-hook on that optimiser's step)."""
    prepared = getattr(accelerator, "_optimizers", None)
    if not isinstance(prepared, (list, tuple)):
        raise refuse("accelerator._optimizers", f"{type(accelerator).__name__} keeps no list of the optimisers it "
                     "prepared, so the DP step cannot be attached to kohya's optimiser")
    mine = {id(p) for p in params}

    def trains_mine(opt) -> bool:
        inner = opt
        for _ in range(8):     # accelerate's AcceleratedOptimizer (.optimizer) and similar wrappers
            groups = getattr(inner, "param_groups", None)
            if groups is not None:
                return any(id(p) in mine for g in groups for p in g.get("params", []))
            inner = getattr(inner, "optimizer", None)
        return False

    found = [opt for opt in prepared if trains_mine(opt)]
    if len(found) != 1:
        raise refuse("kohya's optimiser", f"accelerate prepared {len(found)} optimisers that train the LoRA network "
                     "(expected one), so the DP step cannot be attached")
    return found[0]


# ---------------------------------------------------------------------------------------------- options, state, display
def validation_switch(args) -> None:
    """kohya's ``--validate_every_n_epochs``, which the launcher sets to keep kohya's epoch validation pass off the
    privacy holdout (read by ``train()`` in 48d368fa, by ``_run_validation_loop()`` in v0.11)."""
    if not hasattr(args, compat.VALIDATION_OPTION):
        raise refuse(f"--{compat.VALIDATION_OPTION}", "the trainer's options have no such option, so kohya's "
                     "validation pass cannot be kept off the privacy holdout")


def save_state_hook(accelerator, args):
    """accelerate's ``register_save_state_pre_hook``, through which ``--save_state`` folders get the attacker
    state (``None`` when the run saves no state and the accelerator has none)."""
    register = getattr(accelerator, "register_save_state_pre_hook", None)
    if callable(register):
        return register
    if getattr(args, "save_state", False) or getattr(args, "save_state_on_train_end", False):
        raise refuse("accelerator.register_save_state_pre_hook", f"{type(accelerator).__name__} has none, so "
                     "--save_state folders would lack the attacker state")
    return None


def steps_progress_bar(accelerator) -> Tuple[Any, Optional[str]]:
    """kohya's training progress bar (tqdm, ``desc="steps"``) and, when it is not found on the local main process,
    why. The one piece that only warns: without it the bar lacks mia_ce / mia_acc (the trackers still get them),
    and ranks other than the local main one have no bar by design."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - kohya depends on tqdm
        return None, "tqdm is not installed"
    # tqdm's registry of open bars (what tqdm itself uses to place them) is the only way to the bar: tqdm has no
    # public one, and kohya keeps the bar in a local of train() (48d368fa; the v0.11 PRs do not say where).
    instances = getattr(tqdm, "_instances", None)
    if instances is None:
        return None, "tqdm keeps no _instances registry"
    bars: List[Any] = [b for b in list(instances)
                       if getattr(b, "desc", "") == "steps" and not getattr(b, "disable", False)]
    if bars:   # the newest: an earlier run in this process may have left its bar open
        return max(bars, key=lambda b: getattr(b, "start_t", 0.0)), None
    if not getattr(accelerator, "is_local_main_process", True):
        return None, None
    return None, "no tqdm bar named 'steps' is open at the first step"


# ---------------------------------------------------------------------------------------------- patches
NEVER_VALIDATE = 2**31 - 1    # --validate_every_n_epochs that no run reaches: kohya's epoch validation off


def use_dataset_config(args, path) -> None:
    """kohya reads its datasets from ``path`` (``--dataset_config``)."""
    args.dataset_config = str(path)


def seed_validation_split(args, seed: int) -> None:
    """``--validation_seed``: kohya's carve-out then shuffles its training and validation sides alike."""
    args.validation_seed = seed


def validation_off(args) -> None:
    """Keep kohya's epoch validation pass off the privacy holdout (the option :func:`validation_switch` found)."""
    setattr(args, compat.VALIDATION_OPTION, NEVER_VALIDATE)


def tag_roles(group, key: str, role_of_subset: Callable[[Any], str]) -> None:
    """Write ``custom_attributes[key]`` into each subset of a kohya dataset group (kohya passes these dicts along
    with every batch: :func:`batch_roles`)."""
    if group is None:
        return
    for ds in getattr(group, "datasets", []):
        for subset in getattr(ds, "subsets", []):
            attrs = getattr(subset, "custom_attributes", None)
            if attrs is None:
                attrs = {}
                subset.custom_attributes = attrs
            attrs[key] = role_of_subset(subset)


def wrap_save_weights(saver: Saver, restore_header: Optional[Callable[[Dict[str, str]], Dict[str, str]]],
                      saved: Callable[[Any], None]) -> None:
    """From now on, each ``saver.net.save_weights(file, dtype, metadata)`` saves the header ``restore_header(metadata)``
    (when given) and then calls ``saved(file)``."""
    original = saver.net.save_weights

    def save_weights(*a, **kw):
        a = list(a)
        if restore_header is not None:
            i, name = saver.metadata_index, saver.metadata_name
            if name is not None and isinstance(kw.get(name), dict):
                kw[name] = restore_header(kw[name])
            elif i is not None and i < len(a) and isinstance(a[i], dict):
                a[i] = restore_header(a[i])
        out = original(*a, **kw)
        saved(a[0] if a else kw.get(saver.file_name))
        return out

    saver.net.save_weights = save_weights


def add_to_progress_bar(accelerator, postfix: Callable[[], Dict[str, str]], shown: str = "mia_ce / mia_acc") -> None:
    """From now on, kohya's progress bar (:func:`steps_progress_bar`) shows ``postfix()`` next to its own postfix; a
    warning when the bar is not found (the trackers still get the metrics ``shown``)."""
    bar, missing = steps_progress_bar(accelerator)
    if bar is None:
        if missing:
            logger.warning(f"SMP-LoRA: kohya's progress bar was not found ({missing}); {shown} are "
                           "logged to kohya's trackers only")
        return
    original = bar.set_postfix

    def set_postfix(ordered_dict=None, refresh=True, **kwargs):
        kwargs.update(postfix())
        return original(ordered_dict, refresh, **kwargs)

    bar.set_postfix = set_postfix
