"""The trainer shims, installed as ``smplora_plugin.integrations.<trainer>``.

- :mod:`~smplora_plugin.integrations.kohya`: kohya sd-scripts (``smplora-kohya`` launcher and a trainer mixin);
- :mod:`~smplora_plugin.integrations.diffusers`: diffusers' example training scripts (a few pasted lines);
- :mod:`~smplora_plugin.integrations.comfyui`: ComfyUI nodes (train with SMP-LoRA, audit a LoRA).

A shim holds no algorithm code: it moves the trainer's data and state to the core
(:class:`smplora_plugin.PrivacyRegularizer`, :mod:`smplora_plugin.audit`) and imports it with absolute
``smplora_plugin`` imports. Helpers the shims share are in :mod:`._common`.
"""
