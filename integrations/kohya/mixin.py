"""``SmploraTrainerMixin``: SMP-LoRA for any sd-scripts ``NetworkTrainer`` subclass.

Put it first in the MRO (``make_private_trainer`` / the launcher do that). It overrides only
methods every kohya network trainer shares, each calling ``super()`` with the arguments passed
through unchanged:

- ``train``: validate the privacy settings and prepare the non-member dataset, before anything else;
- ``assert_extra_args``: reach the dataset groups (members / non-members / regularisation), check
  that they are disjoint by content, write the manifest, announce the split;
- ``post_process_network``: with calibrated features, check the network can be switched off
  (``set_multiplier``), right after kohya creates it;
- ``get_noise_pred_and_target``: capture ``(pred, target, timesteps)`` of a forward; with calibrated
  features, first replay the same call (same RNG draws, hence the same noisy latents and timesteps,
  same conditioning; the streams are restored afterwards) under ``no_grad`` with the LoRA at multiplier 0,
  the denoiser running on the privacy rows only (:mod:`.base_forward`): the base prediction;
- ``process_batch``: while training only, feed the core (``reg.features``, ``reg.step``) with the first
  ``reg.privacy_rows(m)`` of the batch's ``m`` member rows (``privacy_fraction`` over steps: 0 on some
  steps, then ``reg.step(loss, None)`` and no base forward), with one no-grad forward on a kohya validation
  batch cut to ``reg.nonmember_rows(its size)`` rows when the attacker is due an update;
- ``on_step_start``: after ``super()``, one-time hookup of checkpoint / ``--save_state`` saving;
- ``get_sai_model_spec``: ``smplora.*`` keys in every saved LoRA;
- ``generate_step_logs``: metrics for kohya's trackers (TensorBoard / wandb).

What it reaches beyond these hooks (kohya's header dict, ``network.save_weights``, the dataset objects, the
progress bar...) is found by :mod:`.reach`, which stops a run whose sd-scripts lacks a piece before its first
training step and before anything is written.

All algorithm code lives in the core (:class:`smplora_plugin.PrivacyRegularizer`).
"""

from __future__ import annotations

import inspect
import json
import logging
import numbers
import os
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from smplora_plugin import PrivacyRegularizer, __version__
from smplora_plugin.errors import ConfigError, SmploraError, StateError
from smplora_plugin.state import config_from_state, read_state

from ..summary import summary_box
from . import base_forward, data, header, reach
from .compat import DENOISER_PARAMS
from .options import CONFIG_OPTIONS, KohyaPrivacySettings, settings_from_namespace

logger = logging.getLogger("smplora.kohya")

STATE_DIR_FILE = "smplora_state.safetensors"   # inside a kohya --save_state folder
STATE_SUFFIX = ".smplora_state"                # next to each LoRA checkpoint (safetensors format;
                                               # no .safetensors suffix so LoRA pickers don't list it)
CHECKPOINT_EXTS = (".safetensors", ".ckpt", ".pt")
NEVER_VALIDATE = 2**31 - 1    # --validate_every_n_epochs that no run reaches: kohya's epoch validation off


def state_path_for_checkpoint(ckpt_file: str) -> Path:
    """Where the attacker state of a LoRA checkpoint is saved: ``<ckpt without ext>.smplora_state``."""
    p = Path(ckpt_file)
    return p.with_name(p.stem + STATE_SUFFIX)


def lora_switch(network: Any, accelerator: Any = None, network_module: Optional[str] = None) -> Any:
    """The sd-scripts network object (under accelerate / DDP / ``torch.compile`` wrappers) whose
    ``set_multiplier(m)`` scales the LoRA and whose ``multiplier`` holds the current scale.

    Raises :class:`SmploraError` saying how to fix it when the network has no such switch.
    """
    net = network
    unwrap = getattr(accelerator, "unwrap_model", None)
    if unwrap is not None:
        net = unwrap(net)
    for _ in range(8):  # DDP / DataParallel / DeepSpeed (.module), torch.compile (._orig_mod)
        if callable(getattr(net, "set_multiplier", None)):
            break
        inner = getattr(net, "_orig_mod", None)
        if inner is None:
            inner = getattr(net, "module", None)
        if inner is None:
            break
        net = inner
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


class _Run:
    """Per-``train()`` state of the privacy regulariser inside a kohya run."""

    def __init__(self, settings: KohyaPrivacySettings):
        self.settings = settings
        self.reg = PrivacyRegularizer(config=settings.config)
        self.capturing = False
        self.captured = None
        self.batch_args: Optional[Dict[str, Any]] = None   # process_batch arguments of the forward being captured
        self.switch_checked = False
        self.warned_whole_base = False
        self.last_saved: Optional[Tuple[Tuple[int, int, int], Path]] = None   # (counters, file) of the last save
        self.feature_rows = {"member": 0, "nonmember": 0}   # samples that fed the privacy term in this run
        self.val_group = None
        self.pool: Optional[data.NonmemberPool] = None
        self.hooked = False
        self.manifest: Optional[Path] = None
        self.counts: Dict[str, int] = {}
        self.source = ""
        self.is_main = True
        self.reg_only_batches = 0
        self.output_dir = Path(".")
        self.user_dataset_config = False          # the user gave --dataset_config themselves
        self.dataset_config: Optional[Dict[str, Any]] = None   # the combined config the launcher passes kohya
        self.dataset_config_path: Optional[Path] = None       # where it is kept once every check has passed
        self.tmp_dir: Optional[Path] = None       # kohya reads the combined config from here until then
        self.header_plan: Optional[header.HeaderPlan] = None
        self.num_processes = 1
        self.records: Optional[Dict[str, Any]] = None          # the manifest, written once every check passed
        self.resumed_from_step = 0
        self.validation_off = False               # kohya's epoch validation over the holdout switched off
        self.layout: Optional[reach.SaveLayout] = None   # how kohya saves (48d368fa closure / v0.11 method)

    # ------------------------------------------------------------------ before kohya's train()
    def prepare_args(self, args) -> None:
        s = self.settings
        self.output_dir = Path(getattr(args, "output_dir", None) or ".")
        name = getattr(args, "output_name", None) or "last"
        self.manifest = s.manifest or self.output_dir / f"{name}_smplora_manifest.json"
        carve_out = data.uses_validation_split(args)   # before the holdout block (split 1.0) is added
        # 1. everything that can fail, before anything is written or changed
        if s.config.calibrated and getattr(args, "network_train_text_encoder_only", False):
            raise ConfigError(
                "calibrated features (--privacy_preset robust / --privacy_calibrated) compare the UNet's prediction with "
                "and without its LoRA at the same text conditioning; with --network_train_text_encoder_only the UNet "
                "has no LoRA, so every calibrated feature would be 0. Use --privacy_preset paper or "
                "--no-privacy_calibrated.")
        holdout_cfg = data.holdout_dataset_config(args, s.holdout_dir) if s.holdout_dir is not None else None
        if holdout_cfg is not None:
            reach.validation_switch(args)     # kohya's pass over the holdout must be switchable off
        self.user_dataset_config = bool(getattr(args, "dataset_config", None))
        state_file = s.attacker_state
        resume = getattr(args, "resume", None)
        if state_file is None and resume and not getattr(args, "resume_from_huggingface", False):
            candidate = Path(resume) / STATE_DIR_FILE
            if candidate.is_file():
                state_file = candidate
            else:
                logger.warning(f"SMP-LoRA: --resume {resume} holds no {STATE_DIR_FILE}; the proxy attacker starts "
                               "from scratch (pass --privacy_attacker_state FILE to continue one)")
        if state_file is not None:
            self.load_attacker_state(state_file)
        # 2. then point kohya at the non-member data: the combined dataset config is read by kohya from a
        # temporary folder; it is kept in the output folder only once every check has passed (write_records)
        if holdout_cfg is not None:
            self.dataset_config = holdout_cfg
            self.dataset_config_path = self.output_dir / f"{name}_smplora_dataset.json"
            self.tmp_dir = Path(tempfile.mkdtemp(prefix="smplora_kohya_"))
            path = data.write_dataset_config(holdout_cfg, self.tmp_dir / self.dataset_config_path.name)
            n_holdout = sum(len(images) for _, images in data.holdout_subfolders(s.holdout_dir))
            logger.warning(
                f"SMP-LoRA: --privacy_holdout_dir {s.holdout_dir} ({n_holdout} images) joins your datasets as a "
                "validation-only dataset (validation_split = 1.0, never trained on). kohya logs 'contains 0 image "
                "files' and 'ignore subset ... no images found' for its folders: that is the empty training side "
                "of that dataset; its images are in kohya's validation dataset. Your LoRA's ss_* header is "
                "written as without it.")
            args.dataset_config = str(path)
            self.source = f"holdout_dir:{Path(s.holdout_dir).name}"   # folder name only: metadata gets published
            if not data.asks_validation(args, holdout_cfg):
                # kohya validates a validation dataset at the end of every epoch unless told otherwise: on the
                # holdout that is a cost a run without privacy never pays, which the user did not ask for
                args.validate_every_n_epochs = NEVER_VALIDATE
                self.validation_off = True
                logger.warning(
                    "SMP-LoRA: kohya's own validation pass over the held-out images is off (without "
                    "--validate_every_n_epochs / --validate_every_n_steps kohya would run it at the end of every "
                    "epoch, several no-grad forwards per held-out batch, which a run without privacy does not pay). "
                    "Pass --validate_every_n_epochs 1 to have kohya report a validation loss on them.")
        if carve_out:
            if getattr(args, "validation_seed", None) is None:
                args.validation_seed = s.config.seed
                logger.warning(f"SMP-LoRA: validation_split carve-out is seeded with validation_seed={s.config.seed} "
                               "(without a seed kohya shuffles the training and validation sides differently, "
                               "so an image could land on both)")
            self.source = (self.source + "+" if self.source else "") + \
                f"validation_split:{getattr(args, 'validation_split', 0.0)}@seed{args.validation_seed}"

    def load_attacker_state(self, state_file: Path) -> None:
        """Restore a saved attacker; settings that differ from the saved ones are named by their kohya flags."""
        state = read_state(state_file)
        saved = config_from_state(state, state_file).algorithm_fields()
        mine = self.reg.config.algorithm_fields()
        differ = [k for k in mine if mine[k] != saved[k]]
        if differ:
            flags = ", ".join(f"{_flag(k, saved[k])} (this run: {_flag(k, mine[k])})" for k in differ)
            raise StateError(
                f"the attacker state {state_file} was saved with other privacy settings. To continue it, pass "
                f"{flags}; or start a new attacker (move {state_file} away, or drop --privacy_attacker_state). "
                "Nothing was trained.")
        self.reg.load_state_dict(state)
        self.resumed_from_step = self.reg.global_step
        logger.warning(
            f"SMP-LoRA: attacker state restored from {state_file} (step {self.reg.global_step}, "
            f"{self.reg.attacker_updates} attacker updates). smplora.metrics.step counts every step since the first "
            "run; kohya restarts its own count (ss_steps) on --resume unless --skip_until_initial_step is given, so "
            f"the two then differ by {self.reg.global_step}.")

    def write_records(self) -> None:
        """The manifest and the combined dataset config, written once every check has passed."""
        if self.records is not None and self.manifest is not None:
            data.record(self.manifest, **self.records)
            self.records = None
        if self.dataset_config is not None and self.dataset_config_path is not None:
            data.write_dataset_config(self.dataset_config, self.dataset_config_path)
            self.dataset_config = None

    def cleanup(self) -> None:
        """Remove the temporary copy of the combined dataset config."""
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.tmp_dir = None

    # ------------------------------------------------------------------ assert_extra_args
    def setup_datasets(self, args, train_group, val_group) -> None:
        holdout = self.settings.holdout_dir
        reach.dataset_groups(train_group, val_group, header_restore=self.dataset_config is not None,
                             user_config=self.user_dataset_config)
        source = self.source or "validation"
        extra = {"holdout_dir": str(holdout.resolve()) if holdout is not None else None,
                 "validation_split": getattr(args, "validation_split", None),
                 "validation_seed": getattr(args, "validation_seed", None), "smplora_version": __version__}
        splits = data.check_and_record(train_group, val_group, manifest=None, seed=self.settings.config.seed,
                                       source=source, extra=extra)
        self.records = {"splits": splits, "seed": self.settings.config.seed, "source": source, "extra": extra}
        if self.dataset_config is not None:   # kohya has read the combined config: point args at the kept copy
            self.header_plan = reach.holdout_plan(self.user_dataset_config, train_group, val_group, holdout,
                                                  validation_off=self.validation_off)
            args.dataset_config = str(self.dataset_config_path)
            self.cleanup()
        data.tag_subsets(train_group, lambda sub: "reg" if getattr(sub, "is_reg", False) else "member")
        data.tag_subsets(val_group, lambda sub: "nonmember")
        self.val_group = val_group
        self.counts = {k: len(v) for k, v in splits.items()}
        carved = [p for p in splits["nonmember"]
                  if holdout is None or not Path(p).resolve().is_relative_to(Path(holdout).resolve())]
        cfg = self.settings.config
        lines = [
            f"SMP-LoRA (smplora-plugin {__version__}): {cfg.objective} objective, alpha={cfg.alpha}, "
            f"beta={cfg.beta}, k_steps={cfg.k_steps}",
            *(["base-calibrated features: one extra no-grad forward per batch with the LoRA switched off "
               "(network.set_multiplier(0))"] if cfg.calibrated else []),
            *([f"privacy fraction {cfg.privacy_fraction:g}, taken over steps: step k's privacy term uses the "
               f"first ceil((k+1) f m) - ceil(k f m) of its m member images (none on some steps at small batches); "
               f"held-out forwards run on ceil(f x batch) images" + (
                   "; the base forward (the LoRA-off denoiser forward) of a training batch runs on the privacy rows "
                   "only, and not at all on a step without one" if cfg.calibrated else "")]
              if cfg.privacy_fraction < 1 else []),
            f"members (trained on, shown to the proxy attacker): {len(splits['member'])} images",
            f"non-members (NEVER trained on): {len(splits['nonmember'])} images [{self.source or 'validation dataset'}]",
        ]
        if carved:
            lines.append(f"!! {len(carved)} image(s) were CARVED OUT of your training folders as non-members and "
                         f"will NOT be trained on: {data.describe(carved)}")
        if splits.get("regularization"):
            lines.append(f"regularisation images (trained on, never shown to the attacker): "
                         f"{len(splits['regularization'])}")
        lines += [f"manifest: {self.manifest}",
                  "loss display: avr_loss stays kohya's denoising loss; the progress bar adds mia_ce / mia_acc"]
        if data.is_main_process():
            print(summary_box(lines), flush=True)

    # ------------------------------------------------------------------ per step
    def check_network(self, network: Any, accelerator: Any, args: Any) -> Any:
        """With calibrated features: the switchable network (see :func:`lora_switch`), else ``None``."""
        if not self.settings.config.calibrated:
            return None
        net = lora_switch(network, accelerator, getattr(args, "network_module", None))
        self.switch_checked = True
        return net

    def base_rows(self, batch: Any, size: int, is_train: bool) -> List[int]:
        """Rows of a batch of ``size`` whose base prediction the privacy term reads: the first
        ``reg.privacy_rows(m)`` of its ``m`` member rows in a training batch (as :meth:`regularize` takes
        them), every row of a held-out batch (already cut to its privacy rows by :meth:`nonmember_features`)."""
        if not is_train:
            return list(range(size))
        rows = data.member_rows(batch if isinstance(batch, dict) else {}, size)
        return rows[: self.reg.privacy_rows(len(rows))] if rows else []

    def base_prediction(self, trainer, call: Callable, a: tuple, kw: dict) -> Optional[_Base]:
        """The base prediction of ``call(*a, **kw)`` (the trainer's ``get_noise_pred_and_target``), or ``None``
        when the batch has no row for the privacy term.

        The call is replayed under ``no_grad`` with the LoRA switched off, and every RNG stream is put back
        afterwards, so the forward that follows draws the same noise and timesteps (the replay draws nothing
        the trainer would see). During the replay the denoiser (the call's ``unet`` argument: UNet or DiT) runs
        on the privacy rows only (:func:`base_forward.cut_forward`: every batch-leading tensor argument, kwargs
        included, is cut), and the trainer's own post-processing (SD3 / FLUX preconditioning) turns its output
        into a prediction in the training forward's space. The replay must run on the whole batch: sd-scripts
        draws the noise of the whole batch and then its timesteps from one generator, so a replay on fewer
        rows would draw other timesteps for them (``tests/test_kohya_fraction.py``)."""
        bound = inspect.signature(call).bind(*a, **kw)
        arg = bound.arguments
        net = self.check_network(arg["network"], arg["accelerator"], arg["args"])
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
        snap = data.rng_snapshot(getattr(latents, "device", None))
        try:
            with torch.no_grad(), lora_off(net), \
                    (base_forward.cut_forward(denoiser, rows, size, record) if cut else nullcontext()):
                out = call(*bound.args, **bound.kwargs)
        finally:
            data.rng_restore(snap)
        b = self.batch_args or {}
        names = ("args", "accelerator", "network", "text_encoders", "unet", "batch", "weight_dtype")
        if all(n in b for n in names):  # kohya's hook after a forward without backward (block swapping re-arms)
            trainer.on_validation_step_end(*(b[n] for n in names))
        if cut and not record and not self.warned_whole_base:
            self.warned_whole_base = True
            logger.warning(f"SMP-LoRA: {type(trainer).__name__}.get_noise_pred_and_target did not call its 'unet' "
                           "argument, so the base forward of calibrated features ran on the whole batch, not only on "
                           "the privacy rows (correct, but slower)")
        return _Base(out[0].detach(), out[1], out[2] if len(out) > 2 else None,
                     rows if record else None, size, record, denoiser)

    @staticmethod
    def check_replay(trainer, base: _Base, out: tuple, batch: Any,
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

    def hook_up(self, trainer, bound: inspect.BoundArguments) -> None:
        """One-time, at the first training step: find every piece of kohya the shim reaches into (:mod:`.reach`;
        refused before anything is written), then write the records and hook up the state next to each
        checkpoint, the state in --save_state folders and the progress bar."""
        self.hooked = True
        acc = bound.arguments["accelerator"]
        args = bound.arguments["args"]
        if not self.switch_checked:   # trainers without post_process_network: still before the first forward
            self.check_network(bound.arguments["network"], acc, args)
        saver = reach.network_saver(bound.arguments["network"], acc)
        if self.header_plan is not None:
            reach.check_header(reach.metadata_dict(trainer, self.layout), self.header_plan)
        reach.batch_roles(bound.arguments["batch"], data.ROLE_KEY)
        register = reach.save_state_hook(acc, args)
        self.is_main = bool(getattr(acc, "is_main_process", True))
        self.num_processes = int(getattr(acc, "num_processes", 1) or 1)
        if self.is_main:
            self.write_records()     # every check has passed: the first training step is about to run
        net = saver.net
        original = net.save_weights
        run = self

        def save_weights(*a, **kw):
            a = list(a)
            if run.header_plan is not None:   # kohya's ss_* keys as without the holdout block
                i, name = saver.metadata_index, saver.metadata_name
                if name is not None and isinstance(kw.get(name), dict):
                    kw[name] = header.restore(kw[name], run.header_plan, args, run.num_processes)
                elif i is not None and i < len(a) and isinstance(a[i], dict):
                    a[i] = header.restore(a[i], run.header_plan, args, run.num_processes)
            out = original(*a, **kw)
            run.after_checkpoint(a[0] if a else kw.get(saver.file_name))
            return out

        net.save_weights = save_weights
        if register is not None:
            def save_state_hook(models, weights, output_dir):
                if run.is_main:
                    run.save_state(Path(output_dir) / STATE_DIR_FILE)
            register(save_state_hook)
        self._wrap_progress_bar(acc)

    def _wrap_progress_bar(self, accelerator) -> None:
        bar, missing = reach.steps_progress_bar(accelerator)
        if bar is None:
            if missing:
                logger.warning(f"SMP-LoRA: kohya's progress bar was not found ({missing}); mia_ce / mia_acc are "
                               "logged to kohya's trackers only")
            return
        original = bar.set_postfix
        run = self

        def set_postfix(ordered_dict=None, refresh=True, **kwargs):
            kwargs.update(run.postfix())
            return original(ordered_dict, refresh, **kwargs)

        bar.set_postfix = set_postfix

    def postfix(self) -> Dict[str, str]:
        return self.reg.progress_postfix()

    def regularize(self, trainer, loss: torch.Tensor, bound: inspect.BoundArguments) -> torch.Tensor:
        captured, self.captured = self.captured, None
        if captured is None:
            raise SmploraError(
                f"{type(trainer).__name__}.process_batch did not call get_noise_pred_and_target, so SMP-LoRA has "
                "no prediction to regularise; this trainer class is not supported.")
        pred, target, timesteps, reference = captured
        batch = bound.arguments["batch"]
        acc = bound.arguments["accelerator"]
        sync = bool(getattr(acc, "sync_gradients", True))
        rows = data.member_rows(batch, pred.shape[0])
        rows = rows[: self.reg.privacy_rows(len(rows))] if rows else None   # the first n member rows (n may be 0)
        # every process must call reg.step together and alike (it gathers features across ranks)
        state = _min_over_ranks(0 if rows is None else 2 if rows else 1, pred.device)
        if state == 0:   # a batch of regularisation / DOP images only, on some rank
            self.reg_only_batches += 1
            return loss
        if state == 1:   # no privacy row on this step (privacy_fraction over steps), on some rank: no features
            return self.reg.step(loss, None, update_attacker=sync, keep_loss_value=True)
        if len(rows) < pred.shape[0]:
            idx = torch.tensor(rows, device=pred.device)
            pred, target = pred.index_select(0, idx), target.index_select(0, idx)
            if reference is not None:
                reference = reference.index_select(0, idx.to(reference.device))
            if isinstance(timesteps, torch.Tensor) and timesteps.ndim > 0 and timesteps.shape[0] > max(rows):
                timesteps = timesteps.index_select(0, idx.to(timesteps.device))
        member = self.reg.features(pred, target, timesteps, reference=reference)
        self.feature_rows["member"] += len(rows)
        nonmember = None
        if sync and self.reg.wants_nonmembers(update_attacker=True):
            nonmember = self.nonmember_features(trainer, bound)
        # keep_loss_value: kohya's avr_loss keeps showing the denoising loss; the gradient is the regularised one's
        return self.reg.step(loss, member, nonmember, update_attacker=sync, keep_loss_value=True)

    def nonmember_features(self, trainer, bound: inspect.BoundArguments) -> torch.Tensor:
        """One no-grad forward of the current model on a kohya validation (non-member) batch, cut to its first
        ``reg.nonmember_rows(size)`` samples (:func:`data.first_rows`), so that with calibrated features its base
        replay runs on those samples only."""
        acc = bound.arguments["accelerator"]
        if self.pool is None:
            self.pool = data.NonmemberPool(self.val_group, self.settings.config.seed,
                                           rank=getattr(acc, "process_index", 0),
                                           world_size=getattr(acc, "num_processes", 1))
        counter = self.reg.attacker_updates
        a = bound.arguments
        device = getattr(acc, "device", None)
        with data.forked_rng(self.settings.config.seed * 7919 + counter, device), torch.no_grad():
            nm_batch = self.pool.batch(counter)
            size = data.batch_rows(nm_batch)
            rows = None if size is None else self.reg.nonmember_rows(size)
            cut = rows is not None and rows < size
            if cut:
                nm_batch = data.first_rows(nm_batch, rows, size)
            hook_args = (a["args"], acc, a["network"], a["text_encoders"], a["unet"], nm_batch, a["weight_dtype"])
            trainer.on_step_start(*hook_args, is_train=False)
            call = inspect.BoundArguments(bound.signature, bound.arguments.copy())
            call.arguments["batch"] = nm_batch
            call.arguments["is_train"] = False
            self.captured, self.capturing, outer = None, True, self.batch_args
            self.batch_args = call.arguments
            try:
                trainer.process_batch(*call.args, **call.kwargs)
            finally:
                self.capturing, self.batch_args = False, outer
            captured, self.captured = self.captured, None
            trainer.on_validation_step_end(*hook_args)
            if captured is None:
                raise SmploraError("the non-member forward did not reach get_noise_pred_and_target.")
            pred, target, timesteps, reference = captured
            if cut and pred.shape[0] != rows:
                raise SmploraError(
                    f"the non-member forward of {type(trainer).__name__} returned {pred.shape[0]} predictions for a "
                    f"batch cut to its first {rows} of {size} samples (privacy_fraction="
                    f"{self.settings.config.privacy_fraction:g}); the batch holds a per-sample entry that was not "
                    "cut. Use --privacy_fraction 1.")
            self.feature_rows["nonmember"] += int(pred.shape[0])
            return self.reg.features(pred, target, timesteps, reference=reference)

    # ------------------------------------------------------------------ saving
    def after_checkpoint(self, ckpt_file: str) -> None:
        if not self.is_main:
            return
        path = state_path_for_checkpoint(ckpt_file)
        self.save_state(path)
        m = self.reg.metrics()
        logger.info(f"SMP-LoRA: attacker state saved to {path} (step {int(m['step'])}, attacker CE on members "
                    f"{m.get('attacker_ce_member', float('nan')):.4f}, attacker accuracy "
                    f"{m.get('attacker_acc', float('nan')):.3f})")
        # drop states whose checkpoint kohya has removed (--save_last_n_steps / --save_last_n_epochs)
        for old in path.parent.glob(f"*{STATE_SUFFIX}"):
            stem = old.name[: -len(STATE_SUFFIX)]
            if old != path and not any((old.parent / f"{stem}{ext}").exists() for ext in CHECKPOINT_EXTS):
                old.unlink(missing_ok=True)

    def save_state(self, path: Path) -> None:
        """Save the attacker state to ``path``; when the same state (same step and attacker counters) was just
        saved elsewhere (a checkpoint and its ``--save_state`` folder at the same step), hard-link that file
        instead, so the two names share one copy on disk (a plain save where links are not possible)."""
        reg = self.reg
        counters = (reg.global_step, reg.attacker_updates, reg.attacker_steps)
        if self.last_saved is not None and self.last_saved[0] == counters and self.last_saved[1].is_file():
            source = self.last_saved[1]
            try:
                if path.resolve() != source.resolve():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name(path.name + ".link-tmp")
                    tmp.unlink(missing_ok=True)
                    os.link(source, tmp)
                    os.replace(tmp, path)
                return
            except OSError:
                pass
        reg.save(path)
        self.last_saved = (counters, path)

    def file_metadata(self) -> Dict[str, str]:
        meta = self.reg.file_metadata()
        meta["smplora.integration"] = "kohya-sd-scripts"
        meta["smplora.data"] = json.dumps({"source": self.source or "validation", "counts": self.counts,
                                           "manifest": self.manifest.name if self.manifest else None,
                                           "reg_only_batches": self.reg_only_batches,
                                           "feature_rows": self.feature_rows,
                                           "resumed_from_step": self.resumed_from_step}, sort_keys=True)
        return meta


class SmploraTrainerMixin:
    """Mixin for kohya ``NetworkTrainer`` subclasses; must come first in the MRO."""

    _smplora_override: Optional[KohyaPrivacySettings] = None
    _smplora: Optional[_Run] = None

    # -------------------------------------------------------------- train
    def train(self, args, *rest, **kw):
        settings = self._smplora_override
        if settings is None:
            settings = settings_from_namespace(args)
        elif settings.holdout_dir is None and getattr(args, "privacy_holdout_dir", None):
            settings.holdout_dir = Path(args.privacy_holdout_dir)
        if not settings.enabled:
            self._smplora = None
            return super().train(args, *rest, **kw)
        run = _Run(settings)
        try:
            # the classes of this trainer below the mixin (kohya's, and any subclass of them)
            run.layout = reach.save_path([c for c in type(self).__mro__ if not issubclass(c, SmploraTrainerMixin)])
            run.prepare_args(args)     # every check that needs no dataset runs here, before kohya starts
        except BaseException:
            run.cleanup()
            raise
        self._smplora = run
        try:
            return super().train(args, *rest, **kw)
        finally:
            run.cleanup()
            if run.reg_only_batches:
                logger.info(f"SMP-LoRA: {run.reg_only_batches} batch(es) held only regularisation images and "
                            "were trained without the privacy term")

    # -------------------------------------------------------------- hooks
    def assert_extra_args(self, args, train_dataset_group, val_dataset_group, *rest, **kw):
        out = super().assert_extra_args(args, train_dataset_group, val_dataset_group, *rest, **kw)
        if self._smplora is not None:
            self._smplora.setup_datasets(args, train_dataset_group, val_dataset_group)
        return out

    def post_process_network(self, args, accelerator, network, *rest, **kw):
        run = self._smplora
        if run is not None:
            reach.network_saver(network, accelerator)       # right after kohya creates the network
            run.check_network(network, accelerator, args)
        parent = getattr(super(), "post_process_network", None)
        return None if parent is None else parent(args, accelerator, network, *rest, **kw)

    def get_noise_pred_and_target(self, *a, **kw):
        run = self._smplora
        call = super().get_noise_pred_and_target
        if run is None or not run.capturing:
            return call(*a, **kw)
        base = run.base_prediction(self, call, a, kw) if run.reg.config.calibrated else None
        inputs: list = []
        with (base_forward.record_inputs(base.denoiser, base.size, inputs) if base is not None and base.rows is not None
              else nullcontext()):
            out = call(*a, **kw)
        reference = None
        if base is not None:
            batch = inspect.signature(call).bind(*a, **kw).arguments.get("batch")
            reference = run.check_replay(self, base, out, batch, inputs)
        run.captured = (out[0], out[1], out[2] if len(out) > 2 else None, reference)
        return out

    def process_batch(self, *a, **kw):
        run = self._smplora
        if run is None:
            return super().process_batch(*a, **kw)
        sig = inspect.signature(super().process_batch)
        bound = sig.bind(*a, **kw)
        is_train = bound.arguments.get("is_train", sig.parameters["is_train"].default)
        if not is_train or run.capturing:
            return super().process_batch(*a, **kw)
        run.captured, run.capturing, run.batch_args = None, True, bound.arguments
        try:
            loss = super().process_batch(*a, **kw)
        finally:
            run.capturing, run.batch_args = False, None
        return run.regularize(self, loss, bound)

    def on_step_start(self, *a, **kw):
        out = super().on_step_start(*a, **kw)
        run = self._smplora
        if run is not None and not run.hooked:
            sig = inspect.signature(super().on_step_start)
            bound = sig.bind(*a, **kw)
            if bound.arguments.get("is_train", True):
                run.hook_up(self, bound)
        return out

    def get_sai_model_spec(self, *a, **kw):
        spec = super().get_sai_model_spec(*a, **kw)
        run = self._smplora
        if run is None:
            return spec
        spec = dict(spec or {})
        spec.update(run.file_metadata())
        return spec

    def generate_step_logs(self, *a, **kw):
        logs = super().generate_step_logs(*a, **kw)
        run = self._smplora
        if run is not None and isinstance(logs, dict):
            logs.update({f"smplora/{k}": v for k, v in run.reg.metrics().items()})
        return logs

    # -------------------------------------------------------------- access
    @property
    def privacy_regularizer(self) -> Optional[PrivacyRegularizer]:
        """The run's :class:`PrivacyRegularizer` (None before ``train()`` or with privacy off)."""
        return None if self._smplora is None else self._smplora.reg


def _min_over_ranks(value: int, device: torch.device) -> int:
    """The least ``value`` over the processes of a torch.distributed run (just ``value`` in a single process)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([int(value)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


_FIELD_FLAGS = {field: name for name, (field, _, _) in CONFIG_OPTIONS.items()}


def _flag(field: str, value: Any) -> str:
    """A config field and value as the kohya option that sets it."""
    if field == "objective":
        return f"--privacy {'smplora' if value == 'smp' else 'mplora'}"
    if field == "calibrated":
        return "--privacy_calibrated" if value else "--no-privacy_calibrated"
    if field == "hidden":
        value = ",".join(str(v) for v in value)
    elif field == "feature_grid":
        value = 0 if value is None else ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value
    return f"--{_FIELD_FLAGS.get(field, 'privacy_' + field)} {value}"
