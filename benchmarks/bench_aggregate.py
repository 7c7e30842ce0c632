"""Benchmark: the sweep's aggregation step (tables + report) on a finished output folder.

Runs the driver's own ``sweep._aggregate`` without Ray on a COPY of a finished folder (it
rewrites the tables, report.md, report.html and figures/ there): the cells and targets of
its ``plan.json``, each cell's spec from its own record. Prints the wall and CPU seconds and
how often the trial store was read (``inspect``: a trial's records verified; ``evaluation``:
one evaluation's record; ``_frame``: one metrics or predictions file), so a change in the
number of reads shows even on a busy machine.

    cp -a runs/demo /tmp/agg && OMP_NUM_THREADS=1 uv run python benchmarks/bench_aggregate.py \
        /tmp/agg experiments/demo.yaml

Measured on the demo (21 cells, 2 busy cores, load 15-40): before the one-pass aggregation
42 trial inspections, 99 evaluation reads, the three tables read back for the report, CPU
8.0-8.1 s; after it 21, 63 and none, CPU 6.7-6.9 s; the tables and report.md are identical.
"""

from __future__ import annotations

import collections
import sys
import time
from pathlib import Path

from privdom_ray import grid, store, sweep
from privdom_ray.cell import TargetRef
from privdom_ray.folder import SweepFolder


def _count(calls: collections.Counter, cls: type, name: str) -> None:
    method = getattr(cls, name)

    def counted(*args, **kwargs):
        calls[name] += 1
        return method(*args, **kwargs)

    setattr(cls, name, counted)


def main(output: str, grid_file: str) -> None:
    out = SweepFolder(Path(output).resolve())
    spec = grid.load_grid(grid_file, output=str(out.root))
    plan = out.read_plan()
    if plan is None:
        raise SystemExit(f"no plan.json in {out.root}: not a finished sweep's folder")
    trials_store = store.TrialStore(out.root)
    trials = [trials_store.valid(c.key).spec for c in plan.cells]
    targets = tuple(TargetRef(t.name, t.fingerprint, "", "", t.data) for t in plan.targets)
    prep = sweep.Prepared(spec, {}, {}, {}, trials, [], targets)
    calls: collections.Counter = collections.Counter()
    for cls, name in ((store.TrialStore, "inspect"), (store.TrialStore, "evaluation"),
                      (store.EvalRecord, "_frame")):  # fmt: skip
        _count(calls, cls, name)
    t0, c0 = time.perf_counter(), time.process_time()
    sweep._aggregate(spec, prep, lambda _line: None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"aggregate + report: wall {wall:.1f} s, cpu {cpu:.1f} s, {len(trials)} cells; "
          f"store reads {dict(sorted(calls.items()))}")  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:3])
