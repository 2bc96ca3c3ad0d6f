"""The ``sd_trainer_smplora`` process: ai-toolkit's own ``SDTrainer``, each hook handed to a
:class:`.run.PrivateRun`.

The class is built on first use from the ``SDTrainer`` ai-toolkit imports (:func:`process_class`), so importing
this package needs no ai-toolkit. It overrides, each time calling the parent with the arguments unchanged:

- ``__init__``: the layout check (:mod:`.source`) and every privacy check (:meth:`.run.PrivateRun.plan`), before
  ai-toolkit's ``__init__`` writes its config copy;
- ``before_dataset_load``: the held-out dataset, built by ai-toolkit's own ``get_dataloader_from_datasets``;
- ``hook_train_loop`` / ``train_single_accumulation`` / ``predict_noise`` / ``calculate_loss``: the forwards and
  the privacy term (see :mod:`.run`);
- ``update_training_metadata`` / ``save`` / ``load_weights``: ``smplora.*`` header keys (``smplora.dp`` with DP
  noise), the attacker state and the DP state next to each checkpoint, and back on resume.

Without a ``privacy:`` block (or with ``method: none``) every override passes straight through.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional

from .run import PrivateRun
from .source import check_classes

PROCESS_TYPE = "sd_trainer_smplora"
_BUILT: Dict[int, type] = {}


def _arguments(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Dict[str, Any]:
    """``fn``'s arguments by name (its ``**kwargs`` flattened in), ``self`` excluded."""
    bound = inspect.signature(fn).bind(None, *args, **kwargs)
    out: Dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL and name != "self":
            out[name] = value
    return out


def build_process_class(base: type, get_dataloader: Optional[Callable[..., Any]] = None,
                        accelerator: Optional[Callable[[], Any]] = None,
                        image_extensions: Optional[tuple] = None) -> type:
    """The SMP-LoRA process class over ``base`` (ai-toolkit's ``SDTrainer``, or a stand-in of it).

    ``get_dataloader`` is ai-toolkit's ``toolkit.data_loader.get_dataloader_from_datasets``, ``accelerator`` its
    ``toolkit.accelerator.get_accelerator`` and ``image_extensions`` its dataset's image extensions (imported from
    ai-toolkit when not given).
    """
    key = id(base)
    if key in _BUILT:
        return _BUILT[key]

    class SmploraSDTrainer(base):  # type: ignore[misc, valid-type]
        """ai-toolkit's SDTrainer with the SMP-LoRA privacy term (smplora-plugin)."""

        _smplora: Optional[PrivateRun] = None

        def __init__(self, process_id: int, job: Any, config: Any, **kwargs: Any):
            check_classes(base)
            loader, acc, exts = _toolkit(get_dataloader, accelerator, image_extensions)
            accel = acc()
            run = PrivateRun.plan(config, job, num_processes=getattr(accel, "num_processes", 1), extensions=exts,
                                  mixed_precision=getattr(accel, "mixed_precision", None))
            self._smplora_loader, self._smplora = loader, run
            super().__init__(process_id, job, config, **kwargs)
            if run is not None:
                print(run.summary(), flush=True)

        def before_dataset_load(self) -> Any:
            out = super().before_dataset_load()
            if self._smplora is not None:
                self._smplora.build_pool(self, self._smplora_loader)
            return out

        def hook_train_loop(self, batch: Any) -> Any:
            run = self._smplora
            if run is None:
                return super().hook_train_loop(batch)
            run.begin_step(self, batch, lambda b: base.train_single_accumulation(self, b))
            try:
                return super().hook_train_loop(batch)
            finally:
                run.end_step(self)

        def train_single_accumulation(self, batch: Any) -> Any:
            run = self._smplora
            if run is None:
                return super().train_single_accumulation(batch)
            with run.member_forward(self):
                return super().train_single_accumulation(batch)

        def predict_noise(self, *args: Any, **kwargs: Any) -> Any:
            run = self._smplora
            if run is not None and run.forward is not None and kwargs.get("is_primary_pred"):
                run.record(_arguments(base.predict_noise, args, kwargs))
            return super().predict_noise(*args, **kwargs)

        def calculate_loss(self, *args: Any, **kwargs: Any) -> Any:
            run = self._smplora
            parent = super().calculate_loss
            if run is None or run.forward is None:
                return parent(*args, **kwargs)
            return run.calculate_loss(self, lambda: parent(*args, **kwargs),
                                      lambda **kw: base.predict_noise(self, **kw),
                                      _arguments(base.calculate_loss, args, kwargs))

        def update_training_metadata(self) -> Any:
            out = super().update_training_metadata()
            if self._smplora is not None:
                self.add_meta(self._smplora.file_metadata())
            return out

        def save(self, step: Optional[int] = None) -> Any:
            out = super().save(step)
            if self._smplora is not None:
                self._smplora.saved(self, step)
            return out

        def load_weights(self, path: Any) -> Any:
            out = super().load_weights(path)
            if self._smplora is not None:
                self._smplora.resumed(self, path)
            return out

    SmploraSDTrainer.__module__ = __name__
    _BUILT[key] = SmploraSDTrainer
    return SmploraSDTrainer


def process_class() -> type:
    """The process class over the ``SDTrainer`` of the ai-toolkit on ``sys.path`` (imported here, on first use)."""
    from extensions_built_in.sd_trainer.SDTrainer import SDTrainer

    return build_process_class(SDTrainer)


def _toolkit(get_dataloader: Optional[Callable[..., Any]], accelerator: Optional[Callable[[], Any]],
             image_extensions: Optional[tuple]):
    if get_dataloader is None or image_extensions is None:
        from toolkit import data_loader

        get_dataloader = get_dataloader or data_loader.get_dataloader_from_datasets
        if image_extensions is None:
            from smplora_plugin.integrations._common import IMAGE_EXTENSIONS

            image_extensions = tuple(dict.fromkeys((*IMAGE_EXTENSIONS, *getattr(data_loader, "image_extensions", ()))))
    if accelerator is None:
        from toolkit.accelerator import get_accelerator

        accelerator = get_accelerator
    return get_dataloader, accelerator, image_extensions
