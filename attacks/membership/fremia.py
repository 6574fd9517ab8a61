"""``loss-hf``, ``pia-hf``, ``pian-hf``, ``secmi-hf``: the residual attacks with FreMIA's high-frequency filter
("Unveiling Impact of Frequency Components on Membership Inference Attacks for Diffusion Models", arXiv
2505.20955; at ICML 2026 as "Enhancing Membership Inference Attacks on Diffusion Models from a Frequency-Domain
Perspective"; DESIGN.md §4.2 "Frequency-filtered residuals").

FreMIA's observation: a diffusion model fits the low frequencies of its training images far better than
the high ones, so the high-frequency part of a residual is noise to a membership test. Its plug-in module
masks the residual in the Fourier domain before the attack's own norm:

    F(r) = Re IFFT2( ifftshift( M ⊙ fftshift( FFT2(r) ) ) )        (per channel, over H × W)
    M[u, v] = 1   where  c_h − τ ≤ u < c_h + τ  and  c_w − τ ≤ v < c_w + τ   (c = ⌊size/2⌋, the centre of the
                                                                         shifted spectrum: frequency 0)
    M[u, v] = s   elsewhere (the high frequencies),        τ = 5, s = 0.2 (the paper's constants)

Checked against the authors' code (github.com/poetic2/FreMIA, ``DDIM/filter.py`` ``Fourier_filter`` and
``DDIM/components.py``: ``--t 5 --s 0.2``; the same filter in ``Stable_Diffusion/filter.py``):

- the box is the slice ``[c − τ, c + τ)`` of the shifted spectrum: offsets −τ .. τ − 1 from frequency 0
  along each axis (2τ bins, not the symmetric |k| ≤ τ), and the real part is taken after the inverse FFT.
  Both kept: the real part of the filter of a real input is its filter by the symmetrised mask
  (M(k) + M(−k))/2, so offset +τ gets weight (1 + s)/2 (:func:`fremia_mask` is M itself; the golden test
  checks the symmetrised effect on a cosine by hand);
- τ is an absolute number of frequency bins, the same at every resolution (their DDPMs are 32 × 32, their
  latents 64 × 64). On images of 2τ = 10 pixels or fewer the box covers the whole spectrum and the filter
  is the identity (the authors' slice would start at a negative index there and mask a wrong, wrapped
  box; we clip it to the spectrum instead);
- their attacks filter both terms of the residual (``intermediates`` and ``intermediates_denoise``) and
  then take the attack's norm; the filter is linear, so that is the filter of the residual, which is what
  these variants do, on the signals the unfiltered attacks already computed: NO extra model query.

Per attack (each variant scores through its unfiltered module, so only the residual changes):

- ``loss-hf``: −mean ‖F(η* − ε_θ(x_t, t))‖² (per pixel) over K draws and the low-noise steps, on the
  residuals of the ``loss`` signal's own draws (``loss_hf_sq``, computed beside ``loss_sq``);
  the authors' "naive" attacker compares x0 with (x_t − s_t ε̂)/a_t, i.e. (s_t/a_t)(ε − ε̂): the same residual
  up to a per-step constant, which no per-step ranking sees;
- ``pia-hf`` / ``pian-hf``: −log ‖F(ε0 − ε_θ(a_t x + s_t ε0, t))‖_4 (PIA's L4 norm), ε0 as PIA / PIAN;
  the authors compare x0 with the one-step estimate of x0, again (s_t/a_t)·(ε0 − ε̂);
- ``secmi-hf``: −log ‖F(x̃_t − x̂_t)‖² of SecMI's inversion / reconstruction pair.

HIGHER score = MORE LIKELY MEMBER. Threats T2, T3. Queries per image: those of the unfiltered attack.
"""
from __future__ import annotations

import numpy as np

from collafuse.attacks.membership import loss, pia, pian, secmi
from collafuse.attacks.membership.base import AttackScores, MembershipAttack, Signals

THRESHOLD = 5        # τ: half-width of the low-frequency box, in frequency bins (the authors' --t 5)
SCALE = 0.2          # s: the weight of the frequencies outside it (the authors' --s 0.2)
ROW_CHUNK = 64       # rows filtered at once (bounds the complex128 spectrum in memory)
REFERENCE = "FreMIA, arXiv 2505.20955 (ICML 2026); github.com/poetic2/FreMIA"


def fremia_mask(height: int, width: int, threshold: int = THRESHOLD, scale: float = SCALE) -> np.ndarray:
    """FreMIA's mask M (height, width) float64 in the fftshifted spectrum: 1 on rows c_h − τ .. c_h + τ − 1 and
    columns c_w − τ .. c_w + τ − 1 (c = ⌊size/2⌋, frequency 0 after the shift), clipped to the spectrum; s elsewhere."""
    if height < 1 or width < 1 or threshold < 0:
        raise ValueError(f"fremia_mask needs a positive size and threshold >= 0, got {height}×{width}, τ = {threshold}")
    mask = np.full((height, width), float(scale))
    ch, cw = height // 2, width // 2
    mask[max(0, ch - threshold): ch + threshold, max(0, cw - threshold): cw + threshold] = 1.0
    return mask


def fremia_filter(x: np.ndarray, threshold: int = THRESHOLD, scale: float = SCALE) -> np.ndarray:
    """F(x) for real x (..., H, W): FFT over the last two axes, shift, mask (:func:`fremia_mask`), unshift,
    inverse FFT, real part. float64, same shape. Linear in x."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"fremia_filter needs (..., H, W), got shape {x.shape}")
    mask = fremia_mask(x.shape[-2], x.shape[-1], threshold, scale)
    spectrum = np.fft.fftshift(np.fft.fft2(x, axes=(-2, -1)), axes=(-2, -1)) * mask
    return np.fft.ifft2(np.fft.ifftshift(spectrum, axes=(-2, -1)), axes=(-2, -1)).real


def filter_flat(x: np.ndarray, image_shape: np.ndarray, threshold: int = THRESHOLD, scale: float = SCALE) -> np.ndarray:
    """:func:`fremia_filter` of flattened images: x (N, ..., D) with D = C·H·W of ``image_shape`` (C, H, W) →
    the same shape, float64, filtered ``ROW_CHUNK`` rows at a time."""
    c, h, w = (int(v) for v in np.asarray(image_shape).ravel())
    x = np.asarray(x)
    if x.shape[-1] != c * h * w:
        raise ValueError(f"filter_flat: last axis {x.shape[-1]} is not C·H·W = {c * h * w}")
    out = np.empty(x.shape, dtype=np.float64)
    for i in range(0, x.shape[0], ROW_CHUNK):
        part = x[i: i + ROW_CHUNK]
        out[i: i + ROW_CHUNK] = fremia_filter(part.reshape(*part.shape[:-1], c, h, w), threshold, scale).reshape(part.shape)
    return out


def score_loss(signals: Signals) -> AttackScores:
    """loss_hf_sq (N, M, K): per-pixel mean of F(η* − ε_θ)², steps, t_range → :func:`loss.score` on it."""
    return loss.score({"loss_sq": signals["loss_hf_sq"], "steps": signals["steps"], "t_range": signals["t_range"]})


def score_pia(signals: Signals) -> AttackScores:
    """PIA's headline and curve on the filtered residual: F is linear, so F(ε0) − F(ε_θ) = F(ε0 − ε_θ)."""
    shape = signals["image_shape"]
    return pia.headline_and_curve(filter_flat(signals["eps_origin"], shape), filter_flat(signals["pia_head_eps"], shape),
                                  filter_flat(signals["pia_eps"], shape), signals["steps"])


def score_pian(signals: Signals) -> AttackScores:
    """PIAN's (ε0 normalised as the paper's) on the filtered residual."""
    shape = signals["image_shape"]
    return pia.headline_and_curve(filter_flat(pian.rescale_rows(signals["eps_origin"]), shape),
                                  filter_flat(signals["pian_head_eps"], shape), filter_flat(signals["pian_eps"], shape),
                                  signals["steps"])


def score_secmi(signals: Signals) -> AttackScores:
    """SecMI's statistic on F(x̃_t) − F(x̂_t) = F(x̃_t − x̂_t)."""
    shape = signals["image_shape"]
    return secmi.score({"secmi_inv": filter_flat(signals["secmi_inv"], shape),
                        "secmi_rec": filter_flat(signals["secmi_rec"], shape),
                        "secmi_steps": signals["secmi_steps"], "t_range": signals["t_range"]})


def _variant(base: MembershipAttack, score, signals: tuple[str, ...], what: str) -> MembershipAttack:
    return MembershipAttack(
        name=f"{base.name}-hf",
        summary=f"{base.name} with FreMIA's filter on its residual ({what}; weight s = {SCALE} outside the "
                f"{2 * THRESHOLD}-bin low-frequency box), no extra query",
        threats=base.threats, signals=signals, score=score, queries_per_image=base.queries_per_image,
        reference=f"{REFERENCE}; {base.reference}",
    )


VARIANTS: tuple[MembershipAttack, ...] = (
    _variant(loss.ATTACK, score_loss, ("loss_hf_sq", "steps", "t_range"), "squared L2"),
    _variant(pia.ATTACK, score_pia, ("eps_origin", "pia_head_eps", "pia_eps", "steps", "image_shape"), "L4"),
    _variant(pian.ATTACK, score_pian, ("eps_origin", "pian_head_eps", "pian_eps", "steps", "image_shape"), "L4"),
    _variant(secmi.ATTACK, score_secmi, ("secmi_inv", "secmi_rec", "secmi_steps", "t_range", "image_shape"),
             "squared L2"),
)
