"""``payload-clip``: clip each image to L2 norm ≤ C (around a public centre) before noising (DESIGN.md §5).

Covers T1 and, downstream, T2 (the server model is post-processing of the
payloads) and T5 (a co-client's hand-offs are post-processing of the server model). Clipping bounds the sensitivity of one release p = a·x0 + s·ε to
Δ = 2aC (instead of 2a√d), so each release is a Gaussian mechanism whose ε the
analytic Gaussian mechanism gives (``accounting.release_epsilon``). The client's
own model still trains on the raw images: clipping touches only what crosses.

The centre c (a public constant, default 0) is subtracted before clipping and
added back: x0' = c + (x0 − c)·min(1, C/‖x0 − c‖). Two clipped images still
differ by at most 2C, and a centre at the data's background (−1 for digits)
keeps far more of each image for the same C.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from collafuse.errors import ConfigError
from collafuse.hooks import ReleaseHook
from collafuse.threats import check_threats

from .validate import DefenseSpec, check_keys, number

NAME = "payload-clip"
COVERS: tuple[str, ...] = check_threats(("T1", "T2", "T5"), NAME)  # the threats this defense addresses (coverage map)


def clip_images(x0: torch.Tensor, clip_norm: float, center: float = 0.0) -> torch.Tensor:
    """x0 (B,C,H,W) → c + (x0 − c)·min(1, C/‖x0 − c‖₂) per image; the norm is over all C·H·W pixels."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    centred = x0.double() - center
    norms = centred.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (clip_norm / norms).clamp(max=1.0).reshape(-1, *([1] * (x0.ndim - 1)))
    return (center + centred * factor).to(x0.dtype)


@dataclass(frozen=True)
class PayloadClipSpec(DefenseSpec):
    """``{name: payload-clip, C: 4.0, center: -1.0}``. Its share of the setting: the sensitivity C."""

    clip_norm: float
    center: float = 0.0
    name: str = NAME
    COVERS = COVERS
    ORDER = 0  # before anything is noised

    def payload_terms(self, terms, config):
        return dataclasses.replace(terms, clip_norm=self.clip_norm)

    @classmethod
    def parse(cls, raw: Mapping[str, Any], where: str) -> "PayloadClipSpec":
        check_keys(raw, ("C", "center"), where)
        if "C" not in raw:
            raise ConfigError(f"{where}: needs 'C' (the L2 clipping norm, > 0)")
        return cls(
            clip_norm=number(raw, "C", where, exclusive_minimum=0.0),
            center=number(raw, "center", where, default=0.0, minimum=-1.0, maximum=1.0),
        )


class PayloadClip(ReleaseHook):
    """Clips each image before the client noises it into a payload."""

    name = NAME

    def __init__(self, clip_norm: float, center: float = 0.0):
        self.clip_norm = clip_norm
        self.center = center

    def prepare(self, x0: torch.Tensor, member_ids: torch.Tensor) -> torch.Tensor:
        return clip_images(x0, self.clip_norm, self.center)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "C": self.clip_norm, "center": self.center, "threats": list(COVERS)}


def build(spec: PayloadClipSpec, config) -> PayloadClip:
    if config.training.payload == "naive":
        raise ConfigError("payload-clip cannot protect the 'naive' payload: it sends the noise")
    return PayloadClip(spec.clip_norm, spec.center)
