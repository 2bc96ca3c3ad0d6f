"""The ``--privacy*`` options of a diffusers training script and the :class:`PrivacyConfig` they select."""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Tuple, Union

import torch

from smplora_plugin.config import PRESETS, PrivacyConfig
from smplora_plugin.dp.errors import DPError
from smplora_plugin.dp.training import DP_ONLY, DPOptions, check_mixed_precision, dp_options
from smplora_plugin.errors import ConfigError, HoldoutError

#: ``--privacy`` value -> the core's objective (``None``: no regulariser; ``dpsgd``: DP-SGD alone, no regulariser)
METHODS = {"none": None, "smplora": "smp", "smp": "smp", "mplora": "mp", "mp": "mp", "dpsgd": None}

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
                        "(MP-LoRA baseline: loss - alpha * attacker CE); smp / mp are aliases. dpsgd: DP-SGD alone "
                        "(per-sample clipping and Gaussian noise, no attacker; needs --privacy_noise_multiplier or "
                        "--privacy_target_epsilon). smplora / mplora with a noise level: that objective under DP "
                        "noise.")
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
                   help="Seed of the attacker, of the holdout order and of the DP noise (default: --seed, else 0).")
    # DP-SGD (smplora_plugin.dp): all default to None, so that a run without a noise level has no DP part
    g.add_argument("--privacy_noise_multiplier", type=float, default=None,
                   help="DP noise sigma: each optimiser step adds N(0, (sigma * clip)^2) to the sum of the clipped "
                        "per-sample gradients of the LoRA (with --privacy dpsgd, or smplora / mplora for "
                        "SMP-LoRA + DP noise).")
    g.add_argument("--privacy_target_epsilon", type=float, default=None,
                   help="Instead of --privacy_noise_multiplier: the smallest sigma whose planned steps "
                        "(--max_train_steps) spend at most this epsilon at --privacy_dp_delta.")
    g.add_argument("--privacy_max_grad_norm", type=float, default=None,
                   help="DP per-sample clip C: each sample's gradient over all LoRA parameters is scaled to norm at "
                        "most C (default 1.0; the script's --max_grad_norm then acts on a discarded gradient).")
    g.add_argument("--privacy_dp_delta", type=float, default=None,
                   help="The delta of the reported epsilon, in (0, 1) (default 1/(N ln N) for N training images). "
                        "Not --privacy_delta, which is SMP-LoRA's denominator constant.")
    g.add_argument("--privacy_dp_accountant", type=str.lower, default=None, choices=("rdp", "prv"),
                   help="The epsilon's accountant (Opacus): rdp (Renyi DP, default) or prv (tighter, slower).")
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


def privacy_method(args: Any) -> str:
    """``--privacy``, lower-cased and checked (:class:`ConfigError` naming the valid values)."""
    method = str(option(args, "privacy", "none")).lower()
    if method not in METHODS:
        smp = ", ".join(m for m in METHODS if m not in DP_ONLY)
        raise ConfigError(f"--privacy {method!r} is unknown; choose one of {smp} (smp and mp are short for smplora "
                          f"and mplora), or {' / '.join(DP_ONLY)} (DP-SGD alone).")
    return method


def dp_options_from_args(args: Any) -> Optional[DPOptions]:
    """The DP part of the ``--privacy*`` options (:func:`smplora_plugin.dp.dp_options`), or ``None`` without a
    noise level; :class:`~smplora_plugin.dp.DPError` naming the fix for bad input, before anything is built.

    Besides the options themselves it refuses what the mechanism cannot honour in a diffusers script: a noise
    level with ``--privacy none``, fp16 mixed precision (a GradScaler'd loss is clipped at the scaled norm),
    ``--with_prior_preservation`` (class images in the batch), ``--train_text_encoder`` (a second network), and
    under SMP-LoRA + DP noise ``--snr_gamma`` (its objective is the plain per-sample MSE) and a
    ``--privacy_fraction`` below 1 (every sample gets its own term).
    """
    method = privacy_method(args)
    opts = dp_options(method, noise_multiplier=option(args, "privacy_noise_multiplier"),
                      max_grad_norm=option(args, "privacy_max_grad_norm"),
                      target_epsilon=option(args, "privacy_target_epsilon"),
                      delta=option(args, "privacy_dp_delta"), accountant=option(args, "privacy_dp_accountant", "rdp"),
                      seed=privacy_seed(args), flag="--privacy_")
    if opts is None:
        return None
    if METHODS[method] is None and method not in DP_ONLY:
        raise DPError("--privacy_noise_multiplier / --privacy_target_epsilon need a privacy method: --privacy dpsgd "
                      "(DP-SGD alone) or --privacy smplora / mplora (that objective under DP noise).")
    check_mixed_precision(option(args, "mixed_precision", "no"))
    for name, what in (("with_prior_preservation", "class images share the batch, so a per-sample gradient is not "
                                                   "one training image's"),
                       ("train_text_encoder", "the text encoder's LoRA is a second network the mechanism does not "
                                              "clip")):
        if option(args, name):
            raise DPError(f"--{name} with DP noise is not supported: {what}. Drop --{name}, or train without "
                          "--privacy_noise_multiplier / --privacy_target_epsilon.")
    if METHODS[method] is not None:
        if option(args, "snr_gamma") is not None:
            raise DPError(f"--snr_gamma with --privacy {method} and DP noise is not supported: the per-sample "
                          "objective is each image's plain MSE of model_pred and target, and min-SNR weighting would "
                          "not be in it. Drop --snr_gamma (or use --privacy dpsgd, which trains the script's loss as "
                          "it is).")
        fraction = option(args, "privacy_fraction")
        if fraction is not None and fraction != 1:
            raise DPError(f"--privacy_fraction {fraction:g} does not apply under DP noise: every sample of the batch "
                          "gets its own SMP-LoRA term. Drop --privacy_fraction.")
    return opts


def privacy_config_from_args(args: argparse.Namespace, device: Optional[Union[str, torch.device]] = None
                             ) -> Optional[PrivacyConfig]:
    """The :class:`PrivacyConfig` selected by ``--privacy*`` options; ``None`` for ``--privacy none``.

    Starts from ``--privacy_preset`` (default ``paper``) and applies the ``--privacy_*`` values that
    were given (not ``None``); ``None`` for ``--privacy dpsgd`` too (DP-SGD alone has no regulariser).
    Raises :class:`~smplora_plugin.errors.ConfigError` for an unknown ``--privacy`` method or invalid
    values, :class:`~smplora_plugin.dp.DPError` for bad DP options (:func:`dp_options_from_args`), and
    :class:`~smplora_plugin.errors.HoldoutError` when a privacy method is chosen without
    ``--privacy_holdout_dir``.
    """
    method = privacy_method(args)
    dp_options_from_args(args)        # the DP options too, so that every entry point refuses them first
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
