"""Faults with real processes: a killed trial worker, a killed driver, a lost worker node.

Every process a test starts runs in its own session, and the test kills exactly those
sessions at the end (never `ray stop`, which would hit other people's clusters).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import launch_here
from helpers import folders

from privdom_ray.cache import load_split
from privdom_ray.config import TrialSpec
from privdom_ray.train import run_trial

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
pytestmark = pytest.mark.ray


def grid(**changes) -> dict:
    base = {
        "name": "faults",
        "output": "out",
        "domains": [
            {
                "name": "a",
                "kind": "synthetic",
                "root": "data/a",
                "options": {"site": "a", "n_patients": 60, "file_size": 32},
            },
            {
                "name": "b",
                "kind": "synthetic",
                "root": "data/b",
                "options": {"site": "b", "n_patients": 60, "file_size": 32},
            },
        ],
        "epsilons": [2],
        "seeds": [0],
        "training": {"epochs": 4, "logical_batch": 16, "physical_batch": 16},
        "preprocessing": {"image_size": 16},  # tiny: no fault here depends on the images
        "evaluation": {"n_boot": 10, "min_positives": 1, "min_negatives": 1},  # tiny test splits
        "ray": {"num_cpus": 2, "max_failures": 2},
    }
    return {**base, **changes}


def start(args: list[str], cwd: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        args,
        cwd=cwd,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``, from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, _pgrp, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(session) == sid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process of ``proc``'s session and wait until none is left. Ray starts
    its workers in process groups of their own, so killing the driver's group alone leaves
    a worker that can finish (and write) a cell after the test has looked."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (pids := session_pids(proc.pid)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    proc.wait(timeout=30)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def checkpoint_epoch(tdir: Path) -> int:
    running = tdir / "running.json"
    if not (tdir / "checkpoint.pt").is_file() or not running.is_file():
        return 0
    with contextlib.suppress(ValueError, OSError):
        return json.loads(running.read_text()).get("epoch", 0)
    return 0


def sweep_killing_a_trial_after_its_first_checkpoint(tmp_path: Path) -> Path:
    """Run grid.yaml; SIGKILL the process of the first trial that checkpointed an epoch (or a
    federation's round), as its heartbeat names it; the sweep must still succeed."""
    driver = start(
        [sys.executable, str(ROOT / "launch.py"), "--grid", "grid.yaml"], tmp_path, tmp_path / "log"
    )
    try:
        trials = tmp_path / "out" / "trials"
        tdir = wait_for(
            lambda: next((d for d in trials.glob("*") if checkpoint_epoch(d) >= 1), None),
            300,
            "a first checkpoint",
            driver,
        )
        os.kill(json.loads((tdir / "running.json").read_text())["pid"], signal.SIGKILL)
        assert driver.wait(timeout=300) == 0, (tmp_path / "log").read_text()[-3000:]
    finally:
        kill_session(driver)
    return tdir


def test_killed_trial_worker_resumes_from_checkpoint(tmp_path):
    # 4 epochs: after the first checkpoint the trial has three left for the kill to land in (a
    # step of 16 images costs about the same at 16 px as at 24: the window is as wide)
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid(domains=grid()["domains"][:1])))
    key = sweep_killing_a_trial_after_its_first_checkpoint(tmp_path).name
    info, ledger = folders.info(tmp_path / "out", key), folders.ledger(tmp_path / "out", key)
    assert info["resumed_from_epoch"] >= 1  # resumed, not restarted
    assert not folders.checkpoint_left(tmp_path / "out", key)

    # the same cell, uninterrupted and without Ray, spends exactly the same privacy
    spec = TrialSpec.from_json(info["spec"])
    cache_dir = next((tmp_path / "out" / "cache").glob("a-*"))
    reference = run_trial(spec, load_split(cache_dir, "train"), load_split(cache_dir, "val"))
    assert ledger["steps"] == reference.ledger.steps
    assert ledger["noise_multiplier"] == reference.ledger.noise_multiplier
    assert ledger["epsilon_spent"] == pytest.approx(reference.ledger.epsilon_spent, rel=1e-9)

    df = pd.read_parquet(tmp_path / "out" / "transfer.parquet")
    assert set(df["target"]) == {"a"} and df["trial_key"].nunique() == 1


def test_killed_federation_coordinator_resumes_at_its_last_round(tmp_path):
    from privdom_ray import federated
    from privdom_ray.cache import split_sizes

    # killed after its first round's checkpoint: two rounds left for the kill to land in
    fed = {"name": "ab", "sites": ["a", "b"], "rounds": 3, "local_epochs": 1}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid(sources=[], federations=[fed])))
    # the heartbeat's pid is the coordinator (the Tune trainable); its site tasks die with it
    key = sweep_killing_a_trial_after_its_first_checkpoint(tmp_path).name
    info, ledger = folders.info(tmp_path / "out", key), folders.ledger(tmp_path / "out", key)
    assert info["resumed_from_epoch"] >= 1  # resumed at a round, not restarted
    # every site took exactly its planned steps with its planned noise: nothing recounted
    spec = TrialSpec.from_json(info["spec"])
    sizes = {
        s: split_sizes(next((tmp_path / "out" / "cache").glob(f"{s}-*")))["train"] for s in "ab"
    }
    for plan in federated.plan_sites(spec, sizes):
        site = ledger["sites"][plan.name]
        assert site["steps"] == fed["rounds"] * plan.steps_per_round
        assert site["noise_multiplier"] == plan.noise_multiplier
        assert site["epsilon_spent"] <= 2 + 1e-6


def test_killed_driver_rerun_completes_only_unfinished_cells(tmp_path):
    """A driver killed mid-sweep leaves no cell running; the rerun trains only what it had not
    trained and evaluates only what it had not evaluated. The rerun is two drivers started at
    the same moment on the folder: one runs the sweep, the other is refused with the first
    one's name (exit 2), so every cell is trained exactly once."""
    g = grid(epsilons=[2, "inf"], training={"epochs": 1, "logical_batch": 16, "physical_batch": 16})
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(g))
    driver = start(
        [sys.executable, str(ROOT / "launch.py"), "--grid", "grid.yaml"], tmp_path, tmp_path / "log"
    )
    trials = tmp_path / "out" / "trials"

    def finished() -> set[str]:  # trained and evaluated on both targets
        return {  # an evaluation is written in a hidden temporary folder, then renamed
            p.parent.name
            for p in trials.glob("*/done")
            if len(list((p.parent / "eval").glob("[!.]*/eval.json"))) == 2
        }

    try:
        wait_for(finished, 300, "a first finished cell", driver)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        kill_session(driver)  # the embedded cluster's processes are in the driver's session
    done_before = finished()
    trained_before = {p.parent.name for p in trials.glob("*/done")}  # some maybe not evaluated
    left = launch_here("status", "out", cwd=tmp_path).stdout  # the killed driver's cells
    states = [line.split()[0] for line in left.splitlines()[1:] if line.split()]
    assert "running" not in states and "driver: none running" in left, left
    if list(trials.glob("*/running.json")):
        assert "interrupted" in states, left
    mtimes = folders.model_stamps(tmp_path / "out")
    assert set(mtimes) == trained_before
    assert 1 <= len(done_before) < 4

    args = [sys.executable, str(ROOT / "launch.py"), "--grid", "grid.yaml"]
    drivers = [start(args, tmp_path, tmp_path / f"rerun{i}.log") for i in range(2)]
    try:
        codes = sorted(d.wait(timeout=420) for d in drivers)
    finally:
        for d in drivers:
            kill_session(d)
    logs = [(tmp_path / f"rerun{i}.log").read_text() for i in range(2)]
    assert codes == [0, 2], [log[-2000:] for log in logs]  # one ran, the other was refused
    refused = next(log for log in logs if "another driver" in log)
    assert "pid" in refused and "run" in refused, refused[-2000:]  # names the one running
    ran = next(log for log in logs if "another driver" not in log)
    assert (
        f"{len(done_before)} already done, {4 - len(trained_before)} to train, "
        f"{len(trained_before) - len(done_before)} trained with evaluations to (re)do"
    ) in ran, ran[-3000:]
    # no trained model is trained again (one killed before its evaluation is only evaluated)
    stamps = folders.model_stamps(tmp_path / "out")
    assert {k: stamps[k] for k in trained_before} == mtimes
    assert len(stamps) == 4  # 2 sources x 2 epsilons, each trained once
    df = pd.read_parquet(tmp_path / "out" / "transfer.parquet")
    assert df["trial_key"].nunique() == 4
    assert not df.duplicated(["trial_key", "target", "label", "subgroup"]).any()
    assert "4 done" in launch_here("status", "out", cwd=tmp_path).stdout


# `ray start` nodes authenticate with ~/.ray/auth_token only in token mode, and `ray start`
# does not create the token (an embedded ray.init does); the driver (launch.py --address)
# switches to token mode by itself when a token exists. The test's own HOME holds a token it
# writes, so it needs nothing from earlier runs in the real home.
def token_env(home: Path) -> dict[str, str]:
    token = home / ".ray" / "auth_token"  # what `ray get-auth-token --generate` writes
    if not token.is_file():
        token.parent.mkdir(parents=True, exist_ok=True)
        token.write_text(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "HOME": str(home)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_cluster_survives_losing_its_worker_node(tmp_path):
    port = free_port()
    TOKEN = token_env(tmp_path)
    env_log = tmp_path / "head.log"
    head = start(
        [
            RAY,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=1",
            "--include-dashboard=false",
            "--node-ip-address=127.0.0.1",
            "--block",
        ],
        tmp_path,
        env_log,
        env=TOKEN,
    )
    worker = None
    try:
        worker = start(
            [
                RAY,
                "start",
                f"--address=127.0.0.1:{port}",
                "--num-cpus=1",
                "--node-ip-address=127.0.0.1",
                "--block",
            ],
            tmp_path,
            tmp_path / "worker.log",
            env=TOKEN,
        )

        def alive_nodes() -> int:
            out = subprocess.run(
                [RAY, "status", f"--address=127.0.0.1:{port}"],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, **TOKEN},
            ).stdout
            active = out.split("Active:")[-1].split("Pending:")[0]
            return active.count("node_")

        # `ray status` is a fresh interpreter (seconds of CPU each): asked once the worker
        # node says it runs, not all through its start
        started = tmp_path / "worker.log"
        wait_for(lambda: "Ray runtime started" in started.read_text(), 120, "the worker", worker)
        wait_for(lambda: alive_nodes() >= 2, 120, "two alive nodes", worker)
        g = grid(
            epsilons=[2, "inf"],
            training={"epochs": 2, "logical_batch": 16, "physical_batch": 16},
            ray={"max_failures": 3},
        )
        (tmp_path / "grid.yaml").write_text(yaml.safe_dump(g))
        driver = start(
            [
                sys.executable,
                str(ROOT / "launch.py"),
                "--grid",
                "grid.yaml",
                "--address",
                f"127.0.0.1:{port}",
            ],
            tmp_path,
            tmp_path / "driver.log",
            env={"HOME": str(tmp_path)},  # finds the test cluster's token by itself
        )
        trials = tmp_path / "out" / "trials"

        def nodes_seen() -> set[str]:
            seen = set()
            for f in [*trials.glob("*/running.json"), *trials.glob("*/trial.json")]:
                with contextlib.suppress(ValueError, OSError):
                    seen.add(json.loads(f.read_text())["node"])
            return seen

        def both_nodes_used() -> set[str] | None:
            seen = nodes_seen()
            return seen if len(seen) >= 2 and list(trials.glob("*/done")) else None

        seen = wait_for(
            both_nodes_used,
            360,
            "trials on both nodes",
            driver,
        )
        assert len(seen) == 2  # the sweep used both nodes
        kill_session(worker)  # the worker node dies mid-sweep
        assert driver.wait(timeout=420) == 0, (tmp_path / "driver.log").read_text()[-3000:]
        log = (tmp_path / "driver.log").read_text()
        assert "2 node(s)" in log
    finally:
        if worker is not None:
            kill_session(worker)
        kill_session(head)
    df = pd.read_parquet(tmp_path / "out" / "transfer.parquet")
    assert df["trial_key"].nunique() == 4
    assert not df.duplicated(["trial_key", "target", "label", "subgroup"]).any()
    # every cell finished, whether it ran on the lost node or not
    assert len(list(trials.glob("*/done"))) == 4


def test_trial_over_its_time_limit_is_stopped_and_the_sweep_goes_on(tmp_path):
    small = {
        "name": "a",
        "kind": "synthetic",
        "root": "data/a",
        "options": {"site": "a", "n_patients": 40, "file_size": 32},  # 34 training images
    }
    large = {
        "name": "b",
        "kind": "synthetic",
        "root": "data/b",
        # 693 training images, generated small (the files' size is most of generation's time)
        "options": {"site": "b", "n_patients": 600, "file_size": 32},
    }
    g = grid(
        domains=[small, large],
        epsilons=["inf"],
        # A step of 2 images at 32 px costs about what one of 4 does (~90 ms of one core, a
        # third of a step of 32 at 64 px): a cell's time is its number of steps. b takes 1,388
        # (347 an epoch), over four times the limit's worth of one core (more than the 64 px
        # cell this test used to train, 12 epochs of 22 steps); a takes 68 (17 an epoch), ~6 s
        # of one core (its 12 epochs of 2 steps at 64 px took ~8 s), so it finishes inside
        # the limit on a busy 2-core machine, worker start and evaluations included (the
        # limit counts them: it runs from the trial's start). The limit separates them.
        training={"epochs": 4, "logical_batch": 2, "physical_batch": 2},
        preprocessing={"image_size": 32},
        ray={"num_cpus": 2, "max_failures": 1, "trial_timeout_s": 30},
    )
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(g))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "--grid", "grid.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=420,
        start_new_session=True,
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # a cell failed
    assert "b_epsinf_seed0" in proc.stderr and "re-run" in proc.stderr
    df = pd.read_parquet(tmp_path / "out" / "transfer.parquet")
    assert set(df["source"]) == {"a"}  # the finished cell is in the table
    status = launch_here("status", "out", cwd=tmp_path).stdout
    failed = [line for line in status.splitlines() if line.startswith("failed")]
    assert len(failed) == 1 and "b_epsinf_seed0" in failed[0] and "timeout" in failed[0]
    assert "1 done" in status and "1 failed" in status
