"""Run attacks on one view and score them (shared by the command and the payload-only curve).

The attacks run through the registry with :class:`ViewArrays` and
:class:`AttackerResources` only; the ground truth (:class:`Truth`) is used
afterwards, here, by the scorer — and to build two upper bounds from the true
linking, each labelled as such and neither an attack: ``multiview-perfect-linking``
(fusion of every view of an image) and ``oracle-all-views`` (the oracle's posterior
over the pool given every view of an image: the ceiling once the server holds several
epochs of payloads; see :mod:`~collafuse.attacks.reconstruction.oracle`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from collafuse.schedule import NoiseSchedule

from collafuse.attacks.reconstruction import oracle
from collafuse.attacks.reconstruction.multiview import perfect_linking
from collafuse.attacks.reconstruction.registry import run_attack
from collafuse.attacks.reconstruction.scoring import (
    LabelClassifier, Scores, Truth, chance_levels, linkage_accuracy, score,
)
from collafuse.attacks.reconstruction.view import AttackerResources, Reconstruction, ViewArrays, rescaled
from collafuse.attacks.stats import Interval, summarize

PERFECT = "multiview-perfect-linking"
ALL_VIEWS = "oracle-all-views"
# The upper bounds a scorer builds with the true linking: name → (threat, summary) for reports.
UPPER_BOUNDS: dict[str, tuple[str, str]] = {
    PERFECT: ("T1 (upper bound: uses the true linking from the audit key)", "multiview fusion with perfect linking"),
    ALL_VIEWS: ("T1 (upper bound: uses the true linking from the audit key)",
                "Bayes posterior over the pool given every view of the image (true linking)"),
}


@dataclass
class ViewEvaluation:
    """Scores per attack (plus the upper bounds ``multiview-perfect-linking`` when multiview
    ran and ``oracle-all-views`` when the oracle ran), the reconstructions, the payload-level
    label inference (per row, 0/1) and chance levels. ``reconstruction_rows``: the view rows the
    reconstructions hold, in order (None: every row; a streamed evaluation keeps a few only)."""

    scores: dict[str, Scores]
    reconstructions: dict[str, Reconstruction]
    payload_label: np.ndarray | None
    labels_sent: bool
    chance: dict[str, float]
    extra: dict[str, dict] = field(default_factory=dict)
    reconstruction_rows: torch.Tensor | None = None

    def payload_label_summary(self, mask: np.ndarray | None = None, seed: int = 0) -> Interval | None:
        """Payload-level label inference accuracy over all rows (or ``mask``), with its interval; None without it."""
        if self.payload_label is None:
            return None
        clusters = next(iter(self.scores.values())).clusters if self.scores else None
        m = np.ones(self.payload_label.shape, dtype=bool) if mask is None else mask
        return summarize(self.payload_label[m], None if clusters is None else clusters[m], proportion=True, seed=seed)


def evaluate_view(
    view: ViewArrays,
    schedule: NoiseSchedule,
    truth: Truth,
    resources: AttackerResources,
    attacks: tuple[str, ...],
    num_classes: int,
    progress: bool = False,
) -> ViewEvaluation:
    """Run ``attacks`` on ``view`` and score each against ``truth`` (N rows each).

    Label inference (when the aux split and the truth have labels): per attack, a
    :class:`LabelClassifier` trained on aux images noised at t ~ U{0..max t} reads x̂ (the
    ``oracle`` instead takes the heaviest label of its posterior over the labelled pool);
    at the payload level, one trained at exactly the view's steps reads p/a — or, when
    labels cross with the payloads, the sent label is the answer.
    """
    aux = resources.aux
    labelled = aux is not None and aux.labels is not None and truth.labels is not None and len(view) > 0
    recon_clf = payload_label = None
    if labelled:
        t_max = int(view.t.max())
        recon_clf = LabelClassifier(seed=resources.seed).fit(aux.images, aux.labels, schedule, torch.arange(0, t_max + 1))
        if view.label is not None:
            payload_label = (view.label == truth.labels).double().numpy()
        else:
            payload_clf = LabelClassifier(seed=resources.seed).fit(aux.images, aux.labels, schedule, view.t)
            y, _ = rescaled(view, schedule)
            payload_label = (payload_clf.predict(y) == truth.labels).double().numpy()
    scores: dict[str, Scores] = {}
    recons: dict[str, Reconstruction] = {}
    extra: dict[str, dict] = {}
    pool_ids = truth.pool if resources.candidates is not None else None
    for name in attacks:
        if progress:
            print(f"  attack {name} on {len(view)} rows", flush=True)
        recon = run_attack(name, view, schedule, resources)
        recons[name] = recon
        scores[name] = score(recon, truth, recon_clf, pool_ids)
        if recon.groups is not None:
            # Ground truth enters only here, after the attack ran: to score its linking and
            # to compute the perfect-linking upper bound.
            extra[name] = {"linkage_accuracy": linkage_accuracy(recon.groups, truth.member)}
            if recon.noise_var is not None:
                extra[name]["mean_noise_var"] = float(recon.noise_var.mean())
            upper = perfect_linking(view, schedule, truth.member)
            recons[PERFECT] = upper
            scores[PERFECT] = score(upper, truth, recon_clf)
            extra[PERFECT] = {"mean_noise_var": float(upper.noise_var.mean())}
    if oracle.NAME in attacks and resources.candidates is not None:
        # The ceiling once an image crossed several times: its posterior given all its views,
        # linked by the audit key (scorer side, after the attacks ran).
        ceiling = oracle.all_views(view, schedule, resources.candidates, truth.member)
        recons[ALL_VIEWS] = ceiling
        scores[ALL_VIEWS] = score(ceiling, truth, recon_clf, pool_ids)
    return ViewEvaluation(scores, recons, payload_label, view.label is not None, chance_levels(truth, num_classes), extra)


