"""``collafuse attack membership`` end to end (DESIGN.md §4.2, §8): the report, the targets that do not
exist, and bad input (one line on stderr, exit code 2, nothing written)."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from collafuse.attacks.membership.targets import Candidates, CandidateError
from collafuse.cli import main
from collafuse.runs import create_run


def _run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["attack", "membership", *args, "--quiet"])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def cut_report(tiny_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("mia") / "cut.json"
    rc = main(["attack", "membership", "--run", str(tiny_runs["cut"]), "--out", str(out), "--quiet"])
    assert rc == 0
    return out, json.loads(out.read_text())


def test_report_has_every_metric_per_attack_and_target(cut_report):
    out, rep = cut_report
    assert set(rep["targets"]) == {"server", "client_0", "client_1", "samples_0", "samples_1", "payload",
                                   "coclient_0", "coclient_1"}
    # server/clients: loss, sima, pia, pian, secmi, their four -hf forms and noise-agg; payload: payload-lr and
    # its two sub-results, payload-lr-single and payload-lr-fused; coclient (T5):
    # handoff-nn and handoff-lr
    expected = {"server": 10, "client_0": 10, "client_1": 10, "samples_0": 1, "samples_1": 1, "payload": 3,
                "coclient_0": 2, "coclient_1": 2}
    for key, entry in rep["targets"].items():
        assert entry["available"] and len(entry["attacks"]) == expected[key]
        assert (out.parent / entry["roc_png"]).is_file()
        assert entry["n_members"] == entry["n_nonmembers"] == 32  # balanced to the 32 held-out images
        for name, r in entry["attacks"].items():
            assert r["auc_ci"][0] <= r["auc"] <= r["auc_ci"][1]
            assert set(r["tpr_at_fpr"]) == {"0.01", "0.001"}
            assert r["tpr_at_fpr"]["0.01"]["resolved"] is False  # 32 non-members cannot resolve 1 %
            # The ROC passes through the best threshold's (FPR, TPR) with J = TPR − FPR = 2·BA − 1, and
            # no point of it lies above t = f + J, so J ≤ AUC ≤ 1 − (1 − J)²/2: AUC and BA must come
            # from the same scores and the same threshold convention.
            j = 2 * r["balanced_accuracy"] - 1
            assert j - 1e-9 <= r["auc"] <= 1 - (1 - j) ** 2 / 2 + 1e-9, (key, name, r["auc"], r["balanced_accuracy"])
            assert r["epsilon"]["delta"] == 1e-5 and r["epsilon"]["confidence"] == 0.95
            if r["auc_ci"][0] <= 0.5:  # no better than chance: no leakage may be claimed
                assert r["epsilon"]["clopper_pearson"]["epsilon_lb"] == 0.0, (key, name)
            assert r["direction"] == "higher = more likely member"
            assert isinstance(r["queries_per_image"], int)
    server = rep["targets"]["server"]
    assert server["threat"] == "T2" and rep["targets"]["client_0"]["threat"] == "T3"
    steps = [p["t"] for p in server["attacks"]["loss"]["per_step"]]
    assert min(steps) > rep["t_hand"] and max(steps) == rep["T"]  # the server is queried above the cut
    assert max(p["t"] for p in rep["targets"]["client_0"]["attacks"]["loss"]["per_step"]) <= rep["t_hand"]
    assert (out.parent / server["steps_png"]).is_file()
    assert "lira/rmia on T2" not in rep["not_implemented"]  # reference server models exist (issue 13)
    assert len(rep["summary"]) == sum(expected.values())  # one row per (target, attack)


def test_payload_lr_on_cut_payloads_at_c_02_on_digits(cut_report):
    _, rep = cut_report
    assert rep["cut_ratio"] == 0.2 and rep["payload_kind"] == "cut"
    assert rep["targets"]["payload"]["attacks"]["payload-lr"]["auc"] >= 0.99
    # A near-perfect test on 32 + 32 candidates certifies a real ε (measured: 1.28).
    assert rep["targets"]["payload"]["attacks"]["payload-lr"]["epsilon"]["clopper_pearson"]["epsilon_lb"] > 1.0


def test_local_only_run_has_no_payload_target_and_says_so(tiny_runs, tmp_path, capsys):
    out = tmp_path / "local.json"
    rc, _, err = _run_cli(capsys, "--run", str(tiny_runs["local"]), "--targets", "payload,server,client",
                          "--attacks", "payload-lr,loss", "--out", str(out))
    assert rc == 0, err
    rep = json.loads(out.read_text())
    payload = rep["targets"]["payload"]
    assert payload["available"] is False and "c = 1" in payload["reason"] and "no T1 target" in payload["reason"]
    assert rep["targets"]["server"]["available"] is False
    assert rep["targets"]["client_0"]["available"] and list(rep["targets"]["client_0"]["attacks"]) == ["loss"]
    assert {"target": "payload", "threat": "T1", "available": False, "reason": payload["reason"]} in rep["summary"]


def test_central_run_has_no_client_target(tiny_runs, tmp_path, capsys):
    out = tmp_path / "central.json"
    rc, _, err = _run_cli(capsys, "--run", str(tiny_runs["central"]), "--targets", "client", "--out", str(out))
    assert rc == 0, err
    assert "c = 0" in json.loads(out.read_text())["targets"]["client"]["reason"]


@pytest.fixture(scope="module")
def no_nonmember_run(tmp_path_factory):
    return create_run(tiny_config(data={"n_nonmembers": 0}, training={"epochs": 1}), tmp_path_factory.mktemp("nn") / "run", progress=False)


@pytest.fixture(scope="module")
def nan_run(tiny_runs, tmp_path_factory):
    """A copy of the cut run whose server checkpoint holds NaN weights."""
    run = tmp_path_factory.mktemp("nan") / "run"
    shutil.copytree(tiny_runs["cut"], run)
    path = run / "checkpoints" / "server.safetensors"
    state = load_file(str(path))
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}, str(path))
    # Record the new hash too, so only the weights check (not the file hashes) can refuse it.
    info = json.loads((run / "run.json").read_text())
    info["files"]["checkpoints/server.safetensors"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (run / "run.json").write_text(json.dumps(info))
    return run


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attacks", "loss,shadow"], "unknown membership attack 'shadow'; valid: loss, sima, pia, pian, secmi, payload-lr, nn-distance"),
        (["--targets", "server,cloud"], "unknown membership target 'cloud'; valid: server, client, samples, payload"),
        (["--targets", ""], "empty membership target name"),
        (["--attacks", "payload-lr", "--targets", "server"], "attack 'payload-lr' applies to T1 (payload)"),
        (["--out", "{tmp}/report.txt"], "--out must end in .json"),
        (["--out", "{tmp}/exists.json"], "already exists"),
        (["--run", "{tmp}/missing"], "is not a collafuse run folder"),
        (["--run", "{nonmembers}", "--targets", "server"], "the non-members candidate set is empty"),
        (["--run", "{nan}", "--targets", "server", "--attacks", "sima"], "checkpoints/server.safetensors holds NaN/inf weights"),
    ],
    ids=["unknown attack", "unknown target", "empty target", "inapplicable attack", "not json", "out exists",
         "missing run", "empty candidates", "NaN weights"],
)
def test_bad_input_gives_one_line_and_exit_2(args, message, tiny_runs, no_nonmember_run, nan_run, tmp_path, capsys):
    (tmp_path / "exists.json").write_text("{}")
    subs = {"tmp": str(tmp_path), "nonmembers": str(no_nonmember_run), "nan": str(nan_run)}
    args = [a.format(**subs) for a in args]
    if "--run" not in args:
        args = ["--run", str(tiny_runs["cut"]), *args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "report.json")]
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, _, err = _run_cli(capsys, *args)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("collafuse: error: ") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize(
    "members, nonmembers, message",
    [
        (torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 16, 16), "differ in shape"),
        (torch.zeros(0, 1, 8, 8), torch.zeros(4, 1, 8, 8), "members candidate set is empty"),
        (torch.zeros(4, 1, 8, 8), torch.full((4, 1, 8, 8), float("nan")), "NaN or infinite pixels"),
        (torch.zeros(4, 64), torch.zeros(4, 64), "(N, C, H, W)"),
    ],
)
def test_candidate_sets_are_validated(members, nonmembers, message):
    with pytest.raises(CandidateError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Candidates(members, nonmembers)


@pytest.mark.parametrize("kind", ["naive", "trajectory"])
def test_payload_lr_on_other_payload_kinds(kind, tiny_runs, tmp_path, capsys):
    out = tmp_path / f"{kind}.json"
    rc, _, err = _run_cli(capsys, "--run", str(tiny_runs[kind]), "--targets", "payload", "--out", str(out))
    assert rc == 0, err
    entry = json.loads(out.read_text())["targets"]["payload"]
    assert entry["payload_kind"] == kind
    r = entry["attacks"]["payload-lr"]
    # naive payloads carry their noise: x0 is exact. Trajectory payloads sit at t > t_c, noisier.
    assert r["auc"] >= (0.99 if kind == "naive" else 0.6)
    if kind == "trajectory":
        assert len(r["per_step"]) > 1 and all(p["t"] > 10 for p in r["per_step"])
