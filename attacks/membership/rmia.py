"""``rmia`` and ``rmia-offline``: the relative membership inference attack (Zarifzadeh, Liu, Mahloujifar &
Shokri 2024, "Low-cost high-power membership inference attacks", ICML; DESIGN.md §4.2).

Pr(x|θ) is the model's per-pixel Gaussian likelihood of its own noise at the fixed (t, noise) draws,
Pr(x|θ) = exp(−L(x)/2) ∈ (0, 1] with L the per-pixel denoising loss (:mod:`references`): for a
diffusion model the analogue of the classifier's probability of the true label the paper uses.
Pr(x) = the mean of Pr(x|θ_r) over reference models: over all R (online, ``rmia``; candidates are
IN half of them) or, offline (``rmia-offline``), from the OUT references with the paper's linear
approximation of the missing IN models, Pr(x) = ½((1 + a)·Pr_OUT(x) + (1 − a)) (§3, "offline"),
a = 0.3 (ML Privacy Meter's default; the population samples z are OUT for every reference, so
Pr(z) is computed the same way). With LR(x, z) = [Pr(x|θ)/Pr(x)] / [Pr(z|θ)/Pr(z)]:

    score(x) = Pr_z( LR(x, z) > γ ),  γ = 1   (Eq. 4: the fraction of population samples x dominates)

over Z population samples (auxiliary images no reference trained on). The fraction takes at most Z + 1
values; ties are broken by adding σ(log Pr(x|θ)/Pr(x)) < 1 to the count, which keeps the score
strictly increasing in the paper's ratio (so its ranking is the paper's). HIGHER = MORE LIKELY MEMBER;
the direction comes from the references. Threats T2 (reference server models on simulated payloads)
and T3. Queries per image: (1 + R)·M·K (and Z·(1 + R)·M·K for the population), plus R reference trainings.
"""
from __future__ import annotations

import numpy as np

from collafuse.attacks.membership.base import AttackScores, MembershipAttack, Signals, low_noise_mean
from collafuse.attacks.membership.metrics import ScoreError

SIGNALS = ("fixed_loss", "ref_fixed_loss", "ref_in", "pop_fixed_loss", "ref_pop_fixed_loss", "steps", "t_range")
OFFLINE_A = 0.3
GAMMA = 1.0


def probability(loss: np.ndarray) -> np.ndarray:
    """Pr(x|θ) = exp(−L/2), L ≥ 0 the per-pixel denoising loss (any shape)."""
    return np.exp(-0.5 * np.maximum(np.asarray(loss, dtype=np.float64), 0.0))


def marginal(ref_p: np.ndarray, out: np.ndarray | None, a: float | None) -> np.ndarray:
    """Pr(x) from reference probabilities (R, N): the mean over all references (``a`` None) or the
    offline ½((1 + a)·mean over OUT + (1 − a)) with ``out`` (R, N) the OUT mask."""
    if a is None:
        return ref_p.mean(0)
    count = out.sum(0)
    if (count == 0).any():
        raise ScoreError(f"rmia-offline: {int((count == 0).sum())} candidate(s) have no OUT reference model")
    p_out = (ref_p * out).sum(0) / count
    return 0.5 * ((1.0 + a) * p_out + (1.0 - a))


def rmia_scores(p_x: np.ndarray, pr_x: np.ndarray, p_z: np.ndarray, pr_z: np.ndarray, gamma: float = GAMMA) -> np.ndarray:
    """(N,) Pr_z(LR(x, z) > γ) + tie-break: p_x, pr_x (N,) target and marginal of the candidates,
    p_z, pr_z (Z,) the same of the population samples."""
    ratio_x = np.log(p_x) - np.log(pr_x)
    ratio_z = np.log(p_z) - np.log(pr_z)
    count = (ratio_x[:, None] - ratio_z[None, :] > np.log(gamma)).sum(1)
    return (count + 1.0 / (1.0 + np.exp(-ratio_x))) / len(ratio_z)


def _score(signals: Signals, a: float | None) -> AttackScores:
    loss = np.asarray(signals["fixed_loss"], dtype=np.float64)
    ref = np.asarray(signals["ref_fixed_loss"], dtype=np.float64)
    pop = np.asarray(signals["pop_fixed_loss"], dtype=np.float64)
    ref_pop = np.asarray(signals["ref_pop_fixed_loss"], dtype=np.float64)
    out = ~np.asarray(signals["ref_in"], dtype=bool)
    if pop.shape[0] == 0:
        raise ScoreError("rmia needs population samples z: the run holds no auxiliary images (data.n_aux = 0)")
    if ref.shape[1:] != loss.shape or ref_pop.shape[1:] != pop.shape or out.shape != ref.shape[:2]:
        raise ScoreError(f"rmia: signal shapes do not match: {loss.shape}, {ref.shape}, {pop.shape}, {ref_pop.shape}")
    steps, t_range = signals["steps"], signals["t_range"]
    z_out = np.ones(ref_pop.shape[:2], dtype=bool)

    def one(lx, rx, lz, rz) -> np.ndarray:
        p_x, p_z = probability(lx), probability(lz)
        return rmia_scores(p_x, marginal(probability(rx), out, a), p_z, marginal(probability(rz), z_out, a))

    per_step = np.stack([one(loss[:, j], ref[:, :, j], pop[:, j], ref_pop[:, :, j]) for j in range(loss.shape[1])], 1)

    def low(x: np.ndarray) -> np.ndarray:  # low-noise mean of the loss over steps, last axis (…, M)
        flat = x.reshape(-1, x.shape[-1])
        return low_noise_mean(flat, steps, t_range).reshape(x.shape[:-1])

    scores = one(low(loss), low(ref), low(pop), low(ref_pop))
    return AttackScores(scores, per_step, tuple(int(t) for t in steps))


def score_online(signals: Signals) -> AttackScores:
    """Pr(x) over all references (IN and OUT)."""
    return _score(signals, None)


def score_offline(signals: Signals) -> AttackScores:
    """Pr(x) from the OUT references with a = :data:`OFFLINE_A`."""
    return _score(signals, OFFLINE_A)


def _queries(settings, m: int) -> int:
    return (1 + settings.references) * m * settings.n_noise


ATTACK = MembershipAttack(
    name="rmia",
    summary="RMIA: Pr(x|θ)/Pr(x) over reference models (client or server), against population samples z (γ = 1)",
    threats=("T2", "T3"),
    signals=SIGNALS,
    score=score_online,
    queries_per_image=_queries,
    reference="Zarifzadeh et al. 2024 (RMIA, ICML)",
)

ATTACK_OFFLINE = MembershipAttack(
    name="rmia-offline",
    summary="offline RMIA: OUT references only, Pr(x) = ((1+a)·Pr_OUT(x) + (1−a))/2, a = 0.3",
    threats=("T2", "T3"),
    signals=SIGNALS,
    score=score_offline,
    queries_per_image=_queries,
    reference="Zarifzadeh et al. 2024 (RMIA, offline)",
)
