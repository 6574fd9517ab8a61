"""Is the server's hand-off distributed like a real payload? (DESIGN.md §2.3; issue 19.)

Every collaborative sample starts from the server's hand-off x̂_{t_c}; the client's chain expects a
payload a x0 + s ε there. A hand-off off that distribution (a saturated DDIM chain, say) makes every
sample, every utility number and every T4/T5 result an artifact of the sampler. The audit therefore
measures it for every trained system, against the payloads the server really trained on (rows of the
run's transcript at the hand-off step; simulated a x0 + s ε from the members where the transcript has
none there, e.g. ``trajectory`` payloads):

- moments: mean and standard deviation of hand-offs and payloads, and their ratio;
- a classifier two-sample test (:mod:`collafuse.attacks.two_sample`): cross-validated AUC of telling
  hand-offs from payloads, with its bootstrap interval.

Hand-offs are drawn without classifier-free guidance (guidance tilts the distribution on purpose), with
the run's sampler and its share of the steps. A hand-off is *off-distribution* when the classifier's AUC
exceeds :data:`MAX_C2ST_AUC` or the standard deviations differ by more than :data:`STD_TOLERANCE`
(relative). A wrong spread is the signature of a broken sampler (issue 19: 2.6× the payload's); a
classifier can also tell a payload-like hand-off apart when the server's model is poor where the payload
still carries much of the image (low cut ratios), which the check reports the same way and the
policy may treat differently (the default limits only the spread: ``sampling: handoff_std_error``).
Both limits and the measurements behind them are in docs/PERFORMANCE.md ("The server's hand-off").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from collafuse.runs import Run, sample_labels
from collafuse.sampling import server_handoff, split_ddim_steps
from collafuse.schedule import q_sample
from collafuse.streams import STREAM_HANDOFF, generator_for, stream_seed

from collafuse.attacks.reconstruction.view import ViewArrays
from collafuse.attacks.two_sample import classifier_two_sample_test, image_features
from collafuse.transcript import ServerView

HANDOFF_SAMPLES = 256   # hand-offs drawn and payloads compared per trained system
MAX_C2ST_AUC = 0.6      # a classifier telling hand-offs from payloads better than this flags the system
STD_TOLERANCE = 0.05    # |std(hand-off)/std(payload) − 1| above this flags the system


@dataclass(frozen=True)
class HandoffCheck:
    """How far one system's hand-off is from its real payloads."""

    n: int
    t_hand: int
    sampler: str
    server_steps: int
    reference: str            # "transcript" or "simulated" (a x0 + s ε from the members)
    mean: float
    payload_mean: float
    std: float
    payload_std: float
    c2st_auc: float
    c2st_low: float | None
    c2st_high: float | None
    c2st_p_value: float       # permutation test of the AUC (exact under "same distribution")

    @property
    def std_ratio(self) -> float:
        return self.std / self.payload_std if self.payload_std > 0 else float("inf")

    @property
    def std_error(self) -> float:
        """|std(hand-off)/std(payload) − 1|: how far the spread is off, relative."""
        return abs(self.std_ratio - 1.0)

    @property
    def off_distribution(self) -> bool:
        return self.c2st_auc > MAX_C2ST_AUC or self.std_error > STD_TOLERANCE


def _payload_reference(run: Run, n: int, seed: int) -> tuple[torch.Tensor, str]:
    """``n`` payloads at the hand-off step: transcript rows when it holds enough, else simulated."""
    gen = generator_for(seed, STREAM_HANDOFF, 1)
    view = ViewArrays.from_server_view(ServerView.open(run.path)) if run.t_hand < run.schedule.T else None
    if view is not None and len(view):
        at_hand = torch.nonzero(view.t == run.t_hand).flatten()
        if at_hand.numel() >= n:
            pick = at_hand[torch.randperm(at_hand.numel(), generator=gen)[:n]]
            return view.tensor[pick].float(), "transcript"
    data, splits = run.load_data()
    members = splits.members[torch.randperm(splits.members.numel(), generator=gen)[:n]]
    x0 = data.images[members]
    noise = torch.randn(x0.shape, generator=gen)
    return q_sample(x0, torch.full((x0.shape[0],), run.t_hand), noise, run.schedule.alpha_bar), "simulated"


def draw_handoffs(run: Run, n: int, seed: int, sampler: str | None = None, steps: int | None = None,
                  guidance: float = 0.0) -> torch.Tensor:
    """``n`` hand-offs x̂_{t_c} of the run's server, labels cycling through the classes, with the run's
    sampler and its share of the DDIM steps (or ``sampler`` / ``steps`` total steps when given).

    Without classifier-free guidance by default: guidance tilts the distribution towards each class's
    modes on purpose, so only the unguided chain targets the payload distribution itself."""
    cfg = run.config
    sampler = sampler or cfg.sampling.sampler
    steps = cfg.sampling.steps if steps is None else steps
    server_steps = split_ddim_steps(steps, run.schedule.T, run.t_hand)[0]
    gen = generator_for(seed, STREAM_HANDOFF, 0)
    y = sample_labels(n, run.num_classes)
    guidance = guidance if y is not None else 0.0
    device = run.device
    x_T = torch.randn((n, cfg.data.channels, cfg.data.image_size, cfg.data.image_size), generator=gen).to(device)
    out = server_handoff(run.server_model, run.schedule, run.t_hand, x_T, gen, y.to(device) if y is not None else None,
                         sampler, server_steps, guidance, cfg.training.payload)
    return out.cpu()


def check_handoff(run: Run, n: int = HANDOFF_SAMPLES, seed: int | None = None) -> HandoffCheck | None:
    """The hand-off check of a trained run; None when there is no hand-off (c = 0 or 1, or no server model)."""
    if run.server_model is None or not 0 < run.t_hand < run.schedule.T:
        return None
    seed = run.config.seed if seed is None else seed
    handoffs = draw_handoffs(run, n, seed)
    payloads, reference = _payload_reference(run, n, seed)
    test = classifier_two_sample_test(image_features(handoffs), image_features(payloads), stream_seed(seed, STREAM_HANDOFF, 2))
    auc = test.metrics.auc
    cfg = run.config
    return HandoffCheck(
        n=int(handoffs.shape[0]), t_hand=run.t_hand, sampler=cfg.sampling.sampler,
        server_steps=split_ddim_steps(cfg.sampling.steps, run.schedule.T, run.t_hand)[0] if cfg.sampling.sampler == "ddim"
        else run.schedule.T - run.t_hand,
        reference=reference, mean=float(handoffs.mean()), payload_mean=float(payloads.mean()),
        std=float(handoffs.std()), payload_std=float(payloads.std()),
        c2st_auc=float(auc.value), c2st_low=auc.low, c2st_high=auc.high, c2st_p_value=test.p_value,
    )
