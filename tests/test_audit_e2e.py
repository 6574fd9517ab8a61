"""`collafuse audit --quick` end to end through the command line: results, report, resume, Ray, bad input.

One quick audit is run once per session (it trains its four small systems into a shared
cache); the other tests reuse that cache, so they recompute audit cells, not training.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from browser_check import needs_browser
import yaml

pytestmark = pytest.mark.slow

QUICK_CELLS = 15  # 5 cut ratios × 2 payload defenses + 2 cut ratios × 2 system defenses + DP-SGD at c = 0.5


def collafuse(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "collafuse.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)


def load_rows(audit_dir: Path) -> list[dict]:
    return json.loads((audit_dir / "results.json").read_text())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def audit_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit-cache")


@pytest.fixture(scope="session")
def quick_audit(tmp_path_factory, audit_cache) -> tuple[Path, subprocess.CompletedProcess, float]:
    out = tmp_path_factory.mktemp("audits") / "quick"
    started = time.perf_counter()
    proc = collafuse("audit", "--quick", "--out", str(out), "--cache", str(audit_cache), "--jobs", "2", "--quiet")
    return out, proc, time.perf_counter() - started


def test_quick_audit_writes_table_report_and_verdict(quick_audit):
    out, proc, _ = quick_audit
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    meta = json.loads((out / "audit.json").read_text())
    assert (proc.returncode == 0) == (meta["verdict"]["status"] == "pass")
    assert meta["verdict"]["text"] in proc.stdout
    assert meta["sweep"] == {"cells": QUICK_CELLS, "computed": QUICK_CELLS, "reused": 0}
    rows = load_rows(out)
    columns = {"cell", "config_hash", "kind", "cut_ratio", "t_c", "defense", "seed", "threat", "target", "attack",
               "metric", "value", "ci_low", "ci_high"}
    assert columns <= set(rows[0])
    threats = {r["threat"] for r in rows}
    assert threats == {"T1", "T2", "T3", "T4", "T5", "utility", "cost", "formal", "sampling"}
    from collafuse.metrics import metric  # every row speaks the one vocabulary (issue 20)

    assert all(r["threat"] in metric(r["metric"]).groups for r in rows)
    # Every split system checks its server's hand-off against its payloads (issue 19) and draws a sample grid.
    handoff = [r for r in rows if r["threat"] == "sampling" and r["metric"] == "handoff_std_error"]
    assert len(handoff) == 5 and all(r["value"] < 0.1 for r in handoff)
    assert all(c["artifacts"].get("samples") for c in meta["cells"] if c["kind"] == "system")
    # The CSV holds the same rows as the JSON.
    import pandas as pd

    csv = pd.read_csv(out / "results.csv")
    assert len(csv) == len(rows) and list(csv["metric"]) == [r["metric"] for r in rows]
    # Every membership metric (issue 14 item 4); the per-step AUC carries its step in column t.
    member = csv[csv["threat"].isin(["T2", "T3"])]
    assert {"auc", "tpr_at_01pct_fpr", "tpr_at_01pct_fpr_resolved", "balanced_accuracy", "epsilon_gdp",
            "auc_at_t"} <= set(member["metric"])
    assert member.loc[member["metric"] == "auc_at_t", "t"].notna().all() and member.loc[member["metric"] == "auc", "t"].isna().all()
    for name in ("report.html", "report.md"):
        assert (out / name).stat().st_size > 1000
    # Its wall time (target: 2 min on a quiet machine) is measured by benchmarks/perf_audit.py, not asserted.


def test_quick_audit_finds_leakage_where_it_is_certain(quick_audit):
    out, _, _ = quick_audit
    rows = load_rows(out)

    def worst(kind, c, defense, threat, metric):
        vals = [r["value"] for r in rows if r["kind"] == kind and r["cut_ratio"] == c and r["defense"] == defense
                and r["threat"] == threat and r["metric"] == metric and r["value"] is not None]
        return max(vals)

    # Low cut, many views: the payloads give the images away; a high cut with one release hides them far better.
    assert worst("payload", 0.1, "none", "T1", "reid_pool") > 0.95
    assert worst("system", 0.3, "none", "T1", "reid_pool") > 0.9
    assert worst("system", 0.8, "single-release", "T1", "reid_pool") < worst("system", 0.3, "none", "T1", "reid_pool")
    # DP-SGD on the clients gives their models a finite formal ε (the accountant's, near its target);
    # without it there is no bound.
    formal = {(r["defense"], r["metric"]): r["value"] for r in rows if r["kind"] == "system" and r["threat"] == "formal"}
    assert 0 < formal[("dp-sgd ε=8", "epsilon_model_clients")] <= 8.5
    assert formal[("none", "epsilon_model_clients")] == "inf"
    # The formal ε of the payload channel falls with the cut ratio.
    eps = {r["cut_ratio"]: r["value"] for r in rows if r["kind"] == "payload" and r["defense"] == "none"
           and r["metric"] == "epsilon_payload"}
    assert eps[0.1] > eps[0.5] > eps[0.9]


def test_report_command_rebuilds_the_report(quick_audit, tmp_path):
    out, _, _ = quick_audit
    (out / "report.html").unlink()
    proc = collafuse("report", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.html").is_file()
    bad = collafuse("report", str(tmp_path))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "collafuse: error:" in bad.stderr


def test_policy_exit_codes_reuse_finished_cells(quick_audit, audit_cache, tmp_path):
    out, _, _ = quick_audit
    lenient = tmp_path / "lenient.yaml"
    lenient.write_text(yaml.safe_dump({"limits": {"T1": {"reid_pool": {"max": 1.0}}, "T2": {"auc": {"max": 1.0}}}}))
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump({"limits": {"T1": {"reid_pool": {"max": 0.0}}}}))
    passing = collafuse("audit", "--quick", "--policy", str(lenient), "--out", str(out), "--cache", str(audit_cache), "--quiet")
    assert passing.returncode == 0, passing.stderr[-2000:]
    meta = json.loads((out / "audit.json").read_text())
    assert meta["sweep"]["computed"] == 0 and meta["sweep"]["reused"] == QUICK_CELLS
    rec = meta["verdict"]["recommendation"]
    assert rec is not None and rec["cell"] in meta["verdict"]["passing_cells"]
    failing = collafuse("audit", "--quick", "--policy", str(strict), "--out", str(out), "--cache", str(audit_cache), "--quiet")
    assert failing.returncode == 1 and "FAIL" in failing.stdout


@pytest.mark.parametrize("kind, content, message", [
    ("grid", {"payload_curve": {"cut_ratios": [1.2]}}, "outside [0, 1]"),
    ("grid", {"payload_curve": {"cut_ratios": []}}, "empty"),
    ("policy", {"limits": {"T2": {"fidelity": {"max": 1}}}}, "unknown metric"),
    ("policy", {"limits": {"T4": {"auc": {"max": 0.6}}}}, "no attack in the grid measures it"),
])
def test_bad_grids_and_policies_exit_2_and_leave_results_intact(quick_audit, audit_cache, tmp_path, kind, content, message):
    out, _, _ = quick_audit
    before = {p.name: digest(out / p.name) for p in out.iterdir() if p.is_file()}
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(content))
    if kind == "policy":
        grid = tmp_path / "curve.yaml"
        grid.write_text(yaml.safe_dump({"payload_curve": {"cut_ratios": [0.5]}}))
        args = ["--config", str(grid), "--policy", str(path)]
    else:
        args = ["--config", str(path)]
    proc = collafuse("audit", *args, "--out", str(out), "--cache", str(audit_cache), "--quiet")
    assert proc.returncode == 2
    assert proc.stderr.startswith("collafuse: error:") and proc.stderr.count("\n") == 1 and message in proc.stderr
    assert {p.name: digest(out / p.name) for p in out.iterdir() if p.is_file()} == before


def test_audit_refuses_a_folder_that_is_not_an_audit(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    proc = collafuse("audit", "--quick", "--out", str(tmp_path), "--quiet")
    assert proc.returncode == 2 and "not an audit" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


def test_killed_sweep_resumes_without_losing_or_repeating_cells(quick_audit, audit_cache, tmp_path):
    out, _, _ = quick_audit
    resumed = tmp_path / "resumed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "collafuse.cli", "audit", "--quick", "--out", str(resumed),
                             "--cache", str(audit_cache), "--jobs", "1", "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cells = resumed / "cells"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if cells.is_dir() and len(list(cells.glob("*.json"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: the hardest interruption
    proc.wait()
    finished = len(list(cells.glob("*.json")))
    assert 3 <= finished < QUICK_CELLS
    assert not (resumed / "results.json").exists()
    again = collafuse("audit", "--quick", "--out", str(resumed), "--cache", str(audit_cache), "--jobs", "1", "--quiet")
    assert again.returncode in (0, 1), again.stderr[-2000:]
    sweep = json.loads((resumed / "audit.json").read_text())["sweep"]
    assert sweep == {"cells": QUICK_CELLS, "computed": QUICK_CELLS - finished, "reused": finished}
    assert load_rows(resumed) == load_rows(out)
    assert not list(resumed.rglob("*.partial-*"))
    assert "taking over the stale lock" in again.stderr  # the killed sweep could not release its lock
    assert not (resumed / ".lock").exists()


def test_a_second_audit_on_a_running_audits_folder_is_refused_and_sigterm_cleans_up(audit_cache, tmp_path):
    """Two audits on one --out would compute every cell twice: the second is refused (one line, exit 2).
    SIGTERM then ends the first with exit 143 (128 + 15), its lock released and no temporaries left."""
    out = tmp_path / "busy"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    first = subprocess.Popen([sys.executable, "-m", "collafuse.cli", "audit", "--quick", "--out", str(out),
                              "--cache", str(audit_cache), "--jobs", "2", "--quiet"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        if (out / "cells").is_dir() and len(list((out / "cells").glob("*.json"))) >= 1:
            break
        time.sleep(0.05)
    assert first.poll() is None, "the first audit finished before the second started"
    assert (out / ".lock").read_text().split()[0] == str(first.pid)
    second = collafuse("audit", "--quick", "--out", str(out), "--cache", str(audit_cache), "--quiet")
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr[-2000:]
    assert f"in use by another collafuse process (pid {first.pid})" in second.stderr
    assert first.poll() is None, "the first audit finished while the second was refused"
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 143, stderr[-2000:]
    assert "terminated (SIGTERM); finished cells are kept" in stderr
    assert not (out / ".lock").exists() and not list(out.rglob("*.partial-*"))
    assert not list(audit_cache.rglob("*.partial-*"))


def test_ray_backend_gives_the_same_table(quick_audit, audit_cache, tmp_path):
    out, _, _ = quick_audit
    via_ray = tmp_path / "ray"
    proc = collafuse("audit", "--quick", "--backend", "ray", "--jobs", "2", "--out", str(via_ray),
                     "--cache", str(audit_cache), "--quiet")
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    meta = json.loads((via_ray / "audit.json").read_text())
    assert meta["backend"] == "ray" and meta["sweep"]["computed"] == QUICK_CELLS
    assert load_rows(via_ray) == load_rows(out)


def test_report_numbers_equal_the_results_table(quick_audit):
    from test_audit_report import _table

    from collafuse.benchmarks.audit.report import format_value

    out, _, _ = quick_audit
    rows = load_rows(out)
    shown = _table((out / "report.html").read_text(encoding="utf-8"), "leakage-table")
    assert len(shown) > 0
    for _, r in shown.iterrows():
        cell, threat, metric = r["cell"][0], r["threat"][0], r["metric"][0]
        candidates = [x["value"] for x in rows if x["cell"] == cell and x["threat"] == threat
                      and x["metric"] == metric and x["value"] is not None]
        assert float(r["worst value"][1]) == max(candidates)   # the exact number behind the cell
        assert r["worst value"][0] == format_value(max(candidates))  # and the text a reader sees
    meta = json.loads((out / "audit.json").read_text())
    text = (out / "report.html").read_text(encoding="utf-8")
    assert meta["verdict"]["text"].split(":")[0] in text


@needs_browser
def test_quick_report_in_a_real_browser(quick_audit, tmp_path_factory):
    from browser_check import check_page

    out, _, _ = quick_audit
    shot = tmp_path_factory.mktemp("screenshots") / "quick-report.png"
    seen = check_page(out / "report.html", shot)
    assert seen["console_errors"] == []
    assert len(seen["images"]) >= 5 and all(w > 0 for _, w in seen["images"])
    assert seen["verdict_visible"] and ("PASS" in seen["verdict_text"] or "FAIL" in seen["verdict_text"])
    assert seen["recommendation_visible"]
    assert shot.stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [(["--backend", "spark"], "unknown backend"), (["--jobs", "0"], "--jobs")])
def test_bad_backend_or_jobs_write_nothing(tmp_path, args, message):
    out = tmp_path / "never"
    proc = collafuse("audit", "--quick", *args, "--out", str(out), "--quiet")
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1
    assert not out.exists()


def test_ctrl_c_keeps_finished_cells_and_says_how_to_resume(quick_audit, audit_cache, tmp_path):
    out = tmp_path / "interrupted"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "collafuse.cli", "audit", "--quick", "--out", str(out),
                             "--cache", str(audit_cache), "--jobs", "1", "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "cells").is_dir() and len(list((out / "cells").glob("*.json"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends to the whole foreground group
    _, stderr = proc.communicate(timeout=120)
    kept = len(list((out / "cells").glob("*.json")))
    assert proc.returncode == 130, stderr[-2000:]
    assert f"{kept} finished cells are kept" in stderr and "run the same command again to resume" in stderr
    assert 2 <= kept < QUICK_CELLS and not (out / "results.json").exists()


def test_baselines_c0_and_c1_are_audited_with_absent_targets_explained(tmp_path):
    grid = {
        "base": {"device": "cpu", "data": {"image_size": 8, "n_members": 64, "n_nonmembers": 32, "n_aux": 32, "num_clients": 2},
                 "diffusion": {"T": 50}, "server_model": {"channels": [8, 16], "time_dim": 16},
                 "client_model": {"channels": [8, 16], "time_dim": 16}, "training": {"epochs": 2, "batch_size": 32},
                 "sampling": {"steps": 5, "per_client": 2}},
        "payload_curve": {"cut_ratios": [0.0, 1.0], "epochs": 2, "attacks": ["rescale", "oracle"]},
        "systems": {"cut_ratios": [0.0, 1.0], "samples_per_client": 8,
                    "attacks": {"T1": ["rescale", "payload-lr"], "T2": ["loss"], "T3": ["loss"], "T4": ["nn-distance"]}},
    }
    path = tmp_path / "baselines.yaml"
    path.write_text(yaml.safe_dump(grid))
    out = tmp_path / "audit"
    proc = collafuse("audit", "--config", str(path), "--out", str(out), "--cache", str(tmp_path / "cache"), "--quiet")
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    checks = {(e["cell"].split("|")[0], e["cell"].split("|")[2], c["threat"]): c
              for e in json.loads((out / "audit.json").read_text())["evaluations"] for c in e["checks"]}
    # c = 0 (central): the server sees the raw images; there is no client model.
    assert checks[("system", "c=0.00", "T1")]["observed"] == 1.0
    assert checks[("system", "c=0.00", "T3")]["note"] == "no client model (c = 0)"
    # c = 1 (local only): nothing crosses and there is no server model.
    assert checks[("system", "c=1.00", "T1")]["note"].startswith("no payload crosses")
    assert checks[("system", "c=1.00", "T2")]["note"] == "no server model (c = 1)"
    assert checks[("payload", "c=1.00", "T1")]["pass"] is True


def test_quick_audit_carries_its_controls_and_every_score(quick_audit):
    """Issue 21: every membership result has its blind baseline, held-out thresholds and (where a finite guarantee
    exists) its ceiling check; no ROC lies above its ceiling; scores.parquet holds one row per candidate × attack
    × target × cell, and re-computing each AUC from it gives the table's."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    out, _, _ = quick_audit
    rows = pd.DataFrame(load_rows(out))
    member = rows[rows["threat"].isin(["T1", "T2", "T3", "T4", "T5"])]
    aucs = member[(member["metric"] == "auc") & member["t"].isna()]
    for metric in ("tpr_at_1pct_fpr_heldout", "fpr_at_1pct_heldout", "above_blind"):
        assert len(member[member["metric"] == metric]) == len(aucs), metric
    blind = member[member["metric"] == "blind_auc"]
    assert set(zip(blind["cell"], blind["target"])) == set(zip(aucs["cell"], aucs["target"]))
    ceiling = member[member["metric"] == "roc_above_ceiling"]
    assert len(ceiling) > 0 and (ceiling["value"] == 0).all()  # a finite guarantee somewhere, never beaten
    meta = json.loads((out / "audit.json").read_text())
    assert meta["verdict"]["errors"] == []
    assert all(t["status"] != "inconclusive" for t in meta["verdict"]["threats"])  # a random split: no shift

    scores = pd.read_parquet(out / "scores.parquet")
    assert list(scores.columns) == ["cell", "threat", "target", "attack", "candidate", "client", "class", "member",
                                    "score"]
    keys = ["cell", "threat", "target", "attack"]
    assert not scores.duplicated([*keys, "candidate"]).any()  # one row per candidate × attack × target × cell
    groups = dict(list(scores.groupby(keys)))
    assert set(groups) == set(map(tuple, aucs[keys].itertuples(index=False)))
    for key, value in zip(map(tuple, aucs[keys].itertuples(index=False)), aucs["value"]):
        part = groups[key]
        assert roc_auc_score(part["member"], part["score"]) == pytest.approx(value, abs=1e-12), key
        assert (part.loc[part["member"], "client"] >= 0).all() and (part.loc[~part["member"], "client"] == -1).all()
    assert meta["scores_sha256"]
    report = (out / "report.html").read_text()
    assert 'id="controls-table"' in report and 'id="per-class-table"' in report


def test_a_changed_scores_file_is_detected_not_trusted(quick_audit, tmp_path):
    import shutil

    import pandas as pd

    out, _, _ = quick_audit
    copy = tmp_path / "audit"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns(".lock"))
    scores = pd.read_parquet(copy / "scores.parquet")
    scores.loc[0, "score"] += 1.0  # one score edited after the audit wrote it
    scores.to_parquet(copy / "scores.parquet", index=False)
    before = (copy / "report.html").read_bytes()
    proc = collafuse("report", str(copy))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "changed after the audit wrote it" in proc.stderr
    assert (copy / "report.html").read_bytes() == before  # nothing rewritten
