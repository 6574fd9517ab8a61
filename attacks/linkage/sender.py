"""Sender identification: which client sent each payload row? (T1; DESIGN.md §3, §5 (d)).

Threat model: T1, a curious server reading its transcript. It knows the public protocol
(DESIGN.md §2.2): ``num_clients`` clients take turns round-robin, one minibatch each, each
client walks its own data once per epoch in minibatches of one configured size (its last
batch of an epoch is smaller when its data does not divide evenly), and a global step
counts the minibatches. It reads every field of its view (:class:`ViewArrays`): the sender
field, the step, the order of arrival (``seq``), the message boundaries and sizes (rows of
one message share a step and a wire size), ``t``, labels and wire bytes. It never reads
the audit key.

The attack (:func:`identify_senders`) is a rule-based + fitted hybrid:

1. **Sender field.** A row whose client field names a client (not −1) is that client's.
2. **Order of arrival.** For the other rows the server replays the round-robin schedule over
   the messages in arrival order: the k-th message of a round is the k-th client still
   active. The schedule is *fitted to the view*: the full batch size is the largest message,
   and a shorter message ends its client's epoch (that client takes no more turns until every
   client has finished the epoch). The fitted schedule is used when it is consistent (every
   epoch it finds gives every client the same number of messages, and the transcript ends at
   an epoch's end); otherwise, and whenever no message is short, the plain rule
   ``step mod num_clients`` (exact whenever all clients take the same number of turns per
   epoch, e.g. equal partitions).

``t``, labels and wire bytes are the same for every client in this protocol (all clients
apply the same release hooks), so beyond marking message boundaries they carry no sender
information; with non-IID clients the *content* (images, labels) can still point at a
client, which this attack does not exploit: its accuracy is then a lower bound.

Scoring (:func:`score_sender_identification`, scorer side): accuracy of the predicted
senders against the true ones under the **best one-to-one relabelling** of predicted ids to
clients (Hungarian assignment, :func:`scipy.optimize.linear_sum_assignment`): a server that
does not know which real client is "client 0" still links every payload of one client
together, and that is the leak. It is scored with a 95 % Wilson interval over rows; chance
is 1/N, and the attack is *at chance* when 1/N lies inside the interval. The prediction
uses at most N ids and, for mixed rounds, one id per whole round, so the best relabelling
cannot lift a prediction that carries no information above 1/N when every client sends
the same number of rows per round.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from collafuse.attacks.reconstruction.view import ViewArrays, _refuse_key
from collafuse.attacks.stats import Interval, wilson_interval
from collafuse.transcript import ServerView

ANONYMOUS_SENDER = -1  # the sender field of a payload that does not name its client
NAME = "sender-id"
THREAT = "T1"

# How each row's prediction was made (SenderPredictions.rule).
RULE_FIELD, RULE_SCHEDULE, RULE_STEP = 0, 1, 2
RULE_NAMES = {RULE_FIELD: "sender field", RULE_SCHEDULE: "fitted round-robin schedule", RULE_STEP: "step mod N"}


@dataclass(frozen=True)
class SenderPredictions:
    """The attack's output. ``sender``: (N,) int64 predicted client in 0..num_clients−1 of every
    view row, in the view's row order; ``rule``: (N,) int64 how each was made (``RULE_*``);
    ``messages``: the number of messages (batches) the server saw."""

    sender: torch.Tensor
    rule: torch.Tensor
    num_clients: int
    messages: int

    def __len__(self) -> int:
        return int(self.sender.shape[0])

    def rules_used(self) -> dict[str, int]:
        """Rows per rule, by name (rules that predicted nothing are left out)."""
        counts = torch.bincount(self.rule, minlength=len(RULE_NAMES)).tolist() if len(self) else [0] * len(RULE_NAMES)
        return {RULE_NAMES[r]: int(c) for r, c in enumerate(counts) if c}


@dataclass(frozen=True)
class SenderIdentification:
    """The score: ``accuracy`` (Wilson 95 % interval over ``n_rows`` rows) under the best
    relabelling ``mapping`` (predicted id → client), ``chance`` = 1/N and ``at_chance``
    (1/N inside the interval)."""

    accuracy: Interval
    chance: float
    at_chance: bool
    n_rows: int
    num_clients: int
    mapping: dict[int, int]

    def to_dict(self) -> dict:
        return {"attack": NAME, "threat": THREAT, "accuracy": self.accuracy.to_json(), "chance": self.chance,
                "at_chance": self.at_chance, "n_rows": self.n_rows, "num_clients": self.num_clients,
                "mapping": {str(k): v for k, v in self.mapping.items()},
                "scoring": "best one-to-one relabelling of predicted ids to clients (Hungarian)"}


# ---------- the attack: server view + public protocol only ----------

def _as_view(view: object) -> ViewArrays:
    _refuse_key(view, "identify_senders(view)")
    if isinstance(view, ServerView):
        return ViewArrays.from_server_view(view)
    if not isinstance(view, ViewArrays):
        raise TypeError(f"identify_senders: view must be ViewArrays or a ServerView, got {type(view).__name__}")
    return view


def message_index(view: ViewArrays) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the rows, in arrival order, into the messages the server received.

    A message is a maximal run of consecutive rows (by ``seq``) with the same step and wire size.
    Returns (order (N,): row indices sorted by seq, message (N,): message number of each row in
    that order, sizes (M,): rows per message).
    """
    order = torch.argsort(view.seq, stable=True)
    n = len(view)
    if n == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return order, empty, empty
    step = view.step[order]
    new = torch.zeros(n, dtype=torch.bool)
    new[0] = True
    new[1:] = step[1:] != step[:-1]
    if view.wire_bytes is not None:
        wire = view.wire_bytes[order]
        new[1:] |= wire[1:] != wire[:-1]
    message = torch.cumsum(new.long(), 0) - 1
    return order, message, torch.bincount(message)


def round_robin_schedule(sizes: list[int], num_clients: int) -> list[int] | None:
    """Replay round robin over message sizes: the client of each message, or None if inconsistent.

    The full batch is the largest message; a shorter one is its client's last of the epoch.
    Consistent = at least one short message, every epoch found ends with all clients done,
    every epoch gives each client the same number of messages, and the transcript ends at an
    epoch's end. (No short message at all: the schedule is plain round robin; the caller's
    ``step mod N`` says the same.)
    """
    if not sizes:
        return []
    full = max(sizes)
    if all(b == full for b in sizes):
        return None
    active, pos = list(range(num_clients)), 0
    counts = [0] * num_clients
    epochs: set[tuple[int, ...]] = set()
    out = []
    for b in sizes:
        k = active[pos]
        out.append(k)
        counts[k] += 1
        if b < full:
            active.pop(pos)  # this client's data is used up for the epoch; the next one takes this turn
        else:
            pos += 1
        if not active:
            epochs.add(tuple(counts))
            active, pos, counts = list(range(num_clients)), 0, [0] * num_clients
        elif pos >= len(active):
            pos = 0
    if len(epochs) != 1 or any(counts):
        return None
    return out


def identify_senders(view: ViewArrays | ServerView, num_clients: int) -> SenderPredictions:
    """Predict the sender of every row of ``view`` (see the module doc for the rules).

    ``num_clients``: N, public protocol knowledge of the server. Returns a
    :class:`SenderPredictions` in the view's row order.
    """
    view = _as_view(view)
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    n = len(view)
    visible = view.client != ANONYMOUS_SENDER
    if bool(visible.any()):
        shown = view.client[visible]
        if int(shown.min()) < 0 or int(shown.max()) >= num_clients:
            raise ValueError(f"view.client names clients outside 0..{num_clients - 1} (and is not {ANONYMOUS_SENDER}): "
                             f"{sorted(set(shown.tolist()))[:8]}")
    order, message, sizes = message_index(view)
    schedule = round_robin_schedule(sizes.tolist(), num_clients)
    if schedule is not None:
        by_schedule = torch.tensor(schedule, dtype=torch.int64)[message]
        rule_order = RULE_SCHEDULE
    else:
        by_schedule = view.step[order] % num_clients  # the k-th turn of a round is client k
        rule_order = RULE_STEP
    sender = torch.empty(n, dtype=torch.int64)
    rule = torch.empty(n, dtype=torch.int64)
    sender[order] = by_schedule
    rule[order] = rule_order
    sender[visible] = view.client[visible]
    rule[visible] = RULE_FIELD
    return SenderPredictions(sender, rule, num_clients, int(sizes.numel()))


# ---------- scoring: the only place that sees the true senders ----------

def best_relabelling(predicted: np.ndarray, truth: np.ndarray, num_clients: int) -> tuple[int, dict[int, int]]:
    """(rows correct, mapping predicted id → client) under the one-to-one relabelling that maximises
    agreement (Hungarian assignment on the N × N confusion matrix)."""
    confusion = np.zeros((num_clients, num_clients), dtype=np.int64)
    np.add.at(confusion, (predicted, truth), 1)
    rows, cols = linear_sum_assignment(-confusion)
    return int(confusion[rows, cols].sum()), {int(r): int(c) for r, c in zip(rows, cols)}


def score_sender_identification(
    predictions: SenderPredictions | torch.Tensor, true_sender: torch.Tensor, num_clients: int, level: float = 0.95
) -> SenderIdentification:
    """Accuracy of ``predictions`` against ``true_sender`` (N,) (the audit key's client of every row,
    in the view's row order) under the best relabelling; chance 1/N; at chance when 1/N is in the interval."""
    predicted = predictions.sender if isinstance(predictions, SenderPredictions) else predictions
    if not isinstance(predicted, torch.Tensor) or not isinstance(true_sender, torch.Tensor):
        raise TypeError("score_sender_identification: predictions and true_sender must be tensors")
    if predicted.shape != true_sender.shape or predicted.ndim != 1:
        raise ValueError(f"predictions {tuple(predicted.shape)} and true_sender {tuple(true_sender.shape)} "
                         "must be (N,) and of one shape")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    p, t = predicted.long().numpy(), true_sender.long().numpy()
    for name, a in (("predictions", p), ("true_sender", t)):
        if a.size and (a.min() < 0 or a.max() >= num_clients):
            raise ValueError(f"{name} must lie in 0..{num_clients - 1}, got {int(a.min())}..{int(a.max())}")
    correct, mapping = best_relabelling(p, t, num_clients)
    accuracy = wilson_interval(correct, int(p.size), level)
    chance = 1.0 / num_clients
    at_chance = bool(p.size) and accuracy.low <= chance <= accuracy.high
    return SenderIdentification(accuracy, chance, at_chance, int(p.size), num_clients, mapping)


def at_chance(lo: float | None, hi: float | None, chance: float | None) -> bool | None:
    """Is chance inside [lo, hi]? None when any is missing (e.g. read back from a results table)."""
    if lo is None or hi is None or chance is None or any(map(np.isnan, (lo, hi, chance))):
        return None
    return bool(lo <= chance <= hi)
