"""``minimize``: send less, or less often (DESIGN.md §5 (a)–(d)). Covers T1 only.

Modes (one per ``{name: minimize, mode: …}`` entry; several entries combine):

- ``single-release``: one fixed noise draw per image for the whole training, from a
  per-image seed derived from the run seed and the member id. Every later release
  of an image is identical to its first, so extra epochs reveal nothing new: the
  payload channel is ONE Gaussian mechanism per image, not one per epoch.
- ``fp16`` / ``int8`` / ``k-bit`` (``bits: k``, 1..8): quantised payloads. ``int8`` and
  ``k-bit`` send uint8 codes on 2^k levels over [−R, R], R = max_rows(a_t + 4·s_t)
  (a function of the public schedule and t, so the server can recompute it; the
  payload carries it as ``scale``/``offset``). k-bit codes are not bit-packed: they
  take one byte each on the wire, and the transcript's ``wire_bytes`` say so.
  Quantisation is post-processing of the Gaussian release: the formal ε does not
  change; the measured leakage can only fall.
- ``no-labels``: the class label stays on the client (the server trains its part
  unconditionally). Without it, a conditional run sends every label in the clear:
  label ε = ∞.
- ``id-free``: the server cannot tell which client sent a payload (§5 (d)). Blanking
  the sender field (−1) is not enough: clients take turns, so the global step of a
  payload (step mod N), its place in the order of arrival and its batch size (a
  client's last batch of an epoch is smaller) all name the sender. The hook is a
  mixing relay (:meth:`IdFree.mix_round`): the payloads of all clients in a round are
  pooled, their rows shuffled with the run's relay stream, and delivered as as many
  messages as the round had payloads, of one size (sizes differ by at most one row
  when the round's rows do not divide evenly; they are a function of the round's row
  and payload counts only). Every message of a round carries the round index as its
  step, so no per-client order or step is left. The server still trains on every row
  once per round, with batches of the pooled size. The audit key keeps the true sender
  and member of every row. Whether this hides the sender is measured, not assumed: the
  audit credits it for T1 only where :mod:`collafuse.attacks.linkage.sender` is at chance.
  Content is not hidden: with non-IID clients (label partitions) the images or labels
  themselves can still point at their client.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from collafuse.errors import ConfigError
from collafuse.hooks import Delivery, ReleaseHook
from collafuse.payload import Payload
from collafuse.registry import Registry
from collafuse.schedule import NoiseSchedule
from collafuse.threats import check_threats
from collafuse.streams import STREAM_SINGLE_RELEASE, stream_seed

from .validate import DefenseSpec, check_keys, number

NAME = "minimize"
COVERS: tuple[str, ...] = check_threats(("T1",), NAME)  # the threats this defense addresses (coverage map)
# A random stream of its own, far from the core's stream ids 0..6.
ANONYMOUS_SENDER = -1


# ---------- pure functions ----------

def per_image_noise(member_ids: torch.Tensor, shape: tuple[int, ...], run_seed: int) -> torch.Tensor:
    """One fixed N(0, I) draw per member id: (B,) ids → (B, *shape), the same every time it is asked."""
    rows = [
        torch.randn(shape, generator=torch.Generator().manual_seed(stream_seed(run_seed, STREAM_SINGLE_RELEASE, int(i))))
        for i in member_ids.tolist()
    ]
    return torch.stack(rows) if rows else torch.empty((0, *shape))


def quant_range(alpha_bar: torch.Tensor, t: torch.Tensor) -> float:
    """R = max over rows of a_t + 4·s_t: payloads of images in [−1, 1] lie in [−R, R] but for a 4σ tail."""
    ab = alpha_bar[t.long()]
    return float((ab.sqrt() + 4.0 * (1.0 - ab).sqrt()).max())


def quantize(values: torch.Tensor, bits: int, bound: float) -> tuple[torch.Tensor, float, float]:
    """Uniform k-bit codes (uint8) of ``values`` clamped to [−bound, bound]; returns (codes, scale, offset).

    Decoding is code·scale + offset; the rounding error is at most scale/2 inside the range.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    levels = 2**bits - 1
    scale = 2.0 * bound / levels
    codes = ((values.double().clamp(-bound, bound) + bound) / scale).round().clamp(0, levels).to(torch.uint8)
    return codes, scale, -bound


# ---------- hooks ----------

class SingleRelease(ReleaseHook):
    name = "minimize:single-release"

    def __init__(self, run_seed: int):
        self.run_seed = run_seed

    def draw_noise(self, x0, member_ids, t, generator):
        return per_image_noise(member_ids.cpu(), tuple(x0.shape[1:]), self.run_seed).to(x0.dtype)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "threats": list(COVERS)}


class Quantize(ReleaseHook):
    """``bits`` = 16: float16 values; 1..8: uint8 codes with a public scale and offset."""

    def __init__(self, bits: int, schedule: NoiseSchedule):
        self.bits = bits
        self.schedule = schedule
        self.name = "minimize:fp16" if bits == 16 else ("minimize:int8" if bits == 8 else f"minimize:{bits}-bit")

    def transform(self, payload: Payload, generator: torch.Generator) -> Payload:
        if payload.scale is not None or not payload.tensor.is_floating_point():
            raise ValueError("payload is already quantised")
        if self.bits == 16:
            return dataclasses.replace(payload, tensor=payload.tensor.to(torch.float16))
        codes, scale, offset = quantize(payload.tensor, self.bits, quant_range(self.schedule.alpha_bar, payload.t))
        return dataclasses.replace(payload, tensor=codes, scale=scale, offset=offset)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "bytes_per_value": 2 if self.bits == 16 else 1, "threats": list(COVERS)}


class NoLabels(ReleaseHook):
    name = "minimize:no-labels"

    def transform(self, payload: Payload, generator: torch.Generator) -> Payload:
        return dataclasses.replace(payload, label=None)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "threats": list(COVERS)}


def mixed_batch_sizes(rows: int, messages: int) -> list[int]:
    """Sizes of ``messages`` batches holding ``rows`` rows: equal, the first ``rows mod messages`` one larger."""
    if messages < 1 or rows < messages:
        raise ValueError(f"cannot split {rows} rows into {messages} non-empty batches")
    base, extra = divmod(rows, messages)
    return [base + 1] * extra + [base] * (messages - extra)


def concat_payloads(payloads: list[Payload]) -> Payload:
    """The rows of several payloads as one (N = Σ B_i rows, in order); they must agree on every public field."""
    first = payloads[0]
    for p in payloads[1:]:
        for name, same in (
            ("kind", p.kind == first.kind),
            ("tensor dtype and image shape", p.tensor.dtype == first.tensor.dtype and p.tensor.shape[1:] == first.tensor.shape[1:]),
            ("label (sent or not)", (p.label is None) == (first.label is None)),
            ("noise (sent or not)", (p.noise is None) == (first.noise is None)),
            ("quantisation scale and offset", p.scale == first.scale and p.offset == first.offset),
        ):
            if not same:
                raise ValueError(f"id-free relay: the payloads of a round differ in their {name}; they cannot share a batch")
    cat = lambda name: None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in payloads])  # noqa: E731
    return dataclasses.replace(first, t=cat("t"), tensor=cat("tensor"), label=cat("label"), noise=cat("noise"))


def take_rows(payload: Payload, rows: torch.Tensor, client_id: int, step: int) -> Payload:
    pick = lambda v: None if v is None else v[rows]  # noqa: E731
    return dataclasses.replace(payload, client_id=client_id, step=step, t=payload.t[rows], tensor=payload.tensor[rows],
                               label=pick(payload.label), noise=pick(payload.noise))


class IdFree(ReleaseHook):
    """A mixing relay: each round's payloads pooled, shuffled and re-batched to one size (see the module doc)."""

    name = "minimize:id-free"

    def transform(self, payload: Payload, generator: torch.Generator) -> Payload:
        return dataclasses.replace(payload, client_id=ANONYMOUS_SENDER)

    def mix_round(self, payloads, round_index: int, generator: torch.Generator) -> list[Delivery] | None:
        """(B_1..B_m payloads of a round) → m messages of the pooled rows in a uniformly random order.

        Row order and the row → message assignment are one ``torch.randperm`` of the round's
        rows (the core's relay stream), so nothing a message carries depends on who sent its
        rows beyond the round's composition. Every message's step is ``round_index``.
        """
        payloads = list(payloads)
        if not payloads:
            return []
        pooled = concat_payloads(payloads)
        order = torch.randperm(len(pooled), generator=generator)
        out, start = [], 0
        for size in mixed_batch_sizes(len(pooled), len(payloads)):
            rows = order[start:start + size]
            start += size
            out.append(Delivery(take_rows(pooled, rows, ANONYMOUS_SENDER, round_index), rows))
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "sender": ANONYMOUS_SENDER, "relay": "round-mixed, one batch size, step = round",
                "threats": list(COVERS)}


# ---------- specs ----------

# Where each mode's release hook runs among the release hooks (clip 0, payload noise 2): the per-image
# noise draw before the extra noise, then labels, sender and quantisation last.
_ORDER = {"single-release": 1, "no-labels": 3, "id-free": 4, "quantize": 5}
# The credit that is measured, not declared (DESIGN.md §5 (d)): an id-free release covers sender
# linkage (T1) only where a sender-identification attack that reads every field and the order of
# arrival is at chance (read by :func:`~.coverage.credit_measured`).
MEASURED_CREDIT: dict[str, str] = {f"{NAME}:id-free": "T1"}


@dataclass(frozen=True)
class MinimizeSpec(DefenseSpec):
    """``{name: minimize, mode: single-release | fp16 | int8 | k-bit | no-labels | id-free, bits: k}``.

    Its share of the setting: the wire bytes (a quantiser), the labels (``no-labels``) and, in the
    payload guarantee, one release per image (``single-release``) and no label channel."""

    mode: str
    bits: int | None = None
    name: str = NAME
    COVERS = COVERS

    @property
    def label(self) -> str:
        return f"{self.name}:{self.mode}"

    @property
    def unique_key(self) -> str:
        return f"{self.name}:{self.key}"

    def twice(self) -> str:
        return "a second quantiser" if self.bits is not None else f"{self.label!r} twice"

    @property
    def order(self) -> int:
        return _ORDER[self.key]

    def check_setting(self, parsed) -> None:
        noisy = next((s for s in parsed if s.adds_noise_per_release), None)
        if self.mode == "single-release" and noisy is not None:
            raise ConfigError(
                f"defenses: minimize single-release cannot be combined with {noisy.label} (the extra noise would be "
                "fresh every epoch and average out); use a larger cut_ratio instead"
            )

    def bytes_per_value(self) -> int | None:
        return None if self.bits is None else bytes_per_value(self.bits)

    def sends_labels(self, sent: bool) -> bool:
        return False if self.mode == "no-labels" else sent

    def payload_terms(self, terms, config):
        if self.mode == "single-release":
            return dataclasses.replace(terms, single_release=True)
        if self.mode == "no-labels":
            return dataclasses.replace(terms, labels_sent=False)
        return terms

    @classmethod
    def parse(cls, raw: Mapping[str, Any], where: str) -> "MinimizeSpec":
        check_keys(raw, ("mode", "bits"), where)
        if "mode" not in raw:
            raise ConfigError(f"{where}: needs 'mode'; valid: {', '.join(MODES.names())}")
        mode = raw["mode"]
        MODES.get(mode)  # refuses unknown modes, listing the valid ones
        if mode == "k-bit":
            if "bits" not in raw:
                raise ConfigError(f"{where}: mode k-bit needs 'bits' (1..8)")
            return cls(mode, number(raw, "bits", where, minimum=1, maximum=8, integer=True))
        if "bits" in raw:
            raise ConfigError(f"{where}: 'bits' only applies to mode k-bit")
        return cls(mode, {"fp16": 16, "int8": 8}.get(mode))

    @property
    def key(self) -> str:
        """What must not appear twice: the mode, and at most one quantiser."""
        return "quantize" if self.bits is not None else self.mode


def _single_release(spec: MinimizeSpec, config) -> ReleaseHook:
    if config.training.payload != "cut":
        raise ConfigError(
            f"minimize single-release needs training.payload 'cut' (got {config.training.payload!r}): "
            "other kinds draw a new step per release"
        )
    return SingleRelease(config.seed)


def _quantize(spec: MinimizeSpec, config) -> ReleaseHook:
    return Quantize(int(spec.bits), NoiseSchedule.from_config(config.diffusion))


MODES: Registry[Callable[[MinimizeSpec, Any], ReleaseHook]] = Registry("minimize mode")
MODES.register("single-release", _single_release)
MODES.register("fp16", _quantize)
MODES.register("int8", _quantize)
MODES.register("k-bit", _quantize)
MODES.register("no-labels", lambda spec, config: NoLabels())
def _id_free(spec: MinimizeSpec, config) -> ReleaseHook:
    payload_kind = config.training.payload
    coded = [d for d in (config.defenses or []) if isinstance(d, Mapping) and d.get("name") == NAME
             and d.get("mode") in ("int8", "k-bit")]
    if coded and payload_kind != "cut":
        raise ConfigError(
            f"minimize id-free with an integer quantiser ({coded[0]['mode']}) needs training.payload 'cut' "
            f"(got {payload_kind!r}): each batch's code range depends on its t, so the payloads of a round "
            "cannot be mixed into one batch; use fp16, or payload 'cut'"
        )
    return IdFree()


MODES.register("id-free", _id_free)


def build(spec: MinimizeSpec, config) -> ReleaseHook:
    return MODES.get(spec.mode)(spec, config)


def bytes_per_value(bits: int | None) -> int:
    """Wire bytes per pixel value: 4 (float32), 2 (fp16), 1 (int8 and unpacked k-bit)."""
    return 4 if bits is None else (2 if bits == 16 else 1)


def expected_quantization_mse(bits: int, bound: float) -> float:
    """scale²/12: the mean squared rounding error of uniform quantisation inside the range."""
    scale = 2.0 * bound / (2**bits - 1)
    return scale * scale / 12.0 if math.isfinite(scale) else math.inf
