"""Membership-inference audit: attacks, honest metrics, reports (``smplora audit``).

Entry point::

    from smplora_plugin.audit import run_audit, AuditSamples, AuditConfig

    report = run_audit(
        target,                      # an AuditTarget (see smplora_plugin.audit.target)
        members, nonmembers,         # AuditSamples(images (N,C,H,W) in [-1,1], captions=None, ids=None),
                                     # or an image tensor, or (images, captions)
        *,
        calibration_members=None,    # give both calibration sets explicitly, or neither: then
        calibration_nonmembers=None, # members/nonmembers are split by identity into calibration/eval
        calibration_fraction=0.5,
        attacks=None,                # names/classes/instances; None = whole suite (CLiD only with captions)
        config=None,                 # AuditConfig or dict: seed, batch_size, timesteps, draws, attack_options...
        out_dir=None,                # writes report.json, report.md, roc.png, manifest.json
        utility=None,                # extra utility fields for the report (ratio to plain LoRA, quality...)
        manifest_sets=None,          # extra id lists, e.g. {"member_defense": [...], "nonmember_defense": [...]}
        info=None,                   # free-form run facts (steps per image, model, ...)
        title="Membership-inference audit",
        progress=True,               # tqdm bars on stderr
        load_plugins=True,           # third-party attacks via the smplora_register_attacks hook
        num_threads=None,            # torch CPU threads during the audit (None = 1; restored afterwards)
        n_permutations=1000,         # label permutations behind the verdict's p-values (>= 1000)
        references=None,             # References (reference LoRAs) for lira_online / lira_offline / rmia
    ) -> AuditReport

    report.verdict["verdict"]        # "leaks" / "no evidence of leakage at this size" / "too few samples to tell"
    report.verdict["headline"]       # attack chosen on calibration: auc, auc_ci95, p_value, calibration_auc
    report.verdict["upper_envelope"] # max over attacks on evaluation, with permutation null_q95 / p_value
    report.verdict["power"], ["epsilon_lower_bound"], ["warnings"], ["shift_check"]
    report.to_dict()                 # == report.json
    report.max_over_attacks["auc"]   # {"value", "attack", "ci95"}: the upper envelope (labelled)

    run_audit_pooled([AuditRun(target, members, nonmembers, ...), ...], **same options)
                                     # pooled verdict over several LoRAs; report.runs = per-run reports
    report.attacks["secmi"]["auc"], ["auc_ci95"], ["leakage"], ["tpr_at_1pct_fpr"], ...
    report.markdown(); report.write(out_dir)
    side_by_side({"plain LoRA": r1, "SMP-LoRA": r2})   # Markdown comparison table (demo)
    compare_to_baseline(report, base_report)           # paired: leakage beyond the base model on the same samples

Each report has: verdict (see smplora_plugin.audit.verdict), splits, null_band_auc95,
max_over_attacks {label, auc (value, attack, ci95), leakage,
tpr_at_1pct_fpr, tpr_at_0.1pct_fpr, balanced_accuracy, paper_tpr_at_5pct_fpr,
paper_asr_best_threshold_on_eval}, attacks[name] {title, auc, auc_ci95, leakage, tpr_at_1pct_fpr,
tpr_at_0.1pct_fpr, balanced_accuracy, threshold, paper_comparison {tpr_at_5pct_fpr,
asr_best_threshold_on_eval, aucn}, low_fpr {1%, 0.1%: tpr, tpr_ci95, false_positives_allowed,
low_reliability}, calibration {calibration_auc, what was tuned}, curves_eval_auc, seconds},
utility {heldout_denoising_loss, member_denoising_loss, heldout_denoising_loss_base, + yours},
info, config, timesteps, model_passes_per_sample, seconds, manifest.

CPU speed: small UNets on near-black images hit denormal floats (~10x slower); run_audit sets
torch.set_flush_denormal(True) while it runs (do the same in CPU training loops), and the
default of one thread avoids OpenMP threads spinning against each other on a busy machine.

Targets: ``load_lora_target(base, lora)`` for a diffusers folder (SD1.x/SD2.x, SDXL: a
:class:`DiffusersTarget`; SD3, FLUX: a :class:`FlowMatchTarget`, flow matching as the equivalent
noise predictor) or an original-layout single-file SD1.x / SDXL checkpoint (``load_single_file``).

Built-in attacks (``available_attacks()``): loss, loss_calibrated, loss_best_t, sima, secmi, pia,
clid, mlp, logreg, gboost and the blind baseline ``blind``; with ``references=``, also
lira_online, lira_offline and rmia (:class:`References`: reference LoRAs and what each trained on).
Known-answer target for checks: :class:`smplora_plugin.audit.synthetic.MemorizingTarget`.
"""

from .attacks import Attack, AttackOutput, available_attacks, register_attack
from .config import AuditConfig
from .engine import ScoreContext
from .flow import FlowMatchTarget
from .metrics import MetricError
from .paired import compare_to_baseline
from .pooled import AuditRun, run_audit_pooled
from .protocol import run_audit
from .references import References
from .report import side_by_side
from .single_file import load_single_file
from .target import AuditTarget, DiffusersTarget, load_lora_target
from .types import AuditError, AuditReport, AuditSamples

__all__ = [
    "Attack",
    "AttackOutput",
    "AuditConfig",
    "AuditError",
    "AuditReport",
    "AuditRun",
    "AuditSamples",
    "AuditTarget",
    "DiffusersTarget",
    "FlowMatchTarget",
    "MetricError",
    "References",
    "ScoreContext",
    "available_attacks",
    "compare_to_baseline",
    "load_lora_target",
    "load_single_file",
    "register_attack",
    "run_audit",
    "run_audit_pooled",
    "side_by_side",
]
