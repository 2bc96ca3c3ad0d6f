"""Build the demo's ``emoji`` data set from the npm packages ``emoji-datasource-{twitter,google}@16.0.0``.

Run once by hand (the output ships in the package; nothing downloads at run time)::

    mkdir -p /tmp/emoji && cd /tmp/emoji && \\
        npm pack emoji-datasource-twitter@16.0.0 emoji-datasource-google@16.0.0
    python scripts/emoji/make_emoji_dataset.py /tmp/emoji [--out smplora_plugin/demo/assets/emoji]

It reads the two ``.tgz`` files in the folder given (without unpacking them), and writes

- ``emoji_16px.safetensors`` and ``emoji_32px.safetensors``: uint8 tensors ``twitter`` and
  ``google`` of shape ``(N, H, W, 3)``, RGB on white, row ``i`` of both is the same emoji;
- ``emoji.json``: per emoji its code points, name, short name, category, subcategory, caption and
  variant group; the selection rules; the packages' versions, SHA-1 and SHA-512; this command.

Selection (deliberate, and recorded in ``emoji.json``):

- skin tones: only the base (default yellow) image of each emoji; the skin-tone variants are
  recolourings of it and are left out;
- flags (category ``Flags``: 270 country, subdivision and other flags) are left out: one
  rectangle template whose content is a country design, not the emoji style; and the
  ``Component`` category (skin-tone swatches, hair parts) is left out;
- gender variants (``man / woman / person`` X, ``X`` with a gender sign, couples and families
  differing only in who is in them) form one variant group; only one member of each group is
  kept (the gender-neutral one when it exists, else the first in the packages' sort order), so no
  near-duplicate of a member can ever be a non-member.

Images: the 64 px PNGs composited on white, then area-averaged (PIL ``BOX``) to 32 and 16 px.
Deterministic: the same packages give identical arrays (checked: a second build matched pixel for
pixel; the safetensors header's key order may differ) and the same ``emoji.json`` but its ``command``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

VERSION = "16.0.0"
STYLES = ("twitter", "google")
RESOLUTIONS = (16, 32)
DROP_CATEGORIES = ("Flags", "Component")
_GENDER = {"2640", "2642"}
_PERSON = {"1F468": "P", "1F469": "P", "1F9D1": "P", "1F466": "C", "1F467": "C", "1F9D2": "C"}
_DEFAULT_OUT = Path(__file__).resolve().parents[2] / "smplora_plugin" / "demo" / "assets" / "emoji"


def variant_group(unified: str) -> str:
    """Code points with gender signs and variation selectors dropped and man / woman / person (and
    boy / girl / child) merged: ``1F468-200D-1F4BB`` (man technologist) -> ``P-200D-1F4BB``."""
    parts = [p for p in unified.upper().split("-") if p not in _GENDER and p != "FE0F"]
    parts = [_PERSON.get(p, p) for p in parts]
    while parts and parts[-1] == "200D":
        parts.pop()
    return "-".join(parts)


def caption(entry: Dict) -> str:
    """Subcategory words then name words, lower case, letters and digits only:
    ``animal mammal water buffalo``."""
    words = entry["subcategory"].replace("-", " ").split() + re.split(r"[^a-z0-9]+", entry["name"].lower())
    return " ".join(w for w in words if w)


def _is_neutral(unified: str) -> bool:
    parts = set(unified.upper().split("-"))
    return not (parts & _GENDER) and not (parts & {"1F468", "1F469", "1F466", "1F467"})


def select(entries: Sequence[Dict]) -> Tuple[List[Dict], Dict[str, int]]:
    """The kept emoji (one per variant group), in sort order, and the counts behind the choice."""
    cand = [e for e in entries if e["category"] not in DROP_CATEGORIES and e.get("has_img_twitter")
            and e.get("has_img_google")]
    cand.sort(key=lambda e: e["sort_order"])
    groups: Dict[str, List[Dict]] = {}
    for e in cand:
        groups.setdefault(variant_group(e["unified"]), []).append(e)
    kept = []
    for members in groups.values():
        neutral = [e for e in members if _is_neutral(e["unified"])]
        kept.append((neutral or members)[0])
    kept.sort(key=lambda e: e["sort_order"])
    counts = {"emoji_in_packages": len(entries),
              "skin_tone_images_left_out": sum(len(e.get("skin_variations") or {}) for e in entries),
              **{f"left_out_category_{c}": sum(e["category"] == c for e in entries) for c in DROP_CATEGORIES},
              "without_both_images": sum(e["category"] not in DROP_CATEGORIES for e in entries) - len(cand),
              "variant_groups": len(groups), "gender_variants_left_out": len(cand) - len(groups),
              "kept": len(kept)}
    return kept, counts


def _digest(path: Path) -> Dict[str, str]:
    blob = path.read_bytes()
    return {"file": path.name, "sha1": hashlib.sha1(blob).hexdigest(), "sha512": hashlib.sha512(blob).hexdigest(),
            "bytes": str(len(blob))}


def _render(png: bytes, sizes: Sequence[int]) -> Dict[int, np.ndarray]:
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGBA")
    if im.size != (64, 64):
        raise ValueError(f"expected a 64x64 PNG, got {im.size}")
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, im).convert("RGB")
    return {s: np.asarray(rgb.resize((s, s), Image.BOX), dtype=np.uint8) for s in sizes}


def build(src: Path, out: Path, argv: Sequence[str]) -> Dict:
    from safetensors.numpy import save_file

    tgz = {s: src / f"emoji-datasource-{s}-{VERSION}.tgz" for s in STYLES}
    missing = [str(p) for p in tgz.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"missing {missing}; run `npm pack emoji-datasource-twitter@{VERSION} "
                         f"emoji-datasource-google@{VERSION}` in {src} first.")
    tars = {s: tarfile.open(p, "r:gz") for s, p in tgz.items()}
    meta_json = {s: json.load(tars[s].extractfile("package/emoji.json")) for s in STYLES}
    if meta_json["twitter"] != meta_json["google"]:
        raise SystemExit("the two packages' emoji.json differ; use the same version of both.")
    kept, counts = select(meta_json["twitter"])
    images = {r: {s: [] for s in STYLES} for r in RESOLUTIONS}
    for s in STYLES:
        names = set(tars[s].getnames())
        for e in kept:
            member = f"package/img/{s}/64/{e['image']}"
            if member not in names:
                raise SystemExit(f"{tgz[s].name} lacks {member}")
            for r, arr in _render(tars[s].extractfile(member).read(), RESOLUTIONS).items():
                images[r][s].append(arr)
    out.mkdir(parents=True, exist_ok=True)
    for r in RESOLUTIONS:
        save_file({s: np.stack(images[r][s]) for s in STYLES}, str(out / f"emoji_{r}px.safetensors"),
                  metadata={"smplora.demo.kind": "emoji-images", "resolution": str(r), "layout": "N,H,W,RGB uint8",
                            "rows": "same order as emoji.json 'emoji'"})
        (out / f"emoji_{r}px.safetensors").chmod(0o644)
    rows = [{"unified": e["unified"], "name": e["name"].lower(), "short_name": e["short_name"],
             "category": e["category"], "subcategory": e["subcategory"], "caption": caption(e),
             "group": variant_group(e["unified"])} for e in kept]
    meta = {"format": "smplora-emoji/1",
            "command": " ".join(["python scripts/emoji/make_emoji_dataset.py", *argv]),
            "packages": {s: {"name": f"emoji-datasource-{s}", "version": VERSION, **_digest(tgz[s])} for s in STYLES},
            "styles": list(STYLES), "resolutions": list(RESOLUTIONS),
            "selection": {"skin_tones": "base image only; skin-tone variants left out",
                          "categories_left_out": list(DROP_CATEGORIES),
                          "gender_variants": "one per variant group (gender-neutral one when it exists)",
                          "counts": counts},
            "rendering": "64 px PNG alpha-composited on white, PIL BOX (area) resize",
            "emoji": rows}
    (out / "emoji.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="folder holding the two npm pack .tgz files")
    p.add_argument("--out", type=Path, default=_DEFAULT_OUT, help=f"output folder (default {_DEFAULT_OUT})")
    args = p.parse_args(argv)
    meta = build(args.src, args.out, argv)
    sizes = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {len(meta['emoji'])} emoji x {len(STYLES)} styles at {RESOLUTIONS} px to {args.out} "
          f"({sizes / 1e6:.2f} MB); counts: {meta['selection']['counts']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
