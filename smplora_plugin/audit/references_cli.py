"""``smplora references prepare``: training sets, manifests and a training script for reference LoRAs.

The pool's images are split into balanced random halves (:func:`~.references.balanced_halves`:
each image is in the training set of exactly half of the references). Per reference ``i`` the
folder ``--out/ref_NN/`` gets ``data/`` (symlinks, or copies with ``--copy``, in the kohya or
image-folder layout), ``manifest.json`` (the images it trains on, set ``member``; the others,
set ``nonmember``) and an empty ``out/`` for the trainer; ``--out/train_references.sh`` holds one
training command per reference, ``--out/references.json`` the index that
``smplora audit --references DIR`` reads to find every finished reference.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .target import AuditError

INDEX = "references.json"
SCRIPT = "train_references.sh"
FORMAT = "smplora-references/1"
LAYOUTS = ("kohya", "imagefolder")
_KOHYA_DIR = re.compile(r"^(\d+)_(.+)$")


DESCRIPTION = """Split the pool's images into balanced random halves (each image trains exactly half of the
references) and write, per reference NN:
  --out/ref_NN/data/           its training images (symlinks, or copies with --copy), kohya or imagefolder layout
  --out/ref_NN/manifest.json   the images it trains on (set 'member') and the others ('nonmember')
  --out/ref_NN/out/            empty: the trainer writes the reference LoRA here ({out})
and --out/train_references.sh (one training command per reference, from --command) and
--out/references.json (what `smplora audit --references DIR` reads to find the finished references)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", required=True, metavar="DIR",
                   help="population pool: a folder of images (captions as NAME.txt / NAME.caption or metadata.jsonl), "
                        "or a kohya folder of <repeats>_<name>/ subfolders; it should contain the audited members "
                        "and non-members (online LiRA / RMIA)")
    p.add_argument("--n", type=int, default=8, help="number of reference LoRAs (at least 2; default 8)")
    p.add_argument("--layout", choices=LAYOUTS, required=True,
                   help="kohya: <repeats>_<name>/ subfolders under each training folder (sd-scripts' "
                        "--train_data_dir); imagefolder: a flat folder of images with caption files next to them "
                        "(diffusers' --train_data_dir)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must be new or empty)")
    p.add_argument("--command", dest="train_command", required=True, metavar="TEMPLATE",
                   help="training command for one reference; {data} (its training folder) and {out} (its output "
                        "folder) are required, {i} (its number) is optional")
    p.add_argument("--copy", action="store_true", help="copy the images instead of symlinking them")
    p.add_argument("--repeats", type=int, default=1,
                   help="kohya layout, flat pool: the repeat count of the <repeats>_<pool name>/ folder (default 1; "
                        "a kohya pool keeps its own subfolders)")
    p.add_argument("--seed", type=int, default=0, help="seed of the balanced halves (default 0)")


def build_parser(sub: Any) -> None:
    """``smplora references {prepare}`` under the top-level sub-parsers ``sub``."""
    refs = sub.add_parser("references", help="reference LoRAs for LiRA / RMIA: prepare their training sets",
                          description="Reference LoRAs for the audit's LiRA / RMIA attacks.")
    rsub = refs.add_subparsers(dest="references_command", metavar="{prepare}")
    prep = rsub.add_parser(
        "prepare", help="balanced halves of a pool, manifests and a training script for N reference LoRAs",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(prep)


# ------------------------------------------------------------------------------------------
# prepare


def pool_images(pool: Path) -> List[Tuple[Path, Optional[str]]]:
    """``(image, kohya subfolder or None)`` of the pool, sorted."""
    from .cli import IMAGE_EXTS

    if not pool.is_dir():
        raise AuditError(f"--pool {pool}: folder does not exist.")
    is_img = lambda p: p.is_file() and p.suffix.lower() in IMAGE_EXTS  # noqa: E731
    out: List[Tuple[Path, Optional[str]]] = [(p, None) for p in sorted(pool.iterdir()) if is_img(p)]
    for sub in sorted(d for d in pool.iterdir() if d.is_dir() and _KOHYA_DIR.match(d.name)):
        out += [(p, sub.name) for p in sorted(sub.iterdir()) if is_img(p)]
    if not out:
        raise AuditError(f"--pool {pool} is empty: it holds no images ({', '.join(IMAGE_EXTS)}) directly or in "
                         "kohya <repeats>_<name>/ subfolders. Point --pool at the folder of your population images.")
    return out


def check_template(command: str) -> None:
    missing = [k for k in ("{data}", "{out}") if k not in command]
    if missing:
        raise AuditError(f"--command has no {' and no '.join(missing)}: the template must name each reference's "
                         "training folder as {data} and its output folder as {out}, e.g. "
                         "'accelerate launch train_network.py ... --train_data_dir {data} --output_dir {out}'.")


def check_halves(n_images: int, n: int, seed: int):
    """The balanced halves, refusing an ``n`` that leaves a reference empty or two alike."""
    import numpy as np

    from .references import MIN_REFERENCES, balanced_halves

    if n < MIN_REFERENCES:
        raise AuditError(f"--n {n}: LiRA and RMIA need at least {MIN_REFERENCES} reference LoRAs; use --n 8 or more.")

    def ok(k: int) -> bool:
        keep = balanced_halves(n_images, k, seed)
        return bool(keep.any(1).all()) and len({r.tobytes() for r in keep}) == k

    if not ok(n):
        best = max((k for k in range(MIN_REFERENCES, n) if ok(k)), default=None)
        hint = f"use --n {best} or fewer, or" if best else "use"
        raise AuditError(f"--n {n} is too large for a pool of {n_images} image(s): some references would train on no "
                         f"image or on the same images as another; {hint} a larger pool.")
    return np.asarray(balanced_halves(n_images, n, seed))


def _captions(images: Sequence[Tuple[Path, Optional[str]]]) -> Dict[Path, Tuple[Optional[Path], Optional[str]]]:
    """Per image: its caption file, or else its caption text from metadata.jsonl, or neither."""
    from .cli import CAPTION_EXTS, _caption

    cache: Dict[Path, Dict[str, str]] = {}
    out = {}
    for p, _ in images:
        side = next((p.with_suffix(e) for e in CAPTION_EXTS if p.with_suffix(e).is_file()), None)
        out[p] = (side, None) if side is not None else (None, _caption(p, cache))
    return out


def prepare(args: argparse.Namespace) -> int:
    """Body of ``smplora references prepare``; every check comes before the first file is written."""
    pool = Path(args.pool)
    images = pool_images(pool)
    keep = check_halves(len(images), args.n, args.seed)
    check_template(args.train_command)
    if args.repeats < 1:
        raise AuditError(f"--repeats {args.repeats} must be at least 1.")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AuditError(f"--out {out} exists and is not empty: choose a new folder (or empty this one).")
    names = [p.name for p, _ in images]
    if args.layout == "imagefolder" and len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise AuditError(f"two pool images are named {dup} (in different subfolders); the imagefolder layout is flat: "
                         "rename one, or use --layout kohya.")
    caps = _captions(images)

    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
    from ..holdout import write_manifest

    index: Dict[str, Any] = {"format": FORMAT, "pool": str(pool.resolve()), "n": args.n, "layout": args.layout,
                             "seed": args.seed, "command": args.train_command, "references": []}
    lines = ["#!/usr/bin/env bash", f"# {args.n} reference LoRAs for `smplora audit --references {out}`; written by "
             "`smplora references prepare`.", "# Run them here, or one line per machine; a reference is finished "
             "when its out/ folder holds a LoRA .safetensors file.", "set -euo pipefail", ""]
    for r in range(args.n):
        name = f"ref_{r:02d}"
        ref = root / name
        data, rout = ref / "data", ref / "out"
        chosen = [images[j] for j in range(len(images)) if keep[r, j]]
        meta_rows = []
        for src, sub in chosen:
            if args.layout == "kohya":
                folder = data / (sub or f"{args.repeats}_{pool.resolve().name}")
            else:
                folder = data
            folder.mkdir(parents=True, exist_ok=True)
            _place(src, folder / src.name, args.copy)
            side, text = caps[src]
            if side is not None:
                _place(side, folder / side.name, args.copy)
            elif text is not None:
                if args.layout == "kohya":
                    (folder / (src.stem + ".txt")).write_text(text + "\n", encoding="utf-8")
                else:
                    meta_rows.append({"file_name": src.name, "text": text})
        if meta_rows:
            (data / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta_rows), encoding="utf-8")
        rout.mkdir(parents=True, exist_ok=True)
        used = {src for src, _ in chosen}
        write_manifest(ref / "manifest.json", {"member": [str(s.resolve()) for s, _ in chosen],
                                               "nonmember": [str(s.resolve()) for s, _ in images if s not in used]},
                       seed=args.seed, extra={"reference": r, "pool": str(pool.resolve())})
        cmd = (args.train_command.replace("{data}", shlex.quote(str(data))).replace("{out}", shlex.quote(str(rout)))
               .replace("{i}", str(r)))
        lines += [f"# reference {r}: {len(chosen)} of {len(images)} pool images", cmd, ""]
        index["references"].append({"name": name, "data": f"{name}/data", "out": f"{name}/out",
                                    "manifest": f"{name}/manifest.json", "images": len(chosen)})
    (root / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    script = root / SCRIPT
    script.write_text("\n".join(lines))
    script.chmod(0o755)
    print(f"wrote {args.n} reference training sets ({args.layout} layout, {'copies' if args.copy else 'symlinks'}) of "
          f"{len(images)} pool images, their manifests and {script}.\nNext: run `bash {script}`, then "
          f"`smplora audit ... --references {out}`.")
    return 0


def _place(src: Path, dst: Path, copy: bool) -> None:
    if copy:
        shutil.copy2(src, dst)
    else:
        os.symlink(src.resolve(), dst)


# ------------------------------------------------------------------------------------------
# smplora audit --references DIR


def find_lora(folder: Path) -> Optional[Path]:
    """The LoRA file a trainer wrote into ``folder``: the only .safetensors file, diffusers'
    ``pytorch_lora_weights.safetensors``, or the one without kohya's ``-NNNNNN`` epoch/step suffix."""
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".safetensors")
    if len(files) <= 1:
        return files[0] if files else None
    named = [p for p in files if p.name == "pytorch_lora_weights.safetensors"]
    if named:
        return named[0]
    final = [p for p in files if not re.search(r"-\d{6}$", p.stem)]
    if len(final) == 1:
        return final[0]
    raise AuditError(f"{folder} holds several LoRA files ({', '.join(p.name for p in files)}); keep only the final "
                     "one there (move intermediate saves elsewhere).")


def finished_reference_specs(folder: str, given: int = 0) -> List[str]:
    """``LORA=MANIFEST`` of every finished reference in a ``references prepare`` folder.

    Missing references are named on stderr; fewer finished than the reference attacks need
    (counting ``given`` other ``--reference`` options) is an error.
    """
    from .references import MIN_REFERENCES

    root = Path(folder)
    idx = root / INDEX
    if not idx.is_file():
        raise AuditError(f"--references {folder}: no {INDEX} there; give the --out folder of `smplora references "
                         "prepare` (or list reference LoRAs with --reference LORA=MANIFEST).")
    try:
        doc = json.loads(idx.read_text())
    except ValueError as exc:
        raise AuditError(f"--references {folder}: {INDEX} is not valid JSON ({exc}).") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("references"), list):
        raise AuditError(f"--references {folder}: {INDEX} was not written by `smplora references prepare`.")
    specs, missing = [], []
    for ref in doc["references"]:
        lora = find_lora(root / ref["out"])
        if lora is None:
            missing.append(ref["name"])
        else:
            specs.append(f"{lora}={root / ref['manifest']}")
    if missing and len(specs) + given < MIN_REFERENCES:
        raise AuditError(f"--references {folder}: {len(specs)} of {len(doc['references'])} references are trained "
                         f"(missing: {', '.join(missing)}: no LoRA .safetensors file in their out/ folder); LiRA and "
                         f"RMIA need at least {MIN_REFERENCES}. Run {root / SCRIPT} (the missing lines) first.")
    if missing:
        print(f"smplora audit: WARNING: --references {folder}: {len(missing)} of {len(doc['references'])} references "
              f"are not trained yet ({', '.join(missing)}); auditing with the {len(specs)} finished ones.",
              file=sys.stderr)
    return specs


def run(args: argparse.Namespace) -> int:
    if getattr(args, "references_command", None) != "prepare":
        raise AuditError("give a sub-command: smplora references prepare --pool DIR --n 8 --layout kohya|imagefolder "
                         "--out DIR --command TEMPLATE.")
    return prepare(args)
