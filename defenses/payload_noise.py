"""``payload-noise``: extra Gaussian noise on every payload, rescaled to a later step t' (DESIGN.md §5).

Covers T1 (the payloads) and, downstream, T2: the server model is a function of
the payloads alone, so the payload channel's ε bounds it too (post-processing);
and T5, the co-client, whose hand-offs are post-processing of the server model.
It does nothing for T3 (the client model trains on raw images) or for the part
of T4 the client model contributes.

The math. A payload p = a·x0 + s·ε (a² + s² = 1) plus σξ is a·x0 + √(s² + σ²)·ε''.
Rescaled by k = 1/√(1 + σ²) it is k·a·x0 + √(1 − k²a²)·ε'': exactly a payload at
a later step t' with ᾱ_{t'} = (k·a)² = ᾱ_t/(1 + σ²). The schedule is discrete, so
t' is the first step with ᾱ_{t'} ≤ ᾱ_t/(1 + σ²) and the noise actually added is
σ_eff = √(ᾱ_t/ᾱ_{t'} − 1) ≥ σ: the payload then sits EXACTLY at t' and the
server, told t', trains on (t', T] with its relative schedule as usual. The
client's model covers 1..t' so the sampling chain hands off at t' (the core's
``ReleaseHook.release_step``); the client's cost per training step is unchanged.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from collafuse.errors import ConfigError
from collafuse.hooks import ReleaseHook
from collafuse.payload import Payload
from collafuse.schedule import NoiseSchedule
from collafuse.threats import check_threats

from .validate import DefenseSpec, check_keys, number

NAME = "payload-noise"
COVERS: tuple[str, ...] = check_threats(("T1", "T2", "T5"), NAME)  # the threats this defense addresses (coverage map)


def noised_step(alpha_bar: torch.Tensor, t: int, sigma: float) -> int:
    """t': the first step with ᾱ_{t'} ≤ ᾱ_t/(1 + σ²) (t itself when σ = 0). May exceed T (then no step fits)."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return t
    target = float(alpha_bar[t]) / (1.0 + sigma * sigma)
    later = torch.nonzero(alpha_bar[t:] <= target).flatten()
    return int(t + later[0]) if later.numel() else len(alpha_bar)


def effective_sigma(alpha_bar: torch.Tensor, t: int, t_prime: int) -> float:
    """σ_eff = √(ᾱ_t/ᾱ_{t'} − 1): the noise that moves a payload at t exactly to t'."""
    return math.sqrt(max(0.0, float(alpha_bar[t]) / float(alpha_bar[t_prime]) - 1.0))


def renoise(p: torch.Tensor, alpha_bar_t: float, alpha_bar_t_prime: float, xi: torch.Tensor) -> torch.Tensor:
    """p' = k·(p + σ_eff·ξ) with k = √(ᾱ_{t'}/ᾱ_t): a payload at t turned into one at t'. Shapes (B,C,H,W).

    Equivalently the forward step q(x_{t'} | x_t); computed in float64, returned in p's dtype.
    """
    k = math.sqrt(alpha_bar_t_prime / alpha_bar_t)
    sigma = math.sqrt(max(0.0, alpha_bar_t / alpha_bar_t_prime - 1.0))
    return (k * (p.double() + sigma * xi.double())).to(p.dtype)


@dataclass(frozen=True)
class PayloadNoiseSpec(DefenseSpec):
    """``{name: payload-noise, sigma: σ}``: σ ≥ 0 is the extra noise std relative to the image scale.

    Its share of the setting: payloads move from t to t' (:func:`noised_step`) and the guarantee's σ."""

    sigma: float
    name: str = NAME
    COVERS = COVERS
    ORDER = 2  # after the noise draw, before labels, sender and quantisation
    adds_noise_per_release = True

    def release_step(self, t: int, schedule: NoiseSchedule) -> int:
        t_prime = noised_step(schedule.alpha_bar, t, self.sigma)
        if t_prime >= schedule.T:
            raise ConfigError(
                f"{self.name} sigma={self.sigma} moves the payload past step {schedule.T - 1}; no server step is left"
            )
        return t_prime

    def payload_terms(self, terms, config):
        return dataclasses.replace(terms, noise_sigma=self.sigma)

    @classmethod
    def parse(cls, raw: Mapping[str, Any], where: str) -> "PayloadNoiseSpec":
        check_keys(raw, ("sigma",), where)
        if "sigma" not in raw:
            raise ConfigError(f"{where}: needs 'sigma' (the extra noise std, >= 0)")
        return cls(sigma=number(raw, "sigma", where, minimum=0.0))


class PayloadNoise(ReleaseHook):
    """Adds σ_eff·ξ to each payload, rescales it, and relabels it with t' (see the module docstring)."""

    name = NAME

    def __init__(self, sigma: float, schedule: NoiseSchedule, t_c: int | None = None):
        self.sigma = sigma
        self.schedule = schedule
        self.t_c = t_c  # only for describe(): where the run's payloads start

    def release_step(self, t: int) -> int:
        return noised_step(self.schedule.alpha_bar, t, self.sigma)

    def transform(self, payload: Payload, generator: torch.Generator) -> Payload:
        if payload.kind == "naive":
            raise ValueError("payload-noise cannot protect the 'naive' payload: it sends the noise")
        if self.sigma == 0:
            return payload
        ab = self.schedule.alpha_bar
        t_new = payload.t.clone()
        out = payload.tensor.clone()
        xi = torch.randn(payload.tensor.shape, generator=generator)
        for t in torch.unique(payload.t).tolist():
            rows = payload.t == t
            t_prime = self.release_step(int(t))
            if t_prime >= self.schedule.T:
                raise ValueError(f"payload-noise sigma={self.sigma} moves step {t} past T-1; nothing left for the server")
            out[rows] = renoise(payload.tensor[rows], float(ab[t]), float(ab[t_prime]), xi[rows])
            t_new[rows] = t_prime
        return dataclasses.replace(payload, tensor=out, t=t_new)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"name": self.name, "sigma": self.sigma, "threats": list(COVERS)}
        if self.t_c is not None:
            t_prime = self.release_step(self.t_c)
            info.update(t_c=self.t_c, t_release=t_prime, sigma_effective=effective_sigma(self.schedule.alpha_bar, self.t_c, t_prime))
        return info


def build(spec: PayloadNoiseSpec, config) -> PayloadNoise:
    """The hook for a run config; refuses a σ that leaves the server no step to train on."""
    schedule = NoiseSchedule.from_config(config.diffusion)
    t_c, T = config.t_c, schedule.T
    if config.training.payload != "cut":
        raise ConfigError(
            f"payload-noise needs training.payload 'cut' (got {config.training.payload!r}): "
            "'naive' sends the noise and 'trajectory' payloads could be pushed past T"
        )
    if t_c == 0:
        raise ConfigError("payload-noise needs a client side (cut_ratio > 0) to own the steps up to t'")
    if t_c >= T:
        raise ConfigError("payload-noise: with cut_ratio 1 no payload crosses; nothing to protect")
    t_prime = noised_step(schedule.alpha_bar, t_c, spec.sigma)
    if t_prime >= T:
        raise ConfigError(
            f"payload-noise sigma={spec.sigma:g} moves the payload from t_c={t_c} past step {T - 1}; "
            "the server would have nothing to train on (use a smaller sigma)"
        )
    return PayloadNoise(spec.sigma, schedule, t_c)
