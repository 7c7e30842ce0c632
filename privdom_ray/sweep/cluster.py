"""The Ray cluster the driver runs on: connect or start it, check and count its resources,
warm its workers.

Owns ``ray.init`` (an embedded local cluster or ``address``), the dashboard's token hint, the
per-trial request check against the cluster's nodes, the task slots it holds and the warm-up
tasks. Separate from the driver's scheduling and aggregation (``privdom_ray.sweep``) because it
is the part that talks to the cluster itself rather than to Tune or the trial store; it is part
of the ``sweep`` package, the Ray edge, and imports Ray only inside its functions (the
environment ``sweep`` sets before Ray is first imported stays in force).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from privdom_ray import grid
from privdom_ray.checks import Log, _log
from privdom_ray.config import SweepSpec
from privdom_ray.trainable import private_ray_temp_dir

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # privdom_ray/ (this module is in sweep/)

# ------------------------------------------------------------------------------------- Ray


def init_ray(spec: SweepSpec, address: str | None, log: Log = _log) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), else start an embedded local cluster."""
    import ray

    address = address or spec.ray.address or os.environ.get("RAY_ADDRESS")
    # Workers import this package: ship it to a remote cluster; locally it is installed.
    if address:
        runtime_env: dict[str, Any] = {"py_modules": [str(PACKAGE_DIR)]}
        ctx = ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        log(f"[ray] connected to cluster at {address}")
        _warn_local_storage(spec, log)
    else:
        cpus = spec.ray.num_cpus or os.cpu_count() or 1
        ctx = ray.init(
            address="local",  # always a new cluster: a bare init() joins any running one
            num_cpus=spec.ray.num_cpus,
            # PRIVDOM_RAY_DASHBOARD=0: no dashboard process (the test suite's sweeps, 2 cores)
            include_dashboard=os.environ.get("PRIVDOM_RAY_DASHBOARD", "1") != "0",
            dashboard_host=spec.ray.dashboard_host,
            log_to_driver=True,
            # owner-only session files, linked from <output>/ray_session (trainable.py)
            _temp_dir=private_ray_temp_dir(spec.output),
            # Ray ends idle workers beyond one per CPU; a federation's sites share CPUs
            # (3 sites on 2 CPUs), and each ended worker costs the next round a torch import
            _system_config={"num_workers_soft_limit": 3 * cpus},
        )
        log("[ray] started an embedded local cluster")
    url = getattr(ctx, "dashboard_url", None)
    if url:
        log(f"[ray] dashboard: http://{url}" + _dashboard_login_hint())
    res = ray.cluster_resources()
    log(
        f"[ray] resources: {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU, {len(ray.nodes())} node(s)"
    )


def _dashboard_login_hint() -> str:
    """Ray 2.60 turns token authentication on for new clusters by default (it writes
    ``~/.ray/auth_token``); the dashboard then asks for that token in the browser."""
    if os.environ.get("RAY_AUTH_MODE", "token") == "disabled":
        return ""
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN"):
        return " (token authentication: log in with the token in $RAY_AUTH_TOKEN)"
    return f" (token authentication: log in with the token in {token})" if token.is_file() else ""


def _use_cluster_token(log: Log) -> None:
    """Connect with token auth when a token is at hand and no mode was chosen.

    `ray start` (2.60) turns token authentication on when ``~/.ray/auth_token`` exists, but a
    connecting driver only sends the token when RAY_AUTH_MODE=token; mirror Ray's own rule.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        log(
            "[ray] using token authentication (RAY_AUTH_MODE=token; set it to 'disabled' to opt out)"
        )


def _warn_local_storage(spec: SweepSpec, log: Log) -> None:
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) > 1:
        log(
            f"[ray] WARNING: the cluster has {len(alive)} nodes but output {spec.output} and cache "
            f"{spec.cache_dir} are paths on this machine. Every node must see them at the same "
            "path (shared storage such as NFS), or trials on other nodes will fail."
        )


def check_resources(spec: SweepSpec) -> None:
    """Refuse a per-trial request no node can satisfy (Tune would wait forever)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = any(
        n.get("CPU", 0) >= spec.resources.cpu and n.get("GPU", 0) >= spec.resources.gpu
        for n in nodes
    )
    if not fits:
        best_cpu = max((n.get("CPU", 0) for n in nodes), default=0)
        best_gpu = max((n.get("GPU", 0) for n in nodes), default=0)
        raise grid.GridError(
            str(spec.grid_path),
            [
                f"resources: cpu={spec.resources.cpu:g}, gpu={spec.resources.gpu:g} per trial is more "
                f"than any node has (largest: {best_cpu:g} CPU, {best_gpu:g} GPU); lower it"
            ],
        )


def cluster_slots(spec: SweepSpec) -> int:
    """How many per-task resource requests (cpu, gpu) the whole cluster holds at once."""
    import ray

    res = ray.cluster_resources()
    slots = res.get("CPU", 0) / spec.resources.cpu
    if spec.resources.gpu > 0:
        slots = min(slots, res.get("GPU", 0) / spec.resources.gpu)
    return max(1, int(slots + 1e-9))


def warm_workers(spec: SweepSpec) -> list:
    """Start one task worker per slot that the first trials will fill (and one per site of
    the largest federation), each importing the training stack, without waiting for them.

    Measured on a federation-only demo sweep: its first round took 21.6 s with three cold
    workers importing torch and Opacus, 8.7 s with warm ones. The warm-up tasks hold no CPU (``num_cpus=0``), so they delay
    nothing Tune reserves; they run while the caches are built and Tune starts. Embedded
    cluster only: on a multi-node cluster they would all land on this node.
    """
    import ray

    from privdom_ray.trainable import warm_up

    sites = max((len(f.sites) for f in spec.federations), default=0)
    task = ray.remote(num_cpus=0, max_retries=0, runtime_env=_trial_runtime_env())(warm_up)
    return [task.options(name="warm-up").remote() for _ in range(max(cluster_slots(spec), sites))]


def _trial_runtime_env() -> dict[str, Any]:
    """The runtime env Tune gives its trial actors, which their tasks inherit. Ray hands an
    idle worker only to tasks of the same env, so warm-up tasks must match it (Tune 2.60 sets
    PL_DISABLE_FORK=1 plus a few variables copied from the driver's environment)."""
    try:
        from ray.tune.execution.class_cache import DEFAULT_ENV_VARS, ENV_VARS_TO_PROPAGATE
    except ImportError:  # another Ray version: warm-ups then only warm the driver's env
        return {}
    env = dict(DEFAULT_ENV_VARS)
    env.update({k: os.environ[k] for k in ENV_VARS_TO_PROPAGATE if k in os.environ})
    return {"env_vars": env}
