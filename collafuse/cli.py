"""The command line (DESIGN.md §8). Bad input: one line on stderr, exit code 2, nothing written."""
from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import warnings
from pathlib import Path

from collafuse.errors import CollafuseError
from collafuse.fsutil import EXIT_TERMINATED, Terminated, check_output, sigterm_raises

EXIT_BAD_INPUT = 2
MAX_SAMPLES = 100_000
MAX_SAMPLE_BYTES = 4 << 30  # `sample` holds its images as float32 before writing them (a sixth of 24 GiB)
MAX_SEED = 2**63 - 1
# A write the file system refuses is the user's to fix (free space, another folder), not a bug.
WRITE_ERRNOS = {errno.ENOSPC: "cannot write to", errno.EROFS: "cannot write to", errno.EDQUOT: "cannot write to",
                errno.EFBIG: "cannot write to", errno.EACCES: "cannot access", errno.EPERM: "cannot access"}


class UsageError(CollafuseError):
    """A command-line usage mistake reported by argparse."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one ``collafuse: error:`` line, not a usage block."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _hooks_for(config):
    """Defense hooks for a config: :func:`collafuse.api.hooks_for` (the API and the CLI share one path)."""
    from collafuse.api import hooks_for

    return hooks_for(config)


def _warn_uncovered(left: list[str]) -> None:
    """Say which threats (DESIGN §3) no configured defense addresses; the run still goes ahead."""
    if left:
        print(f"collafuse: warning: no configured defense addresses {', '.join(left)}", file=sys.stderr)


def _cmd_attack_reconstruct(args: argparse.Namespace) -> int:
    from collafuse.attacks.reconstruction.command import run_command

    return run_command(Path(args.run), args.attacks, args.out, progress=not args.quiet, device=args.device)


def _cmd_attack_membership(args: argparse.Namespace) -> int:
    from collafuse.api import formal_ceilings
    from collafuse.attacks.membership.command import run_command

    slurm = _slurm_options(args) if args.backend == "slurm" else None
    return run_command(Path(args.run), args.attacks, args.targets, args.out, progress=not args.quiet,
                       device=args.device, references=args.references, formal_for=formal_ceilings,
                       jobs=args.jobs, backend=args.backend, address=args.address, slurm=slurm)


def _slurm_options(args: argparse.Namespace, grid_block=None):
    """The SLURM options of a command: its --slurm-* values over the grid's ``slurm:`` block (audit)."""
    from collafuse.tasks import slurm_available

    problem = slurm_available()
    if problem:  # before anything is written
        raise CollafuseError(problem)
    from collafuse.benchmarks.audit.runner import slurm_options

    return slurm_options(grid_block, partition=args.slurm_partition, time=args.slurm_time,
                         gpus_per_task=args.slurm_gpus_per_task, array_size=args.slurm_array_size)


def _cmd_audit(args: argparse.Namespace) -> int:
    from collafuse.benchmarks.audit.command import run_audit_command
    from collafuse.benchmarks.audit.runner import slurm_settings

    slurm = None
    if args.backend == "slurm":  # the grid's slurm: block, under the command line's --slurm-* options
        from collafuse.benchmarks.audit.grid import load_grid

        slurm = _slurm_options(args, load_grid(args.config, args.quick).spec.slurm)
    with slurm_settings(slurm):
        return run_audit_command(args.config, args.policy, args.quick, args.out, args.jobs, args.backend,
                                 args.address, args.cache, progress=not args.quiet, device=args.device)


def _cmd_report(args: argparse.Namespace) -> int:
    from collafuse.benchmarks.audit.command import run_report_command

    return run_report_command(args.audit_dir)


def _cmd_train(args: argparse.Namespace) -> int:
    from collafuse.api import train_run  # the same path as collafuse.api.train: defenses → hooks → run

    out, left = train_run(args.config, Path(args.out), progress=not args.quiet)
    print(f"run written to {out}")
    _warn_uncovered(left)  # after the run, so bad input still gets exactly one line
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from collafuse.runs import Run, generate, image_grid, save_png, sample_labels, to_uint8

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".npz"):
        raise CollafuseError(f"--out must end in .png or .npz, got {out.name!r}")
    if not 1 <= args.n <= MAX_SAMPLES:
        raise CollafuseError(f"-n must be in 1..{MAX_SAMPLES}, got {args.n}")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise CollafuseError(f"--seed must be in 0..2**63-1, got {args.seed}")
    check_output(out, "--out")  # before any work: free name, a folder above it, writable, not full
    run = Run.load(args.run, device=args.device)
    if not 0 <= args.client < len(run.client_models):
        raise CollafuseError(f"--client must be in 0..{len(run.client_models) - 1}, got {args.client}")
    d = run.config.data
    needed = args.n * d.channels * d.image_size * d.image_size * 4
    if needed > MAX_SAMPLE_BYTES:  # the samples are held in memory (float32) before they are written
        raise CollafuseError(f"-n {args.n} images of {d.channels}×{d.image_size}×{d.image_size} take "
                             f"{needed / 2**30:.3g} GiB; at most {MAX_SAMPLE_BYTES >> 30} GiB: draw them in several files")
    missing = [name for name, model, needed in (
        ("server", run.server_model, run.t_hand < run.schedule.T),
        (f"client_{args.client}", run.client_models[args.client], run.t_hand > 0)) if needed and model is None]
    if missing:
        raise CollafuseError(f"{args.run}: the run has no {missing[0]} model (imported without it); "
                             "collaborative sampling needs the server's and the client's")
    seed = run.config.seed if args.seed is None else args.seed
    images = to_uint8(generate(run, args.client, args.n, seed, progress=not args.quiet))
    created = [p for p in reversed(out.parents) if not p.exists()]  # removed again if the write fails
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}{out.suffix}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".png":
            rows = max(1, min(run.num_classes or 10, args.n))
            save_png(image_grid(images, rows=-(-args.n // -(-args.n // rows))), tmp, scale=2)
        else:
            labels = sample_labels(args.n, run.num_classes)
            arrays = {"images": images}
            if labels is not None:
                arrays["labels"] = labels.numpy()
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        tmp.rename(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    print(f"{args.n} samples written to {out}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from collafuse.api import MembershipShiftWarning, import_deployment

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MembershipShiftWarning)
        out = import_deployment(args.manifest, args.out)
    print(f"run written to {out}")
    for w in caught:
        if issubclass(w.category, MembershipShiftWarning):
            print(f"collafuse: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from collafuse.api import export_run

    out = export_run(args.run, args.out)
    print(f"deployment written to {out} (manifest: {out / 'manifest.yaml'})")
    return 0


def _device_option(parser: argparse.ArgumentParser) -> None:
    """``--device {auto,cpu,cuda}`` (DESIGN §10): overrides the config's device; an unavailable CUDA exits 2."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="where models and attacks run (default: auto, CUDA when available)")


def _slurm_arguments(parser: argparse.ArgumentParser) -> None:
    """``--backend slurm``'s options (an audit's grid may set them in its ``slurm:`` block; these win)."""
    parser.add_argument("--slurm-partition", default=None, help="SLURM partition (default: the cluster's)")
    parser.add_argument("--slurm-time", default=None, help="time limit per SLURM job: minutes or [D-]HH:MM:SS "
                        "(default 60 minutes)")
    parser.add_argument("--slurm-gpus-per-task", type=int, default=None, help="GPUs per SLURM job (default 0)")
    parser.add_argument("--slurm-array-size", type=int, default=None,
                        help="array jobs running at once (default: SLURM's limit)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="collafuse", description="Split-diffusion training and leakage audits.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a split-diffusion system and record the server's view")
    train.add_argument("--config", help="YAML config (default: the embedded digits config)")
    train.add_argument("--out", required=True, help="run folder to create (must not exist or be empty)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    sample = sub.add_parser("sample", help="generate images with a trained run (server → client)")
    sample.add_argument("--run", required=True, help="run folder written by 'collafuse train'")
    sample.add_argument("-n", type=int, required=True, help="number of images")
    sample.add_argument("--out", required=True, help="output .png (grid) or .npz (images, labels)")
    sample.add_argument("--client", type=int, default=0, help="which client finishes the chain (default 0)")
    sample.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's seed)")
    sample.add_argument("--quiet", action="store_true", help="no progress bar")
    _device_option(sample)
    sample.set_defaults(func=_cmd_sample)

    attack = sub.add_parser("attack", help="attack a trained run")
    attack_sub = attack.add_subparsers(dest="attack_kind", required=True)
    rec = attack_sub.add_parser("reconstruct", help="rebuild client images from the server's view (T1)")
    rec.add_argument("--run", required=True)
    rec.add_argument("--attacks", default=None, help="comma-separated attack names (default: all)")
    rec.add_argument("--out", default=None, help="output JSON (default: RUN_DIR/../<run>-reconstruct.json)")
    rec.add_argument("--quiet", action="store_true")
    _device_option(rec)
    rec.set_defaults(func=_cmd_attack_reconstruct)
    mem = attack_sub.add_parser("membership", help="membership inference on payloads, models and samples")
    mem.add_argument("--run", required=True)
    mem.add_argument("--attacks", default=None, help="comma-separated attack names (default: all that apply)")
    mem.add_argument("--targets", default=None, help="comma-separated from server,client,samples,payload,coclient (default: all)")
    mem.add_argument("--out", default=None, help="output JSON")
    mem.add_argument("--references", type=int, default=None,
                     help="reference client models per target for lira / rmia (>= 2; default 4)")
    mem.add_argument("--jobs", type=int, default=1,
                     help="reference models (lira / rmia) trained side by side (default 1: one after another)")
    mem.add_argument("--backend", default="local",
                     help="where reference models train: local (processes, default), ray or slurm")
    mem.add_argument("--address", default=None, help="Ray cluster address HOST:PORT (default: start a local Ray)")
    _slurm_arguments(mem)
    mem.add_argument("--quiet", action="store_true")
    _device_option(mem)
    mem.set_defaults(func=_cmd_attack_membership)

    audit = sub.add_parser("audit", help="sweep cut points x defenses, score every threat, write the report")
    audit.add_argument("--config", help="grid YAML (default: the embedded default grid)")
    audit.add_argument("--policy", help="policy YAML (default: the embedded default policy)")
    audit.add_argument("--quick", action="store_true", help="the small embedded grid (about a minute)")
    audit.add_argument("--out", required=True, help="audit folder (new, empty, or an earlier audit to resume)")
    audit.add_argument("--jobs", type=int, default=None, help="cells run side by side (default: CPU count)")
    audit.add_argument("--backend", default="local", help="local (processes, default), ray or slurm")
    audit.add_argument("--address", default=None, help="Ray cluster address HOST:PORT (default: start a local Ray)")
    _slurm_arguments(audit)
    audit.add_argument("--cache", default=None, help="cache of trained systems and attacker models "
                       "(default: $COLLAFUSE_CACHE/audit or ~/.cache/collafuse/audit)")
    audit.add_argument("--quiet", action="store_true", help="no progress bars")
    _device_option(audit)
    audit.set_defaults(func=_cmd_audit)

    imp = sub.add_parser("import", help="turn a deployment trained elsewhere (a manifest) into a run folder")
    imp.add_argument("manifest", help="deployment manifest (YAML; paths relative to it)")
    imp.add_argument("--out", required=True, help="run folder to create (must not exist or be empty)")
    imp.set_defaults(func=_cmd_import)
    exp = sub.add_parser("export", help="write a run as a deployment: manifest, models, transcript, data")
    exp.add_argument("run", help="run folder")
    exp.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    exp.set_defaults(func=_cmd_export)

    report = sub.add_parser("report", help="rebuild report.html and report.md from an audit folder")
    report.add_argument("audit_dir")
    report.set_defaults(func=_cmd_report)
    return parser


def _write_error(exc: BaseException) -> tuple[str, str | None, str] | None:
    """(verb, path, reason) when ``exc`` is a file system refusing a write (full, read-only, no permission).

    safetensors reports its own I/O errors as ``SafetensorError: ... (os error 28) at path "..."``.
    """
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        return WRITE_ERRNOS[exc.errno], exc.filename, exc.strerror or os.strerror(exc.errno)
    if type(exc).__name__ == "SafetensorError":
        m = re.search(r"os error (\d+)\)", str(exc))
        if m and int(m.group(1)) in WRITE_ERRNOS:
            code = int(m.group(1))
            where = re.search(r'at path "([^"]*)"', str(exc))
            path = Path(where.group(1)) if where else None
            if path is not None and path.name.startswith(".tmp"):  # safetensors' own temporary file
                path = path.parent
            return WRITE_ERRNOS[code], None if path is None else str(path), os.strerror(code)
    return None


_PARTIAL = re.compile(r"^\.(.+?)\.partial-\d+(\.[A-Za-z0-9]+)?$")


def _intended(path: str) -> str:
    """The path the user asked for, not the temporary sibling it was being written to (``.x.partial-<pid>``)."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        m = _PARTIAL.match(part)
        if m:
            return str(Path(*parts[:i], m.group(1)))
    return path


def _one_line(text: str, limit: int = 2000) -> str:
    text = " ".join(str(text).split("\n")).replace("\r", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error(message: str) -> int:
    print(f"collafuse: error: {_one_line(message)}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        return _error(str(exc))
    try:
        with sigterm_raises():  # SIGTERM → Terminated: temporaries (.partial-<pid>) and locks are cleaned up
            return args.func(args)
    except CollafuseError as exc:
        return _error(str(exc))
    except Exception as exc:
        refused = _write_error(exc)
        if refused is None:
            raise  # anything else is a bug: keep its traceback
        verb, path, reason = refused
        where = _intended(path) if path else getattr(args, "out", None) or getattr(args, "audit_dir", None) or "the output folder"
        if not path and args.command == "audit":  # a worker's error names no file: the folder or the cache
            from collafuse.benchmarks.audit.command import default_cache

            where = f"{args.out} or the cache {args.cache or default_cache()}"
        if args.command == "audit" and Path(args.out).is_dir():
            after = f"cells finished so far are kept in {args.out}; free space and run the same command again to resume"
        else:
            after = "nothing was written"
        return _error(f"{verb} {where}: {reason}; {after}")
    except KeyboardInterrupt:
        print("collafuse: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        if args.command == "audit":
            after = f"finished cells are kept in {args.out}; run the same command again to resume"
        else:
            after = "nothing was written"
        print(f"collafuse: terminated (SIGTERM); {after}", file=sys.stderr)
        return EXIT_TERMINATED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
