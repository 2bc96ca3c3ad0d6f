"""What the privacy term reads of a kohya forward: ``(pred, target, timesteps)`` of ``get_noise_pred_and_target``
and, with calibrated features, the base prediction at the same noisy input with the LoRA switched off.

kohya's ``process_batch`` returns only the loss, so :meth:`Capture.run` opens a :class:`Forward` for one
``process_batch`` call, the mixin's ``get_noise_pred_and_target`` fills it (:meth:`Capture.predict`), and
:meth:`Capture.run` returns what it holds (:class:`Captured`). With calibrated features :meth:`Capture.predict`
first replays the call under ``no_grad`` with the LoRA at multiplier 0 (:func:`lora_off`) and every RNG stream
put back afterwards, the denoiser running on the privacy rows only (:mod:`.base_forward`).
"""

from __future__ import annotations

import inspect
import logging
import numbers
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from smplora_plugin import PrivacyRegularizer
from smplora_plugin.errors import SmploraError

from .._common import unwrap
from . import base_forward, data
from .compat import DENOISER_PARAMS

logger = logging.getLogger("smplora.kohya")

HOOK_ARGS = ("args", "accelerator", "network", "text_encoders", "unet", "batch", "weight_dtype")  # on_step_start's


def bind(method: Callable, a: tuple, kw: dict) -> inspect.BoundArguments:
    """The arguments of the call ``method(*a, **kw)`` by name (the defaults not filled in)."""
    return inspect.signature(method).bind(*a, **kw)


def lora_switch(network: Any, accelerator: Any = None, network_module: Optional[str] = None) -> Any:
    """The sd-scripts network object (under accelerate / DDP / ``torch.compile`` wrappers) whose
    ``set_multiplier(m)`` scales the LoRA and whose ``multiplier`` holds the current scale.

    Raises :class:`SmploraError` saying how to fix it when the network has no such switch.
    """
    net = unwrap(network, accelerator, until=lambda m: callable(getattr(m, "set_multiplier", None)))
    has_set = callable(getattr(net, "set_multiplier", None))
    value = getattr(net, "multiplier", None)
    if not has_set or not isinstance(value, numbers.Real) or isinstance(value, bool):
        what = ("has no set_multiplier() method" if not has_set else
                f"has set_multiplier() but no numeric 'multiplier' attribute to restore afterwards (got {value!r})")
        module = f" (--network_module {network_module})" if network_module else ""
        raise SmploraError(
            f"calibrated features (--privacy_preset robust / --privacy_calibrated) need the base model's prediction, "
            f"made by switching the LoRA off with network.set_multiplier(0.0) for one no-grad forward, but the network "
            f"{type(net).__name__}{module} {what}. Use a network module that has both, like sd-scripts' networks.lora "
            "(and its other LoRA networks) or LyCORIS, or train without calibrated features: --privacy_preset paper "
            "or --no-privacy_calibrated (privacy_calibrated = false in the TOML).")
    return net


def switch_of(arguments: Dict[str, Any]) -> Any:
    """:func:`lora_switch` of a hook's network, from the hook's ``arguments``
    (``network``, ``accelerator``, ``args``)."""
    return lora_switch(arguments["network"], arguments["accelerator"],
                       getattr(arguments["args"], "network_module", None))


@contextmanager
def lora_off(net: Any) -> Iterator[None]:
    """Run the block with ``net.set_multiplier(0.0)``; the previous multiplier is restored afterwards,
    also when the block raises."""
    previous = net.multiplier
    try:
        net.set_multiplier(0.0)
        yield
    finally:
        net.set_multiplier(previous)


class Captured(NamedTuple):
    """What a forward gave the privacy term."""

    pred: torch.Tensor
    target: torch.Tensor
    timesteps: Any
    reference: Optional[torch.Tensor]   # the base prediction (calibrated features), else None
    weighting: Any = None               # the forward's loss weighting (SD3 / FLUX), for per-sample losses under DP


class Forward:
    """One ``process_batch`` call being captured: its arguments, and what its forward gave (``None`` until then)."""

    __slots__ = ("batch_args", "captured")

    def __init__(self, batch_args: Dict[str, Any]):
        self.batch_args = batch_args
        self.captured: Optional[Captured] = None


class _Base(NamedTuple):
    """A replayed base prediction: ``pred`` (valid on ``rows``; the whole batch when ``rows`` is None),
    the replay's ``target`` and timesteps ``t``, and the denoiser inputs of its cut forwards."""

    pred: torch.Tensor
    target: Any
    t: Any
    rows: Optional[Sequence[int]]
    size: Optional[int]
    inputs: List[Any]
    denoiser: Any


class Capture:
    """The captured forwards of one run: :attr:`forward` is the one open now (``None`` between forwards)."""

    def __init__(self, reg: PrivacyRegularizer):
        self.reg = reg
        self.forward: Optional[Forward] = None
        self._warned_whole_base = False

    def run(self, batch_args: Dict[str, Any], process_batch: Callable, /, *a: Any, **kw: Any
            ) -> Tuple[Any, Optional[Captured]]:
        """``process_batch(*a, **kw)`` (whose arguments by name are ``batch_args``), and what its
        ``get_noise_pred_and_target`` gave (``None`` when it made no such call)."""
        forward, outer = Forward(batch_args), self.forward
        self.forward = forward
        try:
            out = process_batch(*a, **kw)
        finally:
            self.forward = outer
        return out, forward.captured

    def predict(self, trainer: Any, call: Callable, a: tuple, kw: dict) -> Any:
        """``call(*a, **kw)`` (the trainer's ``get_noise_pred_and_target``, inside :meth:`run`), its result kept in
        the open forward; with calibrated features, with the base prediction replayed first."""
        forward = self.forward
        bound = bind(call, a, kw)
        base = self._base_prediction(trainer, call, bound, forward.batch_args) if self.reg.config.calibrated else None
        inputs: List[base_forward.Inputs] = []
        with (base_forward.record_inputs(base.denoiser, base.size, inputs) if base is not None and base.rows is not None
              else nullcontext()):
            out = call(*a, **kw)
        reference = None if base is None else check_replay(trainer, base, out, bound.arguments.get("batch"), inputs)
        forward.captured = Captured(out[0], out[1], out[2] if len(out) > 2 else None, reference,
                                    out[3] if len(out) > 3 else None)
        return out

    def base_rows(self, batch: Any, size: int, is_train: bool) -> List[int]:
        """Rows of a batch of ``size`` whose base prediction the privacy term reads: the first
        ``reg.privacy_rows(m)`` of its ``m`` member rows in a training batch (as the mixin's ``regularize`` takes
        them), every row of a held-out batch (already cut to its privacy rows by ``nonmember_features``)."""
        if not is_train:
            return list(range(size))
        rows = data.member_rows(batch if isinstance(batch, dict) else {}, size)
        return rows[: self.reg.privacy_rows(len(rows))] if rows else []

    def _base_prediction(self, trainer: Any, call: Callable, bound: inspect.BoundArguments,
                         batch_args: Dict[str, Any]) -> Optional[_Base]:
        """The base prediction of the call ``bound`` of ``call`` (the trainer's ``get_noise_pred_and_target``), or
        ``None`` when the batch has no row for the privacy term.

        The call is replayed under ``no_grad`` with the LoRA switched off, and every RNG stream is put back
        afterwards, so the forward that follows draws the same noise and timesteps (the replay draws nothing
        the trainer would see). During the replay the denoiser (the call's ``unet`` argument: UNet or DiT) runs
        on the privacy rows only (:func:`base_forward.cut_forward`: every batch-leading tensor argument, kwargs
        included, is cut), and the trainer's own post-processing (SD3 / FLUX preconditioning) turns its output
        into a prediction in the training forward's space. The replay must run on the whole batch: sd-scripts
        draws the noise of the whole batch and then its timesteps from one generator, so a replay on fewer
        rows would draw other timesteps for them (``tests/test_kohya_fraction.py``)."""
        arg = dict(bound.arguments)
        net = switch_of(arg)
        latents = arg.get("latents")
        size = int(latents.shape[0]) if isinstance(latents, torch.Tensor) and latents.ndim else \
            data.batch_rows(arg.get("batch"))
        rows = None if size is None else self.base_rows(arg.get("batch"), size, bool(arg.get("is_train", True)))
        if rows is not None and not rows:
            return None
        denoiser = next((arg[n] for n in DENOISER_PARAMS if n in arg), None)   # Lumina names it dit
        cut = isinstance(denoiser, torch.nn.Module) and rows is not None and rows != list(range(size))
        record: List[base_forward.Inputs] = []
        arg["is_train"] = False    # in sd-scripts' trainers it only switches autograd off
        replay = inspect.BoundArguments(bound.signature, arg)
        snap = data.rng_snapshot(getattr(latents, "device", None))
        try:
            with torch.no_grad(), lora_off(net), \
                    (base_forward.cut_forward(denoiser, rows, size, record) if cut else nullcontext()):
                out = call(*replay.args, **replay.kwargs)
        finally:
            data.rng_restore(snap)
        if all(n in batch_args for n in HOOK_ARGS):  # kohya's hook after a forward without backward (block swapping)
            trainer.on_validation_step_end(*(batch_args[n] for n in HOOK_ARGS))
        if cut and not record and not self._warned_whole_base:
            self._warned_whole_base = True
            logger.warning(f"SMP-LoRA: {type(trainer).__name__}.get_noise_pred_and_target did not call its 'unet' "
                           "argument, so the base forward of calibrated features ran on the whole batch, not only on "
                           "the privacy rows (correct, but slower)")
        return _Base(out[0].detach(), out[1], out[2] if len(out) > 2 else None,
                     rows if record else None, size, record, denoiser)


def check_replay(trainer: Any, base: _Base, out: tuple, batch: Any,
                 inputs: Optional[List[base_forward.Inputs]] = None) -> torch.Tensor:
    """The base prediction, once the replay is shown to have drawn the same timesteps and target, and to
    have given the denoiser the training forward's own inputs (``inputs``) on the rows it kept."""
    pred, target = out[0], out[1]
    t = out[2] if len(out) > 2 else None
    rows = [i for i, attrs in enumerate((batch or {}).get("custom_attributes") or [])
            if (attrs or {}).get("diff_output_preservation")]   # DOP targets are predictions: not compared
    keep = [i for i in range(target.shape[0]) if i not in rows]
    same_t = not isinstance(t, torch.Tensor) or (isinstance(base.t, torch.Tensor) and torch.equal(base.t, t))
    same_target = (isinstance(base.target, torch.Tensor) and base.target.shape == target.shape
                   and torch.allclose(base.target[keep].float(), target[keep].detach().float(), rtol=1e-3, atol=1e-4))
    same_inputs = base.rows is None or base_forward.same_inputs(base.inputs, inputs or [], base.rows, base.size)
    if not (same_t and same_target and same_inputs and base.pred.shape == pred.shape):
        raise SmploraError(
            f"{type(trainer).__name__}.get_noise_pred_and_target drew different noise or timesteps when it was "
            "replayed for the base prediction of calibrated features (it uses a random source other than the "
            "global torch / Python / NumPy generators), so the base prediction would not be at the same noisy "
            "input. Train without calibrated features: --privacy_preset paper or --no-privacy_calibrated.")
    return base.pred
