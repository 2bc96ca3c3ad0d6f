#!/usr/bin/env python
"""Write a copy of diffusers' official SD1, SDXL or FLUX LoRA script with the SMP-LoRA lines added.

    D=<diffusers>/examples
    python examples/diffusers/patch_official.py sd1 $D/text_to_image/train_text_to_image_lora.py out.py
    python examples/diffusers/patch_official.py sdxl $D/text_to_image/train_text_to_image_lora_sdxl.py out.py
    python examples/diffusers/patch_official.py flux $D/dreambooth/train_dreambooth_lora_flux.py out.py

The edits are exactly those shown in ``PATCH.md``, ``PATCH_SDXL.md`` and ``PATCH_FLUX.md`` next to this file (the
lines below are the ones those files show). Each edit looks for one short anchor line of the official
script. Before anything is edited, every anchor of the script is checked: it must occur exactly once, and
in the order of the known layout (``KNOWN_LAYOUT``: diffusers' examples at commit 58eb52c0, 2026-08-23,
``check_min_version("0.40.0.dev0")``, run with diffusers 0.42.1). A script laid out differently is refused
with every anchor that is missing, repeated or moved, the known layout, and the PATCH file to follow by
hand; nothing is written. No line of the official script ships with this project: the script is read
from your diffusers checkout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

IMPORT = "from smplora_plugin.integrations.diffusers import HoldoutImages, PrivacyRegularizer, add_privacy_args\n"

ARGS = "    add_privacy_args(parser)  # --privacy {none,smplora,mplora}, --privacy_preset, --privacy_holdout_dir, ...\n"

REG = """\
    reg = PrivacyRegularizer.from_args(args, device=accelerator.device)  # None with --privacy none
    if reg:
        reg.attach(accelerator, holdout)  # prints the summary; checkpoints get smplora_state.safetensors

"""

STEP_LINES = """\
                    loss = reg.step(loss, reg.features(model_pred, target, rows=n, reference=base_pred),
                                    reg.nonmember_features(lambda b: predict(b)[:3], rows=n),
                                    update_attacker=accelerator.sync_gradients)
"""

ANNOTATE = """\
        if reg:
            reg.annotate(os.path.join(args.output_dir, "pytorch_lora_weights.safetensors"))
"""

# ------------------------------------------------------------------------------------------------ SD1.x / 2.x
SD1_ARGS = "    add_privacy_args(parser)\n"

SD1_REG = """\
    reg = PrivacyRegularizer.from_args(args, device=accelerator.device)  # None with --privacy none
    if reg:  # prints the summary; save/load hooks: checkpoint-N/smplora_state.safetensors; DP noise: DP-SGD on the LoRA
        reg.attach(accelerator, holdout, model=unet, optimizer=optimizer, train_dataloader=train_dataloader)

"""

SD1_DEF = "    def predict(batch, n=None):  # the loop's forward, moved here unchanged; n=None: a held-out batch\n"

SD1_TAIL = """\
        # the base prediction on the n privacy rows for calibrated features (--privacy_preset robust); else None
        base_pred = reg.reference(unet, n, lambda: unet(
            noisy_latents[:n], timesteps[:n], encoder_hidden_states[:n], return_dict=False)[0]) if reg else None
        return model_pred, target, base_pred, timesteps

"""

SD1_STEP = ("                if reg:  # before the gather: `loss` keeps its value (step_loss, train_loss), "
            "gets the SMP "
            "gradient\n" + STEP_LINES)

SD1_POSTFIX = "            logs.update(reg.progress_postfix() if reg else {})\n"

# ------------------------------------------------------------------------------------------------ SDXL
SDXL_HOLDOUT = """\
    # held-out (non-member) images through the script's own preprocessing; stops here on bad input
    holdout = HoldoutImages.from_args(args, preprocess_train, collate_fn, accelerator)

"""

SDXL_DEF = "    def predict(batch, n=None):  # the loop's forward, moved here unchanged; n=None: a held-out batch\n"

SDXL_TAIL = """\

        # the base prediction (LoRA off, no grad) on the privacy rows for calibrated features
        # (--privacy_preset robust); None and no forward otherwise
        base_pred = reg.reference(unet, n, lambda: unet(
            noisy_model_input[:n], timesteps[:n], prompt_embeds[:n],
            added_cond_kwargs={k: v[:n] for k, v in unet_added_conditions.items()}, return_dict=False,
        )[0]) if reg else None
        return model_pred, target, base_pred, timesteps

"""

SDXL_CALL = """\
                n = reg.privacy_rows(len(batch["pixel_values"])) if reg else 0  # this step's rows in the privacy term
                model_pred, target, base_pred, timesteps = predict(batch, n)
"""

SDXL_STEP = ("                if reg:  # before the gather: `loss` keeps its value and carries the SMP-LoRA gradient\n"
             + STEP_LINES)

SDXL_LOG = """\
                if reg:
                    accelerator.log(reg.log_dict(), step=global_step)
"""

SDXL_POSTFIX = "            logs.update(reg.progress_postfix() if reg else {})  # mia_ce, mia_acc\n"

# ------------------------------------------------------------------------------------------------ FLUX
FLUX_HOLDOUT = """\
    # held-out (non-member) images: the dataset's own image transforms and the instance prompt; no class images
    def holdout_preprocess(examples):
        images = [train_dataset.image_transforms(exif_transpose(im).convert("RGB")) for im in examples["image"]]
        return {"instance_images": images, "instance_prompt": [args.instance_prompt] * len(images)}

    holdout = HoldoutImages.from_args(args, holdout_preprocess, lambda rows: collate_fn(rows, False), accelerator)

"""

FLUX_KEEP_VAE = "        if args.validation_prompt is None and holdout is None:  # held-out images need the VAE\n"

FLUX_DEF = """\
    def predict(batch, n=None, step=None):  # the loop's forward, moved here; n, step None: a held-out batch
        nonlocal tokens_one, tokens_two  # the moved lines assign them (custom prompts with --train_text_encoder)
"""

FLUX_CACHED = "        if args.cache_latents and step is not None:  # held-out batches are never cached\n"

FLUX_TAIL = """\

        # the base prediction (LoRA off, no grad) on the privacy rows of the instance half, unpacked like
        # model_pred, for calibrated features (--privacy_preset robust); None and no forward otherwise
        base_pred = reg.reference(transformer, n, lambda: FluxPipeline._unpack_latents(transformer(
            hidden_states=packed_noisy_model_input[:n], timestep=timesteps[:n] / 1000,
            guidance=None if guidance is None else guidance[:n], pooled_projections=pooled_prompt_embeds[:n],
            encoder_hidden_states=prompt_embeds[:n], txt_ids=text_ids, img_ids=latent_image_ids, return_dict=False,
        )[0], height=model_input.shape[2] * vae_scale_factor, width=model_input.shape[3] * vae_scale_factor,
            vae_scale_factor=vae_scale_factor)) if reg else None
        return model_pred, target, base_pred, weighting

"""

FLUX_CALL = """\
                n = reg.privacy_rows(len(batch["pixel_values"]),  # this step's rows in the privacy term
                                     with_prior_preservation=args.with_prior_preservation) if reg else 0
                model_pred, target, base_pred, weighting = predict(batch, n, step)
"""

FLUX_STEP = ("                if reg:  # the instance loss only (class images never reach the attacker); "
             "keeps its value\n"
             + STEP_LINES + "\n")

FLUX_LOG = """\
            if reg:
                progress_bar.set_postfix(**logs, **reg.progress_postfix())  # mia_ce, mia_acc
                accelerator.log(reg.log_dict(), step=global_step)
"""

SNIPPETS: Dict[str, List[str]] = {
    "sd1": [IMPORT, SD1_ARGS, SDXL_HOLDOUT, SD1_REG, SD1_DEF, SD1_TAIL, SDXL_CALL, SD1_STEP, SDXL_LOG, SD1_POSTFIX,
            ANNOTATE],
    "sdxl": [IMPORT, ARGS, SDXL_HOLDOUT, REG, SDXL_DEF, SDXL_TAIL, SDXL_CALL, SDXL_STEP, SDXL_LOG, SDXL_POSTFIX,
             ANNOTATE],
    "flux": [IMPORT, ARGS, FLUX_HOLDOUT, FLUX_KEEP_VAE, REG, FLUX_DEF, FLUX_CACHED, FLUX_TAIL, FLUX_CALL, FLUX_STEP,
             FLUX_LOG, ANNOTATE],
}


# ------------------------------------------------------------------------------------------------ layouts
# The layout the anchors below were taken from and the patched scripts were run on (tests/test_diffusers_official.py).
KNOWN_LAYOUT = ('diffusers\' official examples at commit 58eb52c0803e (2026-08-23), check_min_version("0.40.0.dev0"), '
                "run with diffusers 0.42.1")

SCRIPTS = {"sd1": ("examples/text_to_image/train_text_to_image_lora.py", "PATCH.md"),
           "sdxl": ("examples/text_to_image/train_text_to_image_lora_sdxl.py", "PATCH_SDXL.md"),
           "flux": ("examples/dreambooth/train_dreambooth_lora_flux.py", "PATCH_FLUX.md")}


class PatchError(ValueError):
    """The official script does not have the layout these edits expect."""


def _show(anchor: str) -> str:
    return repr(" / ".join(ln.strip() for ln in anchor.strip("\n").splitlines()))


def check_layout(kind: str, src: str) -> None:
    """Refuse ``src`` unless each anchor of ``ANCHORS[kind]`` occurs exactly once, in the listed order.

    The error lists every anchor that is missing, repeated or out of place, so one run says all that differs.
    """
    problems, found = [], []
    for anchor in ANCHORS[kind]:
        count = src.count(anchor)
        if count == 0:
            problems.append(f"anchor not found: {_show(anchor)}")
        elif count > 1:
            problems.append(f"anchor found {count} times (expected once): {_show(anchor)}")
        else:
            found.append((src.index(anchor), anchor))
    # the anchors outside the longest run that is in the known order are the moved ones
    best = [[i] for i in range(len(found))]
    for i in range(len(found)):
        for j in range(i):
            if found[j][0] < found[i][0] and len(best[j]) + 1 > len(best[i]):
                best[i] = best[j] + [i]
    keep = set(max(best, key=len)) if best else set()
    for i, (pos, anchor) in enumerate(found):
        if i not in keep:
            # a neighbour it has swapped places with: one that should come before it, or one that should follow
            should_precede = [a for j, (q, a) in enumerate(found) if j < i and q > pos]
            should_follow = [a for j, (q, a) in enumerate(found) if j > i and q < pos]
            where = (f"before {_show(should_precede[0])}" if should_precede else f"after {_show(should_follow[-1])}")
            problems.append(f"anchor moved: {_show(anchor)} now comes {where}, out of the known order")
    if problems:
        rel, doc = SCRIPTS[kind]
        raise PatchError(
            f"{Path(rel).name} ({kind}): this script's layout is not one the patcher knows; nothing was written.\n"
            + "".join(f"  - {p}\n" for p in problems)
            + f"Known layout: {KNOWN_LAYOUT}.\n"
            f"Add the lines by hand following examples/diffusers/{doc}.")


# ------------------------------------------------------------------------------------------------ edits
def _find(src: str, anchor: str) -> int:
    count = src.count(anchor)
    if count != 1:
        raise PatchError(f"anchor {_show(anchor)} occurs {count} times in the script (expected once): this script's "
                         f"layout is not one the patcher knows ({KNOWN_LAYOUT}); add the lines by hand following "
                         "examples/diffusers/PATCH.md / PATCH_SDXL.md / PATCH_FLUX.md.")
    return src.index(anchor)


def _line_start(src: str, pos: int) -> int:
    return src.rfind("\n", 0, pos) + 1


def _line_end(src: str, pos: int) -> int:
    end = src.find("\n", pos)
    return len(src) if end < 0 else end + 1


def insert_before(src: str, anchor: str, text: str) -> str:
    """``text`` (whole lines) inserted before the line where ``anchor`` (unique) starts."""
    at = _line_start(src, _find(src, anchor))
    return src[:at] + text + src[at:]


def insert_after(src: str, anchor: str, text: str) -> str:
    """``text`` (whole lines) inserted after the line where ``anchor`` (unique) ends."""
    at = _line_end(src, _find(src, anchor) + len(anchor) - 1)
    return src[:at] + text + src[at:]


def replace_line(src: str, anchor: str, line: str) -> str:
    """The line holding ``anchor`` (unique) replaced by ``line``."""
    pos = _find(src, anchor)
    start, end = _line_start(src, pos), _line_end(src, pos)
    return src[:start] + line + src[end:]


def after_call(src: str, call: str, first_arg: str) -> int:
    """Offset just after the closing line of the (unique) multi-line ``call(`` whose next line is ``first_arg``."""
    pos = _find(src, call + "\n" + first_arg)
    line = src[_line_start(src, pos):_line_end(src, pos)]
    indent = line[:len(line) - len(line.lstrip())]
    close = src.find("\n" + indent + ")", pos)
    if close < 0:
        raise PatchError(f"no closing parenthesis for {call.strip()!r} at its own indentation.")
    return _line_end(src, close + 1)


def move_forward(src: str, first: str, last: str, loop: str, head: str, tail: str, call: str) -> str:
    """Move the loop's forward, from the line of ``first`` to the line of ``last``, into a function.

    The lines are dedented by 8 spaces (loop body -> ``main()`` body) and placed, between ``head`` and
    ``tail``, before the line of ``loop``; in the loop they become ``call``.
    """
    start = _line_start(src, _find(src, first))
    end = _line_end(src, _find(src, last))
    if end <= start:
        raise PatchError(f"{last.strip()!r} comes before {first.strip()!r}: the forward is laid out differently.")
    block = src[start:end]
    body = []
    for ln in block.splitlines(keepends=True):
        if ln.strip() and not ln.startswith(" " * 8):
            raise PatchError(f"the forward's line {ln.strip()!r} is indented less than the loop body.")
        body.append(ln[8:] if ln.strip() else ln)
    src = src[:start] + call + src[end:]
    return insert_before(src, loop, head + "".join(body) + tail)


# ------------------------------------------------------------------------------------------------ scripts
# The anchors, in the order they occur in the known layout (check_layout refuses any other).
COMPILED = "from diffusers.utils.torch_utils import is_compiled_module\n"
PARSE = "    args = parser.parse_args()\n"
INPUT_ARGS = "    if input_args is not None:\n"
DATALOADERS = "    # DataLoaders creation:\n"
AFTER_PREPARE = ("    # We need to recalculate our total training steps as the size of the training dataloader may "
                 "have changed.")
LOOP = "    for epoch in range(first_epoch, args.num_train_epochs):\n"
LATENTS = "                # Convert images to latent space\n"
SD1_UNET = ("                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, "
            "return_dict=False)[0]\n")
SDXL_LAST = ('                    raise ValueError(f"Unknown prediction type '
             '{noise_scheduler.config.prediction_type}")\n')
GATHER = "                # Gather the losses across all processes for logging"
TRAIN_LOSS = '                accelerator.log({"train_loss": train_loss}, step=global_step)\n'
LOGS = '            logs = {"step_loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}\n'
SAVE_DIR = "            save_directory=args.output_dir,"
SD1_SAVE = "        StableDiffusionPipeline.save_lora_weights(\n" + SAVE_DIR
SDXL_SAVE = "        StableDiffusionXLPipeline.save_lora_weights(\n" + SAVE_DIR
FLUX_TOKENIZERS = "    if not args.train_text_encoder:\n        tokenizers = [tokenizer_one, tokenizer_two]\n"
FLUX_DEL_VAE = "        if args.validation_prompt is None:\n            del vae\n"
FLUX_PROMPTS = '                prompts = batch["prompts"]\n'
FLUX_CACHE = "                if args.cache_latents:\n                    model_input = latents_cache[step]"
# the same lines once move_forward has dedented them into predict()
FLUX_CACHE_MOVED = "        if args.cache_latents:\n            model_input = latents_cache[step]"
FLUX_TARGET = "                target = noise - model_input\n"
FLUX_PRIOR = ("                if args.with_prior_preservation:\n"
              "                    # Add the prior loss to the instance loss.\n")
FLUX_LOGS = "            accelerator.log(logs, step=global_step)\n"
FLUX_SAVE = "        FluxPipeline.save_lora_weights(\n" + SAVE_DIR

ANCHORS: Dict[str, List[str]] = {
    "sd1": [COMPILED, PARSE, DATALOADERS, AFTER_PREPARE, LOOP, LATENTS, SD1_UNET, GATHER, TRAIN_LOSS, LOGS, SD1_SAVE],
    "sdxl": [COMPILED, INPUT_ARGS, DATALOADERS, AFTER_PREPARE, LOOP, LATENTS, SDXL_LAST, GATHER, TRAIN_LOSS, LOGS,
             SDXL_SAVE],
    "flux": [COMPILED, INPUT_ARGS, FLUX_TOKENIZERS, FLUX_DEL_VAE, AFTER_PREPARE, LOOP, FLUX_PROMPTS, FLUX_CACHE,
             FLUX_TARGET, FLUX_PRIOR, FLUX_LOGS, FLUX_SAVE],
}


def patch_sd1(src: str) -> str:
    """``train_text_to_image_lora.py`` (SD1.x / 2.x) with the lines of PATCH.md (the README's block)."""
    check_layout("sd1", src)
    src = insert_after(src, COMPILED, IMPORT)
    src = insert_before(src, PARSE, SD1_ARGS)
    src = insert_before(src, DATALOADERS, SDXL_HOLDOUT)
    src = insert_before(src, AFTER_PREPARE, SD1_REG)
    src = move_forward(src, LATENTS, SD1_UNET, LOOP, SD1_DEF, SD1_TAIL, SDXL_CALL)
    src = insert_before(src, GATHER, SD1_STEP)
    src = insert_after(src, TRAIN_LOSS, SDXL_LOG)
    src = insert_after(src, LOGS, SD1_POSTFIX)
    at = after_call(src, "        StableDiffusionPipeline.save_lora_weights(", SAVE_DIR)
    return src[:at] + ANNOTATE + src[at:]


def patch_sdxl(src: str) -> str:
    """``train_text_to_image_lora_sdxl.py`` with the lines of PATCH_SDXL.md."""
    check_layout("sdxl", src)
    src = insert_after(src, COMPILED, IMPORT)
    src = insert_before(src, INPUT_ARGS, ARGS)
    src = insert_before(src, DATALOADERS, SDXL_HOLDOUT)
    src = insert_before(src, AFTER_PREPARE, REG)
    src = move_forward(src, LATENTS, SDXL_LAST, LOOP, SDXL_DEF, SDXL_TAIL, SDXL_CALL)
    src = insert_before(src, GATHER, SDXL_STEP)
    src = insert_after(src, TRAIN_LOSS, SDXL_LOG)
    src = insert_after(src, LOGS, SDXL_POSTFIX)
    at = after_call(src, "        StableDiffusionXLPipeline.save_lora_weights(", SAVE_DIR)
    return src[:at] + ANNOTATE + src[at:]


def patch_flux(src: str) -> str:
    """``train_dreambooth_lora_flux.py`` with the lines of PATCH_FLUX.md."""
    check_layout("flux", src)
    src = insert_after(src, COMPILED, IMPORT)
    src = insert_before(src, INPUT_ARGS, ARGS)
    src = insert_before(src, FLUX_TOKENIZERS, FLUX_HOLDOUT)
    src = replace_line(src, FLUX_DEL_VAE, FLUX_KEEP_VAE)
    src = insert_before(src, AFTER_PREPARE, REG)
    src = move_forward(src, FLUX_PROMPTS, FLUX_TARGET, LOOP, FLUX_DEF, FLUX_TAIL, FLUX_CALL)
    src = replace_line(src, FLUX_CACHE_MOVED, FLUX_CACHED)
    src = insert_before(src, FLUX_PRIOR, FLUX_STEP)
    src = insert_after(src, FLUX_LOGS, FLUX_LOG)
    at = after_call(src, "        FluxPipeline.save_lora_weights(", SAVE_DIR)
    return src[:at] + ANNOTATE + src[at:]


PATCHERS = {"sd1": patch_sd1, "sdxl": patch_sdxl, "flux": patch_flux}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("script", choices=sorted(PATCHERS), help="sd1: train_text_to_image_lora.py; sdxl: "
                   "train_text_to_image_lora_sdxl.py; flux: train_dreambooth_lora_flux.py")
    p.add_argument("source", type=Path, help="the official script (your diffusers checkout)")
    p.add_argument("dest", type=Path, help="where to write the patched copy (must not be the source)")
    args = p.parse_args(argv)
    if args.dest.resolve() == args.source.resolve():
        p.error("dest must differ from source: keep the official script as it is.")
    try:
        out = PATCHERS[args.script](args.source.read_text(encoding="utf-8"))
    except PatchError as exc:
        print(f"patch_official: {exc}", file=sys.stderr)
        return 1
    args.dest.write_text(out, encoding="utf-8")
    print(f"wrote {args.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
