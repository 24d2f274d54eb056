"""Side by side: ``bench/_read_cpu.py`` run alternately against two source trees.

The machine is shared and its load drifts, so a before/after comparison is only fair when
both sides run in the same minutes: each round runs the benchmark once with ``--before``'s
``src`` first on ``PYTHONPATH`` and once with ``--after``'s, in alternating order, and the
medians of the figure are compared. Make the "before" tree with, for example::

    mkdir -p /tmp/base && git archive HEAD src | tar -x -C /tmp/base

    python bench/_ab_cpu.py --before /tmp/base --after . --rounds 4 -- --reads 3000

Everything after ``--`` goes to ``_read_cpu.py`` unchanged (``--search``, ``--create``,
``--load 2``...). The last line is JSON: the per-round figures, both medians and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
_FIGURES = ("cpu_ms_per_read", "cpu_ms_per_resource")


def run_once(tree: Path, extra: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str((tree / "src").resolve())}
    done = subprocess.run(
        [sys.executable, str(HERE / "_read_cpu.py"), *extra],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{tree}: failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(lines[-1])
    for figure in _FIGURES:
        if figure in result:
            return float(result[figure])
    raise SystemExit(f"{tree}: no CPU figure in {result}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("extra", nargs="*", help="arguments for _read_cpu.py (after --)")
    args = parser.parse_args()
    before: list[float] = []
    after: list[float] = []
    for round_ in range(args.rounds):
        sides = [(args.before, before), (args.after, after)]
        if round_ % 2:
            sides.reverse()
        for tree, figures in sides:
            figures.append(run_once(tree, args.extra))
        print(f"round {round_}: before {before[-1]} after {after[-1]}", file=sys.stderr)
    b, a = statistics.median(before), statistics.median(after)
    print(
        json.dumps(
            {
                "args": args.extra,
                "before": before,
                "after": after,
                "median_before": round(b, 4),
                "median_after": round(a, 4),
                "ratio": round(a / b, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
