"""The audit's verdict: a calibrated headline, a permutation-tested upper envelope, power and epsilon.

:func:`assess` turns per-attack scores (evaluation scores with their labels, plus the calibration
scores each attack may threshold on) into the report's ``verdict`` block:

* **headline**: the model-using attack with the highest calibration AUC (chosen without looking at
  the evaluation labels), reported on the evaluation split with its bootstrap CI and a one-sided
  permutation p-value;
* **upper envelope**: the maximum over attacks on the evaluation split (AUC, leakage, TPR@1%FPR),
  optimistic because it is selected on the evaluation split, with its permutation null (the same
  label permutations for every attack, stratified within pooled runs);
* **verdict** in words: ``"leaks"`` when ``min(p_headline, p_envelope_auc) < alpha / 2``
  (Bonferroni over the two tests); otherwise ``"too few samples to tell"`` when the smallest AUC
  this evaluation detects at 80% power (one-sided ``alpha / 2``, Hanley-McNeil) is above
  ``detectable_bound``; otherwise ``"no evidence of leakage at this size"``;
* the sample sizes needed for a target AUC and TPR@FPR, warnings (blind baseline, loss shift check)
  and the empirical epsilon lower bound of the headline attack (a lower bound, never a guarantee).

The decision itself is :func:`leak_test` (the two p-values) and :func:`decide` (the words), which
``benchmarks/pooled_null.py`` calls on redrawn null labels to measure the false-alarm rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from . import metrics as M
from . import stats as S
from .types import AuditError

LEAKS = "leaks"
NO_EVIDENCE = "no evidence of leakage at this size"
TOO_FEW = "too few samples to tell"
VERDICTS = (LEAKS, NO_EVIDENCE, TOO_FEW)


@dataclass
class AttackScores:
    """One attack's scores kept for the verdict and for pooling (higher = member).

    ``eval_scores`` follow the report's evaluation sample order; ``cal_scores`` / ``cal_labels``
    are the calibration scores the attack may set thresholds on (held-out for trained attacks).
    """

    eval_scores: np.ndarray
    cal_scores: np.ndarray
    cal_labels: np.ndarray
    uses_model: bool = True

    @property
    def calibration_auc(self) -> float:
        y = self.cal_labels == 1
        return M.auc(self.cal_scores[y], self.cal_scores[~y])


@dataclass
class VerdictSettings:
    """Knobs of :func:`assess` (defaults are the documented rule)."""

    alpha: float = 0.05  # family-wise level; each of the two tests runs at alpha / 2
    power: float = 0.8
    detectable_bound: float = 0.75  # above this smallest-detectable AUC the answer is "too few samples"
    n_permutations: int = 1000
    target_auc: float = 0.6
    target_tpr: float = 0.10
    target_fpr: float = 0.01
    epsilon_level: float = 0.95
    epsilon_delta: float = 1e-5
    shift_gap: float = 0.1

    def validate(self) -> None:
        if self.n_permutations < 1000:
            raise AuditError(f"n_permutations={self.n_permutations}: use at least 1000 label permutations.")
        if not 0 < self.alpha < 1 or not 0 < self.power < 1 or not 0.5 < self.detectable_bound <= 1:
            raise AuditError("alpha and power must be in (0, 1) and detectable_bound in (0.5, 1].")


def assess(scores: Mapping[str, AttackScores], eval_labels: np.ndarray, results: Mapping[str, Mapping[str, Any]], *,
           seed: int = 0, strata: Optional[np.ndarray] = None,
           settings: Optional[VerdictSettings] = None) -> Dict[str, Any]:
    """The ``verdict`` block of a report (see the module docstring); ``results`` are the per-attack metrics."""
    st = settings or VerdictSettings()
    y = np.asarray(eval_labels).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    model = {k: v for k, v in scores.items() if v.uses_model}
    out: Dict[str, Any] = {"rule": _rule_text(st), "n_member": n1, "n_nonmember": n0}
    power = _power(n1, n0, st)
    out["power"] = power
    warnings: List[str] = _warnings(results)
    shift = _shift_check(results, st.shift_gap)
    if shift is not None:
        out["shift_check"] = shift
        if shift["warning"]:
            warnings.append(shift["warning"])
    if not model:
        out.update(verdict=None, headline=None, upper_envelope=None, warnings=warnings,
                   summary="no model-using attack was run: no verdict.")
        return out

    cal_auc = {k: float((results[k].get("calibration") or {}).get("calibration_auc", v.calibration_auc))
               for k, v in model.items()}
    test = leak_test(model, y, {k: results[k]["auc"] for k in model}, cal_auc, seed=seed, strata=strata, settings=st)
    head, p_head = test["headline"], test["p_headline"]
    r = results[head]
    out["headline"] = {
        "attack": head, "title": r.get("title", head), "calibration_auc": cal_auc[head], "auc": r["auc"],
        "auc_ci95": r["auc_ci95"], "p_value": p_head, "tpr_at_1pct_fpr": r.get("tpr_at_1pct_fpr"),
        "note": "attack chosen by its AUC on the calibration split; AUC and p-value (one-sided, label "
                "permutations) on the evaluation split",
    }
    env = _envelope(model, test["names"], results, test["null"], st)
    out["upper_envelope"] = env
    p_env = test["p_envelope"]  # = env["auc"]["p_value"]: the same statistic against the same null
    level = st.alpha / 2
    verdict = decide(p_head, p_env, power["smallest_detectable_auc"], st)
    out["verdict"] = verdict
    out["p_values"] = {"headline": p_head, "upper_envelope_auc": p_env, "level_each": level}
    out["epsilon_lower_bound"] = _epsilon(model[head], y, st)
    out["warnings"] = warnings
    out["summary"] = _summary(verdict, out, st)
    return out


def headline_attack(cal_auc: Mapping[str, float]) -> str:
    """The attack with the highest calibration AUC (the first listed among equals)."""
    names = list(cal_auc)
    return max(names, key=lambda k: (cal_auc[k], -names.index(k)))


def leak_test(scores: Mapping[str, AttackScores], eval_labels: np.ndarray, aucs: Mapping[str, float],
              cal_auc: Mapping[str, float], *, seed: int = 0, strata: Optional[np.ndarray] = None,
              settings: Optional[VerdictSettings] = None, tpr_null: bool = True) -> Dict[str, Any]:
    """The two permutation tests behind ``"leaks"``: the headline attack's AUC and the maximum AUC over attacks.

    ``scores``: the model-using attacks; ``aucs``: their evaluation AUCs; ``cal_auc``: their calibration
    AUCs (which pick the headline). Returns ``headline``, ``p_headline``, ``p_envelope`` (max AUC),
    ``names`` (column order) and ``null`` (:func:`~.stats.envelope_null`: the label permutations shared by
    every attack, within ``strata``; with ``tpr_null`` also the TPR at ``target_fpr`` that the report's
    envelope shows, which the verdict does not use).
    """
    st = settings or VerdictSettings()
    y = np.asarray(eval_labels).astype(bool)
    names = list(scores)
    head = headline_attack({k: cal_auc[k] for k in names})
    null = S.envelope_null({k: scores[k].eval_scores for k in names}, y, n_perm=st.n_permutations, seed=seed + 9173,
                           strata=strata, fprs=(st.target_fpr,) if tpr_null else ())
    obs = np.array([aucs[k] for k in names])
    p_head = S.permutation_pvalue(float(aucs[head]), null["auc"][:, names.index(head)])
    p_env = S.permutation_pvalue(float(obs.max()), null["auc"].max(1))
    return {"headline": head, "p_headline": p_head, "p_envelope": p_env, "names": names, "null": null}


def decide(p_headline: float, p_envelope: float, smallest_detectable_auc: float,
           settings: Optional[VerdictSettings] = None) -> str:
    """The verdict in words from the two p-values and the smallest AUC detectable at this size."""
    st = settings or VerdictSettings()
    if min(p_headline, p_envelope) < st.alpha / 2:
        return LEAKS
    if smallest_detectable_auc > st.detectable_bound:
        return TOO_FEW
    return NO_EVIDENCE


def _envelope(model: Mapping[str, AttackScores], names: Sequence[str], results: Mapping[str, Mapping[str, Any]],
              null: Mapping[str, np.ndarray], st: VerdictSettings) -> Dict[str, Any]:
    aucs = np.array([results[k]["auc"] for k in names])
    null_auc = null["auc"]
    env: Dict[str, Any] = {
        "label": "upper envelope: maximum over attacks on the evaluation split (selected on it, so optimistic); "
                 "judge it against its permutation null, not against the single-attack chance band",
        "n_permutations": int(null_auc.shape[0]),
    }
    stats = {"auc": (aucs, null_auc.max(1)),
             "leakage": (np.maximum(aucs, 1 - aucs), np.maximum(null_auc, 1 - null_auc).max(1))}
    key = f"tpr@{st.target_fpr:g}"
    tprs = [results[k].get("tpr_at_1pct_fpr") for k in names]
    if key in null and all(t is not None for t in tprs) and abs(st.target_fpr - 0.01) < 1e-12:
        stats["tpr_at_1pct_fpr"] = (np.array(tprs, dtype=float), null[key].max(1))
    for name, (obs, nul) in stats.items():
        i = int(np.argmax(obs))
        env[name] = {"value": float(obs[i]), "attack": names[i], "null_q95": float(np.quantile(nul, 0.95)),
                     "null_mean": float(nul.mean()), "p_value": S.permutation_pvalue(float(obs[i]), nul)}
    if "tpr_at_1pct_fpr" not in env:
        env["tpr_at_1pct_fpr"] = None
    return env


def _power(n1: int, n0: int, st: VerdictSettings) -> Dict[str, Any]:
    level = st.alpha / 2
    return {
        "smallest_detectable_auc": S.smallest_detectable_auc(n1, n0, alpha=level, power=st.power),
        "bound": st.detectable_bound,
        "alpha_one_sided": level,
        "power": st.power,
        "needed_per_side_for_auc": {"target_auc": st.target_auc,
                                    "members": S.members_needed_for_auc(st.target_auc, alpha=level, power=st.power)},
        "needed_per_side_for_tpr": {"target_tpr": st.target_tpr, "at_fpr": st.target_fpr,
                                    "members": S.members_needed_for_tpr(st.target_tpr, st.target_fpr, power=st.power,
                                                                        level=1 - level)},
        "method": "AUC: one-sided z-test of AUC = 0.5 with the Hanley-McNeil variance (members = non-members). "
                  "TPR: at least 10/FPR non-members, so the threshold admits >= 10 false positives; and with "
                  f"{st.power:.0%} probability the one-sided {1 - level:.1%} Clopper-Pearson lower bound of the TPR "
                  "(members above the threshold ~ Binomial(n, target TPR)) exceeds the upper bound of the FPR.",
    }


def _warnings(results: Mapping[str, Mapping[str, Any]]) -> List[str]:
    w: List[str] = []
    for name, r in results.items():
        if r.get("uses_model", True):
            continue
        lo, hi = r["auc_ci95"]
        if lo > 0.5 or hi < 0.5:
            w.append(f"the blind baseline ({name}, no model access) has AUC {r['auc']:.3f} [{lo:.3f}, {hi:.3f}], "
                     "whose CI excludes 0.5: members and non-members differ in distribution, so the attacks' numbers "
                     "may reflect that difference rather than membership. Draw both sets from one pool.")
    return w


def _shift_check(results: Mapping[str, Mapping[str, Any]], gap: float) -> Optional[Dict[str, Any]]:
    if "loss" not in results or "loss_calibrated" not in results:
        return None
    a, b = results["loss"], results["loss_calibrated"]
    excl = lambda r: r["auc_ci95"][0] > 0.5 or r["auc_ci95"][1] < 0.5  # noqa: E731
    diff = a["auc"] - b["auc"]
    warn = None
    if abs(diff) > gap and excl(a) != excl(b):
        if excl(a):
            warn = (f"loss AUC {a['auc']:.3f} but base-calibrated loss {b['auc']:.3f}: the raw loss separates the "
                    "sets while the base model's difficulty explains it; the signal may be a distribution shift "
                    "(members easier or harder for the base model) rather than membership.")
        else:
            warn = (f"base-calibrated loss AUC {b['auc']:.3f} but raw loss {a['auc']:.3f}: the difference "
                    "between the adapted and base model separates the sets while the raw loss does not; check "
                    "that members and non-members come from one pool.")
    return {"loss_auc": a["auc"], "loss_auc_ci95": a["auc_ci95"], "loss_calibrated_auc": b["auc"],
            "loss_calibrated_auc_ci95": b["auc_ci95"], "difference": diff, "warning": warn}


def _epsilon(sc: AttackScores, y: np.ndarray, st: VerdictSettings) -> Dict[str, Any]:
    cm, cn = sc.cal_scores[sc.cal_labels == 1], sc.cal_scores[sc.cal_labels == 0]
    thr, cal_eps = S.best_epsilon_threshold(cm, cn, level=st.epsilon_level)
    rule = "largest epsilon lower bound on calibration"
    if not np.isfinite(thr):  # calibration too small to refute any epsilon: the balanced-accuracy threshold
        thr, _ = M.best_threshold(cm, cn)
        rule = "best balanced accuracy on calibration (no threshold gave a positive bound there)"
    ev = sc.eval_scores
    tp, fp = int((ev[y] >= thr).sum()), int((ev[~y] >= thr).sum())
    b0 = S.epsilon_lower_bound(tp, int(y.sum()), fp, int((~y).sum()), level=st.epsilon_level)
    bd = S.epsilon_lower_bound(tp, int(y.sum()), fp, int((~y).sum()), level=st.epsilon_level, delta=st.epsilon_delta)
    return {
        "epsilon": b0["epsilon"], "epsilon_at_delta": bd["epsilon"], "delta": st.epsilon_delta,
        "threshold": thr, "threshold_rule": rule, "calibration_epsilon": cal_eps, "tp": tp, "fp": fp,
        "tpr_lower": b0["tpr_lower"], "fpr_upper": b0["fpr_upper"],
        "label": "empirical lower bound on epsilon (not a guarantee): threshold chosen on the calibration split for "
                 f"the headline attack; one-sided {st.epsilon_level:.0%} Clopper-Pearson bounds on the evaluation "
                 f"split (TPR lower, FPR upper; jointly >= {2 * st.epsilon_level - 1:.0%}); "
                 "eps = max(log(TPR_lo/FPR_hi), log((1-FPR_hi)/(1-TPR_lo)), 0) (Nasr et al. 2021; "
                 "Steinke, Nasr & Jagielski 2023)",
    }


def _rule_text(st: VerdictSettings) -> str:
    return (f"'{LEAKS}' when min(p_headline, p_upper_envelope_auc) < {st.alpha / 2:g} (Bonferroni over the two "
            f"permutation tests, family-wise {st.alpha:g}); else '{TOO_FEW}' when the smallest AUC detectable at "
            f"{st.power:.0%} power (one-sided {st.alpha / 2:g}) is above {st.detectable_bound:g}; "
            f"else '{NO_EVIDENCE}'.")


def _summary(verdict: str, v: Mapping[str, Any], st: VerdictSettings) -> str:
    h, e, pw = v["headline"], v["upper_envelope"], v["power"]
    s = (f"Verdict: {verdict}. Headline attack {h['attack']} (chosen on calibration, calibration AUC "
         f"{h['calibration_auc']:.3f}): AUC {h['auc']:.3f} [{h['auc_ci95'][0]:.3f}, {h['auc_ci95'][1]:.3f}], "
         f"p = {h['p_value']:.3g}. Upper envelope (max over attacks on evaluation): AUC {e['auc']['value']:.3f} "
         f"({e['auc']['attack']}), null 95% quantile {e['auc']['null_q95']:.3f}, p = {e['auc']['p_value']:.3g}. "
         f"This evaluation ({v['n_member']} members / {v['n_nonmember']} non-members) detects AUC >= "
         f"{pw['smallest_detectable_auc']:.3f} with {st.power:.0%} power; AUC {st.target_auc:g} needs "
         f"{pw['needed_per_side_for_auc']['members']} members and as many non-members; TPR {st.target_tpr:.0%} at "
         f"{st.target_fpr:.0%} FPR needs {pw['needed_per_side_for_tpr']['members']} per side.")
    return s
