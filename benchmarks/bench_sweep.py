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
Compute is slot-seconds of trial work. A single-site trial holds one slot: its training and
evaluation wall time. A federation's site tasks (local training, validation, membership audit)
share its reserved slots (3 sites on 2 one-CPU slots hold 2/3 CPU each, one thread each); its
compute is the time integral of min(site tasks running, slots reserved), so a slot counts as
busy while enough single-threaded tasks run to fill it, and the coordinator's own work
(averaging, checkpoints, accounting) and waits with fewer tasks than slots count as idle. Its
evaluations count wall time x the slot share each held. The "share-weighted" column counts every
site task as wall time x its slot share instead: a lower bound, which misses that the operating
system gives a finished site's CPU share to the sites still training. slots = the cluster's
per-trial slots.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def busy_slot_seconds(tasks: list[list[float]], slots: float) -> float:
    """Integral over time of min(tasks running, slots), for [start, end] intervals."""
    events = sorted([(start, 1) for start, _ in tasks] + [(end, -1) for _, end in tasks])
    total, running, last = 0.0, 0, None
    for t, step in events:
        if last is not None:
            total += min(running, slots) * (t - last)
        running, last = running + step, t
    return total


def trial_compute(output: Path, key: str) -> tuple[float, float, float]:
    """(compute, share-weighted compute) of one trial in slot-seconds, and the slots it held."""
    tdir = output / "trials" / key
    info = json.loads((tdir / "trial.json").read_text())
    share = info.get("slot_share", 1.0)
    evals = share * sum(
        json.loads(p.read_text())["eval_seconds"] for p in tdir.glob("eval/*/eval.json")
    )
    if "site_tasks" not in info:  # a single-site trial: one slot
        return info["train_seconds"] + evals, info["train_seconds"] + evals, 1.0
    tasks, held = info["site_tasks"], info["site_slots"] * share
    weighted = share * sum(end - start for start, end in tasks) + evals
    return busy_slot_seconds(tasks, held) + evals, weighted, held


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    output = Path(sys.argv[1])
    runs = [json.loads(line) for line in (output / "runs.jsonl").read_text().splitlines() if line]
    print(f"command: uv run python benchmarks/bench_sweep.py {output}\n")
    print(
        "| stage | trials | slots | wall s | compute s | efficiency | idle slot-s per trial "
        "| in-trial overhead s (median) | after the first | efficiency, share-weighted |"
    )
    print("|---" * 10 + "|")
    for run in runs:
        trials = run["trials"]
        if not trials:
            continue
        both = {t["key"]: trial_compute(output, t["key"]) for t in trials}
        compute = {k: c for k, (c, _, _) in both.items()}
        total = sum(compute.values())
        capacity = run["wall_seconds"] * run["slots"]
        efficiency = total / capacity
        weighted = sum(w for _, w, _ in both.values()) / capacity
        # wall time not spent computing, per trial (a federation: its compute over its slots)
        overhead = [t["wall_seconds"] - compute[t["key"]] / both[t["key"]][2] for t in trials]
        later = overhead[1:] or overhead
        print(
            f"| {run['stage']} | {len(trials)} | {run['slots']:g} | {run['wall_seconds']:.0f} | "
            f"{total:.0f} | {efficiency:.2f} | "
            f"{(run['wall_seconds'] * run['slots'] - total) / len(trials):.1f} | "
            f"{statistics.median(overhead):.1f} | {statistics.median(later):.1f} | "
            f"{weighted:.2f} |"
        )


if __name__ == "__main__":
    main()
