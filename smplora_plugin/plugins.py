"""Plugin manager construction, entry-point loading and the built-in default plugins."""

from __future__ import annotations

import os
from importlib import metadata as importlib_metadata
from typing import Iterable, Optional

import pluggy

from . import hookspecs
from .errors import PluginError
from .features import loss_maps

ENTRY_POINT_GROUP = "smplora"
DISABLE_ENV = "SMPLORA_DISABLE_PLUGINS"

hookimpl = pluggy.HookimplMarker(hookspecs.PROJECT)


class DefaultFeatures:
    """Built-in feature extraction: the (base-calibrated) squared-error map pooled to the configured grid."""

    @hookimpl(trylast=True)
    def smplora_extract_features(self, reg, pred, target, reference):
        grid = reg.config.feature_grid if reg.input_grid is None else reg.input_grid
        return loss_maps(pred, target, grid, reference=reference)


class DefaultMetadata:
    """Built-in file metadata: version, method, config and metrics under ``smplora.*``."""

    @hookimpl(tryfirst=True)
    def smplora_file_metadata(self, reg, config, metrics):
        import json

        from . import __version__

        return {
            "smplora.version": __version__,
            "smplora.method": "smp-lora" if config.objective == "smp" else "mp-lora",
            "smplora.config": config.to_json(),
            "smplora.metrics": json.dumps(metrics, sort_keys=True),
            # the grid the attacker's loss maps were pooled to (config.feature_grid capped at the latents' size)
            "smplora.feature_grid": json.dumps(None if reg.input_grid is None else list(reg.input_grid)),
        }


def _disabled_names() -> Optional[set]:
    """``None`` if all entry points are disabled, else the set of blocked plugin names."""
    raw = os.environ.get(DISABLE_ENV, "").strip()
    if raw.lower() in {"1", "true", "yes", "all", "*"}:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def load_entry_point_plugins(pm: pluggy.PluginManager, group: str = ENTRY_POINT_GROUP) -> int:
    """Register every installed ``group`` entry point not blocked by ``SMPLORA_DISABLE_PLUGINS``."""
    blocked = _disabled_names()
    if blocked is None:
        return 0
    eps = importlib_metadata.entry_points()
    selected = eps.select(group=group) if hasattr(eps, "select") else eps.get(group, [])  # py<3.10 dict API
    count = 0
    for ep in sorted(selected, key=lambda e: e.name):
        if ep.name in blocked or pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must say who it is
            raise PluginError(
                f"could not load smplora plugin {ep.name!r} ({ep.value}): {exc!r}. Fix or uninstall it, or "
                f"skip it with {DISABLE_ENV}={ep.name} (or {DISABLE_ENV}=1 to skip all entry points)."
            ) from exc
        pm.register(plugin, name=ep.name)
        count += 1
    return count


def make_plugin_manager(plugins: Optional[Iterable[object]] = None, *,
                        load_entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh plugin manager with the hook specs, the default plugins and the given plugins.

    Entry points of the ``smplora`` group are loaded only when ``plugins`` is ``None`` and
    ``load_entry_points`` is true, and not when ``SMPLORA_DISABLE_PLUGINS=1``.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(DefaultFeatures(), name="smplora.default_features")
    pm.register(DefaultMetadata(), name="smplora.default_metadata")
    if plugins is not None:
        for i, plugin in enumerate(plugins):
            name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{i}"
            try:
                pm.register(plugin, name=name)
            except (ValueError, pluggy.PluginValidationError) as exc:
                raise PluginError(f"plugin {plugin!r} cannot be registered: {exc}") from exc
    elif load_entry_points:
        load_entry_point_plugins(pm)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"a plugin implements a hook that does not exist: {exc}. "
                          "Valid hooks are in smplora_plugin.hookspecs.") from exc
    return pm
