"""``payload-clip``: bounded images, a bounded release sensitivity, and less re-identification."""
from __future__ import annotations

import functools

import torch

from collafuse.attacks.reconstruction.oracle import posterior_log_weights
from collafuse.data import load_digits16
from collafuse.defenses.accounting import l2_sensitivity, release_epsilon
from collafuse.defenses.payload_clip import PayloadClip, clip_images
from collafuse.protocol import Client
from collafuse.schedule import NoiseSchedule


SCHEDULE = NoiseSchedule.create("cosine", 100)
T_C = 20


@functools.lru_cache(maxsize=1)
def _digits() -> torch.Tensor:
    return load_digits16(1, 8).images


def test_clip_bounds_the_norm_and_keeps_small_images():
    x = torch.rand(50, 1, 8, 8) * 2 - 1
    for center in (0.0, -1.0):
        out = clip_images(x, 2.0, center)
        norms = (out - center).flatten(1).norm(dim=1)
        assert float(norms.max()) <= 2.0 + 1e-5
        assert float(out.min()) >= -1 and float(out.max()) <= 1  # a convex mix of the image and the centre
    small = torch.full((2, 1, 8, 8), 0.01)
    assert torch.equal(clip_images(small, 2.0), small)


def test_two_clipped_images_differ_by_at_most_2C():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, 8, 8, generator=gen) * 2 - 1
    y = torch.rand(200, 1, 8, 8, generator=gen) * 2 - 1
    a = SCHEDULE.a(T_C)
    for c in (0.5, 2.0, 5.0):
        gap = (a * (clip_images(x, c, -1.0) - clip_images(y, c, -1.0))).flatten(1).norm(dim=1)
        assert float(gap.max()) <= l2_sensitivity(a, 64, c) + 1e-5


def _reid(clip: float | None) -> float:
    """The Bayes-optimal ``oracle`` re-identification: it knows C and clips its pool the same way."""
    pool = _digits()[:400]
    ids = torch.arange(200)
    hooks = (PayloadClip(clip, -1.0),) if clip is not None else ()
    client = Client(0, None, None, SCHEDULE, T_C, "cut", torch.Generator().manual_seed(1), release_hooks=hooks)
    payload = client.release(pool[:200], None, ids, 0)
    cand = clip_images(pool, clip, -1.0) if clip is not None else pool
    a, s = SCHEDULE.a(T_C), SCHEDULE.s(T_C)
    log_w = posterior_log_weights(payload.tensor / a, torch.full((200,), a * a / (s * s)), cand)
    return float((log_w.argmax(1) == ids).double().mean())


def test_clipping_lowers_reidentification_as_its_epsilon_falls():
    reid = {c: _reid(c) for c in (None, 4.0, 2.0, 1.0)}
    eps = {c: release_epsilon(SCHEDULE.a(T_C), SCHEDULE.s(T_C), 64, 1e-5, c) for c in (None, 4.0, 2.0, 1.0)}
    assert reid[None] > 0.95
    assert reid[None] >= reid[4.0] > reid[2.0] > reid[1.0]
    assert reid[1.0] < 0.5
    assert eps[None] > eps[4.0] > eps[2.0] > eps[1.0]
