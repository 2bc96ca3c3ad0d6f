"""The node classes (ComfyUI's V3 node API, ``comfy_api.latest.io``). Imported by ComfyUI only."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

import comfy.model_management
import comfy.sd
import comfy.utils
import comfy_extras.nodes_train as nodes_train
import folder_paths
from comfy_api.latest import ComfyExtension, io, ui

from smplora_plugin import PrivacyConfig, PrivacyRegularizer
from smplora_plugin.config import PRESETS
from smplora_plugin.errors import ConfigError, HoldoutError, InputError, SmploraError
from smplora_plugin.metadata import validate_entries

from .fit import check_lora_fits
from .images import load_images, member_nonmember_files
from .label import privacy_label
from .layout import SUPPORTED, train_layout
from .training import DP_INPUTS, DP_ONLY, Holdout, dp_report, dp_run, private_training
from .verdict import report_text

PRIVACY = io.Custom("SMPLORA_PRIVACY")
LORA_MODEL = io.Custom("LORA_MODEL")
LOSS_MAP = io.Custom("LOSS_MAP")
OWN_INPUTS = ("holdout_latents", "holdout_positive", "privacy_preset", "privacy_objective", "privacy_alpha",
              *DP_INPUTS)
CATEGORY = "training/smplora"


def _latent_rows(latents: List[Dict[str, torch.Tensor]], what: str, one_size: bool = True) -> List[torch.Tensor]:
    """The ``(1, C, h, w)`` rows of a list of LATENT dicts; of one latent size unless ``one_size=False`` (buckets)."""
    rows = [s[None] for lat in latents for s in lat["samples"]] if latents else []
    if not rows:
        raise InputError(f"{what} is empty: connect a LATENT batch (e.g. VAE Encode of your images).")
    shapes = sorted({tuple(r.shape[1:]) for r in rows})
    if one_size and len(shapes) > 1:
        hint = ("encode the held-out images at one resolution" if what.startswith("holdout") else
                "resize the images to one resolution, or use bucket_mode with ResolutionBucket latents")
        raise InputError(f"{what} has latents of several sizes {shapes}: Train LoRA (SMP-LoRA) needs one size "
                         f"here (no multi-resolution list); {hint}.")
    return rows


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def _conds(positive: List[Any]) -> List[Any]:
    if len(positive) == 1:
        return positive[0]
    return [c for group in positive for c in (group if isinstance(group, list) else [group])]


class SmploraTrainLora(io.ComfyNode):
    """Train LoRA (SMP-LoRA): ComfyUI's Train LoRA with the membership-inference defense."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        base = nodes_train.TrainLoraNode.define_schema()
        inputs = list(base.inputs)  # every input of this ComfyUI's Train LoRA (they differ by version)
        inputs += [
            io.Latent.Input("holdout_latents", optional=True,
                            tooltip="Latents of held-out images (non-members), never trained on; one size (the "
                                    "training size unless bucket_mode is on). Needed by smp / mp, not by dpsgd."),
            io.Conditioning.Input("holdout_positive", optional=True,
                                  tooltip="Conditioning of the held-out images (one, or one per image)."),
            io.Combo.Input("privacy_preset", options=sorted(PRESETS),
                           default="robust" if "robust" in PRESETS else sorted(PRESETS)[0],
                           tooltip="'robust': base-calibrated features, alpha 20 (what the project's frontier "
                                   "supports); 'paper': the paper's settings."),
            io.Combo.Input("privacy_objective", options=["smp", "mp", "dpsgd"], default="smp",
                           tooltip="smp: ratio objective (bounded, the default); mp: sum objective (a baseline); "
                                   "dpsgd: DP-SGD alone (ComfyUI's own loss, no attacker term, no held-out images)."),
            io.Float.Input("privacy_alpha", default=0.0, min=0.0, max=1000.0, step=0.01,
                           tooltip="Weight of the attacker term; 0 keeps the preset's alpha."),
            # DP noise (off by default): DP-SGD alone (dpsgd), or smp / mp + DP noise; needs batch_size 1
            io.Float.Input("privacy_noise_multiplier", optional=True, default=0.0, min=0.0, max=1000.0, step=0.01,
                           tooltip="DP noise: sigma of the Gaussian noise per optimiser step (0 = no DP noise). "
                                   "Needs batch_size 1; grad_accumulation_steps is the DP batch."),
            io.Float.Input("privacy_max_grad_norm", optional=True, default=0.0, min=0.0, max=1000.0, step=0.001,
                           tooltip="DP noise: the per-image gradient clip C (0 = the default 1.0)."),
            io.Float.Input("privacy_target_epsilon", optional=True, default=0.0, min=0.0, max=1.0e6, step=0.1,
                           tooltip="DP noise: the epsilon to spend over the steps; sigma is chosen for it (0 = off; "
                                   "give this or privacy_noise_multiplier)."),
            io.Float.Input("privacy_dp_delta", optional=True, default=0.0, min=0.0, max=1.0, step=1e-6, round=1e-12,
                           tooltip="DP noise: the delta of the reported epsilon (0 = the default 1/(N ln N))."),
        ]
        # The same four outputs on every supported ComfyUI: a97c9806 dropped Train LoRA's MODEL output (the
        # trained patcher is not fit for inference), so the pack never returns one and workflows link alike.
        outputs = [LORA_MODEL.Output(display_name="lora", tooltip="LoRA weights"),
                   LOSS_MAP.Output(display_name="loss_map", tooltip="Loss history (the regularised loss)"),
                   io.Int.Output(display_name="steps", tooltip="Total training steps"),
                   PRIVACY.Output(display_name="privacy",
                                  tooltip="Privacy settings and metrics for Save LoRA (SMP-LoRA)")]
        return io.Schema(node_id="SmploraTrainLora", display_name="Train LoRA (SMP-LoRA)", category=CATEGORY,
                         is_experimental=True, is_input_list=True, inputs=inputs, outputs=outputs,
                         hidden=[io.Hidden.unique_id],
                         description="ComfyUI's LoRA training with the SMP-LoRA privacy term against membership "
                                     "inference, DP-SGD noise (privacy_objective dpsgd), or both "
                                     f"(tested on {SUPPORTED}).")

    @classmethod
    def execute(cls, **kwargs: Any) -> io.NodeOutput:
        layout = train_layout(nodes_train)
        own = {k: kwargs.pop(k, None) for k in OWN_INPUTS}  # optional inputs are absent when not given
        seed = int(kwargs["seed"][0])
        batch_size = int(kwargs["batch_size"][0])
        bucket = layout.bucket_mode and bool(kwargs.get("bucket_mode", [False])[0])
        objective = _first(own["privacy_objective"], "smp")
        members = _latent_rows(kwargs["latents"], "latents", one_size=not bucket)
        reg, holdout, config = None, None, None
        if objective not in DP_ONLY:
            reg, holdout, config = cls._smplora(own, objective, seed, batch_size, bucket, members)
        dp = dp_run(objective, {k: _first(own[k], 0.0) for k in DP_INPUTS}, seed=seed, batch_size=batch_size,
                    accumulation=int(kwargs["grad_accumulation_steps"][0]), steps=int(kwargs["steps"][0]),
                    members=len(members), training_dtype=_first(kwargs.get("training_dtype"), "bf16"),
                    lora_dtype=_first(kwargs.get("lora_dtype"), "bf16"), model_dtype=_model_dtype(kwargs["model"][0]),
                    existing_lora=_first(kwargs.get("existing_lora"), None), regularizer=reg)
        sink = progress_sink(cls)
        # ComfyUI's sampler draws batch indices, sigmas and adapter inits from torch's global RNG; seed it
        # from the node's seed inside a fork, so a run is repeatable and ComfyUI's RNG state is left as it was.
        with torch.random.fork_rng(devices=[]), private_training(nodes_train, reg, holdout, seed, sink, dp=dp):
            torch.manual_seed(seed)
            out = nodes_train.TrainLoraNode.execute(**kwargs)
        lora, loss_map, steps = layout.pick(out.args)
        data = {"members": len(members), "nonmembers": 0 if holdout is None else int(holdout.latents.shape[0]),
                "steps": int(steps), "batch_size": batch_size, "trainer": "comfyui"}
        privacy: Dict[str, Any] = {"file_metadata": {}, "metrics": {}, "config": None}
        if reg is not None:
            privacy = {"file_metadata": reg.file_metadata(), "metrics": reg.metrics(), "config": config.to_dict()}
        if dp is not None:  # the epsilon with its sampling: in the output, the file header and the node's text
            report = dp_report(dp, privacy["file_metadata"] if reg is not None else None)
            privacy.update(file_metadata=report["file_metadata"], dp=report["dp"])
            privacy["metrics"] = {**privacy["metrics"], **report["dp"]["metrics"]}
            data.update(grad_accumulation_steps=dp.batch_size, sampling=report["dp"]["sampling"])
            if sink is not None:
                sink(report["text"])
        privacy["data"] = data
        return io.NodeOutput(lora, loss_map, steps, privacy)

    @staticmethod
    def _smplora(own: Dict[str, Any], objective: str, seed: int, batch_size: int, bucket: bool,
                 members: List[torch.Tensor]):
        """The SMP-LoRA (or MP-LoRA) regulariser, the checked held-out set and the config."""
        overrides: Dict[str, Any] = {"objective": objective, "seed": seed}
        if float(_first(own["privacy_alpha"], 0.0)) > 0:
            overrides["alpha"] = float(own["privacy_alpha"][0])
        try:
            config = PrivacyConfig.preset(_first(own["privacy_preset"], "robust"), **overrides)
        except SmploraError as exc:
            raise ConfigError(f"Train LoRA (SMP-LoRA): {exc}") from exc
        if own["holdout_latents"] is None or own["holdout_positive"] is None:
            raise HoldoutError(f"privacy_objective {objective} needs held-out images: connect holdout_latents and "
                               "holdout_positive (non-members, never trained on), or choose privacy_objective dpsgd "
                               "(DP-SGD alone) with a privacy_noise_multiplier.")
        held = torch.cat(_latent_rows(own["holdout_latents"], "holdout_latents"))
        if not bucket and members[0].shape[1:] != held.shape[1:]:
            raise HoldoutError(f"holdout_latents have size {tuple(held.shape[1:])} but the training latents "
                             f"{tuple(members[0].shape[1:])}: encode the held-out images at the training resolution.")
        member_hash = {_digest(m): i for i, m in enumerate(members)}
        same = [(j, member_hash[d]) for j, h in enumerate(held) if (d := _digest(h[None])) in member_hash]
        if same:
            raise HoldoutError(f"{len(same)} held-out latent(s) equal training latents (held-out #{same[0][0]} == "
                             f"training #{same[0][1]}): non-members must be images that are never trained on.")
        need = config.nonmember_rows(batch_size)
        if held.shape[0] < need:
            raise HoldoutError(f"{held.shape[0]} held-out latent(s) for non-member batches of {need} "
                             f"(nonmember_rows of batch {batch_size}): add held-out images or lower batch_size.")
        hconds = _conds(own["holdout_positive"])
        if len(hconds) == 1:
            hconds = hconds * held.shape[0]
        if len(hconds) != held.shape[0]:
            raise HoldoutError(f"{len(hconds)} held-out conditionings for {held.shape[0]} held-out latents: give one, "
                             "or one per held-out image.")
        return PrivacyRegularizer(config), Holdout(held, hconds), config


def _first(values: Any, default: Any) -> Any:
    """The value of an ``is_input_list`` input (a list of one), or ``default`` when the optional input is absent."""
    if values is None:
        return default
    return values[0] if isinstance(values, (list, tuple)) and values else values


def _model_dtype(model: Any) -> Any:
    """The MODEL's weight dtype (``ModelPatcher.model_dtype()``), or None when it cannot tell."""
    try:
        return model.model_dtype()
    except Exception:  # noqa: BLE001 (any patcher without the method or a model: no dtype to check)
        return None


def progress_sink(cls: Any) -> Optional[Callable[[str], None]]:
    """Where the training's progress text goes: the node's text in ComfyUI's UI (None outside a server)."""
    node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
    if isinstance(node_id, (list, tuple)):  # is_input_list nodes may get hidden values as lists
        node_id = node_id[0] if node_id else None
    if node_id is None:
        return None
    try:
        from server import PromptServer
    except ImportError:
        return None
    return lambda text: PromptServer.instance.send_progress_text(text, node_id)


def _save_folder(save_to: str) -> str:
    if save_to == "models/loras":
        return folder_paths.get_folder_paths("loras")[0]
    return folder_paths.get_output_directory()


class SmploraSaveLora(io.ComfyNode):
    """Save LoRA (SMP-LoRA): the trained weights with ``smplora.*`` header keys."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SmploraSaveLora", display_name="Save LoRA (SMP-LoRA)", category=CATEGORY, is_experimental=True,
            is_output_node=True,
            inputs=[
                LORA_MODEL.Input("lora", tooltip="The LoRA weights from Train LoRA (SMP-LoRA)."),
                PRIVACY.Input("privacy", tooltip="The privacy output of Train LoRA (SMP-LoRA)."),
                io.String.Input("prefix", default="ComfyUI_smplora_lora",
                                tooltip="File name prefix (may hold sub-folders)."),
                io.Combo.Input("save_to", options=["output", "models/loras"], default="output",
                               tooltip="ComfyUI's output folder (as Save LoRA Weights), or models/loras where "
                                       "LoRA loaders, LoRA privacy label and Audit LoRA find it."),
                io.Int.Input("steps", optional=True, tooltip="Training steps, used in the file name."),
            ],
            outputs=[io.String.Output(display_name="filename", tooltip="The saved file, relative to the folder.")],
        )

    @classmethod
    def execute(cls, lora: Dict[str, torch.Tensor], privacy: Dict[str, Any], prefix: str, save_to: str,
                steps: int = None) -> io.NodeOutput:
        from safetensors.torch import save_file

        if not isinstance(lora, dict) or not lora or not all(torch.is_tensor(v) for v in lora.values()):
            raise InputError("lora is not a LoRA state dict: connect the lora output of Train LoRA (SMP-LoRA).")
        if not isinstance(privacy, dict) or "file_metadata" not in privacy:
            raise InputError("privacy is not the privacy output of Train LoRA (SMP-LoRA): connect that output.")
        if "dp" in privacy and "smplora.dp" not in privacy["file_metadata"]:
            raise InputError("privacy says the LoRA was trained with DP noise but carries no smplora.dp entry: connect "
                             "the privacy output of the Train LoRA (SMP-LoRA) node that trained this LoRA.")
        metadata = dict(validate_entries(privacy["file_metadata"]))
        metadata.update(validate_entries({"smplora.data": privacy.get("data", {})}))
        root = _save_folder(save_to)
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, root)
        stem = filename if steps is None else f"{filename}_{steps}_steps"
        name = f"{stem}_{counter:05}_.safetensors"
        path = os.path.join(folder, name)
        tensors = {k: v.detach().contiguous().cpu() for k, v in lora.items()}
        save_file(tensors, path, metadata=metadata)
        rel = os.path.relpath(path, root)
        text = f"saved {rel} in {save_to}\n" + privacy_label(path)
        if isinstance(privacy.get("dp"), dict):  # DP noise: the epsilon with the sampling it assumes
            text += f"\nDP noise: {privacy['dp']['summary']} {privacy['dp']['sampling']}."
        return io.NodeOutput(rel, ui=ui.PreviewText(text))


class SmploraLoraPrivacyLabel(io.ComfyNode):
    """LoRA privacy label: whether a LoRA in models/loras was trained with the defense, and how."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SmploraLoraPrivacyLabel", display_name="LoRA privacy label", category=CATEGORY,
            is_output_node=True,
            inputs=[io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                                   tooltip="A LoRA file in models/loras.")],
            outputs=[io.String.Output(display_name="label")],
        )

    @classmethod
    def execute(cls, lora_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        text = privacy_label(path)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


def _png_tensor(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


class SmploraAuditLora(io.ComfyNode):
    """Audit LoRA: membership-inference audit of a LoRA on the workflow's MODEL/CLIP/VAE."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SmploraAuditLora", display_name="Audit LoRA (membership inference)", category=CATEGORY,
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The base model the LoRA was trained on."),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA in models/loras."),
                io.String.Input("member_folder", default="", tooltip="Folder of the images the LoRA was trained on."),
                io.String.Input("nonmember_folder", default="", tooltip="Folder of held-out images it never saw."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=8,
                             tooltip="Images are resized to this square size."),
                io.String.Input("caption", default="",
                                tooltip="Caption for images without a .txt/.caption file ('' = unconditional)."),
                io.String.Input("attacks", default="",
                                tooltip="Comma-separated attack names; empty = the whole suite."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1),
                io.Boolean.Input("baseline", default=False, optional=True,
                                 tooltip="Also audit the base model (the LoRA switched off) on the same images and "
                                         "test the LoRA against it: 'beyond the base model: yes/no'. Doubles the "
                                         "audit time."),
            ],
            outputs=[io.String.Output(display_name="report"), io.Image.Output(display_name="roc"),
                     io.Image.Output(display_name="exposure",
                                     tooltip="The most exposed members beside the LoRA's nearest generated samples "
                                             "(exposure.png)")],
        )

    @classmethod
    def execute(cls, model: Any, clip: Any, vae: Any, lora_name: str, member_folder: str, nonmember_folder: str,
                resolution: int, caption: str, attacks: str, seed: int, baseline: bool = False) -> io.NodeOutput:
        from smplora_plugin.audit import AuditSamples, baseline_cli, run_audit
        from smplora_plugin.audit.report import EXPOSURE_FILE
        from smplora_plugin.audit.training_dp import read_training_dp

        from .target import ComfyTarget

        names = [a.strip() for a in attacks.split(",") if a.strip()] or None
        if baseline and names and all(n == "blind" for n in names):
            raise InputError("baseline compares model-using attacks, and attacks 'blind' uses no model: add one "
                             "(e.g. loss) or turn baseline off.")
        member_files, nonmember_files = member_nonmember_files(member_folder, nonmember_folder)
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        if not str(path).endswith(".safetensors"):
            raise InputError(f"{lora_name} is not a .safetensors file; only safetensors LoRA files are read.")
        training_dp = read_training_dp(path)  # the smplora.dp header (DP noise), checked before any model work
        lora_sd = comfy.utils.load_torch_file(path, safe_load=True)
        check_lora_fits(model, clip, lora_sd, lora_name)
        lora_model, lora_clip = comfy.sd.load_lora_for_models(model, clip, lora_sd, 1.0, 1.0)
        target = ComfyTarget(model, clip, vae, lora_model, lora_clip,
                             load_models=comfy.model_management.load_models_gpu)
        members = AuditSamples(*load_images(member_files, resolution, caption), ids=[str(p) for p in member_files])
        nonmembers = AuditSamples(*load_images(nonmember_files, resolution, caption),
                                  ids=[str(p) for p in nonmember_files])
        info = {"lora": lora_name, "trainer": "comfyui", "resolution": int(resolution)}

        def audit(tgt: Any, chosen: Optional[List[str]], title: str) -> Any:
            return run_audit(tgt, members, nonmembers, attacks=chosen, config={"seed": int(seed)}, title=title,
                             info=info)

        with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; trained attacks need autograd
            report = audit(target, names, f"Membership-inference audit of {lora_name}")
            report.training_dp = training_dp
            if baseline:  # the same audit of the base model (LoRA off), then the paired test against it
                base_target = baseline_cli.BaseModelTarget(target)
                base = baseline_cli.audit_base(lambda chosen: audit(base_target, chosen, "Membership-inference audit "
                                                                    f"of the base model of {lora_name} (LoRA off)"),
                                               report, base_target)
                baseline_cli.attach(report, baseline_cli.paired_block(report, base, n_permutations=1000,
                                                                      seed=int(seed)))
        out_dir = (Path(folder_paths.get_output_directory()) / "smplora_audit"
                   / f"{Path(lora_name).stem}_seed{int(seed)}")
        if baseline:
            baseline_cli.write_with_baseline(report, base, str(out_dir))
        else:
            report.write(out_dir)
        text = report_text(report) + f"\n\nreport written to {out_dir}"
        if report.exposure is not None:
            image = _png_tensor(out_dir / EXPOSURE_FILE)
        else:  # no ranking (no model-using attack ran): a blank image, and the text says why
            text += "\nno exposure.png: the report ranks no members (no model-using attack ran)"
            image = torch.zeros(1, 64, 64, 3)
        return io.NodeOutput(text, _png_tensor(out_dir / "roc.png"), image, ui=ui.PreviewText(text))


NODES = [SmploraTrainLora, SmploraSaveLora, SmploraLoraPrivacyLabel, SmploraAuditLora]


class SmploraExtension(ComfyExtension):
    async def get_node_list(self) -> List[type]:
        return list(NODES)
