"""The ``privacy:`` block of an ai-toolkit process config: parsed, validated, and the train options it cannot run with.

A process of type ``sd_trainer_smplora`` reads one block next to ai-toolkit's own ``network:``, ``train:``... ::

    privacy:
      method: smplora              # smplora (SMP-LoRA, default), mplora (baseline), dpsgd (DP-SGD alone), none
      preset: robust               # paper (default) or robust, as in every other trainer
      holdout_folder: /data/holdout   # images never trained on (the proxy attacker's non-members)
      alpha: 20                    # any PrivacyConfig field overrides the preset (docs/configuration.md)
      noise_multiplier: 1.0        # DP noise (method dpsgd, or SMP-LoRA + DP noise); or target_epsilon: 8

Every key is checked here, before ai-toolkit writes anything; a bad one raises :class:`ConfigError` naming
``privacy.<key>`` (:class:`~smplora_plugin.dp.DPError` for the DP keys). The values go to
:class:`smplora_plugin.PrivacyConfig` and :func:`smplora_plugin.dp.dp_options` unchanged, so the presets,
defaults and ranges are the core's.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from smplora_plugin.config import PRESETS, PrivacyConfig
from smplora_plugin.dp import DPError, DPOptions, dp_options
from smplora_plugin.errors import ConfigError, HoldoutError

BLOCK = "privacy"
FLAG = f"{BLOCK}."                  # how dp_options names the DP keys in its messages
METHODS = {"smplora": "smp", "smp": "smp", "mplora": "mp", "mp": "mp", "none": None}
DP_METHOD = "dpsgd"                 # DP-SGD alone: ai-toolkit's own loss, no attacker
#: the DP keys (method dpsgd, or SMP-LoRA + DP noise) -> the dp_options keyword; ``delta`` stays SMP-LoRA's constant
DP_KEYS: Dict[str, str] = {"noise_multiplier": "noise_multiplier", "max_grad_norm": "max_grad_norm",
                           "target_epsilon": "target_epsilon", "dp_delta": "delta", "dp_accountant": "accountant"}
#: the block's own keys; the core's fields (alpha, beta, ...) are accepted under their own names
OWN_KEYS = ("method", "preset", "holdout_folder", "attacker_state")
CORE_KEYS = tuple(f.name for f in dataclasses.fields(PrivacyConfig) if f.name != "objective")
ALL_KEYS = (*OWN_KEYS, *CORE_KEYS, *DP_KEYS)
#: keys that configure the proxy attacker / SMP-LoRA term, which method dpsgd does not have
SMP_ONLY_KEYS = tuple(k for k in (*OWN_KEYS, *CORE_KEYS) if k not in ("method", "holdout_folder", "seed"))

# ai-toolkit train options that change the prediction or the target calculate_loss compares, or the batch the
# prediction covers, so that the shim cannot pair each member's prediction with its target: (default, why)
REFUSED_TRAIN_OPTIONS: Dict[str, tuple] = {
    "loss_target": ("noise", "the loss compares denoised latents, not the prediction and its target"),
    "train_turbo": (False, "the loss is on a turbo-processed prediction"),
    "t0_loss_target": (False, "the loss is on a stepped t0 prediction"),
    "match_noise_norm": (False, "the prediction is rescaled inside calculate_loss"),
    "pred_scaler": (1.0, "the prediction is rescaled inside calculate_loss"),
    "target_noise_multiplier": (1.0, "the target noise is rescaled inside calculate_loss"),
    "correct_pred_norm": (False, "the target noise is renormalised inside calculate_loss"),
    "do_signal_amplification": (False, "the target is amplified inside calculate_loss"),
    "do_guidance_loss": (False, "the target is a guidance extrapolation made inside calculate_loss"),
    "do_differential_guidance": (False, "the target is a guidance extrapolation made inside calculate_loss"),
    "loss_type": ("mse", None),          # only mean_flow is refused (checked below)
    "single_item_batching": (False, "calculate_loss sees one sample at a time with the whole batch's items"),
    "short_and_long_captions": (False, "each image is predicted twice in one batch"),
    "merge_network_on_save": (False, "checkpoints are merged full models, reloaded as the base model on resume"),
}


@dataclass
class AitkPrivacySettings:
    """The validated ``privacy:`` block of one process. ``config`` is ``None`` for ``method: dpsgd`` (DP-SGD alone,
    where ``holdout_folder`` is optional); ``dp`` holds the DP noise options (``None``: no DP noise)."""

    config: Optional[PrivacyConfig]
    holdout_folder: Optional[Path]
    attacker_state: Optional[Path] = None
    preset: str = "paper"
    dp: Optional[DPOptions] = None

    @property
    def method(self) -> str:
        if self.config is None:
            return DP_METHOD
        return "smplora" if self.config.objective == "smp" else "mplora"


def parse_privacy_block(block: Any, *, default_seed: Any = None) -> Optional[AitkPrivacySettings]:
    """Validate a ``privacy:`` block; ``None`` when it is absent or ``method: none``.

    ``method: dpsgd`` gives settings without a ``config`` (DP-SGD alone); the DP keys (``noise_multiplier``,
    ``target_epsilon``, ``max_grad_norm``, ``dp_delta``, ``dp_accountant``) go to the core's :func:`dp_options`.
    ``default_seed`` (the process's ``training_seed``) seeds the attacker and the DP noise when the block has no
    ``seed``. Raises :class:`ConfigError` (:class:`DPError` for the DP keys) naming the key, its value and the
    accepted values.
    """
    if block is None:
        return None
    if not isinstance(block, Mapping):
        raise ConfigError(f"{BLOCK}: must be a mapping of keys (method, preset, holdout_folder, alpha, ...), "
                          f"got {type(block).__name__} {block!r}.")
    unknown = [str(k) for k in block if k not in ALL_KEYS]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], ALL_KEYS, n=1)
        raise ConfigError(f"{BLOCK}.{unknown[0]} is not a privacy key." + (f" Did you mean {BLOCK}.{hint[0]}?" if hint
                          else "") + f" Valid keys: {', '.join(ALL_KEYS)}.")
    raw_method = block.get("method", "smplora")
    method = raw_method.lower() if isinstance(raw_method, str) else raw_method
    if method != DP_METHOD and method not in METHODS:
        raise ConfigError(f"{BLOCK}.method={raw_method!r} is unknown: use smplora (SMP-LoRA, recommended), mplora "
                          "(the MP-LoRA baseline), dpsgd (DP-SGD alone) or none.")
    dp_given = sorted(k for k in DP_KEYS if block.get(k) is not None)
    if method == "none":
        if dp_given:
            raise DPError(f"{', '.join(BLOCK + '.' + k for k in dp_given)} given with {BLOCK}.method: none: this "
                          "process would train without DP noise. Use method: dpsgd (DP-SGD alone) or method: smplora "
                          "(SMP-LoRA + DP noise) with them, or drop them.")
        return None
    seed = block["seed"] if "seed" in block else default_seed if isinstance(default_seed, int) \
        and not isinstance(default_seed, bool) and default_seed >= 0 else 0
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{BLOCK}.seed={seed!r} must be an int >= 0 (the attacker's, the held-out draws' and the "
                          "DP noise's seed; default: the process's training_seed).")
    if method == DP_METHOD:
        return _dp_only(block, seed)
    dp = _dp_options(method, block, seed)
    objective = METHODS[method]
    preset = block.get("preset", "paper")
    if not isinstance(preset, str) or preset.lower() not in PRESETS:
        raise ConfigError(f"{BLOCK}.preset={preset!r} is unknown: use paper (the paper's hyperparameters, default) "
                          "or robust (base-calibrated features, alpha 20, attacker lr 1e-3, privacy fraction 0.25).")
    fields: Dict[str, Any] = {"objective": objective}
    for key in CORE_KEYS:
        if key in block:
            fields[key] = _core_value(key, block[key])
    if "seed" not in fields:
        fields["seed"] = seed
    if dp is not None:
        # under DP noise every row has its own SMP-LoRA term (PrivacyRegularizer.step_per_sample): no fraction
        if fields.get("privacy_fraction", 1.0) != 1.0:
            raise DPError(f"{BLOCK}.privacy_fraction={fields['privacy_fraction']!r} with DP noise: every image of a "
                          "batch has its own SMP-LoRA term under DP noise (a share of the images would couple the "
                          f"samples), so the fraction does not apply. Drop {BLOCK}.privacy_fraction (or set it to 1).")
        fields["privacy_fraction"] = 1.0   # also over a preset's fraction (robust: 0.25), so the header says so
    try:
        config = PrivacyConfig.preset(preset.lower(), **fields)
    except ConfigError as exc:
        field = next((k for k in fields if str(exc).startswith(f"{k}=")), None)
        where = f"{BLOCK}.{field}" if field else BLOCK
        raise ConfigError(f"{where}: {exc}") from None
    holdout = block.get("holdout_folder")
    if holdout is None:
        raise ConfigError(f"{BLOCK}.holdout_folder is required: a folder of images of the training domain that are "
                          "never trained on (the proxy attacker's non-members), e.g. holdout_folder: /data/holdout.")
    return AitkPrivacySettings(config=config, holdout_folder=_path("holdout_folder", holdout, folder=True),
                               attacker_state=(_path("attacker_state", block["attacker_state"], folder=False)
                                               if block.get("attacker_state") is not None else None),
                               preset=preset.lower(), dp=dp)


def _dp_options(method: str, block: Mapping[str, Any], seed: int) -> Optional[DPOptions]:
    """The DP noise options of the block (``None``: none), checked by the core's :func:`dp_options`."""
    kwargs = {DP_KEYS[k]: block[k] for k in DP_KEYS if block.get(k) is not None}
    kwargs.setdefault("accountant", "rdp")
    return dp_options(method, seed=seed, flag=FLAG, **kwargs)


def _dp_only(block: Mapping[str, Any], seed: int) -> AitkPrivacySettings:
    """``method: dpsgd``: DP-SGD alone on ai-toolkit's own loss. No attacker, so its keys are refused; a holdout
    folder is optional (checked for overlap and listed in the manifest, for a later audit)."""
    smp = [k for k in SMP_ONLY_KEYS if k in block]
    if smp:
        raise ConfigError(f"{', '.join(BLOCK + '.' + k for k in smp)} configure{'s' if len(smp) == 1 else ''} the "
                          f"SMP-LoRA term, which {BLOCK}.method: dpsgd (DP-SGD alone, ai-toolkit's own loss, no "
                          "attacker) does not have. Drop them, or use method: smplora with noise_multiplier "
                          f"(SMP-LoRA + DP noise). (The DP delta is {BLOCK}.dp_delta; {BLOCK}.delta is SMP-LoRA's "
                          "constant.)")
    if block.get("noise_multiplier") is None and block.get("target_epsilon") is None:
        raise DPError(f"{BLOCK}.method: dpsgd needs a noise level: add {BLOCK}.noise_multiplier (sigma, e.g. 1.0) or "
                      f"{BLOCK}.target_epsilon (e.g. 8, over train.steps).")
    dp = _dp_options(DP_METHOD, block, seed)
    holdout = block.get("holdout_folder")
    return AitkPrivacySettings(config=None, dp=dp, preset="none",
                               holdout_folder=None if holdout is None else _path("holdout_folder", holdout,
                                                                                 folder=True))


def refused_train_options(train: Mapping[str, Any]) -> Dict[str, str]:
    """The ``train:`` options (``train.<key>``: reason) this shim cannot run the privacy term with."""
    out: Dict[str, str] = {}
    for key, (default, why) in REFUSED_TRAIN_OPTIONS.items():
        value = train.get(key, default)
        if key == "loss_type":
            if value == "mean_flow":
                out[f"train.{key}"] = "mean_flow takes its own loss path, which never calls calculate_loss"
        elif value != default:
            out[f"train.{key}"] = why
    return out


def check_train_options(train: Any) -> None:
    """Raise :class:`ConfigError` naming every refused ``train:`` option (see :data:`REFUSED_TRAIN_OPTIONS`)."""
    if not isinstance(train, Mapping):
        return   # ai-toolkit reports its own config errors
    refused = refused_train_options(train)
    if refused:
        listed = "; ".join(f"{k}: {why}" for k, why in refused.items())
        raise ConfigError(f"the privacy term cannot run with {', '.join(refused)} ({listed}). Remove "
                          f"{'it' if len(refused) == 1 else 'them'} from the train: block, or train without the "
                          f"{BLOCK}: block (type: sd_trainer).")


def _core_value(key: str, value: Any) -> Any:
    if key == "hidden" and isinstance(value, str):
        try:
            return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
        except ValueError:
            raise ConfigError(f"{BLOCK}.hidden={value!r} must be a list of positive ints, e.g. [512, 256].") from None
    if key == "hidden" and isinstance(value, list):
        return tuple(value)
    if key == "feature_grid":
        if value == 0:
            return None
        if isinstance(value, list):
            return tuple(value)
    if key == "calibrated" and not isinstance(value, bool):
        raise ConfigError(f"{BLOCK}.calibrated={value!r} must be true or false.")
    return value


def _path(key: str, value: Any, *, folder: bool) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{BLOCK}.{key}={value!r} must be a path.")
    path = Path(value).expanduser()
    if folder and not path.is_dir():
        raise HoldoutError(f"{BLOCK}.{key}: {path} does not exist or is not a folder; create it with images of the "
                          "training domain that are NOT in any training dataset.")
    if not folder and not path.is_file():
        raise ConfigError(f"{BLOCK}.{key}: {path} does not exist; pass a *.smplora_state file written by an earlier "
                          "run (in its output folder's _smplora/ folder).")
    return path
