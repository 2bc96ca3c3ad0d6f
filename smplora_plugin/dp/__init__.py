"""DP-SGD for the LoRA parameters, alone or with SMP-LoRA (docs/dp.md).

Per-sample gradients of the LoRA parameters, clipped to ``max_grad_norm``, summed, with Gaussian
noise ``N(0, (sigma C)^2)`` once per optimiser step, divided by the expected batch size; epsilon
from Opacus's RDP or PRV accountant, always with the sampling it assumes. The accountant needs
``pip install 'smplora-plugin[dp]'``.
"""

from .accountant import DPAccountant, default_delta, noise_multiplier_for, sampling_note
from .errors import DPError
from .gradients import DPGradients
from .hooks import GradSampleHooks
from .per_sample import clip_factors, per_sample_norms
from .sampler import PoissonBatchSampler
from .smp import smp_sample_loss
from .state_file import read_dp_state, save_dp_state
from .training import DPOptions, DPTraining, check_mixed_precision, dp_options

__all__ = ["DPGradients", "DPTraining", "DPOptions", "dp_options", "check_mixed_precision", "GradSampleHooks",
           "DPAccountant", "PoissonBatchSampler", "DPError", "smp_sample_loss", "default_delta",
           "noise_multiplier_for", "sampling_note", "clip_factors", "per_sample_norms", "save_dp_state",
           "read_dp_state"]
