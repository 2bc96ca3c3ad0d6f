"""Feature check of a kohya trainer class: the hooks the mixin needs, by name and parameters, and (from the
source) the sd-scripts pieces beyond those hooks that :mod:`.reach` finds at run time.

sd-scripts has no version number (``library/__init__.py`` is empty), so support is decided by
feature: the per-batch hooks reached main in v0.10.0 (2026-01-19; the sd3 branch had them
from 2025-02). Older versions computed the loss inline in ``train()``; they are refused.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Dict, List, Optional

from smplora_plugin.errors import SmploraError

MIN_VERSION = "v0.10.0"
REQUIREMENT = (f"smplora-kohya needs kohya sd-scripts {MIN_VERSION} (2026-01-19) or newer (or the sd3 branch from "
               "2025-02 on); update your checkout (git pull, or git checkout v0.10.1) and try again")

# The one list of what the mixin relies on in a kohya trainer: hook -> parameter names it must accept (beyond
# self). "a|b" accepts either name: the denoiser is passed by position by train_network.process_batch, and
# Lumina's get_noise_pred_and_target calls it ``dit``. tests/test_kohya_trainer_sources.py checks every trainer
# of a real checkout (SD_SCRIPTS_DIR) and of the stand-in against it, by reading their source.
REQUIRED_HOOKS: Dict[str, tuple] = {
    "train": ("args",),
    "assert_extra_args": ("args", "train_dataset_group", "val_dataset_group"),
    "get_noise_pred_and_target": ("args", "accelerator", "noise_scheduler", "latents", "batch", "text_encoder_conds",
                                  "unet|dit", "network", "weight_dtype", "train_unet", "is_train"),
    "process_batch": ("batch", "text_encoders", "unet", "network", "vae", "noise_scheduler", "vae_dtype",
                      "weight_dtype", "accelerator", "args", "text_encoding_strategy", "tokenize_strategy", "is_train"),
    "on_step_start": ("args", "accelerator", "network", "text_encoders", "unet", "batch", "weight_dtype", "is_train"),
    "on_validation_step_end": ("args", "accelerator", "network", "text_encoders", "unet", "batch", "weight_dtype"),
    "get_sai_model_spec": ("args",),
    "generate_step_logs": ("args", "current_loss", "avr_loss", "lr_scheduler"),
}
# the names the denoiser argument of get_noise_pred_and_target goes by
DENOISER_PARAMS = ("unet", "dit")

# The sd-scripts pieces beyond the hooks (see reach.py), by the names they have in the tested layout (main 48d368fa)
# and in sd-scripts v0.11 (#2353 / #2356), where the shim supports that layout.
TESTED_COMMIT = "48d368fa"
SAVE_CLOSURE = "save_model"      # 48d368fa: a closure inside NetworkTrainer.train() that calls network.save_weights
SAVE_METHOD = "_save_model"      # v0.11 (#2356): the same as a NetworkTrainer method
METADATA_LOCAL = "metadata"      # 48d368fa: the header dict, a local of train() (the closure's cell)
METADATA_ATTR = "_metadata"      # v0.11 (#2353 / #2356): built by _build_metadata() into self._metadata
VALIDATION_OPTION = "validate_every_n_epochs"   # kohya's option that the launcher sets to keep its pass off the holdout
# what the shim takes from sd-scripts' library package (#2372 split train_util.py: these must stay importable there)
LIBRARY_NAMES: Dict[str, tuple] = {
    "train_util": ("IMAGE_EXTENSIONS", "verify_command_line_training_args", "read_config_from_file"),
    "config_util": ("load_user_config", "generate_dreambooth_subsets_config_by_subdirs"),
}

# The LoRA trainer scripts of sd-scripts v0.10.x (main 48d368fa) the launcher accepts, with their trainer class.
KNOWN_TRAINERS: Dict[str, str] = {
    "train_network.py": "NetworkTrainer",
    "sdxl_train_network.py": "SdxlNetworkTrainer",
    "sd3_train_network.py": "Sd3NetworkTrainer",
    "flux_train_network.py": "FluxNetworkTrainer",
    "lumina_train_network.py": "LuminaNetworkTrainer",
    "hunyuan_image_train_network.py": "HunyuanImageNetworkTrainer",
    "anima_train_network.py": "AnimaNetworkTrainer",
}


def _lacking(params: tuple, have, var_kw: bool) -> List[str]:
    """The required names (``a|b`` = either) that a hook with parameter names ``have`` does not accept."""
    if var_kw:
        return []
    return [p for p in params if not any(alt in have for alt in p.split("|"))]


class KohyaVersionError(SmploraError):
    """The sd-scripts checkout lacks the trainer hooks smplora-kohya needs."""


def missing_hooks(trainer_cls: type) -> List[str]:
    """Descriptions of the hooks ``trainer_cls`` lacks or whose parameters differ (empty = supported)."""
    problems = []
    for name, params in REQUIRED_HOOKS.items():
        fn = getattr(trainer_cls, name, None)
        if fn is None or not callable(fn):
            problems.append(f"{name}() is missing")
            continue
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            continue
        accepts_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
        lacking = _lacking(params, sig.parameters, accepts_var_kw)
        if lacking:
            problems.append(f"{name}() lacks parameter(s) {', '.join(lacking)}")
    return problems


def check_trainer_class(trainer_cls: type, where: Optional[str] = None) -> None:
    """Raise :class:`KohyaVersionError` if ``trainer_cls`` lacks a needed hook."""
    problems = missing_hooks(trainer_cls)
    if problems:
        place = f" ({where})" if where else ""
        raise KohyaVersionError(
            f"{trainer_cls.__name__}{place} is from an sd-scripts version without the trainer hooks SMP-LoRA uses: "
            f"{'; '.join(problems)}. {REQUIREMENT}. Nothing was trained."
        )


def find_trainer_class(module, base: type) -> type:
    """The trainer class a kohya script defines: the unique subclass of ``base`` defined in ``module``
    (``base`` itself for ``train_network.py``)."""
    candidates = [obj for obj in vars(module).values()
                  if isinstance(obj, type) and issubclass(obj, base) and obj.__module__ == module.__name__]
    if not candidates:
        raise SmploraError(f"{module.__name__} defines no subclass of {base.__name__}: is it a *_train_network.py "
                           "script of sd-scripts? smplora-kohya works with the LoRA (network) trainers only.")
    # the most derived class defined there
    leaves = [c for c in candidates if not any(o is not c and issubclass(o, c) for o in candidates)]
    if len(leaves) != 1:
        raise SmploraError(f"{module.__name__} defines several trainer classes "
                           f"({', '.join(c.__name__ for c in leaves)}); "
                           "use make_private_trainer(TrainerClass, config) to pick one.")
    return leaves[0]


def _trainer_classes(tree: ast.Module) -> Dict[str, ast.ClassDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def _methods(cls: ast.ClassDef) -> Dict[str, ast.FunctionDef]:
    return {n.name: n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _own_nodes(fn: ast.FunctionDef):
    """The nodes of ``fn``'s body, without those of functions defined inside it."""
    todo = list(fn.body)
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            todo.extend(ast.iter_child_nodes(node))


def calls_method(fn: ast.FunctionDef, attr: str) -> bool:
    """Whether ``fn`` calls ``super().attr(...)`` or ``self.attr(...)``."""
    for node in _own_nodes(fn):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
            owner = node.func.value
            if (isinstance(owner, ast.Name) and owner.id == "self") or (
                    isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super"):
                return True
    return False


def nested_function(fn: ast.FunctionDef, name: str) -> Optional[ast.FunctionDef]:
    """The function ``name`` defined inside ``fn`` (a closure), not looking into other nested functions."""
    todo = list(fn.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name == name:
                return node
            continue
        if not isinstance(node, (ast.Lambda, ast.ClassDef)):
            todo.extend(ast.iter_child_nodes(node))
    return None


def calls_save_weights(fn: ast.FunctionDef) -> bool:
    """Whether ``fn`` calls ``<network>.save_weights(file, dtype, metadata)`` (three arguments, or ``metadata=``)."""
    for node in _own_nodes(fn):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "save_weights":
            if len(node.args) + len(node.keywords) >= 3 or any(k.arg == "metadata" for k in node.keywords):
                return True
    return False


def _assigns(fn: ast.FunctionDef, target) -> bool:
    for node in _own_nodes(fn):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        if any(target(t) for t in targets):
            return True
    return False


def assigns_self_attr(fn: ast.FunctionDef, attr: str) -> bool:
    """Whether ``fn`` assigns ``self.<attr>``."""
    return _assigns(fn, lambda t: isinstance(t, ast.Attribute) and t.attr == attr
                    and isinstance(t.value, ast.Name) and t.value.id == "self")


def assigns_local(fn: ast.FunctionDef, name: str) -> bool:
    """Whether ``fn`` assigns the local ``name``."""
    return _assigns(fn, lambda t: isinstance(t, ast.Name) and t.id == name)


def reads_option(fn: ast.FunctionDef, option: str) -> bool:
    """Whether ``fn`` reads ``<args>.<option>`` other than into a dict literal (kohya's metadata)."""
    todo = list(fn.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.Dict)):
            continue
        if isinstance(node, ast.Attribute) and node.attr == option and isinstance(node.ctx, ast.Load):
            return True
        todo.extend(ast.iter_child_nodes(node))
    return False


def _effective_train(methods: Dict[str, ast.FunctionDef], base_methods: Dict[str, ast.FunctionDef],
                     own: Dict[str, ast.FunctionDef]) -> Optional[ast.FunctionDef]:
    """The ``train()`` that runs the loop: the script's own unless it only wraps ``super().train()``."""
    train = own.get("train")
    if train is not None and not calls_method(train, "train"):
        return train
    return base_methods.get("train", methods.get("train"))


def layout_problems(methods: Dict[str, ast.FunctionDef], train: Optional[ast.FunctionDef]) -> List[str]:
    """What :mod:`.reach` would not find in a trainer class (``methods``: its methods, inherited ones included;
    ``train``: the method that runs the loop): the save path and the header dict of the tested layout (a
    ``save_model`` closure in ``train()`` and its ``metadata`` local; ``on_step_start`` called from ``train()``,
    where the shim looks for that local) or of sd-scripts v0.11 (a ``_save_model()`` method and
    ``self._metadata``), and a read of ``args.validate_every_n_epochs``."""
    problems = []
    method = methods.get(SAVE_METHOD)
    closure = nested_function(train, SAVE_CLOSURE) if train is not None else None
    if method is not None:     # v0.11 (#2356)
        if not calls_save_weights(method):
            problems.append(f"{SAVE_METHOD}() does not call network.save_weights(file, dtype, metadata)")
        if not any(assigns_self_attr(fn, METADATA_ATTR) for fn in methods.values()):
            problems.append(f"{SAVE_METHOD}() is there but no method sets self.{METADATA_ATTR} (the header dict of "
                            "v0.11's _build_metadata())")
    elif closure is not None:  # 48d368fa
        if not calls_save_weights(closure):
            problems.append(f"train()'s {SAVE_CLOSURE}() does not call network.save_weights(file, dtype, metadata)")
        if not assigns_local(train, METADATA_LOCAL):
            problems.append(f"train() has no '{METADATA_LOCAL}' dict (kohya's header) next to its {SAVE_CLOSURE}()")
        if not calls_method(train, "on_step_start"):
            problems.append("train() does not call self.on_step_start() itself")
    else:
        problems.append(f"no checkpoint save path: neither a {SAVE_CLOSURE}() closure in train() ({TESTED_COMMIT}) nor "
                        f"a {SAVE_METHOD}() method (v0.11) that calls network.save_weights(file, dtype, metadata)")
    if not any(reads_option(fn, VALIDATION_OPTION) for fn in methods.values()):
        problems.append(f"no method reads args.{VALIDATION_OPTION} (the option that keeps kohya's validation pass "
                        "off the privacy holdout)")
    return problems


def _top_level_names(tree: ast.Module) -> Optional[set]:
    """Names a module defines at top level; ``None`` when it star-imports (then anything may be there)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    return None
                names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, (ast.If, ast.Try)):   # e.g. try: from x import y / except ImportError: ...
            blocks = [node.body, node.orelse]
            if isinstance(node, ast.Try):
                blocks += [h.body for h in node.handlers] + [node.finalbody]
            inner = _top_level_names(ast.Module(body=[n for b in blocks for n in b], type_ignores=[]))
            if inner is None:
                return None
            names |= inner
    return names


def library_problems(root) -> List[str]:
    """The names of :data:`LIBRARY_NAMES` that ``root/library/<module>.py`` does not define or import (nothing when
    ``root`` has no ``library`` folder; a star import counts as providing every name)."""
    lib = Path(root) / "library"
    if not lib.is_dir():
        return []
    problems = []
    for module, wanted in LIBRARY_NAMES.items():
        path = lib / f"{module}.py"
        if not path.is_file():
            problems.append(f"library/{module}.py is missing (needed: {', '.join(wanted)})")
            continue
        names = _top_level_names(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        lacking = [] if names is None else [n for n in wanted if n not in names]
        if lacking:
            problems.append(f"library/{module}.py has no {', '.join(lacking)} (not even as a re-export)")
    return problems


def _main_names(tree: ast.Module) -> Optional[set]:
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and "__name__" in ast.unparse(node.test):
            return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    return None


def trainer_source_problems(script_py, train_network_py=None, class_name: Optional[str] = None) -> List[str]:
    """What the mixin would meet in a kohya trainer script, read from its source (nothing is imported).

    ``script_py`` is ``train_network.py`` or a ``*_train_network.py``; ``train_network_py`` (default: next to it)
    supplies the inherited ``NetworkTrainer`` hooks. Checked: every hook of :data:`REQUIRED_HOOKS` (own or
    inherited) takes the parameters the mixin passes or reads; an overridden ``process_batch`` still reaches
    ``get_noise_pred_and_target``; an overridden ``get_noise_pred_and_target`` returns (prediction, target,
    timesteps, ...); the ``__main__`` block calls ``setup_parser()`` and the trainer class by name (the launcher
    runs that block with both replaced); the pieces :mod:`.reach` looks for (:func:`layout_problems`: the save
    path and header dict of 48d368fa or of v0.11, the validation option) and, when ``library/`` is next to
    ``train_network.py``, the names the shim imports from it (:func:`library_problems`). Returns descriptions
    of the problems (empty = supported).
    """
    return sum(_source_problems(script_py, train_network_py, class_name), [])


def _source_problems(script_py, train_network_py=None, class_name: Optional[str] = None) -> tuple:
    """(hook problems, layout problems) of :func:`trainer_source_problems`."""
    script = Path(script_py)
    base_path = Path(train_network_py) if train_network_py is not None else script.with_name("train_network.py")
    for path in (script, base_path):
        if not path.is_file():
            return [f"{path} does not exist"], []
    base_tree = ast.parse(base_path.read_text(encoding="utf-8"), filename=str(base_path))
    base_cls = _trainer_classes(base_tree).get("NetworkTrainer")
    if base_cls is None:
        return [f"{base_path} defines no NetworkTrainer class"], []
    tree = base_tree if script.resolve() == base_path.resolve() else \
        ast.parse(script.read_text(encoding="utf-8"), filename=str(script))
    classes = _trainer_classes(tree)
    if class_name is None:
        class_name = KNOWN_TRAINERS.get(script.name)
    if class_name is None:   # the classes that name NetworkTrainer as a base
        found = [c for c in classes.values() if any(ast.unparse(b).split(".")[-1] == "NetworkTrainer" for b in c.bases)]
        if len(found) != 1:
            return [f"{script.name} defines {len(found)} direct subclasses of NetworkTrainer (expected one)"], []
        class_name = found[0].name
    cls = classes.get(class_name)
    if cls is None:
        return [f"{script.name} defines no class {class_name}"], []
    own = _methods(cls) if cls is not base_cls else {}
    methods = {**_methods(base_cls), **own}
    problems = []
    for name, params in REQUIRED_HOOKS.items():
        fn = methods.get(name)
        if fn is None:
            problems.append(f"{name}() is missing")
            continue
        a = fn.args
        lacking = _lacking(params, {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}, a.kwarg is not None)
        if lacking:
            where = class_name if name in own else "NetworkTrainer"
            problems.append(f"{where}.{name}() lacks parameter(s) {', '.join(lacking)}")
    pb = methods.get("process_batch")
    if pb is not None and not (calls_method(pb, "process_batch") or calls_method(pb, "get_noise_pred_and_target")):
        problems.append("process_batch() neither calls super().process_batch() nor get_noise_pred_and_target()")
    gnp = methods.get("get_noise_pred_and_target")
    if gnp is not None:
        returns = [n for n in _own_nodes(gnp) if isinstance(n, ast.Return)]
        if not returns or any(not (isinstance(r.value, ast.Tuple) and len(r.value.elts) >= 3) for r in returns):
            problems.append("get_noise_pred_and_target() does not return (prediction, target, timesteps, ...)")
    names = _main_names(tree)
    if names is not None and not {"setup_parser", class_name} <= names:
        problems.append(f"the __main__ block does not call setup_parser() and {class_name}()")
    base_methods = _methods(base_cls)
    layout = layout_problems(methods, _effective_train(methods, base_methods, own))
    return problems, layout + library_problems(base_path.parent)


def static_check(train_network_py) -> None:
    """Check ``train_network.py``'s ``NetworkTrainer`` by reading its source, before importing anything
    (an old checkout may not even import with today's packages)."""
    path = Path(train_network_py)
    if not path.is_file():
        raise KohyaVersionError(f"{path} does not exist: not an sd-scripts checkout. {REQUIREMENT}.")
    hooks, layout = _source_problems(path, path, "NetworkTrainer")
    if hooks:
        raise KohyaVersionError(
            f"the sd-scripts checkout at {path.parent} is older than {MIN_VERSION}: NetworkTrainer has no per-batch "
            f"hooks ({'; '.join(hooks + layout)}). {REQUIREMENT}. Nothing was trained.")
    if layout:
        from .reach import SUPPORTED  # (reach imports this module)

        raise KohyaVersionError(
            f"the sd-scripts checkout at {path.parent} has the per-batch hooks but not the layout smplora-kohya "
            f"reaches into: {'; '.join(layout)}. {SUPPORTED}. Nothing was trained.")
