"""``smplora audit``: arguments, image-folder and manifest loading, and the command body."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from smplora_plugin._io import IMAGE_EXTENSIONS

from .target import AuditError

# the shims' image types plus the ones an audit may be handed but no trainer reads (kohya takes only the shared
# set): GIF and TIFF member / non-member images are audited, not refused
IMAGE_EXTS = IMAGE_EXTENSIONS + (".gif", ".tif", ".tiff")
CAPTION_EXTS = (".txt", ".caption")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", required=True, metavar="DIR|FILE",
                   help="diffusers-format base model folder (SD1.x/SD2.x/SDXL: unet/, scheduler/, vae/, text_encoder/, "
                        "tokenizer/ [, text_encoder_2/, tokenizer_2/]; SD3/FLUX: the saved pipeline with "
                        "transformer/), or a single-file .safetensors checkpoint in the original SD1.x / SDXL layout")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="for a single-file --base-model: the CLIP tokenizer (a folder with vocab.json and merges.txt, "
                        "or a diffusers model folder of the same architecture with tokenizer/ [and tokenizer_2/]); "
                        "default: the local Hugging Face cache (nothing is downloaded)")
    p.add_argument("--lora", metavar="FILE",
                   help="LoRA .safetensors file, diffusers/peft or kohya format (one run; or use --run)")
    p.add_argument("--run", action="append", default=None, metavar="LORA=MANIFEST",
                   help="one of several audited LoRAs with its own holdout manifest (repeat the option); the "
                        "evidence is pooled over all runs (pooled report at --out, each run in --out/run_NN_<name>/)")
    src = p.add_argument_group("data (image folders, or a manifest)")
    src.add_argument("--members", metavar="DIR", help="folder of member (trained-on) images; captions from "
                     "NAME.txt / NAME.caption or metadata.jsonl when present")
    src.add_argument("--nonmembers", metavar="DIR", help="folder of held-out non-member images")
    src.add_argument("--manifest", metavar="FILE",
                     help="smplora holdout manifest (JSON) with sets 'member'/'nonmember' "
                     "(split here) or member_calibration/nonmember_calibration/member_eval/nonmember_eval")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (the files it gets are listed below)")
    p.add_argument("--attacks", default=None, help="comma-separated attack names (default: the whole suite; "
                   "see --list-attacks)")
    p.add_argument("--fast", action="store_true",
                   help="the fast suite: every default attack except GSA and the generation attack (the two "
                        "costliest at SD1.5 size; exposure.png then has no generated samples), plus LiRA / RMIA "
                        "with references")
    p.add_argument("--calibration-fraction", type=float, default=0.5,
                   help="share of each side used for attack training / calibration (default 0.5)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--no-captions", action="store_true", help="ignore caption files (unconditional scoring)")
    p.add_argument("--flip-average", action="store_true",
                   help="average every model quantity over each image and its horizontal mirror (use when the LoRA "
                        "was trained with random flips); doubles the model passes. Images are resized and "
                        "centre-cropped to the model's resolution")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--draws", type=int, default=None, help="noise draws per timestep (default 4)")
    p.add_argument("--config", metavar="JSON", default=None,
                   help="AuditConfig fields as JSON text or a .json file, e.g. '{\"timesteps\": [100, 200]}'; "
                        "attack settings under \"attack_options\", e.g. '{\"attack_options\": {\"sima\": {\"p\": 2}}}'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the audit (default 1: fastest on a busy machine)")
    p.add_argument("--permutations", type=int, default=1000,
                   help="label permutations behind the verdict's p-values (default 1000, at least 1000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--baseline", action="store_true",
                   help="also audit the base model (the same target with the LoRA switched off) on the same samples "
                        "and test the LoRA against it (paired AUC differences): report.md then says whether it leaks "
                        "beyond the base model; the base model's own report goes to --out/base_model/. Doubles the "
                        "audit time. Works with --run too (each run against its base model)")
    add_reference_arguments(p)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = OUTPUT_FILES


OUTPUT_FILES = """files written to --out:
  report.md             the verdict in words ("leaks", "no evidence of leakage at this size" or
                        "too few samples to tell"), then one table of every attack
  report.json           everything: verdict (headline, upper envelope with permutation null, power,
                        sample sizes needed, warnings, empirical epsilon lower bound), per-attack metrics
  roc.png               ROC curves (AUC in the legend): linear, and log-log down to FPR = 1/non-members
  per_timestep_auc.png  AUC against the timestep (diagnostic; when per-timestep attacks ran)
  manifest.json         the split used, with SHA-256 of every file (single run)
  base_model/           with --baseline: the base model's own report (report.md's second line and
                        report.json's verdict.beyond_base_model hold the paired test against it)
with several --run: the pooled report.md, report.json and roc.png at --out, and each run's own
  report.md, report.json, roc.png, per_timestep_auc.png and manifest.json in --out/run_NN_<name>/"""


def add_reference_arguments(p: argparse.ArgumentParser) -> None:
    """``--reference LORA=MANIFEST`` (repeatable) and ``--reference-mode`` for LiRA / RMIA."""
    g = p.add_argument_group("reference models for LiRA / RMIA (docs/audit.md: training reference LoRAs)")
    g.add_argument("--reference", action="append", default=[], metavar="LORA=MANIFEST",
                   help="a reference LoRA trained like the audited one (same base model and settings) and a smplora "
                        "holdout manifest whose 'member' set lists the images it trained on; repeat for each "
                        "reference (at least 2, 8+ recommended). Adds lira_online, lira_offline and rmia to the suite")
    g.add_argument("--references", metavar="DIR", default=None,
                   help="a folder written by `smplora references prepare`: every reference whose training has "
                        "finished (a LoRA .safetensors file in its output folder) is used, like --reference")
    g.add_argument("--reference-mode", choices=("online", "offline", "auto"), default="auto",
                   help="online: every audited image must be in some references' training sets and out of others; "
                        "offline: only references that did not train on an image are used; auto (default): online "
                        "when possible")


def list_attacks() -> str:
    from .attacks import DEFAULT_ATTACKS, FAST_ATTACKS, available_attacks
    from .references import REFERENCE_ATTACKS

    reg = available_attacks()
    tag = lambda n: ("" if n in FAST_ATTACKS else "  (not in --fast)") if n in DEFAULT_ATTACKS else \
        "  (needs --reference)" if n in REFERENCE_ATTACKS else "  (plugin)"  # noqa: E731
    return "\n".join(f"{n:16s} {reg[n].title or ''}{tag(n)}" for n in reg)


def _attacks(args: argparse.Namespace) -> Union[None, str, List[str]]:
    """``run_audit``'s ``attacks`` from ``--attacks`` / ``--fast``: a list, the suite ``"fast"`` or ``None``."""
    if args.fast:
        return "fast"
    return None if not args.attacks else [a.strip() for a in args.attacks.split(",") if a.strip()]


def run(args: argparse.Namespace) -> int:
    """Body of ``smplora audit``; raises :class:`AuditError` on bad input."""
    from .protocol import run_audit

    if args.fast and args.attacks:
        raise AuditError("--fast is a suite of attacks and --attacks a list: give one of them.")
    if args.permutations < 1000:
        raise AuditError(f"--permutations {args.permutations}: use at least 1000.")
    if args.threads is not None and args.threads < 1:
        raise AuditError(f"--threads {args.threads} must be >= 1.")
    if args.tokenizer is not None and not Path(args.base_model).is_file():
        raise AuditError(f"--tokenizer is for a single-file --base-model; {args.base_model} is not a file (a diffusers "
                         "folder brings its own tokenizer/): drop --tokenizer.")
    from .baseline_cli import check_baseline_args

    check_baseline_args(args)
    if args.run:
        return _run_pooled(args)
    if not args.lora:
        raise AuditError("give --lora FILE (one LoRA), or --run LORA=MANIFEST once per LoRA (pooled audit).")
    if args.manifest and (args.members or args.nonmembers):
        raise AuditError("give either --manifest or --members/--nonmembers, not both.")
    if not args.manifest and not (args.members and args.nonmembers):
        raise AuditError("give --members DIR and --nonmembers DIR (image folders), or --manifest FILE.")
    if not 0 < args.calibration_fraction < 1:
        raise AuditError(f"--calibration-fraction {args.calibration_fraction} must be in (0, 1).")
    cfg = _config(args)
    # cheap checks of every input before loading the model
    if args.manifest:
        groups = manifest_groups(args.manifest)
    else:
        groups = {"members": folder_images(args.members, "--members"),
                  "nonmembers": folder_images(args.nonmembers, "--nonmembers")}
    for name, paths in groups.items():
        if not paths:
            raise AuditError(f"the {name} set is empty.")
    for path in (Path(args.base_model), Path(args.lora)):
        if not path.exists():
            raise AuditError(f"{path} does not exist.")
    from .training_dp import read_training_dp

    read_training_dp(args.lora)  # a malformed smplora.dp entry fails here, before the model loads

    from .target import load_lora_target

    ref_specs = all_reference_specs(args)
    target = load_lora_target(args.base_model, args.lora, device=args.device, tokenizer=args.tokenizer)
    size = args.resolution or _model_resolution(target)
    channels = _image_channels(target)
    samples = {name: load_images(paths, size, channels, captions=not args.no_captions)
               for name, paths in groups.items()}
    references = reference_models(ref_specs, args, size, channels)
    kw = dict(config=cfg, out_dir=None if args.baseline else args.out, progress=not args.no_progress,
              num_threads=args.threads, n_permutations=args.permutations,
              attacks=_attacks(args),
              info={"base_model": str(args.base_model), "lora": str(args.lora), "resolution": size,
                    **architecture_info(target)},
              title=f"Membership-inference audit of {Path(args.lora).name}", references=references,
              lora_file=args.lora)

    def audit(tgt, **over):
        k = {**kw, **over}
        if "members" in samples:
            return run_audit(tgt, samples["members"], samples["nonmembers"],
                             calibration_fraction=args.calibration_fraction, **k)
        return run_audit(tgt, samples["member_eval"], samples["nonmember_eval"],
                         calibration_members=samples["member_calibration"],
                         calibration_nonmembers=samples["nonmember_calibration"], **k)

    report = audit(target)
    if args.baseline:
        from .baseline_cli import BaseModelTarget, attach, audit_base, paired_block, write_with_baseline

        base_target = BaseModelTarget(target)
        base = audit_base(lambda names: audit(base_target, attacks=names, lora_file=None,
                                              title=f"Membership-inference audit of the "
                                              f"base model of {Path(args.lora).name} (LoRA switched off)"),
                          report, base_target)
        attach(report, paired_block(report, base, n_permutations=args.permutations, seed=cfg.seed))
        write_with_baseline(report, base, args.out)
    out = Path(args.out)
    print((out / "report.md").read_text() if args.baseline else report.markdown())
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))} in {out}")
    return 0


def parse_runs(specs: Sequence[str]) -> List[Tuple[str, Path, Path]]:
    """``LORA=MANIFEST`` strings -> ``(name, lora, manifest)``; names are the LoRA file stems (made unique)."""
    out: List[Tuple[str, Path, Path]] = []
    for spec in specs:
        lora, sep, manifest = spec.partition("=")
        if not sep or not lora or not manifest:
            raise AuditError(f"--run {spec!r}: write it as LORA_FILE=MANIFEST_FILE.")
        for path in (Path(lora), Path(manifest)):
            if not path.is_file():
                raise AuditError(f"--run {spec!r}: {path} does not exist.")
        out.append((Path(lora).stem, Path(lora), Path(manifest)))
    stems = [n for n, _, _ in out]
    return [(n if stems.count(n) == 1 else f"{n}_{i + 1}", lo, ma) for i, (n, lo, ma) in enumerate(out)]


def _run_pooled(args: argparse.Namespace) -> int:
    from .pooled import AuditRun, run_audit_pooled
    from .target import load_lora_target

    if args.lora or args.manifest or args.members or args.nonmembers:
        raise AuditError("--run replaces --lora/--manifest/--members/--nonmembers; give one or the other.")
    if not 0 < args.calibration_fraction < 1:
        raise AuditError(f"--calibration-fraction {args.calibration_fraction} must be in (0, 1).")
    cfg = _config(args)
    specs = parse_runs(args.run)
    groups = {name: manifest_groups(str(manifest)) for name, _, manifest in specs}  # every input checked first
    if not Path(args.base_model).exists():
        raise AuditError(f"{args.base_model} does not exist.")
    ref_specs = all_reference_specs(args)
    runs = []
    size = None
    references = None
    for name, lora, _ in specs:
        target = load_lora_target(args.base_model, str(lora), device=args.device, tokenizer=args.tokenizer)
        if size is None:  # one resolution and one set of reference LoRAs for every run
            size = args.resolution or _model_resolution(target)
            channels = _image_channels(target)
            references = reference_models(ref_specs, args, size, channels, like=lora)
        s = {k: load_images(v, size, channels, captions=not args.no_captions) for k, v in groups[name].items()}
        info = {"lora": str(lora), "resolution": size, **architecture_info(target)}
        if "members" in s:
            runs.append(AuditRun(target, s["members"], s["nonmembers"], calibration_fraction=args.calibration_fraction,
                                 name=name, info=info, references=references, lora_file=lora))
        else:
            runs.append(AuditRun(target, s["member_eval"], s["nonmember_eval"],
                                 calibration_members=s["member_calibration"],
                                 calibration_nonmembers=s["nonmember_calibration"], name=name, info=info,
                                 references=references, lora_file=lora))
    pool_kw = dict(config=cfg, progress=not args.no_progress, num_threads=args.threads,
                   n_permutations=args.permutations)
    report = run_audit_pooled(
        runs, out_dir=None if args.baseline else args.out, **pool_kw,
        attacks=_attacks(args),
        title=f"Membership-inference audit pooled over {len(runs)} LoRAs")
    if args.baseline:
        import dataclasses

        from .baseline_cli import BaseModelTarget, attach, audit_base, paired_block, write_with_baseline

        base_runs = [dataclasses.replace(r, target=BaseModelTarget(r.target), lora_file=None) for r in runs]
        base = audit_base(lambda names: run_audit_pooled(
            base_runs, out_dir=None, attacks=names, **pool_kw,
            title=f"Membership-inference audit of the base model pooled over {len(runs)} runs (LoRAs switched off)"),
            report, base_runs[0].target)
        attach(report, paired_block(report, base, n_permutations=args.permutations, seed=cfg.seed))
        write_with_baseline(report, base, args.out)
        print((Path(args.out) / "report.md").read_text())
    else:
        print(report.markdown())
    print(f"wrote {Path(args.out) / 'report.md'} (pooled) and one folder per run in {args.out}")
    return 0
def reference_specs(specs: Sequence[str]) -> List[tuple]:
    """``LORA=MANIFEST`` strings -> (LoRA path, image paths the reference trained on); files checked."""
    from ..errors import HoldoutError
    from ..holdout import read_manifest

    out = []
    for spec in specs:
        lora, sep, manifest = spec.rpartition("=")
        if not sep or not lora or not manifest:
            raise AuditError(f"--reference {spec!r}: expected LORA=MANIFEST (a LoRA .safetensors file and the manifest "
                             "of the images it trained on).")
        if not Path(lora).is_file():
            raise AuditError(f"--reference {spec!r}: LoRA file {lora} does not exist.")
        try:
            sets = read_manifest(manifest)
        except HoldoutError as exc:
            raise AuditError(f"--reference {spec!r}: {exc}") from exc
        names = [k for k in ("member", "members") if k in sets]
        if not names:
            raise AuditError(f"--reference manifest {manifest} has sets {sorted(sets)}; it needs a 'member' set "
                             "listing the images this reference LoRA trained on.")
        root = Path(manifest).resolve().parent
        files = [p if p.is_absolute() else root / p for k in names for p in map(Path, sets[k])]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise AuditError(f"--reference manifest {manifest} names {len(missing)} image(s) that do not exist, e.g. "
                             f"{missing[0]}; list the image files the reference LoRA trained on.")
        if not files:
            raise AuditError(f"--reference manifest {manifest}: its 'member' set is empty.")
        out.append((Path(lora), files))
    if len(out) == 1:
        raise AuditError("one --reference given; LiRA and RMIA need at least 2 reference LoRAs "
                         "(8 or more recommended).")
    return out


def all_reference_specs(args: argparse.Namespace) -> List[tuple]:
    """``--reference`` options plus the finished references of ``--references DIR``, all checked."""
    extra: List[str] = []
    if getattr(args, "references", None):
        from .references_cli import finished_reference_specs

        extra = finished_reference_specs(args.references, given=len(args.reference))
    return reference_specs(list(args.reference) + extra)


def reference_models(specs: Sequence[tuple], args: argparse.Namespace, size: int, channels: int, like: Any = None):
    """:class:`~.references.References` for ``specs``; trained images are matched by path and by pixels."""
    if not specs:
        return None
    from .references import References

    pairs = []
    for lora, files in specs:
        pix = load_images(files, size, channels, captions=False)
        ids = set(pix.identity())  # explicit ids: the paths as given
        ids |= set(type(pix)(pix.images).identity())  # and the pixel hashes
        ids |= {str(f.resolve()) for f in files}
        pairs.append((lora, ids))
    return References.from_lora_files(args.base_model, pairs, mode=args.reference_mode, device=args.device,
                                      like=like if like is not None else args.lora,
                                      tokenizer=getattr(args, "tokenizer", None))


def _config(args: argparse.Namespace):
    from .engine import AuditConfig

    d: Dict[str, object] = {}
    if args.config:
        text = args.config
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise AuditError(f"--config {text}: not JSON text and not an existing file.")
            text = path.read_text()
        try:
            d = json.loads(text)
        except ValueError as exc:
            raise AuditError(f"--config is not valid JSON ({exc}).") from exc
        if not isinstance(d, dict):
            raise AuditError("--config must be a JSON object of AuditConfig fields.")
    d.setdefault("seed", args.seed)
    d.setdefault("batch_size", args.batch_size)
    if args.draws is not None:
        d["draws"] = args.draws
    if getattr(args, "flip_average", False):
        d["flip_average"] = True
    cfg = AuditConfig.from_dict(d)
    cfg.validate()
    return cfg


def _model_resolution(target) -> int:
    unet = getattr(target, "unet", None)
    if unet is None:  # flow-matching transformers: the VAE's image size
        return int(getattr(target.vae.config, "sample_size", 1024) or 1024)
    s = int(getattr(unet.config, "sample_size", 64) or 64)
    if target.vae is not None:
        s *= 2 ** (len(target.vae.config.block_out_channels) - 1)
    return s


def architecture_info(target) -> Dict[str, str]:
    """What the report says about the audited model's family and how its losses are measured."""
    arch = getattr(target, "architecture", None)
    if arch is None:
        return {}
    out = {"architecture": arch}
    if getattr(target, "prediction_type", None) == "flow":
        out["loss_parameterisation"] = ("flow matching audited as the equivalent noise prediction: loss at a level = "
                                        "(1 - sigma)^2 x the velocity loss (docs/audit.md)")
    return out


def _image_channels(target) -> int:
    if getattr(target, "vae", None) is not None:
        return 3
    return int(target.unet.config.in_channels)


def folder_images(folder: str, what: str) -> List[Path]:
    path = Path(folder)
    if not path.is_dir():
        raise AuditError(f"{what} {folder}: folder does not exist.")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise AuditError(f"{what} {folder} contains no images ({', '.join(IMAGE_EXTS)}).")
    return files


_ALIASES = {"member": "members", "members": "members", "nonmember": "nonmembers", "nonmembers": "nonmembers",
            "non_member": "nonmembers", "non_members": "nonmembers"}
_EXPLICIT = ("member_calibration", "nonmember_calibration", "member_eval", "nonmember_eval")


def manifest_groups(path: str) -> Dict[str, List[Path]]:
    """Image paths per set from a manifest (relative ids resolve against the manifest's folder)."""
    from ..errors import HoldoutError
    from ..holdout import read_manifest

    try:
        sets = read_manifest(path)  # raises if two sets share an image
    except HoldoutError as exc:
        raise AuditError(f"manifest {path}: {exc}") from exc
    root = Path(path).resolve().parent
    resolve = lambda ids: [p if p.is_absolute() else root / p for p in map(Path, ids)]  # noqa: E731
    if all(k in sets for k in _EXPLICIT):
        groups = {k: resolve(sets[k]) for k in _EXPLICIT}
    else:
        groups = {}
        for k, v in sets.items():
            if k in _ALIASES:
                groups.setdefault(_ALIASES[k], []).extend(resolve(v))
        if set(groups) != {"members", "nonmembers"}:
            raise AuditError(
                f"manifest {path} has sets {sorted(sets)}; it needs 'member' and 'nonmember' (split here), or all of "
                f"{', '.join(_EXPLICIT)}."
            )
    for name, files in groups.items():
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise AuditError(f"manifest {path}: {len(missing)} file(s) of set {name!r} do not exist, "
                             f"e.g. {missing[0]}.")
    return groups


def load_images(paths: Sequence[Path], size: int, channels: int, *, captions: bool = True):
    """Images resized (shorter side) and centre-cropped to ``size``, in [-1, 1], with captions when found."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from .protocol import AuditSamples

    arrs, caps = [], []
    meta_cache: Dict[Path, Dict[str, str]] = {}
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB" if channels == 3 else "L")
                w, h = im.size
                scale = size / min(w, h)
                im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
                w, h = im.size
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
                a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise AuditError(f"cannot read image {p}: {exc}. Remove or replace the file.") from exc
        arrs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        caps.append(_caption(p, meta_cache) if captions else None)
    images = torch.from_numpy(np.stack(arrs))
    have = [c is not None for c in caps]
    if any(have) and not all(have):
        missing = [str(p) for p, h in zip(paths, have) if not h]
        raise AuditError(f"{len(missing)} image(s) have no caption file while others do, e.g. {missing[0]}; "
                         "add NAME.txt captions for all, or pass --no-captions.")
    return AuditSamples(images, caps if all(have) else None, [str(p) for p in paths])


def _caption(p: Path, cache: Dict[Path, Dict[str, str]]) -> Optional[str]:
    for ext in CAPTION_EXTS:
        c = p.with_suffix(ext)
        if c.is_file():
            return c.read_text(encoding="utf-8").strip()
    meta = p.parent / "metadata.jsonl"
    if meta.is_file():
        if p.parent not in cache:
            rows: Dict[str, str] = {}
            for line in meta.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError as exc:
                        raise AuditError(f"{meta} has an invalid line ({exc}).") from exc
                    if "file_name" in row and isinstance(row.get("text"), str):
                        rows[row["file_name"]] = row["text"]
            cache[p.parent] = rows
        return cache[p.parent].get(p.name)
    return None
