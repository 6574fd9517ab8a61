"""Wall time of `collafuse audit` against its targets (issue 6): default ≤ 15 min, --quick ≤ 2 min.

    python -m collafuse.benchmarks.perf_audit            # the quick grid: cold, warm cache, resume
    python -m collafuse.benchmarks.perf_audit --default  # the default grid, cold (about 13 minutes)

Each audit runs as its own `collafuse audit` process with a fresh output folder. "Cold"
uses an empty cache (trains every system, the attacker's denoiser and the evaluation
classifier); "warm cache" reuses the cache but recomputes every cell; "resume" reruns
the finished folder (nothing to compute: the cost of validation, the table and the
report). Printed: seconds, the ratio to the target, and warm/cold.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = {"quick": 120.0, "default": 900.0}


def timed_audit(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "collafuse.cli", "audit", *args, "--quiet"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode not in (0, 1):
        sys.exit(f"audit failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    print("   ", proc.stdout.strip().splitlines()[0])
    return seconds, proc.returncode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--default", action="store_true", help="the default grid (cold only) instead of --quick")
    parser.add_argument("--jobs", type=int, default=None, help="passed to collafuse audit (default: CPU count)")
    args = parser.parse_args(argv)
    grid = "default" if args.default else "quick"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        common = ["--cache", str(root / "cache")] + (["--jobs", str(args.jobs)] if args.jobs else [])
        flags = [] if args.default else ["--quick"]
        cold, _ = timed_audit([*flags, "--out", str(root / "cold"), *common], env)
        target = TARGET_SECONDS[grid]
        print(f"{grid} audit, cold cache: {cold:.1f} s; target {target:.0f} s; ratio {cold / target:.2f}")
        if args.default:
            return
        warm, _ = timed_audit([*flags, "--out", str(root / "warm"), *common], env)
        print(f"{grid} audit, warm cache (every cell recomputed, no training): {warm:.1f} s; warm/cold {warm / cold:.2f}")
        resume, _ = timed_audit([*flags, "--out", str(root / "cold"), *common], env)
        print(f"{grid} audit, resume of a finished folder: {resume:.1f} s; resume/cold {resume / cold:.2f}")


if __name__ == "__main__":
    main()
