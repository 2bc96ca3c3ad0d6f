"""smplora-plugin: SMP-LoRA membership-inference defense for the LoRA trainers people already use.

The core is framework-agnostic (torch, pluggy, safetensors, numpy); trainer shims live in
``smplora_plugin.integrations``.
"""

__version__ = "0.1.0"

from .config import PrivacyConfig
from .errors import ConfigError, FeatureError, HoldoutError, PluginError, SmploraError, StateError
from .features import loss_maps
from .metadata import annotate, read_privacy_metadata
from .plugins import hookimpl
from .regularizer import PrivacyRegularizer

__all__ = [
    "PrivacyConfig", "PrivacyRegularizer", "loss_maps", "annotate", "read_privacy_metadata", "hookimpl",
    "SmploraError", "ConfigError", "FeatureError", "StateError", "HoldoutError", "PluginError", "__version__",
]
