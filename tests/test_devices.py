"""Devices (issue 15 item 1, DESIGN §10): ``auto`` resolves to the available device everywhere, no module
hard-codes the CPU, ``--device`` overrides the config, a run trained on CUDA opens and is attacked on
a CPU machine, and audit cells on a GPU run one per device.

No GPU is needed: availability is mocked, and where a device must reach a computation a sentinel
device (``meta``) is passed and spies record where their inputs landed."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from collafuse.cli import main
from collafuse.errors import ConfigError
from collafuse.runs import Run
from collafuse.device import CPU, resolve_device

ROOT = Path(__file__).resolve().parents[1]
META = torch.device("meta")


def no_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def with_cuda(monkeypatch, count: int = 1) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


# ---------------------------------------------------------------- resolution


def test_auto_resolves_to_the_available_device(monkeypatch) -> None:
    with_cuda(monkeypatch)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device(None) == torch.device("cuda")
    assert resolve_device("cpu") == CPU and resolve_device("cuda") == torch.device("cuda")
    no_cuda(monkeypatch)
    assert resolve_device("auto") == CPU and resolve_device(None) == CPU and resolve_device(META) == META
    with pytest.raises(ConfigError, match="no CUDA device is available") as err:
        resolve_device("cuda")
    assert "\n" not in str(err.value)


def test_the_embedded_grids_say_auto() -> None:
    from collafuse.benchmarks.audit.grid import load_grid

    for quick in (False, True):
        cells = load_grid(None, quick=quick).cells()
        assert cells and {c.run_config.device for c in cells} == {"auto"}


CPU_LITERAL = re.compile(r"""["']cpu["']""")
# The resolver, the config's allowed values and the command line's --device choices name the CPU;
# nothing else may.
# The CPU-against-CUDA benchmark (perf_gpu.py) names both devices: comparing them is its job.
ALLOWED = {"collafuse/device.py", "collafuse/config.py", "collafuse/cli.py", "benchmarks/perf_gpu.py"}


def test_no_module_hard_codes_the_cpu() -> None:
    found = []
    for folder in ("attacks", "benchmarks", "collafuse", "defenses"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in ALLOWED:
                continue
            for no, line in enumerate(path.read_text().splitlines(), 1):
                if CPU_LITERAL.search(line):
                    found.append(f"{rel}:{no}: {line.strip()}")
    assert not found, "hard-coded CPU (use collafuse.device.resolve_device / CPU):\n" + "\n".join(found)
    cli = (ROOT / "collafuse/cli.py").read_text()
    assert len(CPU_LITERAL.findall(cli)) == 1 and 'choices=("auto", "cpu", "cuda")' in cli


# ---------------------------------------------------------------- spies: where the device goes


class SpyDenoiser(nn.Module):
    """An attacker denoiser that records the device of every query and answers zeros on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.device] = []

    def eps(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen += [p.device, t.device]
        return torch.zeros(p.shape)

    def x0(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen += [p.device, t.device]
        return torch.zeros(p.shape)


class SpyUNet(nn.Module):
    """A model the membership targets query: records the device of x, t, y; answers zeros on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.device] = []

    def forward(self, x, t, y=None):
        self.seen += [x.device, t.device] + ([y.device] if y is not None else [])
        return torch.zeros(x.shape)


@pytest.fixture(scope="module")
def small_view():
    from collafuse.attacks.reconstruction.view import ViewArrays
    from collafuse.schedule import NoiseSchedule

    gen = torch.Generator().manual_seed(0)
    schedule = NoiseSchedule.create("cosine", 50)
    n = 6
    view = ViewArrays(torch.randn(n, 1, 8, 8, generator=gen), torch.full((n,), 20), torch.zeros(n, dtype=torch.long),
                      torch.arange(n), torch.arange(n))
    return view, schedule


@pytest.mark.parametrize("name", ["tweedie", "ddim"])
def test_attacks_query_the_denoiser_on_the_resources_device(small_view, name) -> None:
    from collafuse.attacks.reconstruction import AttackerResources, run_attack

    view, schedule = small_view
    spy = SpyDenoiser()
    run_attack(name, view, schedule, AttackerResources(denoiser=spy, ddim_steps=2, device=META))
    assert spy.seen and set(spy.seen) == {META}


def test_inversion_trains_and_runs_on_the_resources_device(small_view, monkeypatch) -> None:
    import collafuse.attacks.reconstruction.inversion as inversion
    from collafuse.attacks.reconstruction import AttackerResources, run_attack
    from collafuse.data import ImageSet

    view, schedule = small_view
    spy, asked = SpyDenoiser(), []

    def fake_train(images, schedule, config, t_values=None, progress=False, device=CPU):
        asked.append(device)
        return spy

    monkeypatch.setattr(inversion, "train_denoiser", fake_train)
    aux = ImageSet(torch.zeros(4, 1, 8, 8), None, 0)
    run_attack("inversion", view, schedule, AttackerResources(aux=aux, device=META))
    assert asked == [META] and set(spy.seen) == {META}


def test_attacker_resources_carry_the_device_to_the_denoiser_cache(tmp_path, monkeypatch) -> None:
    import collafuse.attacks.reconstruction.denoiser as den
    from collafuse.attacks.reconstruction.engine import attacker_resources
    from collafuse.data import ImageSet
    from collafuse.schedule import NoiseSchedule

    schedule = NoiseSchedule.create("cosine", 50)
    images = torch.rand(8, 1, 8, 8) * 2 - 1
    trained_on = []
    real = den.train_denoiser

    def spy_train(images, schedule, config, t_values=None, progress=False, device=CPU):
        trained_on.append(device)
        return real(images, schedule, config, t_values, progress, device=CPU)  # meta holds no numbers to cache

    monkeypatch.setattr(den, "train_denoiser", spy_train)
    cfg = den.DenoiserConfig(steps=1, batch_size=2)
    aux = ImageSet(images, None, 0)
    res, used = attacker_resources(aux, images, schedule, ("tweedie",), seed=0, epochs=1, denoiser_config=cfg,
                                   denoiser_cache=tmp_path, device=META)
    assert trained_on == [META] and res.device == META and not used.cache_hit
    res, used = attacker_resources(aux, images, schedule, ("tweedie",), seed=0, epochs=1, denoiser_config=cfg,
                                   denoiser_cache=tmp_path, device=META)  # a cache hit is moved to the device
    assert used.cache_hit and next(res.denoiser.parameters()).device == META
    no_cuda(monkeypatch)
    res, _ = attacker_resources(aux, images, schedule, ("oracle",), seed=0, epochs=1)
    assert res.device == CPU  # default: auto


def test_the_feature_classifier_trains_and_loads_on_the_device(tmp_path) -> None:
    from collafuse.benchmarks.audit.utility import load_or_train_feature_classifier, train_feature_classifier

    images, labels = torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 2
    clf = train_feature_classifier(images, labels, 2, seed=0, epochs=1, device=META)
    assert clf.device == META and {p.device for p in clf.net.parameters()} == {META}
    cpu = load_or_train_feature_classifier(images, labels, 2, 0, tmp_path, epochs=1)
    again = load_or_train_feature_classifier(images, labels, 2, 0, tmp_path, epochs=1, device=META)  # from the cache
    assert cpu.device == CPU and {p.device for p in again.net.parameters()} == {META}


# ---------------------------------------------------------------- runs: load-time device, CUDA runs on a CPU


def _as_cuda_run(src: Path, dst: Path) -> Path:
    """A copy of a CPU run whose config says device: cuda, its sha256 re-recorded in run.json."""
    shutil.copytree(src, dst)
    cfg = dst / "config.yaml"
    text = cfg.read_text()
    assert "device: cpu" in text
    cfg.write_text(text.replace("device: cpu", "device: cuda"))
    info = json.loads((dst / "run.json").read_text())
    info["files"]["config.yaml"] = hashlib.sha256(cfg.read_bytes()).hexdigest()
    (dst / "run.json").write_text(json.dumps(info))
    return dst


@pytest.fixture()
def cuda_run(tiny_runs, tmp_path) -> Path:
    return _as_cuda_run(tiny_runs["cut"], tmp_path / "cuda-run")


def test_a_cuda_run_opens_on_a_cpu_machine(cuda_run, monkeypatch) -> None:
    no_cuda(monkeypatch)
    run = Run.load(cuda_run)  # auto, resolved at load time: not config.device
    assert run.config.device == "cuda" and run.device == CPU
    assert {p.device for p in run.server_model.parameters()} == {CPU}
    assert Run.load(cuda_run, device="cpu").device == CPU
    with pytest.raises(ConfigError, match="no CUDA device"):
        Run.load(cuda_run, device="cuda")
    meta = Run.load(cuda_run, device=META)  # the models go where Run.load is told
    assert {p.device for m in [meta.server_model, *meta.client_models] for p in m.parameters()} == {META}


def test_a_cuda_run_is_attacked_and_sampled_with_device_cpu(cuda_run, tmp_path, monkeypatch, capsys) -> None:
    no_cuda(monkeypatch)
    out = tmp_path / "rec.json"
    assert main(["attack", "reconstruct", "--run", str(cuda_run), "--attacks", "rescale,oracle", "--out", str(out),
                 "--quiet", "--device", "cpu"]) == 0
    assert json.loads(out.read_text())
    mem = tmp_path / "mem.json"
    assert main(["attack", "membership", "--run", str(cuda_run), "--attacks", "loss", "--targets", "server",
                 "--out", str(mem), "--quiet", "--device", "cpu"]) == 0
    assert mem.is_file()
    assert main(["sample", "--run", str(cuda_run), "-n", "2", "--out", str(tmp_path / "s.npz"), "--quiet"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("argv", [
    ["sample", "-n", "2", "--out", "{tmp}/s.png"],
    ["attack", "reconstruct", "--attacks", "rescale", "--out", "{tmp}/r.json"],
    ["attack", "membership", "--attacks", "loss", "--targets", "server", "--out", "{tmp}/m.json"],
])
def test_device_cuda_without_cuda_is_one_line_exit_2(cuda_run, tmp_path, monkeypatch, capsys, argv) -> None:
    no_cuda(monkeypatch)
    args = [a.format(tmp=tmp_path) for a in argv]
    assert main([*args[:2 if args[0] == "attack" else 1], "--run", str(cuda_run), *args[2 if args[0] == "attack" else 1:],
                 "--device", "cuda", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no CUDA device is available" in err
    assert not list(tmp_path.glob("[srm].*"))


def test_audit_device_cuda_without_cuda_writes_nothing(tmp_path, monkeypatch, capsys) -> None:
    no_cuda(monkeypatch)
    out = tmp_path / "audit"
    assert main(["audit", "--quick", "--out", str(out), "--device", "cuda", "--quiet", "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no CUDA device is available" in err and not out.exists()


def test_membership_queries_land_on_the_run_device(tiny_runs, monkeypatch) -> None:
    from collafuse.attacks.membership.engine import run_membership

    run = Run.load(tiny_runs["cut"], device=META)
    spies = [SpyUNet() for _ in range(1 + len(run.client_models))]
    run.server_model, run.client_models = spies[0], spies[1:]
    run_membership(run, ("loss",), ("server", "client"))
    assert all(s.seen for s in spies) and {d for s in spies for d in s.seen} == {META}


# ---------------------------------------------------------------- the audit: cells and the runner


GRID = """
base:
  device: auto
  data: {image_size: 8, n_members: 32, n_nonmembers: 16, n_aux: 16, num_clients: 2}
  diffusion: {T: 50}
payload_curve: {cut_ratios: [0.5], epochs: 2, attacks: [rescale, oracle]}
"""


@pytest.fixture()
def payload_cells(tmp_path):
    from collafuse.benchmarks.audit.grid import load_grid

    path = tmp_path / "grid.yaml"
    path.write_text(GRID)
    return load_grid(path).cells()


def test_a_payload_cell_gives_its_device_to_the_attacker(payload_cells, tmp_path, monkeypatch) -> None:
    from collafuse.benchmarks.audit.cells import compute_cell
    from collafuse.benchmarks.audit.cells import payload as engine  # the payload cell's own binding

    asked, real = [], engine.attacker_resources

    def spy(*args, **kw):
        asked.append(kw.get("device"))
        return real(*args, **kw)

    monkeypatch.setattr(engine, "attacker_resources", spy)
    no_cuda(monkeypatch)
    auto = compute_cell(payload_cells[0], tmp_path / "cache")
    meta = compute_cell(payload_cells[0], tmp_path / "cache", device=META)
    assert asked == [CPU, META] and auto.info["device"] == "cpu" and meta.info["device"] == "meta"
    assert auto.rows == meta.rows  # rescale and oracle run on CPU tensors: the device changes no number


def test_system_cells_evaluate_on_the_cell_device(tiny_runs, monkeypatch, tmp_path) -> None:
    from collafuse.benchmarks.audit.cells import system

    asked = []

    def spy(*args, device=CPU, **kw):
        asked.append(device)
        raise RuntimeError("stop here")

    monkeypatch.setattr(system, "load_or_train_feature_classifier", spy)
    run = Run.load(tiny_runs["cut"], device=META)

    class FakeCell:
        samples_per_client = 4
        inception_fid = False

    with pytest.raises(RuntimeError, match="stop here"):
        system.measured_utility(run, FakeCell(), tmp_path, {})
    assert asked == [META]


def test_cells_on_a_gpu_run_one_per_device(payload_cells, tmp_path, monkeypatch) -> None:
    from collafuse.benchmarks.audit import runner

    with_cuda(monkeypatch, count=1)
    assert runner.sweep_devices(payload_cells, None) == {"cuda"}
    assert runner.sweep_devices(payload_cells, "cpu") == {"cpu"}
    assert runner.device_jobs(4, {"cuda"}, 1) == 1 and runner.device_jobs(4, {"cuda"}, 2) == 2
    assert runner.device_jobs(4, {"cpu"}, 0) == 4
    assert runner.ray_options(True)["num_gpus"] == 1 and "num_gpus" not in runner.ray_options(False)
    seen = {}
    monkeypatch.setattr(runner, "_local", lambda shared, pending, cache, jobs, on_done, device=None, gpus=0:
                        seen.update(local=(jobs, gpus, device)))
    monkeypatch.setattr(runner, "_ray", lambda *a, device=None, gpu_cells=False, **k: seen.update(ray=gpu_cells))
    runner.run_sweep(payload_cells, tmp_path / "a", tmp_path / "c", jobs=4, progress=False)
    runner.run_sweep(payload_cells, tmp_path / "b", tmp_path / "c", jobs=4, backend="ray", progress=False)
    assert seen == {"local": (1, 1, None), "ray": True}
    runner.run_sweep(payload_cells, tmp_path / "d", tmp_path / "c", jobs=4, progress=False, device="cpu")
    assert seen["local"] == (4, 0, "cpu")
