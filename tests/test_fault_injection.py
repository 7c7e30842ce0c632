"""Fault injection: every stored record damaged three ways, a paused driver, a deleted ``done``.

One tiny sweep (6 synthetic sites, each a source at epsilon 2 and inf: 12 trials, each tested
on sites a, b and c; 6 cache entries) is trained once for the module; two rounds then damage
it and run it again. Every record kind (model, ledger, trial record, history, thresholds, each
evaluation file, and the cache's images, rows and meta) is truncated, zero-filled in a block
inside, and deleted, in three different trials or entries: every fault of a round is in a trial,
evaluation or entry of its own, so the faults are independent. Each round checks: ``status``
names every damaged file; the next run exits 0 with a complete table whose stored scores match
the models on disk, predicted afresh on images decoded from the image files (not the cache,
which may be the damaged record). The last round also deletes a DP trial's ``done`` (trained
again, with new noise: none of its old evaluations may survive), and runs under a driver that
is paused (SIGSTOP) past its lease: a second driver takes over and finishes, and the paused
one, resumed, exits 2 having written nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import launch, launch_here
from helpers.grids import tiny_grid
from test_faults import kill_session, session_pids, start, wait_for

ROOT = Path(__file__).resolve().parents[1]
# each test re-runs the sweep (the first also trains the module's): on 2 busy cores a sweep
# took up to 7 minutes, beyond the suite's 600 s default
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1800)]
# the paused driver's lease: its writers stop after 7.5 s, a takeover after 10 s. The holder
# renews every 10/6 s, so even a driver on 2 busy cores keeps it; the test waits (polling the
# lease file's renewal, as a second driver judges it) only until a takeover is allowed
LEASE_S = 10

# 12 trials, so that the records a damaged trial trains again (model, ledger, trial record,
# thresholds) each get three trials of their own in one run; 6 cache entries likewise for the
# images and rows. Only a, b and c are targets: 36 evaluations, not 72.
SITES = ["a", "b", "c", "d", "c14", "cpt"]  # synthetic site profiles, each a domain of its name
GRID = tiny_grid("inject", SITES, n_patients=40, epochs=1, image_size=16, max_failures=2)
GRID["targets"] = ["a", "b", "c"]
N = 12  # trials
# the RDP accountant calibrates the DP trials' noise in about a second, PRV (the default) in 3-7 s
# per fresh trial process and sweep run; which accountant spent the budget is not what is tested
GRID["training"]["accountant"] = "rdp"
HOW = ("truncate", "zero-fill", "delete")


def damage(path: Path, how: str) -> None:
    """Truncate to half, zero a block inside (4 KiB, or a third of a small file), or delete."""
    if how == "delete":
        path.unlink()
        return
    size = path.stat().st_size
    if how == "truncate":
        os.truncate(path, size // 2)
        return
    block = min(4096, max(1, size // 3))
    with open(path, "r+b") as f:
        f.seek(size // 2 - block // 2)
        f.write(b"\0" * block)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    work = tmp_path_factory.mktemp("inject")
    (work / "grid.yaml").write_text(yaml.safe_dump(GRID))
    launch("--grid", "grid.yaml", cwd=work, timeout=900)
    table = pd.read_parquet(work / "out" / "transfer.parquet")
    assert table["trial_key"].nunique() == N
    return work, len(table), reference_images(work)


def trials(work: Path) -> list[Path]:
    """The 12 trial folders in a fixed order (by name): a_eps2, a_epsinf, b_eps2, ..."""
    named = {
        json.loads((p / "trial.json").read_text())["name"]: p
        for p in (work / "out" / "trials").iterdir()
        if (p / "trial.json").is_file()
    }
    return [named[n] for n in sorted(named)]


def entry(work: Path, domain: str) -> Path:
    return next(p for p in (work / "out" / "cache").glob(f"{domain}-*") if "." not in p.name)


def evaluation(trial: Path, target: str) -> Path:
    return next(p for p in (trial / "eval").glob(f"{target}-*") if not p.name.startswith("."))


def reference_images(work: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each target's test split decoded afresh from its image files: (images, labels)."""
    from privdom_ray.domains import build_manifest
    from privdom_ray.grid import load_grid
    from privdom_ray.imaging import load
    from privdom_ray.manifest import LABELS

    spec = load_grid(work / "grid.yaml")
    out = {}
    for d in (d for d in spec.domains if d.name in GRID["targets"]):
        test = build_manifest(d.kind, d.root, d.options, name=d.name).query("split == 'test'")
        images = np.stack([load(p, spec.preprocessing) for p in test["path"]])
        out[d.name] = (images, test[list(LABELS)].to_numpy(dtype=float))
    return out


def check_table(work: Path, rows: int, refs) -> pd.DataFrame:
    """A complete table whose AUCs are those of the models now on disk (predicted afresh)."""
    import torch
    from sklearn.metrics import roc_auc_score

    from privdom_ray.manifest import LABELS
    from privdom_ray.train import load_model, predict

    df = pd.read_parquet(work / "out" / "transfer.parquet")
    assert len(df) == rows and df["trial_key"].nunique() == N
    assert not df.duplicated(["trial_key", "target", "label", "subgroup"]).any()
    compared = 0
    for (key, target), group in df.groupby(["trial_key", "target"]):
        state = torch.load(work / "out" / "trials" / key / "model.pt", weights_only=True)
        model = load_model(group["model"].iloc[0], state, num_outputs=len(LABELS))
        images, labels = refs[target]
        scores = predict(model, images)
        stored = group[group["subgroup"] == "all"].set_index("label")["auc"]
        for j, label in enumerate(LABELS):
            y, keep = labels[:, j], ~np.isnan(labels[:, j])
            if pd.isna(stored.get(label)) or len(set(y[keep])) < 2:
                continue
            fresh = roc_auc_score(y[keep], scores[keep, j])
            assert abs(fresh - stored[label]) < 1e-4, (key, target, label, fresh, stored[label])
            compared += 1
    assert compared >= N * 3  # every evaluation had labels to compare
    return df


def status_of(work: Path) -> str:
    """``launch.py status out``'s report, run in this process: it only reads the folder (no Ray,
    no driver), and a fresh interpreter would cost each call ~5-10 s of imports."""
    return launch_here("status", "out", cwd=work).stdout


def status_names(work: Path, names: list[str]) -> str:
    out = status_of(work)
    for name in names:
        assert name in out, (name, out)
    return out


def inject(work: Path, trial_faults, eval_faults=(), cache_faults=()) -> list[str]:
    """Damage records; returns the file names ``status`` must name."""
    names = []
    folders = trials(work)
    for i, record, how in trial_faults:
        damage(folders[i] / record, how)
        names.append(record)
    for i, target, record, how in eval_faults:
        damage(evaluation(folders[i], target) / record, how)
        names.append(record)
    for domain, record, how in cache_faults:
        damage(entry(work, domain) / record, how)
        names.append(record)
    return names


# the records whose damage trains a trial again, each in 3 trials (12 in all), and the cache
# records other than meta, each in 3 entries (6 in all): one run
RETRAIN_RECORDS = ["model.pt"] * 3 + ["ledger.json"] * 3 + ["trial.json"] * 3
RETRAIN_RECORDS += ["thresholds.json"] * 3
CACHE_FAULTS = [(d, "images.npy", HOW[k]) for k, d in enumerate("abc")]
CACHE_FAULTS += [(d, "rows.parquet", HOW[k]) for k, d in enumerate(SITES[3:])]


def test_damaged_trial_records_and_cache_are_named_and_redone(sweep):
    work, rows, refs = sweep
    before = {p.name: (p / "model.pt").stat().st_mtime_ns for p in trials(work)}
    names = inject(
        work,
        [(i, record, HOW[i % 3]) for i, record in enumerate(RETRAIN_RECORDS)],
        cache_faults=CACHE_FAULTS,
    )
    status = status_names(work, names)
    assert "12 damaged" in status and status.count("cache damaged") == 6, status
    leftover = entry(work, "a").with_name(entry(work, "a").name + ".tmp-424242")
    (leftover / "images.npy").parent.mkdir()  # what a build killed midway leaves
    (leftover / "images.npy").write_bytes(b"\0" * 100)
    proc = launch("--grid", "grid.yaml", cwd=work, timeout=900)
    assert "12 to train" in proc.stdout and proc.stdout.count("building it again") == 6
    assert not leftover.exists() and f"removed {leftover.name}" in proc.stdout
    check_table(work, rows, refs)
    after = {p.name: (p / "model.pt").stat().st_mtime_ns for p in trials(work)}
    assert all(after[k] != before[k] for k in before)  # every damaged trial trained again
    assert len(list((work / "out" / "set_aside").glob("*-damaged-*"))) == N
    assert f"{N} done" in status_of(work)


def test_logs_evaluations_meta_and_done_under_a_driver_paused_past_its_lease(sweep):
    work, rows, refs = sweep
    folders = trials(work)
    models = {p.name: (p / "model.pt").read_bytes() for p in folders}
    names = inject(
        work,
        [(1, "history.json", "truncate"), (2, "history.json", "zero-fill"),
         (3, "history.json", "delete")],
        [(1 + k // 3, "abc"[k % 3], rec, HOW[k % 3])
         for k, rec in enumerate(["eval.json"] * 3 + ["metrics.parquet"] * 3
                                 + ["predictions.parquet"] * 3)],
        [(d, "meta.json", HOW[k]) for k, d in enumerate("abc")],
    )  # fmt: skip
    status_names(work, names)
    (folders[0] / "done").unlink()  # a_eps2: trained again with new noise
    old_evals = {p.name for p in (folders[0] / "eval").iterdir()}
    paused_and_taken_over(work)
    df = check_table(work, rows, refs)
    assert (folders[0] / "model.pt").read_bytes() != models[folders[0].name]  # new noise
    assert (
        {p.name for p in folders[1:]}
        == {  # the others kept their models: logs set aside
            p.name for p in folders[1:] if (p / "model.pt").read_bytes() == models[p.name]
        }
    )
    current = {p.name for p in (folders[0] / "eval").iterdir() if not p.name.startswith(".")}
    assert current == old_evals  # the same targets, evaluated again from the new model
    assert set(df["trial_key"]) == {p.name for p in folders}
    status = status_of(work)
    assert f"{N} done" in status and status.count("history.json set aside earlier") == 3
    assert status.count("cache ok") == 6 and "driver: none running" in status


def paused_and_taken_over(work: Path) -> None:
    """Driver 1 starts the re-run and is paused (SIGSTOP, its Ray workers keep running) past
    its lease once a cell is at work; driver 2 takes over and finishes (exit 0); driver 1,
    resumed, exits 2 and the output folder is byte for byte as driver 2 left it."""
    from privdom_ray import lease

    env = {"PRIVDOM_DRIVER_LEASE_S": str(LEASE_S)}
    args = [sys.executable, str(ROOT / "launch.py"), "--grid", "grid.yaml"]
    first = start(args, work, work / "driver1.log", env=env)
    second = None
    try:
        wait_for(lambda: list((work / "out" / "trials").glob("*/running.json")), 600,
                 "a cell at work", first)  # fmt: skip
        first.send_signal(signal.SIGSTOP)
        # past the lease (what lets a second driver take over: not renewed for LEASE_S); its
        # trials stopped writing at 0.75 x LEASE_S, and the second driver's start adds seconds
        wait_for(lambda: lease.current(work / "out").stale(), 3 * LEASE_S,
                 "the paused driver's lease to lapse")  # fmt: skip
        second = subprocess.run(
            args, cwd=work, capture_output=True, text=True, timeout=900,
            env={**os.environ, **env}, start_new_session=True,
        )  # fmt: skip
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert "took over the output folder" in second.stdout
        snapshot = files(work / "out")
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=120) == 2, (work / "driver1.log").read_text()[-3000:]
        log = (work / "driver1.log").read_text()
        assert "stops here (exit 2)" in log and "lease" in log
        # its orphaned workers, if any were left, would write now: wait until none of its
        # processes is left (then nothing of it can write), or 5 s at most
        deadline = time.monotonic() + 5
        while session_pids(first.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert files(work / "out") == snapshot  # the resumed driver wrote nothing
    finally:
        kill_session(first)


def files(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def as_written_before_checksums(out: Path) -> None:
    """Rewrite a finished output folder into what privdom-ray wrote before checksums
    (commit 10482de, see tests/fixtures/legacy_output): ``done`` = "done", evaluations of
    protocol 3 without checksums or model, cache ``meta.json`` without seal or identity."""
    import shutil

    from privdom_ray import integrity

    for done in out.glob("trials/*/done"):
        done.write_text("done\n")
    for path in out.glob("trials/*/eval/[!.]*/eval.json"):
        body = integrity.unseal(path)
        for k in ("files", "model"):
            body.pop(k)
        path.write_text(json.dumps({**body, "protocol": 3}, indent=2))
    for path in out.glob("cache/*/meta.json"):
        meta = integrity.unseal(path)
        keep = ("domain", "fingerprint", "preprocessing", "n_images", "n_skipped", "built_seconds")
        path.write_text(json.dumps({k: meta[k] for k in keep}, indent=2))
    (out / "outputs.json").unlink()
    shutil.rmtree(out / ".driver-lease")


def test_a_finished_folder_of_the_code_before_checksums_is_upgraded_without_training(sweep):
    work, rows, refs = sweep
    out = work / "out"
    as_written_before_checksums(out)
    models = {p.name: (p / "model.pt").read_bytes() for p in trials(work)}
    mtimes = {p.name: (p / "model.pt").stat().st_mtime_ns for p in trials(work)}
    proc = launch("--grid", "grid.yaml", cwd=work, timeout=900)
    assert f"0 already done, 0 to train, {N} trained with evaluations to (re)do" in proc.stdout
    assert proc.stdout.count("written before checksums; parsed in full and sealed") == N
    assert proc.stdout.count("written before caches had checksums; building it again") == 6
    check_table(work, rows, refs)
    assert {p.name: (p / "model.pt").read_bytes() for p in trials(work)} == models
    assert {p.name: (p / "model.pt").stat().st_mtime_ns for p in trials(work)} == mtimes
    status = status_of(work)
    assert f"{N} done" in status and status.count("cache ok") == 6, status
