"""Benchmark: the paper's grid at (a fraction of) its real sizes, through the real pipeline.

Why: everything so far ran on the demo (3 sites of ~670 images). The paper's grid is five
sites with 15k-153k training and 3k-40k test images, epsilons {1, 3, 6, 10, inf} x 3 seeds and
a public pretraining; before anyone runs it we need to know which stage stops scaling. This
script builds that grid's shape at ``--scale`` of the paper's image counts (paper-shaped
synthetic sites: ``synthetic.PAPER_SITES``: test shares, images per patient, sex/age mix,
label prevalences), at 16 px with the cheap ``smallcnn`` and 1 epoch, and runs
``launch.py --grid`` on it: manifests, cache build (Ray Data), planning, the pretraining, every
trial kind (standard, the clip_only control, a five-site federation, one audit twin per
epsilon), evaluation of every model on every target with 1,000 patient-bootstrap
resamples, aggregation, comparisons and the report; then ``export``, ``audit`` and ``status``.

How stages are timed (say which in any note that quotes the numbers):

* ``sweep:*`` rows: the real ``launch.py --grid`` process, cut at its own log lines (each line
  is time-stamped here on arrival; ``[data]``, ``[ray]``, ``[cache]``, ``[sweep] running``,
  ``cells done``, ``[sweep] table``). Peak RSS per stage from sampling /proc every 0.5 s:
  the driver, the largest single Ray worker (``ray::*`` processes) and the sum over workers
  (RSS counts pages shared between workers once per worker).
* ``direct:*`` rows: each stage function called again on the finished output in a fresh
  process (``--stage NAME``), so stages that the sweep runs back to back (aggregation,
  comparisons, report) are timed apart; peak RSS is that process's ``ru_maxrss``. With
  ``--profile`` each runs under cProfile (``<work>/profiles/<stage>.txt``).
* ``inside trials``: training and evaluation seconds from the trials' own records, by kind.

Several ``--scale`` values run one after the other in one invocation and the last table puts
each stage's growth ratio side by side (wall time ratio / data ratio: ~1 = linear).

    uv run python benchmarks/bench_paper_scale.py --scale 0.01 0.05 --work /tmp/ps --profile
    uv run python benchmarks/bench_paper_scale.py --compare /tmp/ps/s0.01/bench.json /tmp/ps/s0.05/bench.json
    uv run python benchmarks/bench_paper_scale.py --print-grid 1.0 > experiments/paper_scale.yaml
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402


@dataclass(frozen=True)
class PaperDomain:
    """One institution: train + test images of the paper (frontal), the synthetic site that
    mimics it and the most images one patient has (mean = (max + 1) / 2)."""

    name: str
    site: str
    images: int
    images_per_patient: int
    delta: float | None = None


#: paper.md: VDR 15,000 + 3,000; C14 86,524 + 25,596 (30,805 patients: 3.6 per patient);
#: CPT 128,356 + 29,320 (frontal, ~3 per patient); UKA ~153.5k + 39,824 (images per patient
#: not published: 3.5 assumed); PCH ~88k + 22,045 (PadChest ~1.6 frontal images per patient);
#: MIMIC-CXR about 240k frontal images, ~3.7 per patient (unverified), pretraining only.
#: Deltas from the authors' config history (VDR: the default).
PAPER: tuple[PaperDomain, ...] = (
    PaperDomain("MIMIC", "mimic", 240_000, 6),
    PaperDomain("VDR", "vdr", 18_000, 1),
    PaperDomain("C14", "c14", 112_120, 6, 1e-5),
    PaperDomain("CPT", "cpt", 157_676, 5, 7e-6),
    PaperDomain("UKA", "uka", 193_324, 6, 1e-6),
    PaperDomain("PCH", "pch", 110_045, 2, 1e-5),
)
SITES = [d.name for d in PAPER if d.name != "MIMIC"]
FILE_SIZE = 32  # PNG side written (the generator's minimum); the grid trains at 16 px
IMAGE_SIZE = 16
TICKS = os.sysconf("SC_CLK_TCK")
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # Ray's services, not workers


def n_patients(d: PaperDomain, scale: float) -> int:
    return max(40, round(scale * d.images / ((d.images_per_patient + 1) / 2)))


def grid_dict(scale: float, work: Path) -> dict:
    """The paper's grid (paper.yaml) on paper-shaped synthetic sites at ``scale``."""
    domains = []
    for d in PAPER:
        options = {"site": d.site, "n_patients": n_patients(d, scale),
                   "images_per_patient": d.images_per_patient, "file_size": FILE_SIZE}  # fmt: skip
        entry = {"name": d.name, "kind": "synthetic", "root": str(work / "data" / d.name),
                 "options": options}  # fmt: skip
        if d.delta:
            entry["delta"] = d.delta
        domains.append(entry)
    batches = {"logical_batch": 128, "physical_batch": 64}
    return {
        "name": "paper_scale",
        "output": str(work / "out"),
        "cache_dir": str(work / "cache"),
        "domains": domains,
        "sources": list(SITES),
        "targets": list(SITES),
        "pretrain": {"domain": "MIMIC", "epochs": 1, "lr": 0.001, **batches},
        "epsilons": [1, 3, 6, 10, "inf"],
        "controls": ["clip_only"],
        "delta": 1.0e-5,
        "seeds": [0, 1, 2],
        "model": "smallcnn",
        "training": {
            "init": "pretrain",
            "epochs": 1,
            "lr": 0.001,
            "max_grad_norm": 1.5,
            "accountant": "prv",
            **batches,
        },  # fmt: skip
        "federations": [{"name": "FED", "sites": list(SITES), "rounds": 1, "local_epochs": 1}],
        "preprocessing": {"image_size": IMAGE_SIZE, "geometry": "stretch", "equalize": True},
        "resources": {"cpu": 1, "gpu": 0},
        "evaluation": {"n_boot": 1000, "age_bins": [0, 40, 70, "inf"]},
        "audit": {"canaries": 1000, "kind": "gradient", "cells": "per_epsilon"},
    }


def write_grid(scale: float, work: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    path = work / "grid.yaml"
    path.write_text(_yaml(grid_dict(scale, work)))
    return path


def _yaml(obj: dict) -> str:
    return yaml.safe_dump(obj, sort_keys=False, width=100, default_flow_style=None)


# ------------------------------------------------------------------------------ generation


def _generate_one(entry: dict) -> dict:
    """Generate one domain (in a pool process) and measure it."""
    from privdom_ray.domains.synthetic import SyntheticOptions, build

    t0 = time.perf_counter()
    df = build(Path(entry["root"]), SyntheticOptions(**entry["options"]))
    seconds = time.perf_counter() - t0
    images = Path(entry["root"]) / "images"
    disk = apparent = 0
    for f in os.scandir(images):
        st = f.stat()
        disk += st.st_blocks * 512
        apparent += st.st_size
    counts = df["split"].value_counts().to_dict()
    return {"domain": entry["name"], "images": len(df), "patients": df["patient_id"].nunique(),
            "train": counts.get("train", 0), "val": counts.get("val", 0),
            "test": counts.get("test", 0), "seconds": seconds,
            "disk_bytes": disk, "file_bytes": apparent}  # fmt: skip


def generate(grid: dict, jobs: int) -> tuple[list[dict], float]:
    """All domains, largest first over ``jobs`` processes; (per-domain rows, wall seconds)."""
    entries = sorted(grid["domains"], key=lambda e: -e["options"]["n_patients"])
    t0 = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        rows = list(pool.map(_generate_one, entries))
    return rows, time.perf_counter() - t0


# ------------------------------------------------------------------ process-tree sampling


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, start time, own CPU clock ticks) of every process (/proc/*/stat)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2 :].split()
        table[int(name)] = (int(f[1]), int(f[19]), int(f[11]) + int(f[12]))
    return table


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return ""


class TreeSampler(threading.Thread):
    """Samples the RSS of a process and all its descendants every ``every`` seconds: the
    driver, Ray workers (``ray::`` process titles but the agents) and Ray's own services
    (GCS, raylet, dashboard, agents), apart; and the CPU time of every process of the tree
    seen so far (its own user + system time at its last sample: a process living less than
    one interval, or its last interval, is missed)."""

    def __init__(self, root_pid: int, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.every = root_pid, every
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self._ticks: dict[tuple[int, int], int] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(self.sample())
            self.stop.wait(self.every)

    def sample(self) -> dict:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        tree, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        workers, system = [], 0
        for pid in tree[1:]:
            rss = _rss_kib(pid)
            cmd = _cmd(pid)
            if cmd.startswith("ray::") and not cmd.startswith(RAY_AGENTS):
                workers.append(rss)
            else:
                system += rss
        for pid in tree:  # CPU of every process ever seen, kept after it exits
            if pid in table:
                self._ticks[(pid, table[pid][1])] = table[pid][2]
        ticks = sum(self._ticks.values())
        return {"t": time.time(), "driver": _rss_kib(self.root), "worker_max": max(workers, default=0),
                "workers_sum": sum(workers), "n_workers": len(workers), "system": system,
                "cpu_s": ticks / TICKS, "load": os.getloadavg()[0]}  # fmt: skip


# -------------------------------------------------------------------------------- the sweep


@dataclass
class SweepRun:
    t_start: float
    t_end: float
    returncode: int
    lines: list[tuple[float, str]]
    samples: list[dict]


def run_sweep(grid_path: Path, log_path: Path) -> SweepRun:
    """``launch.py --grid`` in a child process; each output line time-stamped on arrival."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "launch.py"), "--grid", str(grid_path)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT)  # fmt: skip
    sampler = TreeSampler(proc.pid)
    sampler.start()
    lines = []
    with open(log_path, "w") as log:
        for line in proc.stdout:
            now = time.time()
            lines.append((now, line.rstrip("\n")))
            log.write(f"{now - t0:9.2f} {line}")
            log.flush()
    rc = proc.wait()
    sampler.stop.set()
    sampler.join()
    return SweepRun(t0, time.time(), rc, lines, sampler.samples)


_MARKS = [  # (stage that ENDS at the first/last line matching, pattern, first or last match)
    ("start + manifests", r"^\[data\]", "last"),
    ("ray init", r"^\[ray\] resources", "first"),
    ("caches (Ray Data)", r"^\[cache\]", "last"),
    ("planning", r"^\[sweep\] \S+: \d+ cells", "first"),
    ("pretraining (Tune)", r"^\[sweep\] running \d+ cells", "first"),
    ("trials (Tune)", r"^\[sweep\] \d+/\d+ cells done", "last"),
    ("shutdown + aggregate + comparisons + report", r"^\[sweep\] table:", "first"),
    ("rest", r"^\[sweep\] wall time", "first"),
]


def sweep_stages(run: SweepRun) -> list[dict]:
    """Stage rows (wall, peak RSS by role) from the sweep's own log lines."""
    rows, t_prev = [], run.t_start
    for stage, pattern, which in _MARKS:
        hits = [t for t, line in run.lines if re.search(pattern, line)]
        if not hits:
            continue
        t_end = hits[0] if which == "first" else hits[-1]
        rows.append(_stage_row(f"sweep: {stage}", t_prev, t_end, run.samples))
        t_prev = t_end
    rows.append(_stage_row("sweep: exit", t_prev, run.t_end, run.samples))
    rows.append(_stage_row("sweep: total", run.t_start, run.t_end, run.samples))
    return rows


def _stage_row(name: str, t0: float, t1: float, samples: list[dict]) -> dict:
    """Wall seconds, CPU seconds of the process tree (between the samples around the stage),
    peak RSS by role, mean load average."""
    inside = [s for s in samples if t0 - 0.25 <= s["t"] <= t1 + 0.25] or [{}]
    peak = {k: max(s.get(k, 0) for s in inside) for k in ("driver", "worker_max", "workers_sum")}
    before = [s for s in samples if s["t"] <= t0 + 0.25][-1:] or samples[:1] or [{}]
    after = [s for s in samples if s["t"] >= t1 - 0.25][:1] or samples[-1:] or [{}]
    cpu = after[0].get("cpu_s", 0.0) - before[0].get("cpu_s", 0.0)
    load = [s["load"] for s in inside if "load" in s]
    return {"stage": name, "seconds": t1 - t0, "cpu_s": cpu,
            "driver_mib": peak["driver"] / 1024, "worker_max_mib": peak["worker_max"] / 1024,
            "workers_sum_mib": peak["workers_sum"] / 1024,
            "load": sum(load) / len(load) if load else float("nan")}  # fmt: skip


def manifest_seconds(run: SweepRun) -> dict[str, float]:
    """Per-domain manifest build seconds from the ``[data]`` lines."""
    out = {}
    for _, line in run.lines:
        m = re.match(r"^\[data\] (\S+) .*\((\d+\.\d+)s\)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def cache_seconds(run: SweepRun) -> dict[str, tuple[int, float]]:
    """Per-domain (images decoded, seconds): the built time a ``[cache]`` line reports, else
    (the pretraining entry) the time since the previous line of the cache stage."""
    out, t_prev = {}, None
    for t, line in run.lines:
        if line.startswith("[ray] resources"):
            t_prev = t
        m = re.match(r"^\[cache\] (\S+)(?: \(pretraining\))?: (\d+) images decoded", line)
        if not m or t_prev is None:
            continue
        built = re.search(r"built in (\d+\.\d+)s", line)
        out[m.group(1)] = (int(m.group(2)), float(built.group(1)) if built else t - t_prev)
        t_prev = t
    return out


# --------------------------------------------------------------------- stages, called directly


def _keys_and_targets(out: Path) -> tuple[list[str], list]:
    from privdom_ray.atomic import read_json
    from privdom_ray.stats import results

    plan = read_json(out / "plan.json")
    return [c["key"] for c in plan["cells"]], results.planned_targets(out)


def stage_manifests(grid_path: Path, out: Path) -> None:
    from privdom_ray import checks, grid

    checks.build_manifests(grid.load_grid(grid_path), log=lambda _m: None)


def stage_planning(grid_path: Path, out: Path) -> None:
    """Trial specs and cells of the whole grid against the finished store (a resume's plan)."""
    from privdom_ray import cache, checks, grid, kinds, planning
    from privdom_ray.kinds.pretrain import pretraining_trial
    from privdom_ray.store import TrialStore

    spec = grid.load_grid(grid_path)
    inputs = checks.check_inputs(spec, log=lambda _m: None, writable=False)
    fps = inputs.fingerprints
    caches = {d.name: str(cache.entry_path(spec.cache_dir, d.name, fps[d.name], spec.preprocessing))
              for d in spec.domains}  # fmt: skip
    pre = pretraining_trial(spec, fps)
    if pre is not None:
        caches[pre.name] = str(
            cache.entry_path(spec.cache_dir, pre.source, fps[pre.source], pre.preprocessing)
        )
    trials = kinds.plan_trials(spec, fps, inputs.n_train)
    planning.plan_cells(spec, trials, TrialStore(spec.output), caches, fps, slots=2,
                        log=lambda _m: None)  # fmt: skip


def stage_evaluate(grid_path: Path, out: Path) -> None:
    """``evaluation.evaluate`` as a trial calls it, for one model on the largest test set (from
    the stored predictions: the model's forward pass is not timed)."""
    import numpy as np

    from privdom_ray import grid
    from privdom_ray.manifest import LABELS
    from privdom_ray.stats import evaluation
    from privdom_ray.store import TrialStore

    spec = grid.load_grid(grid_path)
    store = TrialStore(out)
    keys, _ = _keys_and_targets(out)
    evals = [ev for k in keys if store.valid(k) for ev in store.evaluations(k)]
    ev = max(evals, key=lambda e: e.n_test)
    pred = ev.predictions()
    scores = pred[[f"score_{x}" for x in LABELS]].to_numpy()
    labels = pred[[f"label_{x}" for x in LABELS]].to_numpy()
    e = spec.evaluation
    evaluation.evaluate(
        scores, labels, np.full(len(LABELS), 0.5), LABELS,
        groups=evaluation.subgroup_masks(pred["sex"].to_numpy(), pred["age"].to_numpy(), e.age_bins),
        n_boot=e.n_boot, seed=e.seed, ci=e.ci, clusters=pred["patient_group"].to_numpy(),
        min_positives=e.min_positives, min_negatives=e.min_negatives,
        calibration_bins=e.calibration_bins,
    )  # fmt: skip


def stage_aggregate(grid_path: Path, out: Path) -> None:
    from privdom_ray.stats import results

    keys, targets = _keys_and_targets(out)
    results.aggregate(out, keys, "paper_scale", targets)


def stage_comparisons(grid_path: Path, out: Path) -> None:
    from privdom_ray import grid
    from privdom_ray.stats import comparisons

    spec = grid.load_grid(grid_path)
    keys, targets = _keys_and_targets(out)
    comparisons.write_all(out, comparisons.compute_all(out, keys, spec.evaluation, targets=targets))


def stage_report(grid_path: Path, out: Path) -> None:
    from privdom_ray import report

    report.write_report(out)


def _launch(*argv: str) -> None:
    sys.argv = ["launch.py", *argv]
    sys.path.insert(0, str(ROOT))
    import launch

    rc = launch.main(list(argv))
    if rc not in (0, 1):  # audit exits 1 when it finds a problem: still timed
        raise SystemExit(rc)


def stage_export(grid_path: Path, out: Path) -> None:
    dest = out.parent / "export"
    shutil.rmtree(dest, ignore_errors=True)
    with open(os.devnull, "w") as null:
        sys.stdout = null
        try:
            _launch("export", str(out), "--to", str(dest))
        finally:
            sys.stdout = sys.__stdout__


def stage_audit(grid_path: Path, out: Path) -> None:
    with open(out.parent / "audit.txt", "w") as f:
        sys.stdout = f
        try:
            _launch("audit", str(out))
        finally:
            sys.stdout = sys.__stdout__


def stage_status(grid_path: Path, out: Path) -> None:
    with open(os.devnull, "w") as null:
        sys.stdout = null
        try:
            _launch("status", str(out))
        finally:
            sys.stdout = sys.__stdout__


STAGES = {
    "manifests": stage_manifests,
    "planning": stage_planning,
    "evaluate": stage_evaluate,
    "aggregate": stage_aggregate,
    "comparisons": stage_comparisons,
    "report": stage_report,
    "export": stage_export,
    "audit": stage_audit,
    "status": stage_status,
}


def _stage_main(name: str, grid_path: Path, out: Path, profile: Path | None) -> None:
    """In the child process: run one stage (under cProfile with ``profile``)."""
    fn = STAGES[name]
    if profile is None:
        fn(grid_path, out)
        return
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn, grid_path, out)
    dump = profile.with_suffix(".prof")
    prof.dump_stats(dump)
    text = io.StringIO()
    for order in ("cumulative", "tottime"):
        text.write(f"## {name}: top 40 by {order}\n")
        pstats.Stats(str(dump), stream=text).sort_stats(order).print_stats(40)
    profile.write_text(text.getvalue())


def direct_stage(name: str, grid_path: Path, out: Path, profile_dir: Path | None) -> dict:
    """One stage in a fresh process: wall seconds and that process's peak RSS."""
    cmd = [sys.executable, __file__, "--stage", name, "--grid", str(grid_path), "--out", str(out)]
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
        cmd += ["--profile-to", str(profile_dir / f"{name}.txt")]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    ok = os.waitstatus_to_exitcode(status) == 0
    return {"stage": f"direct: {name}" + ("" if ok else " (FAILED)"), "seconds": seconds,
            "cpu_s": usage.ru_utime + usage.ru_stime, "driver_mib": usage.ru_maxrss / 1024,
            "worker_max_mib": 0.0, "workers_sum_mib": 0.0,
            "load": os.getloadavg()[0]}  # fmt: skip


# ------------------------------------------------------------------------- inside the trials


def trial_breakdown(out: Path) -> list[dict]:
    """Training and evaluation seconds by trial kind, from the trials' own records."""
    from privdom_ray import kinds
    from privdom_ray.store import TrialStore

    store = TrialStore(out)
    keys, _ = _keys_and_targets(out)
    by_kind: dict[str, dict] = {}
    for key in keys:
        record = store.valid(key)
        if record is None:
            continue
        row = by_kind.setdefault(kinds.kind_of(record.spec).name,
                                 {"kind": kinds.kind_of(record.spec).name, "trials": 0,
                                  "train_s": 0.0, "evals": 0, "eval_s": 0.0, "eval_images": 0})  # fmt: skip
        row["trials"] += 1
        row["train_s"] += (record.info.train_seconds or 0.0)
        for ev in store.evaluations(key):
            row["evals"] += 1
            row["eval_s"] += ev.eval_seconds
            row["eval_images"] += ev.n_test
    return sorted(by_kind.values(), key=lambda r: r["kind"])


def _tree_bytes(path: Path) -> tuple[int, int]:
    """(bytes on disk, files) under ``path``."""
    total = files = 0
    if path.is_file():
        return path.stat().st_blocks * 512, 1
    for dirpath, _, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
                files += 1
            except OSError:
                pass
    return total, files


def output_sizes(work: Path) -> list[dict]:
    out = work / "out"
    items = [("data/ (generated PNGs + labels)", work / "data"), ("cache/", work / "cache"),
             ("out/trials/", out / "trials"), ("out/ray_results/", out / "ray_results"),
             ("out/transfer.parquet", out / "transfer.parquet"),
             ("out/comparisons.parquet", out / "comparisons.parquet"),
             ("out/reliability.parquet", out / "reliability.parquet"),
             ("out/report.md", out / "report.md"), ("out/figures/", out / "figures"),
             ("export/", work / "export")]  # fmt: skip
    rows = []
    for name, path in items:
        if not path.exists():
            continue
        size, files = _tree_bytes(path)
        row = {"output": name, "mib": size / 2**20, "files": files}
        if path.suffix == ".md":
            row["lines"] = len(path.read_text().splitlines())
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            row["rows"] = pq.read_metadata(path).num_rows
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ driver


@dataclass
class ScaleResult:
    scale: float
    work: str
    images: dict[str, int] = field(default_factory=dict)
    generation: list[dict] = field(default_factory=list)
    generation_wall: float = 0.0
    stages: list[dict] = field(default_factory=list)
    manifests: dict[str, float] = field(default_factory=dict)
    caches: dict[str, list] = field(default_factory=dict)
    trials: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    returncode: int = 0


def run_scale(scale: float, work: Path, jobs: int, profile: bool, skip_sweep: bool) -> ScaleResult:
    grid_path = write_grid(scale, work)
    grid = yaml.safe_load(grid_path.read_text())
    res = ScaleResult(scale, str(work))
    print(f"## scale {scale}: generating data under {work / 'data'}", flush=True)
    res.generation, res.generation_wall = generate(grid, jobs)
    res.images = {g["domain"]: g["images"] for g in res.generation}
    out = work / "out"
    previous = work / "bench.json"
    if skip_sweep and previous.is_file():  # keep the sweep's rows of the run that made `out`
        old = json.loads(previous.read_text())
        res.stages = [r for r in old["stages"] if r["stage"].startswith("sweep:")]
        res.manifests, res.caches = old["manifests"], old["caches"]
        res.returncode = old["returncode"]
    if not skip_sweep:
        print(
            f"## scale {scale}: launch.py --grid {grid_path} (log: {work / 'sweep.log'})",
            flush=True,
        )
        run = run_sweep(grid_path, work / "sweep.log")
        res.returncode = run.returncode
        res.stages = sweep_stages(run)
        res.manifests = manifest_seconds(run)
        res.caches = {k: list(v) for k, v in cache_seconds(run).items()}
    profile_dir = work / "profiles" if profile else None
    for name in STAGES:
        print(f"## scale {scale}: direct {name}", flush=True)
        res.stages.append(direct_stage(name, grid_path, out, profile_dir))
    res.trials = trial_breakdown(out)
    res.outputs = output_sizes(work)
    (work / "bench.json").write_text(json.dumps(asdict(res), indent=1))
    return res


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render(res: ScaleResult) -> str:
    parts = [f"### scale {res.scale} ({sum(res.images.values())} images; {res.work})"]
    gen = [[g["domain"], g["images"], g["patients"], g["train"], g["val"], g["test"],
            f"{g['seconds']:.1f}", f"{g['images'] / g['seconds']:.0f}",
            f"{g['disk_bytes'] / g['images']:.0f}", f"{g['file_bytes'] / g['images']:.0f}"]
           for g in res.generation]  # fmt: skip
    total = sum(res.images.values())
    parts.append(_table(["domain", "images", "patients", "train", "val", "test", "gen s",
                         "img/s (1 process)", "disk B/img", "file B/img"], gen))  # fmt: skip
    parts.append(f"generation wall {res.generation_wall:.1f} s for {total} images: "
                 f"{total / res.generation_wall:.0f} images/s on the pool")  # fmt: skip
    st = [[s["stage"], f"{s['seconds']:.1f}", f"{s.get('cpu_s', float('nan')):.1f}",
           f"{s['driver_mib']:.0f}", f"{s['worker_max_mib']:.0f}", f"{s['workers_sum_mib']:.0f}",
           f"{s.get('load', float('nan')):.0f}"] for s in res.stages]  # fmt: skip
    parts.append(_table(["stage", "wall s", "CPU s", "driver (or process) peak MiB",
                         "largest worker MiB", "workers sum MiB", "load avg"], st))  # fmt: skip
    if res.manifests or res.caches:
        rows = []
        for d in res.manifests:
            n, sec = res.caches.get(d, (0, float("nan")))
            rows.append([d, f"{res.manifests[d]:.2f}", f"{sec:.1f}", f"{n / sec:.0f}"])
        parts.append(_table(["domain", "manifest s", "cache build s", "decoded img/s"], rows))
    tr = [[t["kind"], t["trials"], f"{t['train_s']:.1f}", t["evals"], f"{t['eval_s']:.1f}",
           f"{t['eval_s'] / max(t['evals'], 1):.2f}", t["eval_images"]] for t in res.trials]  # fmt: skip
    parts.append(_table(["kind", "trials", "train s (sum)", "evaluations", "eval s (sum)",
                         "eval s / evaluation", "test images evaluated"], tr))  # fmt: skip
    outs = [[o["output"], f"{o['mib']:.1f}", o["files"], o.get("rows", o.get("lines", ""))]
            for o in res.outputs]  # fmt: skip
    parts.append(_table(["output", "MiB on disk", "files", "rows / lines"], outs))
    return "\n\n".join(parts)


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.2f}x" if a > 0.05 else "-"


def render_growth(results: list[ScaleResult]) -> str:
    """Each stage's wall and CPU time at every scale, the growth of each against the growth
    of the data (~ data growth = linear; much more = super-linear), and peak memory."""
    base = results[0]
    n0 = sum(base.images.values())
    data = [f"x{sum(r.images.values()) / n0:.1f}" for r in results[1:]]
    header = ["stage"] + [f"wall s @{r.scale}" for r in results]
    header += [f"wall growth ({d} data)" for d in data]
    header += [f"CPU s @{r.scale}" for r in results] + [f"CPU growth ({d})" for d in data]
    header += [f"peak MiB @{r.scale}" for r in results]
    rows = []
    for s in base.stages:
        found = [next((x for x in r.stages if x["stage"] == s["stage"]), None) for r in results]
        if any(f is None for f in found):
            continue
        cpu = [f.get("cpu_s", float("nan")) for f in found]
        row = [s["stage"]] + [f"{f['seconds']:.1f}" for f in found]
        row += [_ratio(found[0]["seconds"], f["seconds"]) for f in found[1:]]
        row += [f"{c:.1f}" for c in cpu] + [_ratio(cpu[0], c) for c in cpu[1:]]
        row += [f"{max(f['driver_mib'], f['worker_max_mib']):.0f}" for f in found]
        rows.append(row)
    blank = [""] * (len(results) * 2 - 1)
    for kind in [t["kind"] for t in base.trials]:
        found = [next((t for t in r.trials if t["kind"] == kind), None) for r in results]
        if any(f is None for f in found):
            continue
        for what in ("train_s", "eval_s"):
            row = [f"inside trials: {kind} {what} (sum)"] + [f"{f[what]:.1f}" for f in found]
            row += [_ratio(found[0][what], f[what]) for f in found[1:]]
            rows.append(row + blank + [""] * len(results))
    return "### growth between scales\n\n" + _table(header, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, nargs="+", default=[0.01],
                    help="fractions of the paper's image counts, run in order")  # fmt: skip
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "paper_scale",
                    help="data, caches and outputs go to <work>/s<scale>/")  # fmt: skip
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="generator processes")
    ap.add_argument("--profile", action="store_true", help="cProfile the direct stages")
    ap.add_argument("--skip-sweep", action="store_true", help="reuse a finished sweep's output")
    ap.add_argument("--compare", type=Path, nargs="+", help="bench.json files: growth table only")
    ap.add_argument("--print-grid", type=float, metavar="SCALE", help="print the grid and exit")
    ap.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    ap.add_argument("--grid", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--profile-to", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:
        _stage_main(args.stage, args.grid, args.out, args.profile_to)
        return 0
    if args.print_grid is not None:
        print(_yaml(grid_dict(args.print_grid, Path("../runs/paper_scale"))), end="")
        return 0
    if args.compare:
        results = [ScaleResult(**json.loads(p.read_text())) for p in args.compare]
    else:
        results = []
        for scale in args.scale:
            res = run_scale(scale, args.work / f"s{scale:g}", args.jobs, args.profile,
                            args.skip_sweep)  # fmt: skip
            print(render(res), flush=True)
            results.append(res)
    for res in results if args.compare else []:
        print(render(res) + "\n")
    print(
        f"Peak RSS of this script: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )
    if len(results) > 1:
        print(render_growth(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
