"""The one vocabulary of metrics: every name a result row, a policy limit or a report table uses.

Each metric is a :class:`MetricSpec` in the :data:`METRICS` registry (the project's one registry
mechanism): the groups whose rows carry it (threats T1–T5, and ``utility``, ``cost``, ``formal``,
``sampling``), which direction is worse (more leakage, less utility, more cost), whether a policy may
judge it, which threat's worst-case leakage it is the headline of, which flag says whether a value is
resolved, and what kind of number it is (an empirical measurement, a formal guarantee, a flag, a count,
a curve point). Producers build rows through :func:`metric` (an unknown name raises at once), the policy
takes its limits and directions from here, and the report its headlines, labels and orderings.
Adding a metric is one entry here plus its computation.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from collafuse.registry import Registry
from collafuse.threats import THREAT_IDS

GROUPS: tuple[str, ...] = (*THREAT_IDS, "utility", "cost", "formal", "sampling")
"""Everything a results row's ``threat`` column may hold: the threats, then the non-threat groups."""
KINDS = ("empirical", "formal", "flag", "count", "curve", "descriptive")
AT_EPOCH = "_at_epoch"  # suffix of a metric measured on a training.snapshots model (its epoch in the row's `epoch`)


@dataclass(frozen=True)
class MetricSpec:
    """One metric. ``worse``: "higher" (a larger value means more leakage, less utility or more cost),
    "lower", or None (descriptive: a count, a chance level, a flag's companion). ``headline``: (threat,
    rank) pairs, rank 0 first, for the threats whose worst-case leakage this metric reports.
    ``resolved_by``: the flag metric (same target and attack) that is 0 where this value is only a
    bound. ``formal_for``: threats this formal ε bounds. ``axis``: "t" or "epoch" for curve points."""

    name: str
    groups: tuple[str, ...]
    worse: str | None
    label: str
    kind: str = "empirical"
    judged: bool = True
    headline: tuple[tuple[str, int], ...] = ()
    resolved_by: str | None = None
    formal_for: tuple[str, ...] = ()
    axis: str | None = None

    def __post_init__(self) -> None:
        if self.worse not in ("higher", "lower", None):
            raise ValueError(f"metric {self.name}: worse must be 'higher', 'lower' or None, got {self.worse!r}")
        if self.kind not in KINDS:
            raise ValueError(f"metric {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        unknown = [g for g in self.groups if g not in GROUPS]
        if not self.groups or unknown:
            raise ValueError(f"metric {self.name}: groups must be a non-empty subset of {GROUPS}, got {self.groups}")
        if self.judged and self.worse is None:
            raise ValueError(f"metric {self.name}: a judged metric needs a direction")

    def is_worse(self, a: float, b: float) -> bool:
        """Is ``a`` worse than ``b`` (strictly)?"""
        return a > b if self.worse == "higher" else a < b


METRICS: Registry[MetricSpec] = Registry("metric")


def _add(spec: MetricSpec) -> MetricSpec:
    return METRICS.register(spec.name, spec)


def metric(name: str) -> MetricSpec:
    """The spec of ``name``; an unknown name raises :class:`~collafuse.registry.UnknownNameError` listing the valid ones."""
    return METRICS.get(name)


def names(*wanted: str) -> tuple[str, ...]:
    """``wanted``, each checked against the vocabulary (producers bind their names with this at import)."""
    return tuple(metric(n).name for n in wanted)


def in_group(group: str, judged_only: bool = False) -> tuple[str, ...]:
    """The metrics a row of ``group`` may carry (``judged_only``: those a policy may limit), in order."""
    return tuple(n for n in METRICS if group in METRICS.get(n).groups and (METRICS.get(n).judged or not judged_only))


def headline_metrics(threat: str) -> tuple[str, ...]:
    """The metrics whose worst value is ``threat``'s worst-case leakage, the first measured one wins."""
    ranked = [(rank, n) for n in METRICS for t, rank in METRICS.get(n).headline if t == threat]
    return tuple(n for _, n in sorted(ranked))


def formal_metrics(threat: str) -> tuple[str, ...]:
    """The formal ε metrics that bound ``threat`` (T4: both models' bounds, which compose)."""
    return tuple(n for n in METRICS if threat in METRICS.get(n).formal_for)


def at_epoch(name: str) -> str:
    """The name of ``name`` measured on a training snapshot (``auc`` → ``auc_at_epoch``)."""
    return metric(name + AT_EPOCH).name


# ---------------------------------------------------------------- the vocabulary

MEMBERSHIP_GROUPS = THREAT_IDS
_RECON = ("T1",)

# T1 reconstruction (DESIGN §4.1): per attack, pooled over payload rows.
_add(MetricSpec("mse", _RECON, "lower", "MSE of the reconstruction ([0, 1] scale)"))
_add(MetricSpec("psnr", _RECON, "higher", "PSNR of the reconstruction (dB)"))
_add(MetricSpec("ssim", _RECON, "higher", "SSIM of the reconstruction"))
_add(MetricSpec("reid_client", _RECON, "higher", "re-identification within the client's data"))
_add(MetricSpec("reid_pool", _RECON, "higher", "re-identification within the candidate pool", headline=(("T1", 0),)))
_add(MetricSpec("label", _RECON, "higher", "label inference accuracy"))
_add(MetricSpec("linkage_accuracy", _RECON, "higher", "linkage of payloads of the same image"))
_add(MetricSpec("extraction", ("T1", "T4", "T5"), "higher", "extraction rate (Carlini et al. 2023: 50 nearest, α = 0.5)"))
_add(MetricSpec("extraction_abs", ("T1", "T4", "T5"), "higher", "absolute-threshold extraction rate (ℓ2 ≤ δ)"))
_add(MetricSpec("payload_rows", _RECON, None, "payload rows the server received", kind="count", judged=False))
_add(MetricSpec("sender_accuracy", _RECON, "higher", "sender identification accuracy"))
_add(MetricSpec("sender_chance", _RECON, None, "sender identification at chance (1/N)", kind="descriptive",
                judged=False))

# Membership inference (DESIGN §4.2, §4.3), every threat.
_add(MetricSpec("auc", MEMBERSHIP_GROUPS, "higher", "ROC AUC",
                headline=(("T1", 1), ("T2", 0), ("T3", 0), ("T4", 0), ("T5", 0))))
_add(MetricSpec("tpr_at_1pct_fpr", MEMBERSHIP_GROUPS, "higher", "TPR at 1 % FPR"))
_add(MetricSpec("tpr_at_01pct_fpr", MEMBERSHIP_GROUPS, "higher", "TPR at 0.1 % FPR",
                resolved_by="tpr_at_01pct_fpr_resolved"))
_add(MetricSpec("tpr_at_01pct_fpr_resolved", MEMBERSHIP_GROUPS, None,
                "1 where ≥ 1000 non-members resolve TPR at 0.1 % FPR (else it is TPR at FPR 0)", kind="flag",
                judged=False))
_add(MetricSpec("balanced_accuracy", MEMBERSHIP_GROUPS, "higher", "balanced accuracy"))
_add(MetricSpec("epsilon_lb", MEMBERSHIP_GROUPS, "higher", "ε lower bound (Clopper–Pearson)"))
_add(MetricSpec("epsilon_gdp", MEMBERSHIP_GROUPS, "higher", "ε lower bound (Gaussian-DP)"))
_add(MetricSpec("one_run_epsilon_lb", MEMBERSHIP_GROUPS, "higher", "one-run ε lower bound (canaries)"))
_add(MetricSpec("inverted", MEMBERSHIP_GROUPS, None, "1 where the AUC lies significantly below 0.5", kind="flag",
                judged=False))
# The controls every membership result carries (DESIGN §4.2).
for _pct, _target in (("1pct", "1 %"), ("01pct", "0.1 %")):
    _add(MetricSpec(f"tpr_at_{_pct}_fpr_heldout", MEMBERSHIP_GROUPS, "higher",
                    f"TPR at a threshold fixed for {_target} FPR on a calibration half, measured on the other half",
                    resolved_by=f"tpr_at_{_pct}_fpr_heldout_resolved"))
    _add(MetricSpec(f"fpr_at_{_pct}_heldout", MEMBERSHIP_GROUPS, None,
                    f"the FPR that threshold (nominal {_target}) reaches on the held-out half", kind="descriptive",
                    judged=False))
    _add(MetricSpec(f"tpr_at_{_pct}_fpr_heldout_resolved", MEMBERSHIP_GROUPS, None,
                    f"1 where the calibration half's non-members resolve {_target} FPR", kind="flag", judged=False))
_add(MetricSpec("blind_auc", MEMBERSHIP_GROUPS, None,
                "model-blind baseline AUC: members vs non-members from the images alone (a control)",
                kind="descriptive", judged=False))
_add(MetricSpec("blind_tpr_at_1pct_fpr", MEMBERSHIP_GROUPS, None, "model-blind baseline TPR at 1 % FPR",
                kind="descriptive", judged=False))
_add(MetricSpec("blind_p_value", MEMBERSHIP_GROUPS, None, "permutation p-value of the blind baseline's AUC",
                kind="descriptive", judged=False))
_add(MetricSpec("blind_differs", MEMBERSHIP_GROUPS, None,
                "1 where the blind baseline tells members from non-members (AUC above 0.6, permutation p < 0.01)",
                kind="flag", judged=False))
_add(MetricSpec("above_blind", MEMBERSHIP_GROUPS, None,
                "1 where the attack's AUC is significantly above the model-blind baseline's", kind="flag",
                judged=False))
_add(MetricSpec("roc_above_ceiling", MEMBERSHIP_GROUPS, None,
                "1 where the ROC lies above its formal ceiling beyond its error: an error of the audit", kind="flag",
                judged=False))
_add(MetricSpec("auc_at_t", MEMBERSHIP_GROUPS, None, "ROC AUC at one query step", kind="curve", judged=False,
                axis="t"))
for _base in ("auc", "tpr_at_1pct_fpr", "tpr_at_01pct_fpr", "balanced_accuracy", "epsilon_lb", "epsilon_gdp"):
    _spec = metric(_base)
    _add(replace(_spec, name=_base + AT_EPOCH, label=f"{_spec.label} at a training snapshot", kind="curve",
                 judged=False, headline=(), resolved_by=None, axis="epoch", worse=None))

# Utility of generated samples (DESIGN §6).
_add(MetricSpec("fid", ("utility",), "higher", "FID (project classifier features)"))
_add(MetricSpec("kid", ("utility",), "higher", "KID (project classifier features)"))
_add(MetricSpec("precision", ("utility",), "lower", "precision (k-NN manifolds)"))
_add(MetricSpec("recall", ("utility",), "lower", "recall (k-NN manifolds)"))
_add(MetricSpec("accuracy", ("utility",), "lower", "class accuracy of the samples"))
_add(MetricSpec("accuracy_real", ("utility",), None, "class accuracy on real images (the ceiling)",
                kind="descriptive", judged=False))
_add(MetricSpec("fid_inception", ("utility",), "higher", "FID (Inception-v3 features)"))

# Client cost (DESIGN §6): judged ones may be limited or minimised by a policy.
for _name, _label in (("client_eval_share_train", "client share of denoiser evaluations, training"),
                      ("client_eval_share_sample", "client share of denoiser evaluations, sampling"),
                      ("client_flops_share_train", "client share of FLOPs, training"),
                      ("client_flops_share_sample", "client share of FLOPs, sampling"),
                      ("client_gflops_train_per_image_epoch", "client GFLOPs per image per epoch"),
                      ("client_gflops_sample", "client GFLOPs per generated image"),
                      ("payload_bytes_per_image_epoch", "payload bytes per image per epoch")):
    _add(MetricSpec(_name, ("cost",), "higher", _label, kind="count"))
for _name, _label in (("server_gflops_train_per_image_epoch", "server GFLOPs per image per epoch"),
                      ("server_gflops_sample", "server GFLOPs per generated image"),
                      ("client_forward_gflops", "one client forward pass, GFLOPs"),
                      ("server_forward_gflops", "one server forward pass, GFLOPs"),
                      ("client_evals_sample", "client denoiser evaluations per generated image"),
                      ("server_evals_sample", "server denoiser evaluations per generated image"),
                      ("hand_off_step", "the hand-off step")):
    _add(MetricSpec(_name, ("cost",), None, _label, kind="count", judged=False))

# Formal guarantees (DESIGN §5): ∞ where no bound exists.
_add(MetricSpec("epsilon_payload", ("formal",), "higher", "formal ε of the payload channel", kind="formal",
                formal_for=("T1",)))
_add(MetricSpec("epsilon_model_server", ("formal",), "higher", "formal ε of the server model", kind="formal",
                formal_for=("T2", "T4", "T5")))
_add(MetricSpec("epsilon_model_clients", ("formal",), "higher", "formal ε of the client models", kind="formal",
                formal_for=("T3", "T4")))

# The server's hand-off against its payloads (DESIGN §2.3; benchmarks/audit/handoff.py).
_add(MetricSpec("handoff_auc", ("sampling",), "higher", "classifier AUC, hand-offs vs payloads"))
_add(MetricSpec("handoff_p_value", ("sampling",), None, "permutation p-value of that AUC", kind="descriptive",
                judged=False))
_add(MetricSpec("handoff_std_error", ("sampling",), "higher", "|std(hand-off)/std(payload) − 1|"))
_add(MetricSpec("handoff_off_distribution", ("sampling",), "higher", "1 where the hand-off is off-distribution",
                kind="flag"))
for _name, _label in (("handoff_mean", "hand-off mean"), ("payload_mean", "payload mean"),
                      ("handoff_std", "hand-off standard deviation"), ("payload_std", "payload standard deviation"),
                      ("handoff_std_ratio", "std(hand-off)/std(payload)"),
                      ("handoff_server_steps", "server steps of the checked chain")):
    _add(MetricSpec(_name, ("sampling",), None, _label, kind="descriptive", judged=False))

# T5, the curious co-client (DESIGN §3, §4.2; issue 22): how many hand-offs its extraction and membership used.
_add(MetricSpec("handoffs_drawn", ("T5",), None, "hand-offs the co-client drew", kind="count", judged=False))

# Dataset inference per client (DESIGN §4.2; attacks/membership/dataset_inference.py): one row per suspect client and
# target, attack "dataset-inference"; a policy may ask that no client's set be shown (T2: {dataset_p: {min: 0.01}}).
_DATASET = ("T2", "T3", "T4")
_add(MetricSpec("dataset_p", _DATASET, "lower",
                "dataset inference p-value: one-sided Welch test of the client's members against held-out images"))
_add(MetricSpec("dataset_members_needed", _DATASET, "lower",
                "member images needed for dataset-inference p < 0.01 in at least half of the draws (∞: not reached)",
                kind="count"))
_add(MetricSpec("dataset_members", _DATASET, None, "suspect member images the dataset inference tested", kind="count",
                judged=False))
_add(MetricSpec("dataset_heldout", _DATASET, None, "held-out images the dataset inference tested", kind="count",
                judged=False))

# Leakage against training length (benchmarks/audit/trend.py): the slope of the worst AUC between the last two
# measured epochs (training.snapshots and the final one), per threat whose models were snapshotted.
_TREND = ("T2", "T3")
_add(MetricSpec("auc_epoch_slope", _TREND, None,
                "slope of the worst AUC per epoch between the last two measured epochs (95 % interval)",
                kind="descriptive", judged=False))
_add(MetricSpec("auc_trend_start_epoch", _TREND, None, "the earlier epoch of that slope (the later: the final epoch)",
                kind="count", judged=False))
_add(MetricSpec("auc_still_rising", _TREND, None,
                "1 where the worst AUC was still rising at the last epoch (the slope's 95 % interval above 0)",
                kind="flag", judged=False))

# Source inference on client models (DESIGN §4.2; attacks/membership/source.py): which client's model holds a member,
# beside T1's sender identification; and what the peer attacks (lira-peers, rmia-peers) used as OUT references.
_add(MetricSpec("source_accuracy", ("T3",), "higher",
                "source inference accuracy: the client whose model gives a member the lowest loss (Hu et al. 2023)"))
_add(MetricSpec("source_chance", ("T3",), None, "source inference at chance (1/N)", kind="descriptive", judged=False))
_add(MetricSpec("peer_models", ("T3",), None, "other clients' models a peer attack used as OUT references",
                kind="count", judged=False))
_add(MetricSpec("peer_partition_iid", ("T3",), None,
                "1 where the clients' partition is IID (the peers are OUT models of the target's distribution); 0 where "
                "it is label / Dirichlet or undeclared (imported)", kind="flag", judged=False))
