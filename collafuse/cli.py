"""The command line (DESIGN.md §8). Bad input: one line on stderr, exit code 2, nothing written."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from collafuse.errors import CollafuseError

EXIT_BAD_INPUT = 2


def _hooks_for(config):
    """Defense hooks for a config. Only the command line joins the core and the defenses."""
    from collafuse.training import Hooks

    if not config.defenses:
        return Hooks()
    from collafuse.defenses import build_hooks

    return build_hooks(config.defenses, config)


def _warn_uncovered(config) -> None:
    """Say which threats (DESIGN §3) no configured defense addresses; the run still goes ahead."""
    from collafuse.defenses import uncovered_threats

    left = uncovered_threats(config.defenses, config)
    if left:
        print(f"collafuse: warning: no configured defense addresses {', '.join(left)}", file=sys.stderr)


def _cmd_attack_reconstruct(args: argparse.Namespace) -> int:
    from collafuse.attacks.reconstruction.command import run_command

    return run_command(Path(args.run), args.attacks, args.out, progress=not args.quiet)


def _cmd_attack_membership(args: argparse.Namespace) -> int:
    from collafuse.attacks.membership.command import run_command

    return run_command(Path(args.run), args.attacks, args.targets, args.out, progress=not args.quiet)


def _cmd_audit(args: argparse.Namespace) -> int:
    from collafuse.benchmarks.audit.command import run_audit_command

    return run_audit_command(args.config, args.policy, args.quick, args.out, args.jobs, args.backend, args.address,
                             args.cache, progress=not args.quiet)


def _cmd_report(args: argparse.Namespace) -> int:
    from collafuse.benchmarks.audit.command import run_report_command

    return run_report_command(args.audit_dir)


def _cmd_train(args: argparse.Namespace) -> int:
    from collafuse.config import load_config
    from collafuse.runs import create_run

    config = load_config(args.config)
    hooks = _hooks_for(config)
    out = create_run(config, Path(args.out), hooks=hooks, progress=not args.quiet)
    print(f"run written to {out}")
    _warn_uncovered(config)  # after the run, so bad input still gets exactly one line
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from collafuse.runs import Run, generate, image_grid, save_png, sample_labels, to_uint8

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".npz"):
        raise CollafuseError(f"--out must end in .png or .npz, got {out.name!r}")
    if out.exists():
        raise CollafuseError(f"{out} already exists; choose a new file")
    if args.n < 1:
        raise CollafuseError(f"-n must be at least 1, got {args.n}")
    run = Run.load(args.run)
    if not 0 <= args.client < len(run.client_models):
        raise CollafuseError(f"--client must be in 0..{len(run.client_models) - 1}, got {args.client}")
    seed = run.config.seed if args.seed is None else args.seed
    images = to_uint8(generate(run, args.client, args.n, seed, progress=not args.quiet))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}{out.suffix}")
    try:
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
        raise
    print(f"{args.n} samples written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collafuse", description="Split-diffusion training and leakage audits.")
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
    sample.set_defaults(func=_cmd_sample)

    attack = sub.add_parser("attack", help="attack a trained run")
    attack_sub = attack.add_subparsers(dest="attack_kind", required=True)
    rec = attack_sub.add_parser("reconstruct", help="rebuild client images from the server's view (T1)")
    rec.add_argument("--run", required=True)
    rec.add_argument("--attacks", default=None, help="comma-separated attack names (default: all)")
    rec.add_argument("--out", default=None, help="output JSON (default: RUN_DIR/../<run>-reconstruct.json)")
    rec.add_argument("--quiet", action="store_true")
    rec.set_defaults(func=_cmd_attack_reconstruct)
    mem = attack_sub.add_parser("membership", help="membership inference on payloads, models and samples")
    mem.add_argument("--run", required=True)
    mem.add_argument("--attacks", default=None, help="comma-separated attack names (default: all that apply)")
    mem.add_argument("--targets", default=None, help="comma-separated from server,client,samples,payload (default: all)")
    mem.add_argument("--out", default=None, help="output JSON")
    mem.add_argument("--quiet", action="store_true")
    mem.set_defaults(func=_cmd_attack_membership)

    audit = sub.add_parser("audit", help="sweep cut points x defenses, score every threat, write the report")
    audit.add_argument("--config", help="grid YAML (default: the embedded default grid)")
    audit.add_argument("--policy", help="policy YAML (default: the embedded default policy)")
    audit.add_argument("--quick", action="store_true", help="the small embedded grid (about a minute)")
    audit.add_argument("--out", required=True, help="audit folder (new, empty, or an earlier audit to resume)")
    audit.add_argument("--jobs", type=int, default=None, help="cells run side by side (default: CPU count)")
    audit.add_argument("--backend", default="local", help="local (processes, default) or ray")
    audit.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    audit.add_argument("--cache", default=None, help="cache of trained systems and attacker models "
                       "(default: $COLLAFUSE_CACHE/audit or ~/.cache/collafuse/audit)")
    audit.add_argument("--quiet", action="store_true", help="no progress bars")
    audit.set_defaults(func=_cmd_audit)

    report = sub.add_parser("report", help="rebuild report.html and report.md from an audit folder")
    report.add_argument("audit_dir")
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CollafuseError as exc:
        print(f"collafuse: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("collafuse: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
