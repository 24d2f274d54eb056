"""Side by side: ``bench/_read_cpu.py`` run alternately against two source trees.

The machine is shared and its load drifts, so a before/after comparison is only fair when
both sides run in the same minutes: each round runs the benchmark once with ``--before``'s
``src`` first on ``PYTHONPATH`` and once with ``--after``'s, in alternating order, and the
medians of the figure are compared. Make the "before" tree with, for example::

    mkdir -p /tmp/base && git archive HEAD src | tar -x -C /tmp/base

    python bench/_ab_cpu.py --before /tmp/base --after . --rounds 4 -- --reads 3000

Everything after ``--`` goes to ``_read_cpu.py`` unchanged (``--search``, ``--create``,
``--load 2``...). The last line is JSON: for the CPU figure (and ``p50_ms``/``p99_ms`` where
reported) the per-round values, both medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_FIGURES = ("cpu_ms_per_read", "cpu_ms_per_resource")


def run_once(tree: Path, extra: list[str]) -> dict[str, Any]:
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
    result: dict[str, Any] = json.loads(lines[-1])
    if not any(figure in result for figure in _FIGURES):
        raise SystemExit(f"{tree}: no CPU figure in {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("extra", nargs="*", help="arguments for _read_cpu.py (after --)")
    args = parser.parse_args()
    before: list[dict[str, Any]] = []
    after: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        sides = [(args.before, before), (args.after, after)]
        if round_ % 2:
            sides.reverse()
        for tree, results in sides:
            results.append(run_once(tree, args.extra))
        print(f"round {round_}: before {before[-1]} after {after[-1]}", file=sys.stderr)
    summary: dict[str, Any] = {"args": args.extra, "rounds": args.rounds}
    for figure in (*_FIGURES, "p50_ms", "p99_ms"):
        if figure not in before[0]:
            continue
        b = statistics.median(r[figure] for r in before)
        a = statistics.median(r[figure] for r in after)
        summary[figure] = {
            "before": [r[figure] for r in before],
            "after": [r[figure] for r in after],
            "median_before": round(b, 4),
            "median_after": round(a, 4),
            "ratio": round(a / b, 3),
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
