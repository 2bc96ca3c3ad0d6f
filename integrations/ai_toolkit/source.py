"""The pieces of ai-toolkit the shim uses, in one table, checked on the live classes and in a checkout's source.

Built against ostris/ai-toolkit master ``27a03a91`` (2026-08-21, ``version.py`` 0.12.26). Every method the
process class overrides or calls, with the parameters it passes or reads, and the lines it relies on inside
them (the save path, the progress bar, the loss target's branches) are listed in :data:`PIECES`:

- :func:`check_classes` runs when a ``sd_trainer_smplora`` process is built, before ai-toolkit writes anything,
  on the imported ``SDTrainer`` (and, through it, ``BaseSDTrainProcess``);
- :func:`source_problems` reads a checkout's files without importing them (``smplora-ai-toolkit install`` and
  ``check``, ``tests/test_ai_toolkit_source.py``).

Either refuses a checkout that lacks a piece with :class:`AiToolkitVersionError`, naming the piece and 27a03a91.
"""

from __future__ import annotations

import ast
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from smplora_plugin.errors import SmploraError

TESTED_COMMIT = "27a03a91"
TESTED = "ai-toolkit master 27a03a91 (2026-08-21, version 0.12.26)"
PathLike = Union[str, "os.PathLike[str]"]


class AiToolkitVersionError(SmploraError):
    """The ai-toolkit checkout lacks a piece the shim uses (it is older or newer than the tested layout)."""


@dataclass(frozen=True)
class Piece:
    """One function or method the shim relies on."""

    file: str                      # path in the checkout
    cls: Optional[str]             # its class, None for a module-level function
    name: str
    params: Tuple[str, ...] = ()   # parameter names it must take (besides self)
    uses: Tuple[str, ...] = ()     # text its body must contain (source check only)
    why: str = ""

    @property
    def label(self) -> str:
        return f"{self.file}: {self.cls + '.' if self.cls else ''}{self.name}"


BASE = "jobs/process/BaseSDTrainProcess.py"
SDT = "extensions_built_in/sd_trainer/SDTrainer.py"
PIECES: Tuple[Piece, ...] = (
    Piece("toolkit/extension.py", None, "get_all_extensions", (), ("AI_TOOLKIT_EXTENSIONS", "'extensions'"),
          "finds the module `smplora-ai-toolkit install` writes into extensions/"),
    Piece("toolkit/extension.py", "Extension", "get_process", (), (), "an extension hands over its process class"),
    Piece(BASE, "BaseSDTrainProcess", "__init__", ("process_id", "job", "config"), (),
          "the privacy block is checked before it writes the config copy"),
    Piece(BASE, "BaseSDTrainProcess", "save", ("step",),
          ("self.update_training_metadata()", "self.network.save_weights(", "self.clean_up_saves()"),
          "each LoRA checkpoint: smplora.* header keys, attacker state next to it"),
    Piece(BASE, "BaseSDTrainProcess", "update_training_metadata", (), ("self.add_meta(",),
          "the smplora.* keys join ai-toolkit's header keys"),
    Piece(BASE, "BaseSDTrainProcess", "load_weights", ("path",), (), "a resumed checkpoint: its attacker state"),
    Piece(BASE, "BaseSDTrainProcess", "get_latest_save_path", ("name", "post"), (), "the checkpoint a run resumes"),
    Piece(BASE, "BaseSDTrainProcess", "before_dataset_load", (), (), "the held-out dataset is built next to the "
          "training datasets"),
    Piece(BASE, "BaseSDTrainProcess", "run", (),
          ("self.before_dataset_load()", "self.load_weights(", "self.hook_train_loop(",
           "self.progress_bar.set_postfix_str(", "self.additional_logs", "self.is_grad_accumulation_step"),
          "the training loop: resume, steps, progress bar (mia_*), trackers"),
    Piece(SDT, "SDTrainer", "calculate_loss",
          ("noise_pred", "noise", "noisy_latents", "timesteps", "batch", "mask_multiplier", "prior_pred"),
          ("get_loss_target", "is_flow_matching", "get_velocity(batch.tensor, noise, timesteps)",
           "(noise - batch.latents)"),
          "the trainer's loss, and the target rule the members' loss maps follow"),
    Piece(SDT, "SDTrainer", "predict_noise",
          ("noisy_latents", "timesteps", "conditional_embeds", "unconditional_embeds", "batch", "is_primary_pred"), (),
          "the training forward's inputs, replayed with the LoRA off for calibrated features"),
    Piece(SDT, "SDTrainer", "train_single_accumulation", ("batch",),
          ("is_primary_pred=True", "self.calculate_loss(", "self.accelerator.backward("),
          "one batch's forward: members through the trainer's own path, held-out batches without the backward"),
    Piece(SDT, "SDTrainer", "hook_train_loop", ("batch",), ("self.train_single_accumulation(", "self.optimizer.step()"),
          "one optimiser step over its batches (with DP noise, the step the noised gradient is written before)"),
    Piece("toolkit/data_loader.py", None, "get_dataloader_from_datasets", ("dataset_options", "batch_size", "sd"), (),
          "the held-out images prepared like the training images"),
    Piece("toolkit/network_mixins.py", "ToolkitNetworkMixin", "__init__", (), ("self.is_active",),
          "the LoRA switched off (is_active) for the base prediction"),
)
#: the classes the live check reads, by the file that defines them
LIVE_FILES = (BASE, SDT)


def _problem(piece: Piece, what: str) -> str:
    return f"{piece.label} {what} (used for: {piece.why})"


def class_problems(trainer_cls: type) -> List[str]:
    """What the live ``SDTrainer`` class (or a subclass of it) lacks of :data:`PIECES` (methods and parameters)."""
    problems = []
    for piece in PIECES:
        if piece.file not in LIVE_FILES:
            continue
        fn = getattr(trainer_cls, piece.name, None)
        if not callable(fn):
            problems.append(_problem(piece, "is missing"))
            continue
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            continue
        names = [n for n in sig.parameters if n != "self"]
        missing = [p for p in piece.params if p not in names]
        if missing:
            problems.append(_problem(piece, f"takes no parameter {', '.join(missing)}"))
    return problems


def check_classes(trainer_cls: type) -> None:
    """Raise :class:`AiToolkitVersionError` when ``trainer_cls`` lacks a piece (:func:`class_problems`)."""
    problems = class_problems(trainer_cls)
    if problems:
        raise AiToolkitVersionError(refusal(problems))


def refusal(problems: List[str], where: str = "this ai-toolkit") -> str:
    """The message that refuses a checkout with ``problems``."""
    return (f"{where} does not have the layout the SMP-LoRA process was built for ({TESTED}): "
            + "; ".join(problems) + ". Nothing was trained or written. Use ai-toolkit at 27a03a91 (git checkout "
            "27a03a91), or train with type: sd_trainer (no privacy term) until smplora-plugin supports this version.")


def source_problems(root: PathLike) -> List[str]:
    """What the checkout at ``root`` lacks of :data:`PIECES`, read from its files (nothing is imported)."""
    root = Path(root)
    problems: List[str] = []
    trees: Dict[str, Optional[Tuple[ast.Module, str]]] = {}
    for piece in PIECES:
        if piece.file not in trees:
            trees[piece.file] = _parse(root / piece.file)
        parsed = trees[piece.file]
        if parsed is None:
            problems.append(f"{piece.file} is missing or does not parse")
            trees[piece.file] = None
            continue
        tree, text = parsed
        node = _find(tree, piece.cls, piece.name)
        if node is None:
            problems.append(_problem(piece, "is missing"))
            continue
        args = node.args
        names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
        missing = [p for p in piece.params if p not in names]
        if missing:
            problems.append(_problem(piece, f"takes no parameter {', '.join(missing)}"))
        body = _squash(ast.get_source_segment(text, node) or "")
        absent = [u for u in piece.uses if _squash(u) not in body]
        if absent:
            problems.append(_problem(piece, f"no longer contains {', '.join(repr(u) for u in absent)}"))
    sdt = trees.get(SDT)
    if sdt is not None:
        cls = next((n for n in sdt[0].body if isinstance(n, ast.ClassDef) and n.name == "SDTrainer"), None)
        if cls is not None and not any(isinstance(b, ast.Name) and b.id == "BaseSDTrainProcess" for b in cls.bases):
            problems.append(f"{SDT}: SDTrainer no longer subclasses BaseSDTrainProcess")
    return problems


def check_source(root: PathLike) -> None:
    """Raise :class:`AiToolkitVersionError` when the checkout at ``root`` lacks a piece (:func:`source_problems`)."""
    problems = source_problems(root)
    if problems:
        raise AiToolkitVersionError(refusal(problems, where=f"the ai-toolkit checkout {root}"))


def _parse(path: Path) -> Optional[Tuple[ast.Module, str]]:
    try:
        text = path.read_text(encoding="utf-8")
        return ast.parse(text), text
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _find(tree: ast.Module, cls: Optional[str], name: str) -> Any:
    scope: List[ast.stmt] = tree.body
    if cls is not None:
        owner = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
        if owner is None:
            return None
        scope = owner.body
    return next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name), None)


def _squash(text: str) -> str:
    return "".join(text.split())
