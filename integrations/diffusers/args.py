"""The ``--privacy*`` options of a diffusers training script and the :class:`PrivacyConfig` they select."""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Tuple, Union

import torch

from smplora_plugin.config import PRESETS, PrivacyConfig
from smplora_plugin.errors import ConfigError, HoldoutError

#: ``--privacy`` value -> the core's objective (``None``: no regulariser)
METHODS = {"none": None, "smplora": "smp", "smp": "smp", "mplora": "mp", "mp": "mp"}

# option name -> PrivacyConfig field
_ARG_FIELDS = {
    "privacy_alpha": "alpha", "privacy_beta": "beta", "privacy_delta": "delta", "privacy_k_steps": "k_steps",
    "privacy_attacker_lr": "attacker_lr", "privacy_attacker_weight_decay": "attacker_weight_decay",
    "privacy_attacker_dropout": "dropout", "privacy_calibrated": "calibrated",
    "privacy_nonmember_every": "nonmember_every", "privacy_fraction": "privacy_fraction",
}


def add_privacy_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--privacy*`` options (an argument group) to a training script's parser.

    ``--privacy_preset`` picks the base values (:meth:`PrivacyConfig.preset`); each ``--privacy_*``
    hyperparameter flag overrides the preset only when it is given on the command line.
    """
    d = PrivacyConfig()
    g = parser.add_argument_group("privacy (smplora-plugin: SMP-LoRA membership-inference defense)")
    g.add_argument("--privacy", type=str.lower, default="none", choices=sorted(METHODS),
                   help="none (default), smplora (SMP-LoRA: loss / (beta + alpha * attacker CE)) or mplora "
                        "(MP-LoRA baseline: loss - alpha * attacker CE); smp / mp are aliases.")
    g.add_argument("--privacy_preset", type=str.lower, default="paper", choices=tuple(PRESETS),
                   help="paper (default): the paper's hyperparameters. robust: base-calibrated features, alpha 20, "
                        "attacker lr 1e-3, privacy term on a quarter of each batch (stronger against the full attack "
                        "suite; one extra no-grad base forward on that quarter per step). --privacy_* flags below "
                        "override the preset's values.")
    g.add_argument("--privacy_calibrated", action=argparse.BooleanOptionalAction, default=None,
                   help="Attacker sees loss maps minus the base model's (LoRA disabled) at the same noisy input; "
                        "costs a no-grad base forward per step (default: the preset's; robust turns it on).")
    g.add_argument("--privacy_fraction", type=float, default=None,
                   help="Share of the training samples whose loss maps feed the privacy term, taken over steps: step k "
                        "uses the first ceil((k+1) f B) - ceil(k f B) of its batch of B (at batch 1 and 0.25, one step "
                        "in four; the base forward runs on those only); held-out batches hold ceil(f B). "
                        f"Default: the preset's (paper {d.privacy_fraction:g}, robust 0.25).")
    g.add_argument("--privacy_holdout_dir", type=str, default=None,
                   help="Folder of held-out (non-member) images with captions (metadata.jsonl or .txt files). "
                        "Required with --privacy; must not share any image with the training data.")
    g.add_argument("--privacy_holdout_batch_size", type=int, default=None,
                   help="Non-member images per process and optimiser step (default: the privacy term's share "
                        "of --train_batch_size, see --privacy_fraction).")
    g.add_argument("--privacy_holdout_caption_column", type=str, default=None,
                   help="Caption field of the holdout metadata.jsonl (default: --caption_column or 'text').")
    # default=None throughout: only flags given on the command line override the preset
    g.add_argument("--privacy_alpha", type=float, default=None,
                   help=f"Weight of the attacker's member CE (paper {d.alpha}, robust 20).")
    g.add_argument("--privacy_beta", type=float, default=None, help=f"SMP denominator constant (> 0; {d.beta}).")
    g.add_argument("--privacy_delta", type=float, default=None,
                   help=f"Numerical guard in the SMP denominator ({d.delta}).")
    g.add_argument("--privacy_k_steps", type=int, default=None,
                   help=f"Attacker updates per optimiser step ({d.k_steps}).")
    g.add_argument("--privacy_attacker_lr", type=float, default=None,
                   help=f"Attacker Adam learning rate (paper {d.attacker_lr}, robust 1e-3).")
    g.add_argument("--privacy_attacker_weight_decay", type=float, default=None,
                   help=f"Attacker Adam weight decay ({d.attacker_weight_decay}).")
    g.add_argument("--privacy_attacker_hidden", nargs="+", default=None, action=_HiddenWidths, metavar="WIDTH",
                   help=f"Hidden widths of the attacker MLP ({' '.join(map(str, d.hidden))}; '512,256' works too). "
                        "Stored as a comma-separated string, so that trackers' hyperparameter logging "
                        "(init_trackers(config=vars(args)), e.g. tensorboard) accepts it.")
    g.add_argument("--privacy_attacker_dropout", type=float, default=None, help=f"Attacker dropout ({d.dropout}).")
    g.add_argument("--privacy_feature_grid", type=int, default=None,
                   help="Loss maps are pooled per channel down to (never up to) this square grid (default: the "
                        "preset's, paper 16, robust 32; SD1.5 latents at 512 px are 64; 0 = no pooling).")
    g.add_argument("--privacy_nonmember_every", type=int, default=None,
                   help="Run the held-out forward every this many attacker updates and reuse its features in "
                        f"between (1 = every optimiser step, as in the paper; default {d.nonmember_every}).")
    g.add_argument("--privacy_seed", type=int, default=None,
                   help="Seed of the attacker and of the holdout order (default: --seed, else 0).")
    return parser


def _hidden_widths(value: Any) -> Tuple[int, ...]:
    """Attacker widths from ``"512,256"``, ``"512 256"`` or a sequence of ints / strings."""
    text = value if isinstance(value, str) else " ".join(map(str, value))
    try:
        widths = tuple(int(p) for p in text.replace(",", " ").split())
    except ValueError:
        widths = ()
    if not widths or any(w < 1 for w in widths):
        raise ConfigError(f"--privacy_attacker_hidden {value!r}: give positive ints, e.g. 512 256 (or 512,256).")
    return widths


class _HiddenWidths(argparse.Action):
    """``--privacy_attacker_hidden 512 256`` (or ``512,256``) stored as the string ``"512,256"``: a list in
    ``vars(args)`` would break ``accelerator.init_trackers(config=vars(args))`` with tensorboard, whose
    hyperparameter log takes only scalars and strings."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            widths = _hidden_widths(values)
        except ConfigError as exc:
            parser.error(str(exc))
        setattr(namespace, self.dest, ",".join(map(str, widths)))


def option(args: Any, name: str, default: Any = None) -> Any:
    """``args.<name>``, or ``default`` when the script has no such option or left it ``None``."""
    value = getattr(args, name, None)
    return default if value is None else value


def privacy_seed(args: Any) -> int:
    """``--privacy_seed``, else the script's ``--seed``, else 0."""
    seed = option(args, "privacy_seed")
    return int(option(args, "seed", 0) if seed is None else seed)


def privacy_config_from_args(args: argparse.Namespace, device: Optional[Union[str, torch.device]] = None
                             ) -> Optional[PrivacyConfig]:
    """The :class:`PrivacyConfig` selected by ``--privacy*`` options; ``None`` for ``--privacy none``.

    Starts from ``--privacy_preset`` (default ``paper``) and applies the ``--privacy_*`` values that
    were given (not ``None``). Raises :class:`~smplora_plugin.errors.ConfigError` for an unknown
    ``--privacy`` method or invalid values, and :class:`~smplora_plugin.errors.HoldoutError` when a
    privacy method is chosen without ``--privacy_holdout_dir``.
    """
    method = str(option(args, "privacy", "none")).lower()
    if method not in METHODS:
        raise ConfigError(f"--privacy {method!r} is unknown; choose one of {', '.join(METHODS)} "
                          "(smp and mp are short for smplora and mplora).")
    objective = METHODS[method]
    if objective is None:
        return None
    if not option(args, "privacy_holdout_dir"):
        raise HoldoutError(
            f"--privacy {method} needs non-member images: pass --privacy_holdout_dir pointing to held-out images "
            "of the same kind as the training set (never trained on), e.g. 10-20% of your data set aside."
        )
    overrides: Dict[str, Any] = {f: getattr(args, a) for a, f in _ARG_FIELDS.items() if option(args, a) is not None}
    if option(args, "privacy_attacker_hidden") is not None:
        overrides["hidden"] = _hidden_widths(args.privacy_attacker_hidden)
    grid = option(args, "privacy_feature_grid")
    if grid is not None:
        overrides["feature_grid"] = None if grid == 0 else grid
    overrides.update(objective=objective, seed=privacy_seed(args), device=None if device is None else str(device))
    return PrivacyConfig.preset(str(option(args, "privacy_preset", "paper")).lower(), **overrides)
