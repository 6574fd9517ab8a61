"""Sender identification (T1) and the id-free relay it judges (DESIGN.md §5 (d); issue 11 item 1)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from collafuse.attacks.linkage import identify_senders, score_sender_identification
from collafuse.attacks.linkage.sender import RULE_FIELD, round_robin_schedule
from collafuse.attacks.reconstruction.curve import SimulationSpec, simulate_rounds, simulate_view
from collafuse.attacks.reconstruction.engine import resolve_truth_rows
from collafuse.attacks.reconstruction.view import AuditKeyLeak, ViewArrays
from collafuse.defenses import build_hooks
from collafuse.defenses.coverage import credit_measured
from collafuse.defenses.minimize import ANONYMOUS_SENDER, IdFree, mixed_batch_sizes
from collafuse.hooks import Delivery, ReleaseHook, relay_round
from collafuse.payload import Payload
from collafuse.runs import prepare_data
from collafuse.schedule import NoiseSchedule
from collafuse.training import Hooks, train_system
from collafuse.transcript import AuditKey, ServerView

from conftest import tiny_config

N = 4
ID_FREE = [{"name": "minimize", "mode": "id-free"}]


def _config(defenses=(), **data):
    # 64 members over 4 clients: 16 each, batches of 6 → turns of 6, 6, 4 (a short last batch).
    return tiny_config(
        defenses=list(defenses),
        data={"image_size": 8, "n_members": 64, "n_nonmembers": 16, "n_aux": 16, "num_clients": N, **data},
        diffusion={"T": 20, "cut_ratio": 0.2},
        training={"epochs": 2, "batch_size": 6},
    )


def _train(root, name, defenses=()):
    config = _config(defenses)
    hooks = build_hooks(config.defenses, config) if config.defenses else Hooks()
    data, splits = prepare_data(config)
    out = root / name
    out.mkdir()
    system = train_system(config, data, splits, out, hooks, progress=False)
    view = ViewArrays.from_server_view(ServerView.open(out))
    member, sender = resolve_truth_rows(view, AuditKey.open(out))
    return {"view": view, "member": member, "sender": sender, "splits": splits, "system": system}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sender")
    return {"default": _train(root, "default"), "id-free": _train(root, "id-free", ID_FREE)}


def _score(view, sender):
    return score_sender_identification(identify_senders(view, N), sender, N)


# ---------- the attack on trained runs ----------

def test_default_payloads_name_their_sender(runs):
    r = runs["default"]
    view, sender = r["view"], r["sender"]
    # The protocol as it was: one message per turn, round-robin, the global step gives the sender away.
    assert torch.equal(view.client, sender)
    assert torch.equal(view.step % N, sender)
    score = _score(view, sender)
    assert score.accuracy.value >= 0.99 and not score.at_chance
    assert score.chance == pytest.approx(1 / N) and score.n_rows == len(view) == 2 * 64


def test_blanking_the_sender_field_alone_hides_nothing(runs):
    """The old id-free (field −1 only): the order of arrival still names every sender."""
    r = runs["default"]
    blanked = dataclasses.replace(r["view"], client=torch.full_like(r["view"].client, ANONYMOUS_SENDER))
    predictions = identify_senders(blanked, N)
    assert not bool((predictions.rule == RULE_FIELD).any())
    score = score_sender_identification(predictions, r["sender"], N)
    assert score.accuracy.value >= 0.99 and not score.at_chance


def test_id_free_relay_puts_sender_identification_at_chance(runs):
    r = runs["id-free"]
    view, sender = r["view"], r["sender"]
    assert set(view.client.tolist()) == {ANONYMOUS_SENDER}
    score = _score(view, sender)
    assert score.at_chance, score
    assert score.accuracy.low <= 1 / N <= score.accuracy.high


def test_id_free_view_keeps_no_per_client_order_or_step(runs):
    r = runs["id-free"]
    view, sender, member = r["view"], r["sender"], r["member"]
    steps = view.step.tolist()
    rounds = sorted(set(steps))
    assert rounds == list(range(len(rounds))) == list(range(6))  # 2 epochs × 3 rounds: the step is the round
    assert steps == sorted(steps)  # rows arrive round by round
    shuffled = 0
    for rnd in rounds:
        rows = view.step == rnd
        # Every client of the round carries the same step, and sent the same number of rows.
        counts = torch.bincount(sender[rows], minlength=N)
        assert counts.tolist() == [counts[0].item()] * N
        # Rows within a round are not grouped by client: the arrival order is a shuffle.
        s = sender[rows]
        shuffled += int((s[1:] != s[:-1]).sum()) > N - 1
    assert shuffled == len(rounds)
    # The server still trains on every payload once per epoch; the audit key keeps the truth.
    per_epoch = len(view) // 2
    for e in range(2):
        assert sorted(member[e * per_epoch:(e + 1) * per_epoch].tolist()) == sorted(r["splits"].members.tolist())
    for k, idx in enumerate(r["splits"].clients):
        assert set(member[sender == k].tolist()) == set(idx.tolist())


def test_id_free_training_is_deterministic_and_trains(tmp_path, runs):
    again = _train(tmp_path, "again", ID_FREE)
    assert torch.equal(again["view"].tensor, runs["id-free"]["view"].tensor)
    assert torch.equal(again["sender"], runs["id-free"]["sender"])
    log = runs["id-free"]["system"].log
    assert all(e["server_loss"] is not None for e in log)


# ---------- the relay hook ----------

def _payloads(sizes, step0=0, labels=True):
    return [
        Payload(k, step0 + k, "cut", torch.full((b,), 4), torch.randn(b, 1, 2, 2, generator=torch.Generator().manual_seed(k)),
                label=torch.full((b,), k) if labels else None)
        for k, b in enumerate(sizes)
    ]


def test_relay_mixes_a_round_into_batches_of_one_size():
    payloads = _payloads([6, 6, 6, 6])
    out = relay_round((IdFree(),), payloads, 7, torch.Generator().manual_seed(0))
    assert [len(d.payload) for d in out] == [6, 6, 6, 6]
    assert {d.payload.step for d in out} == {7} and {d.payload.client_id for d in out} == {ANONYMOUS_SENDER}
    source = torch.cat([d.source for d in out])
    assert sorted(source.tolist()) == list(range(24)) and source.tolist() != list(range(24))
    pooled = torch.cat([p.tensor for p in payloads])
    labels = torch.cat([p.label for p in payloads])
    for d in out:  # every delivered row is the released row it says it is
        assert torch.equal(d.payload.tensor, pooled[d.source]) and torch.equal(d.payload.label, labels[d.source])
    # Uneven rounds: sizes a function of (rows, messages) only, at most one row apart.
    assert [len(d.payload) for d in relay_round((IdFree(),), _payloads([6, 6, 4]), 0, torch.Generator())] == [6, 5, 5]
    assert mixed_batch_sizes(16, 4) == [4, 4, 4, 4]


def test_relay_is_identity_without_a_mixing_hook_and_refuses_lost_rows():
    assert relay_round((ReleaseHook(),), _payloads([3, 3]), 0, torch.Generator()) is None

    class Dropper(ReleaseHook):
        name = "dropper"

        def mix_round(self, payloads, round_index, generator):
            return [Delivery(payloads[0], torch.arange(len(payloads[0])))]

    with pytest.raises(ValueError, match="exactly once"):
        relay_round((Dropper(),), _payloads([3, 3]), 0, torch.Generator())
    with pytest.raises(ValueError, match="label"):
        IdFree().mix_round(_payloads([2]) + _payloads([2], labels=False), 0, torch.Generator())


# ---------- simulated views (what payload cells attack) ----------

def _simulate(defenses, epochs=3, batch_size=6):
    config = _config(defenses)
    data, splits = prepare_data(config)
    schedule = NoiseSchedule.create(config.diffusion.schedule, config.diffusion.T)
    hooks = build_hooks(config.defenses, config).release if config.defenses else ()
    return simulate_rounds(SimulationSpec(data, splits, schedule, config.t_c, epochs, "cut", batch_size, config.seed,
                                          False, hooks))


def test_simulated_views_default_old_and_new_id_free():
    plain = _simulate([])
    assert _score(plain.view, plain.sender).accuracy.value >= 0.99
    old = dataclasses.replace(plain.view, client=torch.full_like(plain.view.client, ANONYMOUS_SENDER))
    assert _score(old, plain.sender).accuracy.value >= 0.99
    mixed = _simulate(ID_FREE)
    assert set(mixed.view.client.tolist()) == {ANONYMOUS_SENDER}
    assert _score(mixed.view, mixed.sender).at_chance
    # The simulation's relay is the training's: same rows, same steps as a trained id-free transcript.
    assert sorted(set(mixed.view.step.tolist())) == list(range(9))


def test_simulation_without_id_free_is_unchanged():
    config = _config()
    data, splits = prepare_data(config)
    schedule = NoiseSchedule.create(config.diffusion.schedule, config.diffusion.T)
    view, member = simulate_view(SimulationSpec(data, splits, schedule, config.t_c, 2, "cut", 6, config.seed))
    sim = simulate_rounds(SimulationSpec(data, splits, schedule, config.t_c, 2, "cut", 6, config.seed))
    assert torch.equal(view.tensor, sim.view.tensor) and torch.equal(member, sim.member)
    assert torch.equal(sim.sender, view.client) and torch.equal(view.step % N, view.client)


# ---------- the fitted schedule, the scorer, the audit key ----------

def test_fitted_schedule_follows_clients_that_run_out():
    # Clients with 2, 3 and 1 batches of 8 (last ones short): turns 0 1 2 | 0 1 | 1, twice.
    sizes = [8, 8, 3, 5, 8, 2] * 2
    assert round_robin_schedule(sizes, 3) == [0, 1, 2, 0, 1, 1] * 2
    assert round_robin_schedule([8, 8, 8, 8], 2) is None  # nothing short: plain step mod N
    assert round_robin_schedule([8, 3, 8, 8, 8], 2) is None  # an epoch that does not repeat: not used


def test_scorer_uses_the_best_relabelling_and_wilson():
    truth = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3] * 10)
    relabelled = (truth + 1) % 4  # the server links every client's payloads, but not its name
    score = score_sender_identification(relabelled, truth, 4)
    assert score.accuracy.value == 1.0 and score.mapping == {0: 3, 1: 0, 2: 1, 3: 2}
    assert score.accuracy.method == "wilson" and score.accuracy.high == 1.0 and score.accuracy.low < 1.0
    constant = score_sender_identification(torch.zeros_like(truth), truth, 4)
    assert constant.accuracy.value == 0.25 and constant.at_chance
    with pytest.raises(ValueError, match="0..3"):
        score_sender_identification(torch.full_like(truth, 4), truth, 4)


def test_the_attack_never_takes_the_audit_key():
    with pytest.raises(AuditKeyLeak):
        identify_senders(AuditKey(torch.arange(3), torch.arange(3), torch.zeros(3, dtype=torch.long)), N)


def test_coverage_credits_id_free_only_at_chance():
    declared = {"T1": ["minimize:id-free", "payload-noise"], "T2": [], "T3": [], "T4": []}
    assert credit_measured(declared, True) == declared
    assert credit_measured(declared, None) == declared
    assert credit_measured(declared, False)["T1"] == ["payload-noise"]
    assert declared["T1"] == ["minimize:id-free", "payload-noise"]  # the caller's map is untouched


# ---------- the audit: rows, coverage credit, the report's plain sentence ----------

def test_audit_credits_id_free_only_where_sender_identification_is_at_chance(tmp_path):
    import json

    import yaml

    from collafuse.benchmarks.audit.command import run_audit_command

    grid = {
        "base": {"data": {"image_size": 8, "n_members": 64, "n_nonmembers": 16, "n_aux": 16, "num_clients": N},
                 "diffusion": {"T": 20}, "training": {"batch_size": 6}},
        "payload_curve": {"cut_ratios": [0.5], "epochs": 2, "attacks": ["rescale"],
                          "defenses": {"none": [], "id-free": ID_FREE,
                                       "quantised": [{"name": "minimize", "mode": "int8"}, *ID_FREE]}},
        "systems": {},
    }
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"limits": {"T1": {"reid_pool": {"max": 0.05}}}}))
    out = tmp_path / "audit"
    run_audit_command(str(tmp_path / "grid.yaml"), str(tmp_path / "policy.yaml"), False, str(out), jobs=1,
                      cache=str(tmp_path / "cache"), progress=False)
    rows = json.loads((out / "results.json").read_text())
    sender = {(r["defense"], r["metric"]): r for r in rows if r["attack"] == "sender-id"}
    assert sender[("none", "sender_accuracy")]["value"] >= 0.99
    assert sender[("none", "sender_chance")]["value"] == pytest.approx(0.25)
    idf = sender[("id-free", "sender_accuracy")]
    assert idf["ci_low"] <= 0.25 <= idf["ci_high"]
    coverage = json.loads((out / "audit.json").read_text())["coverage"]
    assert coverage["id-free"]["T1"] == ["minimize:id-free"] and coverage["none"]["T1"] == []
    assert "minimize:id-free" in coverage["quantised"]["T1"]
    report = (out / "report.md").read_text()
    assert "Sender identification (none): accuracy 1.00" in report
    assert "the server knows who sent every payload" in report
    assert "Sender identification (id-free): accuracy 0.25" in report and "at chance" in report


def test_audit_coverage_drops_id_free_where_the_sender_is_found():
    import pandas as pd

    from collafuse.benchmarks.audit.command import _sender_at_chance

    def rows(defense, cell, acc, lo, hi):
        return [{"defense": defense, "config_hash": cell, "attack": "sender-id", "metric": "sender_accuracy",
                 "value": acc, "ci_low": lo, "ci_high": hi},
                {"defense": defense, "config_hash": cell, "attack": "sender-id", "metric": "sender_chance", "value": 0.25,
                 "ci_low": None, "ci_high": None}]

    df = pd.DataFrame(rows("a", "c1", 0.25, 0.2, 0.3) + rows("a", "c2", 0.25, 0.21, 0.29)
                      + rows("b", "c3", 0.25, 0.2, 0.3) + rows("b", "c4", 1.0, 0.99, 1.0))
    assert _sender_at_chance(df, "a") is True
    assert _sender_at_chance(df, "b") is False  # one cell where the server finds the senders is enough
    assert _sender_at_chance(df, "c") is None
