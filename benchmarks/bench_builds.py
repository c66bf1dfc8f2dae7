"""What a change costs per turn: `bench_turn_overhead.py` on two builds, interleaved in one run.

The earlier build is a git revision checked out into a temporary worktree; each repetition runs
the turn benchmark once in each tree (a fresh process each, the same interpreter), alternating,
so both builds see the same machine. Reported per variant: the median added CPU ms per turn of
each build (each against its own uninstrumented baseline, measured in the same process) and the
ratio after / before with the spread of the per-pair ratios.

    uv run python benchmarks/bench_builds.py --base a1ad5ef [--pairs 5] [--turns 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("lk_observe, no-op spans, paced", "lk_observe, paced", "lk_observe, fast at 10%, paced")


def run_turn_benchmark(tree: Path, turns: int, repeat: int) -> dict[str, float]:
    """Added ms per turn by variant, as the tree's own bench_turn_overhead.py prints them."""
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_turn_overhead.py", "--turns", str(turns),
         "--repeat", str(repeat)],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout  # fmt: skip
    added: dict[str, float] = {}
    for line in out.splitlines():
        for variant in VARIANTS:
            if line.startswith(variant) and line[len(variant) :].split():
                added[variant] = float(line[len(variant) :].split()[1])
    missing = set(VARIANTS) - set(added)
    if missing:
        raise SystemExit(f"{tree}: no figure for {sorted(missing)} in:\n{out}")
    return added


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True, help="the earlier build: a git revision")
    parser.add_argument("--pairs", type=int, default=5, help="interleaved runs of each build")
    parser.add_argument("--turns", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="repetitions inside each run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lk-observe-base-") as scratch:
        base = Path(scratch) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--quiet", str(base), args.base],
            cwd=ROOT,
            check=True,
        )
        try:
            before: list[dict[str, float]] = []
            after: list[dict[str, float]] = []
            for n in range(args.pairs):
                first, second = (base, ROOT) if n % 2 == 0 else (ROOT, base)
                for tree in (first, second):
                    result = run_turn_benchmark(tree, args.turns, args.repeat)
                    (before if tree is base else after).append(result)
                print(f"pair {n + 1}/{args.pairs} done", file=sys.stderr)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT)
    print(
        f"added CPU ms per turn, {args.pairs} interleaved runs of each build "
        f"({args.turns} turns x {args.repeat} repetitions each, medians)"
    )
    print(f"{'variant':<34} {'before':>8} {'after':>8} {'ratio':>6}  ratio range")
    medians: dict[str, tuple[float, float]] = {}
    for variant in VARIANTS:
        old = statistics.median(r[variant] for r in before)
        new = statistics.median(r[variant] for r in after)
        medians[variant] = (old, new)
        ratios = sorted(a[variant] / b[variant] for a, b in zip(after, before, strict=True))
        print(
            f"{variant:<34} {old:>8.3f} {new:>8.3f} {new / old:>5.2f}x  "
            f"{ratios[0]:.2f}-{ratios[-1]:.2f}"
        )
    return medians


if __name__ == "__main__":
    main()
