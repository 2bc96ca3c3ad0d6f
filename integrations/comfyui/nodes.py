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
from .training import Holdout, private_training
from .verdict import report_text

PRIVACY = io.Custom("SMPLORA_PRIVACY")
LORA_MODEL = io.Custom("LORA_MODEL")
LOSS_MAP = io.Custom("LOSS_MAP")
OWN_INPUTS = ("holdout_latents", "holdout_positive", "privacy_preset", "privacy_objective", "privacy_alpha")
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
            io.Latent.Input("holdout_latents", tooltip="Latents of held-out images (non-members), never trained on; "
                                                       "one size (the training size unless bucket_mode is on)."),
            io.Conditioning.Input("holdout_positive",
                                  tooltip="Conditioning of the held-out images (one, or one per image)."),
            io.Combo.Input("privacy_preset", options=sorted(PRESETS),
                           default="robust" if "robust" in PRESETS else sorted(PRESETS)[0],
                           tooltip="'robust': base-calibrated features, alpha 20 (what the project's frontier "
                                   "supports); 'paper': the paper's settings."),
            io.Combo.Input("privacy_objective", options=["smp", "mp"], default="smp",
                           tooltip="smp: ratio objective (bounded, the default); mp: sum objective (a baseline)."),
            io.Float.Input("privacy_alpha", default=0.0, min=0.0, max=1000.0, step=0.01,
                           tooltip="Weight of the attacker term; 0 keeps the preset's alpha."),
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
                                     f"inference (tested on {SUPPORTED}).")

    @classmethod
    def execute(cls, **kwargs: Any) -> io.NodeOutput:
        layout = train_layout(nodes_train)
        own = {k: kwargs.pop(k) for k in OWN_INPUTS}
        seed = int(kwargs["seed"][0])
        batch_size = int(kwargs["batch_size"][0])
        bucket = layout.bucket_mode and bool(kwargs.get("bucket_mode", [False])[0])
        overrides: Dict[str, Any] = {"objective": own["privacy_objective"][0], "seed": seed}
        if float(own["privacy_alpha"][0]) > 0:
            overrides["alpha"] = float(own["privacy_alpha"][0])
        try:
            config = PrivacyConfig.preset(own["privacy_preset"][0], **overrides)
        except SmploraError as exc:
            raise ConfigError(f"Train LoRA (SMP-LoRA): {exc}") from exc
        members = _latent_rows(kwargs["latents"], "latents", one_size=not bucket)
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
        reg = PrivacyRegularizer(config)
        # ComfyUI's sampler draws batch indices, sigmas and adapter inits from torch's global RNG; seed it
        # from the node's seed inside a fork, so a run is repeatable and ComfyUI's RNG state is left as it was.
        with torch.random.fork_rng(devices=[]), \
                private_training(nodes_train, reg, Holdout(held, hconds), seed, progress_sink(cls)):
            torch.manual_seed(seed)
            out = nodes_train.TrainLoraNode.execute(**kwargs)
        lora, loss_map, steps = layout.pick(out.args)
        privacy = {"file_metadata": reg.file_metadata(), "metrics": reg.metrics(), "config": config.to_dict(),
                   "data": {"members": len(members), "nonmembers": int(held.shape[0]), "steps": int(steps),
                            "batch_size": batch_size, "trainer": "comfyui"}}
        return io.NodeOutput(lora, loss_map, steps, privacy)


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
        return io.NodeOutput(rel, ui=ui.PreviewText(f"saved {rel} in {save_to}\n" + privacy_label(path)))


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
            ],
            outputs=[io.String.Output(display_name="report"), io.Image.Output(display_name="roc")],
        )

    @classmethod
    def execute(cls, model: Any, clip: Any, vae: Any, lora_name: str, member_folder: str, nonmember_folder: str,
                resolution: int, caption: str, attacks: str, seed: int) -> io.NodeOutput:
        from smplora_plugin.audit import AuditSamples, run_audit

        from .target import ComfyTarget

        member_files, nonmember_files = member_nonmember_files(member_folder, nonmember_folder)
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        if not str(path).endswith(".safetensors"):
            raise InputError(f"{lora_name} is not a .safetensors file; only safetensors LoRA files are read.")
        lora_sd = comfy.utils.load_torch_file(path, safe_load=True)
        check_lora_fits(model, clip, lora_sd, lora_name)
        lora_model, lora_clip = comfy.sd.load_lora_for_models(model, clip, lora_sd, 1.0, 1.0)
        target = ComfyTarget(model, clip, vae, lora_model, lora_clip,
                             load_models=comfy.model_management.load_models_gpu)
        members = AuditSamples(*load_images(member_files, resolution, caption), ids=[str(p) for p in member_files])
        nonmembers = AuditSamples(*load_images(nonmember_files, resolution, caption),
                                  ids=[str(p) for p in nonmember_files])
        names = [a.strip() for a in attacks.split(",") if a.strip()] or None
        with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; trained attacks need autograd
            report = run_audit(target, members, nonmembers, attacks=names, config={"seed": int(seed)},
                               title=f"Membership-inference audit of {lora_name}",
                               info={"lora": lora_name, "trainer": "comfyui", "resolution": int(resolution)})
        out_dir = (Path(folder_paths.get_output_directory()) / "smplora_audit"
                   / f"{Path(lora_name).stem}_seed{int(seed)}")
        paths = report.write(out_dir)
        text = report_text(report) + f"\n\nreport written to {out_dir}"
        return io.NodeOutput(text, _png_tensor(Path(paths["roc"])), ui=ui.PreviewText(text))


NODES = [SmploraTrainLora, SmploraSaveLora, SmploraLoraPrivacyLabel, SmploraAuditLora]


class SmploraExtension(ComfyExtension):
    async def get_node_list(self) -> List[type]:
        return list(NODES)
