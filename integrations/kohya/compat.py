"""Feature check of a kohya trainer class: the hooks the mixin needs, by name and parameters.

sd-scripts has no version number (``library/__init__.py`` is empty), so support is decided by
feature: the per-batch hooks reached main in v0.10.0 (2026-01-19; the sd3 branch had them
from 2025-02). Older versions computed the loss inline in ``train()``; they are refused.
"""

from __future__ import annotations

import inspect
from typing import Dict, List, Optional

from smplora_plugin.errors import SmploraError

MIN_VERSION = "v0.10.0"
REQUIREMENT = (f"smplora-kohya needs kohya sd-scripts {MIN_VERSION} (2026-01-19) or newer (or the sd3 branch from "
               "2025-02 on); update your checkout (git pull, or git checkout v0.10.1) and try again")

# hook -> parameter names it must accept (beyond self)
REQUIRED_HOOKS: Dict[str, tuple] = {
    "train": ("args",),
    "assert_extra_args": ("args", "train_dataset_group", "val_dataset_group"),
    "get_noise_pred_and_target": ("args", "accelerator", "noise_scheduler", "latents", "batch", "text_encoder_conds",
                                  "unet", "network", "weight_dtype", "train_unet", "is_train"),
    "process_batch": ("batch", "text_encoders", "unet", "network", "vae", "noise_scheduler", "vae_dtype",
                      "weight_dtype", "accelerator", "args", "text_encoding_strategy", "tokenize_strategy", "is_train"),
    "on_step_start": ("args", "accelerator", "network", "text_encoders", "unet", "batch", "weight_dtype", "is_train"),
    "on_validation_step_end": ("args", "accelerator", "network", "text_encoders", "unet", "batch", "weight_dtype"),
    "get_sai_model_spec": ("args",),
    "generate_step_logs": ("args", "current_loss", "avr_loss", "lr_scheduler"),
}


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
        lacking = [p for p in params if p not in sig.parameters and not accepts_var_kw]
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
        raise SmploraError(f"{module.__name__} defines several trainer classes ({', '.join(c.__name__ for c in leaves)}); "
                           "use make_private_trainer(TrainerClass, config) to pick one.")
    return leaves[0]


def static_check(train_network_py) -> None:
    """Check ``train_network.py``'s ``NetworkTrainer`` by reading its source, before importing anything
    (an old checkout may not even import with today's packages)."""
    import ast
    from pathlib import Path

    path = Path(train_network_py)
    if not path.is_file():
        raise KohyaVersionError(f"{path} does not exist: not an sd-scripts checkout. {REQUIREMENT}.")
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "NetworkTrainer"), None)
    if cls is None:
        raise KohyaVersionError(f"{path} defines no NetworkTrainer class. {REQUIREMENT}.")
    methods = {n.name: n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    problems = []
    for name, params in REQUIRED_HOOKS.items():
        fn = methods.get(name)
        if fn is None:
            problems.append(f"{name}() is missing")
            continue
        a = fn.args
        have = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
        lacking = [p for p in params if p not in have and a.kwarg is None]
        if lacking:
            problems.append(f"{name}() lacks parameter(s) {', '.join(lacking)}")
    if problems:
        raise KohyaVersionError(
            f"the sd-scripts checkout at {path.parent} is older than {MIN_VERSION}: NetworkTrainer has no per-batch "
            f"hooks ({'; '.join(problems)}). {REQUIREMENT}. Nothing was trained.")
