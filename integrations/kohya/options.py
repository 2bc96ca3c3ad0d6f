"""Kohya-style ``--privacy*`` arguments, their TOML form, and their validation.

sd-scripts reads ``--config_file x.toml`` by flattening every section into one namespace and
letting argparse fill only what is missing, so TOML values skip argparse's ``type=`` and
``choices=`` checks. Everything is therefore validated here, whatever its source.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from smplora_plugin.config import PRESETS as CORE_PRESETS
from smplora_plugin.config import PrivacyConfig
from smplora_plugin.dp import DPError, DPOptions, dp_options
from smplora_plugin.errors import ConfigError

MODES = {"none": None, "smplora": "smp", "smp": "smp", "mplora": "mp", "mp": "mp", "dpsgd": None}
METHODS = ("none", "smplora", "mplora", "dpsgd")   # the --privacy choices
DP_ONLY = "dpsgd"                                  # DP-SGD alone: no SMP-LoRA term
TOML_SECTION = "smplora"
FLAG = "--privacy_"                                # how dp_options names the DP options in its messages

# kohya option name -> (PrivacyConfig field, argparse type, help)
CONFIG_OPTIONS: Dict[str, tuple] = {
    "privacy_alpha": ("alpha", float, "weight of the attacker's member cross-entropy (paper: 0.05)"),
    "privacy_beta": ("beta", float, "constant of the SMP denominator, > 0 (paper: 1)"),
    "privacy_delta": ("delta", float, "numerical guard of the SMP denominator (paper: 1e-5)"),
    "privacy_k_steps": ("k_steps", int, "proxy-attacker updates per optimiser step; 0 freezes it (paper: 1)"),
    "privacy_attacker_lr": ("attacker_lr", float, "Adam learning rate of the proxy attacker (paper: 1e-5)"),
    "privacy_attacker_weight_decay": ("attacker_weight_decay", float,
                                      "Adam weight decay of the attacker (paper: 1e-4)"),
    "privacy_attacker_hidden": ("hidden", str, "hidden widths of the attacker MLP, comma separated (paper: 512,256)"),
    "privacy_attacker_dropout": ("dropout", float, "dropout of the attacker while it trains (paper: 0.5)"),
    "privacy_feature_grid": ("feature_grid", str,
                             "loss maps are pooled per channel down to this grid: N or H,W; 0 = no pooling (default: "
                             "the preset's, paper 16, robust 32)"),
    "privacy_nonmember_every": ("nonmember_every", int,
                                "refresh the held-out forward every N attacker updates (default 4)"),
    "privacy_fraction": ("privacy_fraction", float, "share of the member images in the privacy term, in (0, 1], taken "
                         "over steps: step k uses the first ceil((k+1) F m) - ceil(k F m) of its m (at batch 1 and "
                         "0.25, one step in four); held-out forwards of ceil(F * batch) images (default: the "
                         "preset's: paper 1, robust 0.25)"),
    "privacy_seed": ("seed", int, "seed of the attacker and of the non-member draws (default: --seed, else 0)"),
}
PATH_OPTIONS: Dict[str, str] = {
    "privacy_holdout_dir": "non-member images in kohya's folder layout (DIR/<repeats>_<name>/*.png), never trained on",
    "privacy_manifest": "where to write the member / non-member manifest (default: "
                        "OUTPUT_DIR/OUTPUT_NAME_smplora_manifest.json)",
    "privacy_attacker_state": "an attacker state .safetensors to start from (default: the one in --resume DIR, if any)",
}
PRESETS = tuple(CORE_PRESETS)  # PrivacyConfig.preset names
PRESET_OPTIONS: Dict[str, str] = {
    "privacy_preset": "paper (default): the paper's hyperparameters. robust: base-calibrated features, alpha 20, "
                      "attacker lr 1e-3, privacy fraction 0.25 (stronger against the full attack suite; one extra "
                      "no-grad base forward per step). --privacy_* options override the preset's values",
    "privacy_calibrated": "the attacker sees loss maps minus the base model's (LoRA switched off) at the same noisy "
                          "input; costs a no-grad base forward per step (default: the preset's; robust turns it on)",
}
# kohya option name -> (dp_options keyword, argparse type, help); checked by smplora_plugin.dp.dp_options
DP_OPTIONS: Dict[str, tuple] = {
    "privacy_noise_multiplier": ("noise_multiplier", float,
                                 "DP noise: sigma of the Gaussian noise added to the clipped per-sample gradients "
                                 "at every optimiser step, e.g. 1.0. With --privacy dpsgd (DP-SGD alone) or "
                                 "--privacy smplora / mplora (SMP-LoRA + DP noise)"),
    "privacy_max_grad_norm": ("max_grad_norm", float,
                              "DP noise: the clip C of each image's gradient norm over the LoRA (default 1.0)"),
    "privacy_target_epsilon": ("target_epsilon", float,
                               "DP noise: choose sigma so that max_train_steps steps spend this epsilon (instead "
                               "of --privacy_noise_multiplier)"),
    "privacy_dp_delta": ("delta", float,
                         "DP noise: the delta of the reported epsilon, in (0, 1) (default 1/(N ln N) of N training "
                         "rows; not --privacy_delta, which is SMP-LoRA's denominator constant)"),
    "privacy_dp_accountant": ("accountant", str, "DP noise: rdp (Renyi DP, default) or prv (tighter, slower)"),
}
ALL_OPTIONS = {"privacy", *CONFIG_OPTIONS, *PRESET_OPTIONS, *PATH_OPTIONS, *DP_OPTIONS}


@dataclass
class KohyaPrivacySettings:
    """Validated privacy settings of one kohya run."""

    objective: Optional[str]                      # "smp", "mp", or None (off, or DP-SGD alone)
    config: Optional[PrivacyConfig] = None        # None without an SMP-LoRA term
    holdout_dir: Optional[Path] = None
    manifest: Optional[Path] = None
    attacker_state: Optional[Path] = None
    sources: Dict[str, str] = field(default_factory=dict)  # option -> "cli/toml" provenance, for messages
    dp: Optional[DPOptions] = None                # DP noise (--privacy dpsgd, or SMP-LoRA + DP noise)
    dp_seed: int = 0                              # the DP noise seed without an SMP config (--privacy dpsgd)

    @property
    def enabled(self) -> bool:
        return self.objective is not None or self.dp is not None

    @property
    def method(self) -> str:
        """The ``--privacy`` word: ``smplora``, ``mplora``, ``dpsgd`` or ``none``."""
        if self.objective is None:
            return DP_ONLY if self.dp is not None else "none"
        return "smplora" if self.objective == "smp" else "mplora"

    @property
    def seed(self) -> int:
        """``--privacy_seed`` (else ``--seed``, else 0): the attacker's, the held-out draws', the DP noise's."""
        return self.config.seed if self.config is not None else self.dp_seed


def add_privacy_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--privacy*`` options to a kohya parser (snake_case, no ``required=``)."""
    group = parser.add_argument_group("privacy (smplora-plugin: SMP-LoRA membership-inference defense)")
    existing = {a.dest for a in parser._actions}
    if "privacy" in existing:  # already extended (e.g. setup_parser called twice)
        return parser
    group.add_argument("--privacy", type=str, default=None, choices=list(METHODS),
                       help="membership-inference defense: smplora (SMP-LoRA, recommended), mplora (baseline), "
                            "dpsgd (DP-SGD alone: clipped, noised per-sample gradients, an epsilon; needs "
                            "--privacy_noise_multiplier or --privacy_target_epsilon) or none")
    group.add_argument("--privacy_preset", type=str.lower, default=None, choices=list(PRESETS),
                       help=PRESET_OPTIONS["privacy_preset"])
    group.add_argument("--privacy_calibrated", action=argparse.BooleanOptionalAction, default=None,
                       help=PRESET_OPTIONS["privacy_calibrated"])
    for name, (_, typ, help_) in CONFIG_OPTIONS.items():
        group.add_argument(f"--{name}", type=typ, default=None, help=help_)
    for name, help_ in PATH_OPTIONS.items():
        group.add_argument(f"--{name}", type=str, default=None, help=help_)
    for name, (_, typ, help_) in DP_OPTIONS.items():
        group.add_argument(f"--{name}", type=typ, default=None, help=help_)
    return parser


def check_toml_section(path: Optional[str]) -> None:
    """Refuse keys in the ``[smplora]`` TOML section that kohya would flatten into its own options."""
    if not path:
        return
    file = Path(path if str(path).endswith(".toml") else f"{path}.toml")
    if not file.is_file():
        return  # kohya itself reports a missing --config_file
    data = _load_toml(file)
    section = data.get(TOML_SECTION)
    if section is None:
        return
    if not isinstance(section, dict):
        raise ConfigError(f"{file}: '{TOML_SECTION}' must be a table ([{TOML_SECTION}]), got {type(section).__name__}.")
    for key in section:
        if key not in ALL_OPTIONS:
            hint = _suggest(key if key.startswith("privacy") else f"privacy_{key}")
            raise ConfigError(
                f"{file}: key '{key}' in [{TOML_SECTION}] is not a privacy option. sd-scripts flattens every TOML "
                f"section into its own arguments, so only privacy / privacy_* keys belong there.{hint}"
            )


def settings_from_namespace(args: argparse.Namespace) -> KohyaPrivacySettings:
    """Validate the ``privacy*`` attributes of a kohya namespace (CLI or TOML) into settings.

    Raises :class:`ConfigError` naming the option, its value and the accepted values (:class:`DPError` for the
    DP options, checked by :func:`smplora_plugin.dp.dp_options`).
    """
    values = vars(args)
    unknown = sorted(k for k in values if k.startswith("privacy") and k not in ALL_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown privacy option(s) {unknown}.{_suggest(unknown[0])} "
                          f"Valid options: {sorted(ALL_OPTIONS)}.")
    check_toml_section(values.get("config_file"))
    raw_mode = values.get("privacy")
    mode = "none" if raw_mode is None else raw_mode
    if not isinstance(mode, str) or mode.lower() not in MODES:
        raise ConfigError(f"privacy={raw_mode!r} is unknown: use 'smplora' (SMP-LoRA, recommended), 'mplora' "
                          "(MP-LoRA baseline), 'dpsgd' (DP-SGD alone) or 'none'.")
    mode = mode.lower()
    objective = MODES[mode]
    cfg_values = {k: values.get(k) for k in CONFIG_OPTIONS if values.get(k) is not None}
    preset_values = {k: values.get(k) for k in PRESET_OPTIONS if values.get(k) is not None}
    path_values = {k: values.get(k) for k in PATH_OPTIONS if values.get(k) is not None}
    dp_values = {k: values.get(k) for k in DP_OPTIONS if values.get(k) is not None}
    if mode == "none":
        if dp_values:
            raise DPError(f"{', '.join('--' + k for k in sorted(dp_values))} given with --privacy none: this run "
                          "would train without DP noise. Pass --privacy dpsgd (DP-SGD alone) or --privacy smplora "
                          "(SMP-LoRA + DP noise) with them, or drop them.")
        if cfg_values or preset_values or path_values:
            given = sorted({*cfg_values, *preset_values, *path_values})
            logging.getLogger("smplora.kohya").warning(
                f"privacy options {given} are ignored because --privacy is 'none': this run has NO membership-"
                "inference defense (add --privacy smplora to enable it).")
        return KohyaPrivacySettings(objective=None)
    seed = cfg_values.get("privacy_seed")
    if seed is None:
        seed = values.get("seed")
        seed = int(seed) if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 else 0
    if mode == DP_ONLY:
        return _dp_only_settings(cfg_values, preset_values, path_values, dp_values, seed)
    dp = _dp(mode, dp_values, seed if isinstance(seed, int) and not isinstance(seed, bool) else 0)
    preset = _preset(preset_values.get("privacy_preset", "paper"))
    fields: Dict[str, Any] = {"objective": objective, "seed": seed}
    if "privacy_calibrated" in preset_values:
        fields["calibrated"] = _bool(preset_values["privacy_calibrated"], "privacy_calibrated")
    for name, value in cfg_values.items():
        field_name = CONFIG_OPTIONS[name][0]
        if field_name == "hidden":
            value = _int_list(value, name)
        elif field_name == "feature_grid":
            value = _grid(value, name)
        fields[field_name] = value
    if dp is not None:
        # under DP noise every row has its per-sample term (PrivacyRegularizer.step_per_sample): no fraction
        fraction = fields.get("privacy_fraction", 1.0)
        if fraction != 1.0:
            raise DPError(f"privacy_fraction={fraction!r} with DP noise: every image of a batch has its own SMP-LoRA "
                          "term under DP noise (a share of the images would couple the samples), so the fraction "
                          "does not apply. Drop --privacy_fraction (or set it to 1).")
        fields["privacy_fraction"] = 1.0   # also over a preset's fraction (robust: 0.25), so the header says so
    try:
        config = PrivacyConfig.preset(preset, **fields)   # explicit options override the preset
    except ConfigError as exc:
        raise ConfigError(f"invalid privacy option: {exc} (kohya option names: --privacy_<field>, e.g. "
                          "--privacy_alpha; TOML values are checked the same way).") from None
    settings = KohyaPrivacySettings(objective=objective, config=config, dp=dp, dp_seed=config.seed)
    _paths(settings, path_values)
    return settings


def _dp(mode: str, dp_values: Mapping[str, Any], seed: int) -> Optional[DPOptions]:
    """The DP options (``None``: no DP noise), checked by :func:`smplora_plugin.dp.dp_options`."""
    kwargs = {DP_OPTIONS[k][0]: v for k, v in dp_values.items()}
    kwargs.setdefault("accountant", "rdp")
    return dp_options(mode, seed=seed, flag=FLAG, **kwargs)


def _dp_only_settings(cfg_values: Mapping[str, Any], preset_values: Mapping[str, Any],
                      path_values: Mapping[str, Any], dp_values: Mapping[str, Any], seed: Any) -> KohyaPrivacySettings:
    """``--privacy dpsgd``: DP-SGD alone. No attacker, so its options are refused; a holdout is optional."""
    smp_only = sorted({*(k for k in cfg_values if k != "privacy_seed"), *preset_values,
                       *(k for k in path_values if k == "privacy_attacker_state")})
    if smp_only:
        raise ConfigError(f"{', '.join('--' + k for k in smp_only)} set SMP-LoRA's proxy attacker, which --privacy "
                          "dpsgd (DP-SGD alone) does not train: drop them, or use --privacy smplora with "
                          "--privacy_noise_multiplier S (SMP-LoRA + DP noise).")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"privacy_seed={seed!r} must be a non-negative integer (the DP noise seed).")
    settings = KohyaPrivacySettings(objective=None, dp=_dp(DP_ONLY, dp_values, seed), dp_seed=seed)
    _paths(settings, path_values)
    return settings


def _paths(settings: KohyaPrivacySettings, path_values: Mapping[str, Any]) -> None:
    for name, value in path_values.items():
        if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
            raise ConfigError(f"{name}={value!r} must be a path.")
    if "privacy_holdout_dir" in path_values:
        settings.holdout_dir = Path(path_values["privacy_holdout_dir"]).expanduser()
    if "privacy_manifest" in path_values:
        settings.manifest = Path(path_values["privacy_manifest"]).expanduser()
    if "privacy_attacker_state" in path_values:
        settings.attacker_state = Path(path_values["privacy_attacker_state"]).expanduser()
        if not settings.attacker_state.is_file():
            raise ConfigError(f"privacy_attacker_state={str(settings.attacker_state)!r} does not exist; pass a "
                              "*.smplora_state.safetensors file written by an earlier run.")


def settings_from_mapping(config: Any, base: Optional[KohyaPrivacySettings] = None) -> KohyaPrivacySettings:
    """Settings for in-process callers: a :class:`PrivacyConfig`, or a mapping of core fields
    (``alpha``...) and/or kohya option names (``privacy_alpha``, ``privacy_holdout_dir``...)."""
    if isinstance(config, PrivacyConfig):
        out = base or KohyaPrivacySettings(objective=config.objective)
        out.objective, out.config = config.objective, config
        return out
    if not isinstance(config, Mapping):
        raise ConfigError(f"config must be a PrivacyConfig or a mapping, got {type(config).__name__}.")
    core_fields = {f.name for f in dataclasses.fields(PrivacyConfig)}   # a core field may itself start with privacy_
    kohya_style = {k: v for k, v in config.items()
                   if (k == "privacy" or str(k).startswith("privacy_")) and k not in core_fields}
    core = {k: v for k, v in config.items() if k not in kohya_style}
    ns = argparse.Namespace(**kohya_style)
    if "privacy" not in kohya_style:
        ns.privacy = "mplora" if str(core.get("objective", "smp")).lower() in ("mp", "mplora", "sum") else "smplora"
    settings = settings_from_namespace(ns)
    if core:
        if settings.config is None:
            raise ConfigError(f"{sorted(core)} set SMP-LoRA's proxy attacker, which privacy='dpsgd' (DP-SGD alone) "
                              "does not train: drop them, or use privacy='smplora' with privacy_noise_multiplier.")
        try:
            settings.config = PrivacyConfig.from_dict({**settings.config.to_dict(), **core})
        except ConfigError as exc:
            raise ConfigError(f"invalid privacy config: {exc}") from None
        settings.objective = settings.config.objective
        if settings.dp is not None and settings.config.privacy_fraction != 1.0:
            raise DPError(f"privacy_fraction={settings.config.privacy_fraction!r} with DP noise: every image has its "
                          "own SMP-LoRA term under DP noise, so the fraction does not apply. Drop it.")
        settings.dp_seed = settings.config.seed
        if settings.dp is not None and settings.dp.seed != settings.config.seed:
            settings.dp = dataclasses.replace(settings.dp, seed=settings.config.seed)
    return settings


def _preset(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in PRESETS:
        raise ConfigError(f"privacy_preset={value!r} is unknown: use 'paper' (the paper's hyperparameters, default) or "
                          "'robust' (base-calibrated features, alpha 20, attacker lr 1e-3, privacy fraction 0.25).")
    return value.lower()


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be true or false (in TOML unquoted: {name} = true; on the command "
                          f"line --{name} or --no-{name}).")
    return value


def _int_list(value: Any, name: str):
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, str):
        items = [v for v in value.replace(" ", "").split(",") if v]
    else:
        raise ConfigError(f"{name}={value!r} must be comma-separated positive ints, e.g. '512,256'.")
    try:
        out = tuple(int(v) for v in items)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} must be comma-separated positive ints, e.g. '512,256'.") from None
    if not out or any(v <= 0 for v in out):
        raise ConfigError(f"{name}={value!r} must be comma-separated positive ints, e.g. '512,256'.")
    return out


def _grid(value: Any, name: str):
    if value in (0, "0", "none", "None"):
        return None
    grid = _int_list(value, name)
    if len(grid) == 1:
        return grid[0]
    if len(grid) != 2:
        raise ConfigError(f"{name}={value!r} must be N, H,W or 0 (no pooling).")
    return grid


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, sorted(ALL_OPTIONS), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _load_toml(file: Path) -> dict:
    try:
        import tomllib  # Python >= 3.11

        with open(file, "rb") as f:
            return tomllib.load(f)
    except ModuleNotFoundError:
        import toml  # sd-scripts' own dependency on Python 3.10

        return toml.load(str(file))
    except Exception as exc:  # noqa: BLE001 - report any parse error clearly
        raise ConfigError(f"{file} is not valid TOML ({exc}).") from exc
