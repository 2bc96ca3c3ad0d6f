"""SMP-LoRA for the diffusers example training scripts (diffusers / peft / accelerate).

Users copy ``train_text_to_image_lora.py`` or ``train_dreambooth_lora.py`` from diffusers and paste
a handful of lines (see ``docs/diffusers.md``)::

    from smplora_plugin.integrations.diffusers import HoldoutImages, PrivacyRegularizer, add_privacy_args
    add_privacy_args(parser)
    holdout = HoldoutImages.from_args(args, preprocess_train, collate_fn, accelerator)   # checks the folder
    reg = PrivacyRegularizer.from_args(args, device=accelerator.device)    # None for --privacy none
    if reg:   # checkpoint save/load hooks; with DP noise also DP-SGD on the model's LoRA and the optimiser
        reg.attach(accelerator, holdout, model=unet, optimizer=optimizer, train_dataloader=train_dataloader)
    def predict(batch, n=None):       # the script's forward; n: this step's privacy rows (None: a held-out batch)
        ...
        base_pred = reg.reference(unet, n, lambda: unet(
            noisy_latents[:n], timesteps[:n], encoder_hidden_states[:n], return_dict=False)[0]) if reg else None
        return model_pred, target, base_pred, timesteps
    ...
    n = reg.privacy_rows(len(batch["pixel_values"])) if reg else 0   # this step's rows in the privacy term
    model_pred, target, base_pred, timesteps = predict(batch, n)
    ...
    if reg:
        loss = reg.step(loss, reg.features(model_pred, target, rows=n, reference=base_pred),
                        reg.nonmember_features(lambda b: predict(b)[:3], rows=n),
                        update_attacker=accelerator.sync_gradients)
    ...
    if reg:
        accelerator.log(reg.log_dict(), step=global_step)
    ...
    if reg:
        reg.annotate(os.path.join(args.output_dir, "pytorch_lora_weights.safetensors"))

DP-SGD (``--privacy dpsgd --privacy_noise_multiplier 1.0``) and SMP-LoRA + DP noise (``--privacy smplora
--privacy_noise_multiplier 1.0``) run through the same lines: :mod:`.dp` builds the core's
:class:`~smplora_plugin.dp.DPTraining` in ``reg.attach`` (see ``docs/diffusers.md``, "DP-SGD").

SDXL (``train_text_to_image_lora_sdxl.py``) and FLUX DreamBooth (``train_dreambooth_lora_flux.py``) take
the same calls; their forwards' lines are in ``examples/diffusers/PATCH_SDXL.md`` / ``PATCH_FLUX.md``.

The modules: :mod:`.args` (the ``--privacy*`` options and the config they select), :mod:`.holdout`
(held-out image folders, captions and batches), :mod:`.adapters` (the LoRA switched off for the base
prediction), :mod:`.accelerator` (checkpoint hooks, state file, summary), :mod:`.dp` (DP-SGD wired to the
script's model, optimiser and dataloader) and :mod:`.regularizer`
(:class:`PrivacyRegularizer`, a delegate holding the core :class:`smplora_plugin.PrivacyRegularizer`).
No algorithm code lives here, and neither diffusers nor accelerate is imported: any object with
accelerate's ``Accelerator`` interface works.
"""

from smplora_plugin.integrations._common import IMAGE_EXTENSIONS, list_images

from .accelerator import STATE_FILENAME
from .adapters import adapters_disabled, base_prediction, unwrap_model
from .args import add_privacy_args, dp_options_from_args, privacy_config_from_args
from .dp import DP_STATE_FILENAME
from .holdout import HoldoutImages
from .regularizer import PrivacyRegularizer, instance_half, nonmember_loss_maps, privacy_regularizer_from_args

__all__ = [
    "PrivacyRegularizer", "HoldoutImages", "add_privacy_args", "privacy_config_from_args",
    "privacy_regularizer_from_args", "nonmember_loss_maps", "instance_half", "list_images", "unwrap_model",
    "adapters_disabled", "base_prediction",
    "STATE_FILENAME", "IMAGE_EXTENSIONS", "dp_options_from_args", "DP_STATE_FILENAME",
]
