"""``minimize``: single release, quantised payloads, no labels, id-free release (DESIGN.md §5 (a)–(d))."""
from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from collafuse.attacks.linkage import identify_senders, score_sender_identification
from collafuse.attacks.reconstruction.multiview import fuse
from collafuse.attacks.reconstruction.view import ViewArrays
from collafuse.attacks.reconstruction.oracle import posterior_log_weights
from collafuse.data import load_digits16
from collafuse.defenses import build_hooks
from collafuse.defenses.minimize import (
    ANONYMOUS_SENDER, NoLabels, Quantize, expected_quantization_mse, per_image_noise, quant_range, quantize,
)
from collafuse.payload import Payload
from collafuse.protocol import Client
from collafuse.runs import prepare_data
from collafuse.schedule import NoiseSchedule
from collafuse.training import Hooks, train_system
from collafuse.transcript import AuditKey, ServerView

from conftest import tiny_config


SCHEDULE = NoiseSchedule.create("cosine", 100)


@functools.lru_cache(maxsize=1)
def _digits():
    return load_digits16(1, 8)


def _client(hooks=(), t_c=20, send_labels=False) -> Client:
    return Client(
        0, None, None, SCHEDULE, t_c, "cut", torch.Generator().manual_seed(5), release_hooks=tuple(hooks),
        send_labels=send_labels,
    )


def _train(tmp_path, name, defenses):
    config = tiny_config(defenses=defenses, training={"epochs": 3}, data={"image_size": 8})
    hooks = build_hooks(config.defenses, config) if defenses else Hooks()
    data, splits = prepare_data(config)
    out = tmp_path / name
    out.mkdir()
    train_system(config, data, splits, out, hooks, progress=False)
    return out, data, config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("minimize")
    every_mode = [
        {"name": "minimize", "mode": "single-release"},
        {"name": "minimize", "mode": "int8"},
        {"name": "minimize", "mode": "no-labels"},
        {"name": "minimize", "mode": "id-free"},
    ]
    minimized = _train(root, "minimized", every_mode)
    return {"plain": _train(root, "plain", []), "single": minimized, "int8": minimized}


def _rows_and_members(run_dir):
    rows = ServerView.open(run_dir).load()
    key = AuditKey.open(run_dir)
    member = key.member_index[torch.argsort(key.seq)]
    return rows, member, key.client[torch.argsort(key.seq)]


# ---------- single-release ----------

def test_single_release_sends_identical_payloads_for_an_image(runs):
    rows, member, _ = _rows_and_members(runs["single"][0])
    assert len(rows["tensor"]) == 3 * 128  # every image released once per epoch
    for m in torch.unique(member)[:40].tolist():
        views = rows["tensor"][member == m]
        assert len(views) == 3
        assert all(torch.equal(views[0], v) for v in views[1:])
    plain_rows, plain_member, _ = _rows_and_members(runs["plain"][0])
    views = plain_rows["tensor"][plain_member == plain_member[0]]
    assert not torch.equal(views[0], views[1])  # without the defense every epoch is a fresh draw


def test_single_release_noise_is_a_fixed_function_of_seed_and_id():
    a = per_image_noise(torch.tensor([3, 7, 3]), (1, 4, 4), run_seed=11)
    assert torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])
    assert torch.equal(per_image_noise(torch.tensor([7]), (1, 4, 4), 11)[0], a[1])
    assert not torch.equal(per_image_noise(torch.tensor([7]), (1, 4, 4), 12)[0], a[1])


def _psnr(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    mse = float((((x_hat.clamp(-1, 1) - x) / 2) ** 2).mean())
    return -10 * math.log10(mse)


def test_multiview_attack_gains_nothing_from_single_release(runs):
    """The ``multiview`` fusion with perfect linkage (its upper bound) over 3 epochs vs one view."""
    gains = {}
    for name in ("plain", "single"):
        run_dir, data, config = runs[name]
        rows, member, _ = _rows_and_members(run_dir)
        sched = NoiseSchedule.create(config.diffusion.schedule, config.diffusion.T)
        a, s = sched.a(config.t_c), sched.s(config.t_c)
        y = rows["tensor"].double() / a
        var = torch.full((len(y),), s * s / (a * a), dtype=torch.float64)
        fused, _ = fuse(y, var, member)
        truth = data.images[member].double()
        first = torch.zeros(len(member), dtype=torch.bool)
        first[[int(torch.nonzero(member == m)[0]) for m in torch.unique(member)]] = True
        gains[name] = _psnr(fused[first], truth[first]) - _psnr(y[first], truth[first])
    assert gains["plain"] > 2.0  # three fresh views: about 10·log10(3) dB better than one
    assert abs(gains["single"]) < 1e-6


# ---------- quantisation ----------

def test_bytes_per_payload_drop_as_stated():
    x0 = _digits().images[:16]
    ids = torch.arange(16)
    sizes = {}
    for name, hooks in {"fp32": [], "fp16": [Quantize(16, SCHEDULE)], "int8": [Quantize(8, SCHEDULE)], "4-bit": [Quantize(4, SCHEDULE)]}.items():
        payload = _client(hooks).release(x0, None, ids, 0)
        sizes[name] = payload.tensor[0].nbytes
        # Measured: every row's bytes = its image at the wire dtype + its int64 step.
        assert payload.row_wire_bytes().tolist() == [sizes[name] + 8] * 16
    d = x0[0].numel()
    assert sizes == {"fp32": 4 * d, "fp16": 2 * d, "int8": d, "4-bit": d}
    assert sizes["int8"] * 4 == sizes["fp32"]


def test_transcript_records_the_real_sizes(runs):
    plain = ServerView.open(runs["plain"][0])
    quant = ServerView.open(runs["int8"][0])
    d = 8 * 8
    plain_rows, quant_rows = plain.load(), quant.load()
    assert set(plain_rows["wire_bytes"].tolist()) == {4 * d + 8 + 8}  # fp32 image, int64 step, int64 label
    assert set(quant_rows["wire_bytes"].tolist()) == {d + 8}          # uint8 codes, int64 step, no label
    assert quant.wire_bytes == int(quant_rows["wire_bytes"].sum()) == len(quant_rows["t"]) * (d + 8)
    index = json.loads((runs["int8"][0] / "transcript" / "index.json").read_text())
    assert index["wire_bytes"] == quant.wire_bytes
    # The transcript stores the decoded values the server trained on: on the code grid.
    values = quant_rows["tensor"]
    bound = quant_range(NoiseSchedule.create("cosine", 50).alpha_bar, quant_rows["t"])
    codes = (values.double() + bound) / (2 * bound / 255)
    assert torch.allclose(codes, codes.round(), atol=1e-3)


def test_quantisation_error_and_leakage():
    x0 = _digits().images[:200]
    pool = _digits().images[:400]
    ids = torch.arange(200)
    exact = _client().release(x0, None, ids, 0)
    bound = quant_range(SCHEDULE.alpha_bar, exact.t)
    reid = {}
    for bits in (8, 2, 1):
        codes, scale, offset = quantize(exact.tensor, bits, bound)
        decoded = codes.double() * scale + offset
        inside = exact.tensor.abs() < bound
        assert float((decoded - exact.tensor.double())[inside].abs().max()) <= scale / 2 + 1e-9
        mse = float(((decoded - exact.tensor.double())[inside] ** 2).mean())
        assert mse == pytest.approx(expected_quantization_mse(bits, bound), rel=0.3) or bits < 4
        a, s = SCHEDULE.a(20), SCHEDULE.s(20)
        log_w = posterior_log_weights(decoded / a, torch.full((200,), a * a / (s * s)), pool)
        reid[bits] = float((log_w.argmax(1) == ids).double().mean())
    a, s = SCHEDULE.a(20), SCHEDULE.s(20)
    log_w = posterior_log_weights(exact.tensor.double() / a, torch.full((200,), a * a / (s * s)), pool)
    reid[32] = float((log_w.argmax(1) == ids).double().mean())
    assert reid[8] >= reid[32] - 0.02  # int8 keeps what fp32 leaks (the bytes are the point)
    assert reid[1] < reid[32] - 0.1   # one bit per pixel throws a lot away


def test_server_decodes_quantised_payloads():
    payload = _client([Quantize(8, SCHEDULE)]).release(_digits().images[:4], None, torch.arange(4), 0)
    assert payload.tensor.dtype == torch.uint8 and payload.scale is not None
    assert payload.values().dtype == torch.float32
    with pytest.raises(ValueError, match="integer codes"):
        Payload(0, 0, "cut", payload.t, payload.values(), scale=0.1)


# ---------- no-labels, id-free ----------

def test_no_labels_keeps_labels_on_the_client():
    data = _digits()
    x0, y = data.images[:300], data.labels[:300]
    sent = _client(t_c=90, send_labels=True).release(x0, y, torch.arange(300), 0)
    kept = _client([NoLabels()], t_c=90, send_labels=True).release(x0, y, torch.arange(300), 0)
    assert torch.equal(sent.label, y) and kept.label is None
    # Without the label the server must infer it: nearest class mean of public images, in the rescaled space.
    aux, aux_y = data.images[1000:1600], data.labels[1000:1600]
    means = torch.stack([aux[aux_y == c].mean(0) for c in range(10)])
    guess = torch.cdist((kept.tensor / SCHEDULE.a(90)).flatten(1), means.flatten(1)).argmin(1)
    inferred = float((guess == y).double().mean())
    assert float((sent.label == y).double().mean()) == 1.0
    assert inferred < 0.9  # at a noisy cut the label is no longer certain


def test_id_free_release_hides_the_sender(runs):
    rows, member, true_client = _rows_and_members(runs["int8"][0])
    assert set(rows["client"].tolist()) == {ANONYMOUS_SENDER}
    assert set(true_client.tolist()) == {0, 1}  # the audit key keeps the truth
    assert "label" not in rows
    # Against the attack it claims to stop: sender identification from every field and the
    # order of arrival is at chance with id-free, and exact without it (or with the field blanked only).
    n_clients = 2
    hidden = score_sender_identification(identify_senders(ViewArrays.from_rows(rows), n_clients), true_client, n_clients)
    assert hidden.at_chance and hidden.accuracy.low <= 0.5 <= hidden.accuracy.high
    plain = ViewArrays.from_rows(_rows_and_members(runs["plain"][0])[0])
    plain_client = _rows_and_members(runs["plain"][0])[2]
    assert score_sender_identification(identify_senders(plain, n_clients), plain_client, n_clients).accuracy.value == 1.0
    blanked = ViewArrays.from_rows({**_rows_and_members(runs["plain"][0])[0],
                                    "client": torch.full_like(plain_client, ANONYMOUS_SENDER)})
    assert score_sender_identification(identify_senders(blanked, n_clients), plain_client, n_clients).accuracy.value >= 0.99
    # No per-client step or order is left: one step per round, every client in it.
    steps = rows["step"]
    assert sorted(set(steps.tolist())) == list(range(6))  # 3 epochs × 2 rounds
    for rnd in range(6):
        assert torch.bincount(true_client[steps == rnd], minlength=2).tolist() == [32, 32]
    # Leakage it changes: with the sender known, re-identification only needs the sender's own images.
    run_dir, data, config = runs["plain"]
    plain_rows, plain_member, plain_client = _rows_and_members(run_dir)
    _, splits = prepare_data(config)
    sched = NoiseSchedule.create("cosine", 50)
    # Make the channel noisy enough that the pool size matters: one view at a late step.
    t_late = 40
    gen = torch.Generator().manual_seed(0)
    x = data.images[plain_member].double()
    noisy = sched.a(t_late) * x + sched.s(t_late) * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    prec = torch.full((len(x),), sched.a(t_late) ** 2 / sched.s(t_late) ** 2)
    hits_known, hits_unknown = 0, 0
    for k in (0, 1):
        rows_k = plain_client == k
        pool_k = splits.clients[k]
        lw = posterior_log_weights(noisy[rows_k] / sched.a(t_late), prec[rows_k], data.images[pool_k])
        hits_known += int((pool_k[lw.argmax(1)] == plain_member[rows_k]).sum())
    lw = posterior_log_weights(noisy / sched.a(t_late), prec, data.images[splits.members])
    hits_unknown = int((splits.members[lw.argmax(1)] == plain_member).sum())
    assert hits_known > hits_unknown


def test_id_free_refuses_integer_codes_whose_range_differs_per_batch():
    from collafuse.errors import ConfigError

    config = tiny_config(defenses=[{"name": "minimize", "mode": "int8"}, {"name": "minimize", "mode": "id-free"}],
                         training={"payload": "trajectory"})
    with pytest.raises(ConfigError, match="id-free with an integer quantiser"):
        build_hooks(config.defenses, config)
    fp16 = tiny_config(defenses=[{"name": "minimize", "mode": "fp16"}, {"name": "minimize", "mode": "id-free"}],
                       training={"payload": "trajectory"})
    assert any(h.name == "minimize:id-free" for h in build_hooks(fp16.defenses, fp16).release)
