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
- ``id-free``: the payload no longer says which client sent it (sender −1, as
  through a mixing relay); rows already carry no image id and each epoch's order
  is a fresh shuffle, so linking a payload to its client, and its images, must be
  inferred. The audit key keeps the true sender.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from collafuse.errors import ConfigError
from collafuse.hooks import ReleaseHook
from collafuse.protocol import Payload
from collafuse.schedule import NoiseSchedule
from collafuse.training import stream_seed

from .registry import Registry, check_keys, number

NAME = "minimize"
THREATS: tuple[str, ...] = ("T1",)
# A random stream of its own, far from the core's stream ids 0..6.
STREAM_SINGLE_RELEASE = 1001
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
        return {"name": self.name, "threats": list(THREATS)}


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
        return {"name": self.name, "bits": self.bits, "bytes_per_value": 2 if self.bits == 16 else 1, "threats": list(THREATS)}


class NoLabels(ReleaseHook):
    name = "minimize:no-labels"

    def transform(self, payload: Payload, generator: torch.Generator) -> Payload:
        return dataclasses.replace(payload, label=None)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "threats": list(THREATS)}


class IdFree(ReleaseHook):
    name = "minimize:id-free"

    def transform(self, payload: Payload, generator: torch.Generator) -> Payload:
        return dataclasses.replace(payload, client_id=ANONYMOUS_SENDER)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "sender": ANONYMOUS_SENDER, "threats": list(THREATS)}


# ---------- specs ----------

@dataclass(frozen=True)
class MinimizeSpec:
    """``{name: minimize, mode: single-release | fp16 | int8 | k-bit | no-labels | id-free, bits: k}``."""

    mode: str
    bits: int | None = None
    name: str = NAME
    threats: tuple[str, ...] = THREATS

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
    return Quantize(int(spec.bits), NoiseSchedule.create(config.diffusion.schedule, config.diffusion.T))


MODES: Registry[Callable[[MinimizeSpec, Any], ReleaseHook]] = Registry("minimize mode")
MODES.register("single-release", _single_release)
MODES.register("fp16", _quantize)
MODES.register("int8", _quantize)
MODES.register("k-bit", _quantize)
MODES.register("no-labels", lambda spec, config: NoLabels())
MODES.register("id-free", lambda spec, config: IdFree())


def build(spec: MinimizeSpec, config) -> ReleaseHook:
    return MODES.get(spec.mode)(spec, config)


def bytes_per_value(bits: int | None) -> int:
    """Wire bytes per pixel value: 4 (float32), 2 (fp16), 1 (int8 and unpacked k-bit)."""
    return 4 if bits is None else (2 if bits == 16 else 1)


def expected_quantization_mse(bits: int, bound: float) -> float:
    """scale²/12: the mean squared rounding error of uniform quantisation inside the range."""
    scale = 2.0 * bound / (2**bits - 1)
    return scale * scale / 12.0 if math.isfinite(scale) else math.inf
