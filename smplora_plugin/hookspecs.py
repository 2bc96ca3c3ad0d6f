"""Hook specifications (pluggy project ``smplora``, entry-point group ``smplora``).

Implement any of these in a module or object, mark the functions with
:data:`smplora_plugin.hookimpl`, and either pass the object in ``PrivacyRegularizer(plugins=[...])``
or expose it as an entry point::

    [project.entry-points.smplora]
    my_plugin = "my_package.my_plugin"

Hooks are called with keyword arguments; an implementation may accept any subset of them.
``reg`` is the calling :class:`~smplora_plugin.PrivacyRegularizer`.
"""

from __future__ import annotations

import pluggy

PROJECT = "smplora"
hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec(firstresult=True)
def smplora_extract_features(reg, pred, target, timesteps, reference):
    """Turn a batch's ``(pred, target)`` (optional ``timesteps``, and ``reference``, the base
    model's prediction at the same input) into attacker features.

    Return a ``(B, ...)`` float tensor that keeps the graph of ``pred``, or ``None`` to let the
    next implementation decide. The first non-``None`` result wins; the built-in default
    (registered last) returns the squared-error map pooled to ``reg.config.feature_grid``.
    """


@hookspec
def smplora_before_attacker_update(reg, step, member_feats, nonmember_feats):
    """Called before the ``k_steps`` attacker updates with the detached fp32 features."""


@hookspec
def smplora_after_attacker_update(reg, step, attacker_loss, attacker_accuracy):
    """Called after the attacker updates with its last balanced loss and its accuracy (tensors)."""


@hookspec
def smplora_after_regularize(reg, step, adaptation_loss, member_ce, denominator, loss):
    """Called after the regularised loss is formed (tensors; ``loss`` still carries its graph)."""


@hookspec
def smplora_on_metrics(reg, step, metrics):
    """Metrics sink: called after every step with ``reg.metrics()`` (a dict of Python floats)."""


@hookspec
def smplora_file_metadata(reg, config, metrics):
    """Return extra ``{"smplora.<key>": str}`` entries for the header of saved ``.safetensors`` files."""


@hookspec
def smplora_register_attacks(register):
    """Register extra membership-inference attacks for the audit: call ``register(name, attack_cls)``."""
