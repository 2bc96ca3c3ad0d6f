"""Which members are exposed: the report's ranking of members, near-copy flags and ``exposure.png``.

Per evaluation member, from the report's **headline attack** (the one chosen on calibration):

* **score**: the attack's score (higher = more member-like);
* **calibrated score**: the score standardised with the calibration non-members' mean and standard
  deviation (as pooling does): 0 is a typical non-member, +3 three standard deviations above;
* **share of non-members below**: the share of the evaluation non-members whose score is lower,
  ties counting half ("more member-like than 99.6% of non-members"). Its mean over the members is
  the attack's evaluation AUC (Mann-Whitney).

Members are ordered by score (ties: by id, then position), and the first ``top_k`` are listed.
Only evaluation members are ranked: the calibration members chose the attack and its settings.

**Near-copy flag**, when the generation attack ran: the mean squared difference (pixels in [-1, 1]
at the audit's resolution; latents when the target cannot decode) between a sample and the
nearest of the LoRA's samples generated at its caption. The threshold is the lower
``near_copy_quantile`` quantile (default 1%) of that distance over the calibration non-members, and
a sample is flagged when its distance is strictly below it, so at most that share of calibration
non-members is flagged; the share of the evaluation non-members flagged is measured on samples the
threshold never saw. A heuristic: a flagged member resembles a generated image more closely than
almost any non-member does, which is neither necessary nor sufficient for copying.

Pooled reports are ranked per run (a member is exposed by the LoRA that trained on it, against that
run's non-members): each run's report has its own section and ``exposure.png``.

:func:`attach_exposure` sets ``report.exposure`` (:class:`Exposure`, or :class:`PooledExposure`);
``report.json`` then has an ``exposure`` block, ``report.md`` an "Exposure" section and
``report.write`` draws ``exposure.png`` (:meth:`Exposure.plot`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .config import ExposureOptions, make_options
from .report import run_folder
from .types import AuditError


@dataclass
class MemberExposure:
    """One evaluation member: its rank (1 = most exposed), scores, and nearest-generated distance."""

    rank: int
    id: str
    score: float
    calibrated_score: float
    nonmember_share_below: float
    distance: Optional[float] = None
    near_copy: Optional[bool] = None
    position: int = field(default=0, repr=False)  # index among the evaluation members (the report's order)

    @property
    def rank_text(self) -> str:
        """``"more member-like than X% of non-members"``."""
        return rank_text(self.nonmember_share_below)


@dataclass
class Exposure:
    """The members of one report ranked by exposure, with the near-copy check (see the module docstring)."""

    attack: str
    title: str
    top_k: int
    members: List[MemberExposure]
    n_nonmember: int
    quantile: float
    distance_space: Optional[str] = None  # "pixels" / "latents"; None without the generation attack's samples
    generated_per_caption: Optional[int] = None
    threshold: Optional[float] = None
    n_calibration_nonmember: int = 0
    nonmembers_flagged: Optional[int] = None
    members_flagged: Optional[int] = None
    no_distance_reason: Optional[str] = None

    @property
    def top(self) -> List[MemberExposure]:
        """The ``top_k`` most exposed members."""
        return self.members[:self.top_k]

    @property
    def nonmember_flag_share(self) -> Optional[float]:
        """The share of evaluation non-members flagged as near copies (``None`` without a threshold)."""
        return None if self.nonmembers_flagged is None else self.nonmembers_flagged / max(1, self.n_nonmember)

    def to_dict(self) -> Dict[str, Any]:
        """report.json's ``exposure`` block: settings, the near-copy check and every ranked member."""
        d = {k: v for k, v in asdict(self).items() if k != "members"}
        d["nonmember_flag_share"] = self.nonmember_flag_share
        d["members"] = [{**{k: v for k, v in asdict(m).items() if k != "position"}, "rank_text": m.rank_text}
                        for m in self.members]
        d["note"] = ("members of the evaluation split ranked by the headline attack's score; nonmember_share_below: "
                     "share of evaluation non-members scoring lower (ties half); near_copy: mean squared difference "
                     "to the nearest LoRA sample generated at the caption below the lower quantile of the calibration "
                     "non-members' (a heuristic, not a proof of copying)")
        return d

    def plot(self, path: Union[str, Path], report: Any) -> Path:
        """Draw ``exposure.png`` (:func:`plot_exposure`) with the report's kept images."""
        return plot_exposure(self, report, path)


@dataclass
class PooledExposure:
    """A pooled report's exposure: ranked per run; the most exposed member of each run."""

    runs: List[Dict[str, Any]]

    def to_dict(self) -> Dict[str, Any]:
        """report.json's ``exposure`` block of a pooled report."""
        return {"ranked": "per run: each member against the non-members of its own run (its own LoRA)",
                "runs": self.runs}


def rank_text(share: float) -> str:
    """``"more member-like than 99.6% of non-members"``."""
    return f"more member-like than {100 * share:.1f}% of non-members"


def share_below(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per score, the share of ``reference`` strictly below it plus half the share equal to it."""
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64)
    if ref.size == 0:
        raise AuditError("exposure needs at least one non-member score to rank members against.")
    lo = np.searchsorted(ref, s, side="left")
    hi = np.searchsorted(ref, s, side="right")
    return (lo + 0.5 * (hi - lo)) / ref.size


def near_copy_threshold(distances: np.ndarray, quantile: float) -> float:
    """The lower ``quantile`` of ``distances``: strictly below it lie at most that share of them."""
    d = np.sort(np.asarray(distances, dtype=np.float64))
    if d.size == 0:
        raise AuditError("the near-copy threshold needs at least one calibration non-member distance.")
    return float(d[int(math.floor(quantile * (d.size - 1)))])


def exposure_options(report: Any, top_k: Optional[int] = None, quantile: Optional[float] = None) -> ExposureOptions:
    """The report config's exposure options (``attack_options["exposure"]``) with overrides, validated."""
    values = dict(((getattr(report, "config", None) or {}).get("attack_options") or {}).get("exposure") or {})
    if top_k is not None:
        values["top_k"] = top_k
    if quantile is not None:
        values["near_copy_quantile"] = quantile
    return make_options("exposure", values)


def compute_exposure(report: Any, *, top_k: Optional[int] = None,
                     quantile: Optional[float] = None) -> Optional[Exposure]:
    """``report``'s evaluation members ranked by exposure; ``None`` for a pooled report or without a headline.

    ``top_k`` / ``quantile`` override the config's exposure options; bad values raise :class:`AuditError`.
    """
    opts = exposure_options(report, top_k, quantile)
    head = ((report.verdict or {}).get("headline") or {}).get("attack")
    if report.runs is not None or head is None or not report.scores or head not in report.scores:
        return None
    sc = report.scores[head]
    labels = np.asarray(report.eval_labels).astype(bool)
    ev = np.asarray(sc.eval_scores, dtype=np.float64)
    if ev.shape != labels.shape:
        raise AuditError(f"the report's {head!r} scores ({ev.size}) do not match its {labels.size} evaluation labels.")
    cal_non = np.asarray(sc.cal_scores, dtype=np.float64)[np.asarray(sc.cal_labels) == 0]
    mem, non = ev[labels], ev[~labels]
    if mem.size == 0 or non.size == 0:
        return None
    mu = float(cal_non.mean()) if cal_non.size else 0.0
    sd = float(cal_non.std()) if cal_non.size else 1.0
    if not np.isfinite(sd) or sd <= 1e-12 * max(1.0, abs(mu)):
        sd = 1.0  # constant calibration scores: centre only
    ids = _eval_member_ids(report, int(mem.size))
    shares = share_below(mem, non)
    order = sorted(range(mem.size), key=lambda i: (-mem[i], ids[i], i))
    members = [MemberExposure(rank=r + 1, id=ids[i], score=float(mem[i]), calibrated_score=(float(mem[i]) - mu) / sd,
                              nonmember_share_below=float(shares[i]), position=i) for r, i in enumerate(order)]
    title = (report.attacks.get(head) or {}).get("title", head)
    ex = Exposure(attack=head, title=title, top_k=opts.top_k, members=members, n_nonmember=int(non.size),
                  quantile=float(opts.near_copy_quantile))
    _near_copies(ex, report)
    return ex


def _eval_member_ids(report: Any, n: int) -> List[str]:
    ids = list((report.manifest_sets or {}).get("member_eval") or [])
    return ids if len(ids) == n else [f"evaluation member {i + 1}" for i in range(n)]


def _context_slices(report: Any) -> Dict[str, slice]:
    """Where each split sits in the score context's sample order (protocol.ORDER)."""
    out, start = {}, 0
    for name in ("member_calibration", "nonmember_calibration", "member_eval", "nonmember_eval"):
        n = int(report.splits.get(name, 0))
        out[name] = slice(start, start + n)
        start += n
    return out


def _near_copies(ex: Exposure, report: Any) -> None:
    gen = report.generated
    if gen is None:
        ex.no_distance_reason = _why_no_samples(report)
        return
    where = _context_slices(report)
    mse = np.asarray(gen.mse, dtype=np.float64)
    if mse.size != where["nonmember_eval"].stop:
        ex.no_distance_reason = (f"the generation attack kept {mse.size} samples but the report has "
                                 f"{where['nonmember_eval'].stop}")
        return
    cal_non = mse[where["nonmember_calibration"]]
    thr = near_copy_threshold(cal_non, ex.quantile)
    mem_d, non_d = mse[where["member_eval"]], mse[where["nonmember_eval"]]
    ex.distance_space, ex.generated_per_caption = gen.space, int(gen.generated)
    ex.threshold, ex.n_calibration_nonmember = thr, int(cal_non.size)
    ex.nonmembers_flagged, ex.members_flagged = int((non_d < thr).sum()), int((mem_d < thr).sum())
    for m in ex.members:
        m.distance = float(mem_d[m.position])
        m.near_copy = bool(mem_d[m.position] < thr)


def _why_no_samples(report: Any) -> str:
    skipped = (report.info or {}).get("skipped_attacks") or {}
    if "generation" in skipped:
        return f"the generation attack was skipped ({skipped['generation']})"
    if "generation" not in report.attacks:
        return "the generation attack did not run (add generation to the attacks to compare with generated samples)"
    return "the generation attack's samples are not kept in this report"


def attach_exposure(report: Any) -> Any:
    """Set ``report.exposure`` (per run for a pooled report, whose runs get theirs too) and return ``report``.

    The config's exposure options are checked first (:class:`AuditError`), before anything is set.
    """
    exposure_options(report)
    if report.runs is None:
        report.exposure = compute_exposure(report)
        return report
    runs = []
    for i, (name, run) in enumerate(zip(report.run_names(), report.runs)):
        if run.exposure is None:
            attach_exposure(run)
        top = None if run.exposure is None else run.exposure.to_dict()["members"][0]
        runs.append({"run": name, "report": f"{run_folder(i, name)}/report.md", "most_exposed": top})
    report.exposure = PooledExposure(runs)
    return report


# -- exposure.png ------------------------------------------------------------------------------------------

def plot_exposure(ex: Exposure, report: Any, path: Union[str, Path]) -> Path:
    """``exposure.png``: a row per top-k member: its image | its nearest generated sample | file, rank, flag.

    Images come from the generation attack's kept samples, else from the member's file (when its id is
    a path). Generated latents (a target that cannot decode) are drawn as a false-colour view of their
    first three channels, each scaled to its own range.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = ex.top
    gen = report.generated
    where = _context_slices(report)
    header = _header(ex)
    head_h = 0.35 + 0.16 * header.count("\n")  # inches: the header's lines and the column titles
    fig_h = head_h + 1.75 * len(rows) + 0.15
    fig = plt.figure(figsize=(9.0, fig_h), dpi=110)
    grid = fig.add_gridspec(len(rows), 3, width_ratios=[1, 1, 2.9], left=0.02, right=0.99, bottom=0.17 / fig_h,
                            top=1 - (head_h + 0.05) / fig_h, wspace=0.06, hspace=0.18)
    fig.text(0.02, 1 - 0.08 / fig_h, header, fontsize=8, va="top", ha="left")
    for r, m in enumerate(rows):
        ctx_i = where["member_eval"].start + m.position
        real = _hwc(gen.images[ctx_i]) if gen is not None else _file_image(m.id)
        _image_cell(fig.add_subplot(grid[r, 0]), real, "member" if r == 0 else None,
                    None if real is not None else "image not kept\n(the sample id is not a file)")
        near, note = None, None
        if gen is not None:
            near, note = _generated_image(gen, ctx_i)
        else:
            note = "no generated sample:\n" + _wrap(ex.no_distance_reason or "", 34)
        _image_cell(fig.add_subplot(grid[r, 1]), near, "nearest generated" if r == 0 else None, note)
        _text_cell(fig.add_subplot(grid[r, 2]), ex, m)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _header(ex: Exposure) -> str:
    lines = [f"Most exposed members: the {len(ex.top)} of {len(ex.members)} evaluation members that the headline "
             f"attack ({ex.attack}) scores most member-like, ranked against {ex.n_nonmember} evaluation non-members."]
    if ex.threshold is not None:
        lines.append(f"NEAR-COPY: mean squared {_space_word(ex.distance_space)} difference to the nearest of the "
                     f"LoRA's {ex.generated_per_caption} samples at the caption below {ex.threshold:.4g} (the "
                     f"{100 * ex.quantile:g}% quantile of {ex.n_calibration_nonmember} calibration non-members); it "
                     f"flags {ex.nonmembers_flagged} of {ex.n_nonmember} evaluation non-members "
                     f"({100 * ex.nonmember_flag_share:.1f}%). A heuristic, not a proof of copying.")
    else:
        lines.append(f"No near-copy check: {ex.no_distance_reason}.")
    return "\n".join(_wrap(s, 125) for s in lines)


def _space_word(space: Optional[str]) -> str:
    return {"pixels": "pixel", "latents": "latent"}.get(space or "", str(space))


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def _hwc(x: torch.Tensor) -> np.ndarray:
    """A uint8 ``(C, H, W)`` image as ``(H, W)`` (one channel) or ``(H, W, 3)``."""
    a = x.detach().cpu().numpy()
    if a.ndim != 3:
        return a
    a = a.transpose(1, 2, 0)
    return a[..., 0] if a.shape[-1] == 1 else a[..., :3]


def _file_image(ident: str) -> Optional[np.ndarray]:
    p = Path(ident)
    if not p.is_file():
        return None
    try:
        from PIL import Image

        with Image.open(p) as im:
            im = im.convert("RGB")
            im.thumbnail((256, 256))
            return np.asarray(im)
    except (OSError, ValueError):
        return None


def _generated_image(gen: Any, i: int) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """(image, note) for sample ``i``'s nearest generated sample."""
    x = gen.nearest[i]
    if gen.space == "pixels":
        return _hwc(x), None
    if x.ndim != 3:
        return None, "generated latent\n(not image-shaped)"
    z = x[:3].float()
    lo, hi = z.amin(dim=(1, 2), keepdim=True), z.amax(dim=(1, 2), keepdim=True)
    z = (z - lo) / (hi - lo).clamp_min(1e-8)
    img = (z * 255).round().to(torch.uint8)
    return _hwc(img), "latent, false colour"


def _image_cell(ax: Any, img: Optional[np.ndarray], title: Optional[str], note: Optional[str]) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if img is not None:
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    if note:
        if img is None:
            ax.text(0.5, 0.5, note, ha="center", va="center", fontsize=6.5, transform=ax.transAxes, wrap=True)
        else:
            ax.set_xlabel(note, fontsize=6.5)
    if title:
        ax.set_title(title, fontsize=8)


def _text_cell(ax: Any, ex: Exposure, m: MemberExposure) -> None:
    ax.axis("off")
    name = Path(m.id).name if "/" in m.id or "\\" in m.id else m.id
    if len(name) > 48:
        name = name[:22] + "..." + name[-22:]
    ax.text(0.0, 0.92, f"#{m.rank}  {name}", fontsize=9, weight="bold", va="top", transform=ax.transAxes)
    ax.text(0.0, 0.70, m.rank_text, fontsize=8.5, va="top", transform=ax.transAxes)
    ax.text(0.0, 0.50, f"calibrated score {m.calibrated_score:+.2f} (score {m.score:.4g}, {ex.attack})", fontsize=8,
            va="top", transform=ax.transAxes)
    if m.distance is None:
        ax.text(0.0, 0.28, "no nearest generated sample", fontsize=8, va="top", color="0.4", transform=ax.transAxes)
        return
    ax.text(0.0, 0.28, f"nearest generated: MSE {m.distance:.4g} (threshold {ex.threshold:.4g})", fontsize=8,
            va="top", transform=ax.transAxes)
    if m.near_copy:
        ax.text(0.0, 0.08, "NEAR-COPY", fontsize=9, weight="bold", color="#c0001a", va="top", transform=ax.transAxes)
    else:
        ax.text(0.0, 0.08, "not flagged", fontsize=8, color="0.35", va="top", transform=ax.transAxes)


__all__ = ["Exposure", "MemberExposure", "PooledExposure", "attach_exposure", "compute_exposure", "exposure_options",
           "near_copy_threshold", "plot_exposure", "rank_text", "share_below"]
