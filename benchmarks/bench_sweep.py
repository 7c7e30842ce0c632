"""Sweep efficiency: how much of a sweep's wall time x slots is trial compute.

    uv run launch.py --grid experiments/demo.yaml --out /tmp/bench_sweep   # a fresh sweep
    uv run python benchmarks/bench_sweep.py /tmp/bench_sweep

Reads ``runs.jsonl`` (written by the sweep: each Tune stage's wall time, slots and each
trial's scheduling-to-finish wall time) and the trial folders (train and evaluation seconds
measured inside the trial). Prints, per stage:
  efficiency = sum(trial compute) / (stage wall time x concurrent slots)
  idle slot-seconds per trial = (wall x slots - compute) / trials: everything that is not
  trial compute (worker start and imports, Tune scheduling, slots idle at the end)
  in-trial overhead = Tune's trial wall time - trial compute (cache load, model set-up,
  reporting), median over trials and over trials after the first
Compute is slot-seconds of trial work: a single-site trial's training and evaluation wall time
(one slot); a federation's site tasks (local training, validation, membership audit) and
evaluations, each task's wall time x the part of a slot it held (3 sites sharing 2 one-CPU slots
hold 2/3 each). A federation's coordinating (averaging, checkpoints, accounting) and the sites'
wait for the slowest site count as idle. slots = the cluster's per-trial slots.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def trial_compute(output: Path, key: str) -> float:
    tdir = output / "trials" / key
    info = json.loads((tdir / "trial.json").read_text())
    evals = [json.loads(p.read_text())["eval_seconds"] for p in tdir.glob("eval/*/eval.json")]
    train = info.get("site_task_seconds", info["train_seconds"])  # a federation: its site tasks
    return (float(train) + sum(evals)) * info.get("slot_share", 1.0)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    output = Path(sys.argv[1])
    runs = [json.loads(line) for line in (output / "runs.jsonl").read_text().splitlines() if line]
    print(f"command: uv run python benchmarks/bench_sweep.py {output}\n")
    print(
        "| stage | trials | slots | wall s | compute s | efficiency | idle slot-s per trial "
        "| in-trial overhead s (median) | after the first |"
    )
    print("|---" * 9 + "|")
    for run in runs:
        trials = run["trials"]
        if not trials:
            continue
        compute = {t["key"]: trial_compute(output, t["key"]) for t in trials}
        total = sum(compute.values())
        efficiency = total / (run["wall_seconds"] * run["slots"])
        overhead = [t["wall_seconds"] - compute[t["key"]] for t in trials]
        later = overhead[1:] or overhead
        print(
            f"| {run['stage']} | {len(trials)} | {run['slots']:g} | {run['wall_seconds']:.0f} | "
            f"{total:.0f} | {efficiency:.2f} | "
            f"{(run['wall_seconds'] * run['slots'] - total) / len(trials):.1f} | "
            f"{statistics.median(overhead):.1f} | {statistics.median(later):.1f} |"
        )


if __name__ == "__main__":
    main()
