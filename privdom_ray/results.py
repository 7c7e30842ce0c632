"""Trial folders on disk, atomic writes, and the aggregated transfer table.

One trial = ``<output>/trials/<key>/`` (key = content hash of what determines the model):

- ``trial.json``  the resolved trial spec, versions, node, timings (``config.yaml``: the same
  plus the ledger, for people)
- ``tensorboard/`` training curves: loss, validation macro AUC, epsilon spent per epoch
- ``model.pt``    final weights (a plain state_dict: loadable with ``weights_only=True``)
- ``ledger.json`` the privacy ledger;  ``history.json`` per-epoch loss, val AUC, epsilon
- ``val_predictions.parquet``, ``thresholds.json`` (Youden on the source's validation split)
- ``done``        written last: the trained model is complete
- ``eval/<target>-<fingerprint>/``  per target: ``predictions.parquet`` (row position,
  scores, labels, sex, age bin: no ids, no paths), ``metrics.parquet``, ``eval.json``;
  each folder is renamed into place complete

The transfer table is an aggregate: one row per trial x target x label x subgroup, with no
patient identifiers, image paths or per-image rows. Tune may run a trial twice
(at-least-once); rows are keyed by (trial_key, target), so duplicates cannot arise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from privdom_ray.metrics import MetricRow

TRIALS = "trials"
TRANSFER = "transfer.parquet"

_ARROW_TYPES = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}


def _metric_fields() -> list[tuple[str, pa.DataType]]:
    """The metric columns, in ``metrics.MetricRow``'s field order and types (one definition)."""
    out = []
    for f in dataclasses.fields(MetricRow):
        base = str(f.type).split("|")[0].strip()
        out.append((f.name, _ARROW_TYPES[base]))
    return out


# Columns of the transfer table, in order. Metric columns come from metrics.MetricRow.
SCHEMA = pa.schema(
    [
        ("sweep", pa.string()),
        ("trial_key", pa.string()),
        ("source", pa.string()),
        ("target", pa.string()),
        ("on_domain", pa.bool_()),
        # the domains whose training data made the model: the source, or a federation's sites
        ("training_sites", pa.string()),
        ("seed", pa.int64()),
        ("model", pa.string()),
        ("variant", pa.string()),
        ("init", pa.string()),
        ("epsilon_target", pa.float64()),
        ("epsilon_spent", pa.float64()),
        ("epsilon_rdp", pa.float64()),
        ("delta", pa.float64()),
        ("noise_multiplier", pa.float64()),
        ("sample_rate", pa.float64()),
        ("steps", pa.int64()),
        ("max_grad_norm", pa.float64()),
        ("accountant", pa.string()),
        ("privacy_unit", pa.string()),
        # "trial": one dataset's guarantee; "site": per-site guarantees of a federation (the
        # row holds the ledger of the site with the largest epsilon)
        ("privacy_scope", pa.string()),
        *_metric_fields(),  # label, subgroup, n, auc, ... : every field of metrics.MetricRow
        ("mia_auc", pa.float64()),
        ("mia_tpr_at_1fpr", pa.float64()),
        ("n_boot", pa.int64()),
        ("image_size", pa.int64()),
        ("epochs", pa.int64()),
        ("best_epoch", pa.int64()),
        ("logical_batch", pa.int64()),
        ("lr", pa.float64()),
        ("train_seconds", pa.float64()),
        ("eval_seconds", pa.float64()),
        ("node", pa.string()),
        ("versions", pa.string()),
    ]
)


# ------------------------------------------------------------------------------ atomic writes

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=_json_default)))


def write_parquet(path: Path, df: pd.DataFrame | pa.Table) -> None:
    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    atomic_write(path, lambda p: pq.write_table(table, p))


def write_yaml(path: Path, obj: Any) -> None:
    """Human-readable record (round-tripped through JSON so numpy scalars and inf are plain)."""
    import yaml

    plain = json.loads(json.dumps(obj, default=_json_default))
    atomic_write(path, lambda p: p.write_text(yaml.safe_dump(plain, sort_keys=False)))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------ trial folders


def trial_dir(output: Path, key: str) -> Path:
    return Path(output) / TRIALS / key


def is_trained(tdir: Path) -> bool:
    return (Path(tdir) / "done").is_file()


def mark_done(tdir: Path) -> None:
    atomic_write(Path(tdir) / "done", lambda p: p.write_text("done\n"))


def eval_dir(tdir: Path, target: str, fingerprint: str) -> Path:
    return Path(tdir) / "eval" / f"{target}-{fingerprint}"


def is_evaluated(edir: Path) -> bool:
    return (Path(edir) / "eval.json").is_file()


def heartbeat(tdir: Path, run_id: str, node: str, **extra: Any) -> None:
    """``running.json``: a cell at work, with its last epoch (status and progress read it)."""
    write_json(
        tdir / "running.json",
        {"run_id": run_id, "node": node, "pid": os.getpid(), "updated": time.time(), **extra},
    )


def record_failure(tdir: Path, run_id: str, *, reason: str, error: str) -> None:
    """``failed.json``: why a cell stopped (the error's last lines), for ``launch.py status``."""
    write_json(
        tdir / "failed.json",
        {"run_id": run_id, "reason": reason, "error": error[-4000:], "time": time.time()},
    )


def find_trials(output: Path, query: str) -> list[Path]:
    """Trial folders matching a key (or key prefix) or ``source/epsilon/seed``."""
    base = Path(output) / TRIALS
    if not base.is_dir():
        raise FileNotFoundError(f"no trials in {output}; is it a sweep's output folder?")
    if "/" not in query:
        return sorted(p for p in base.glob(f"{query}*") if (p / "trial.json").is_file())
    parts = query.split("/")
    if len(parts) != 3:
        raise LookupError(
            f"{query!r}: expected a trial key or source/epsilon/seed, e.g. site_a/1/0"
        )
    source, eps, seed = parts
    hits = []
    for p in sorted(base.glob("*/trial.json")):
        spec = read_json(p)["spec"]
        if spec["source"] == source and str(spec["epsilon"]) == eps and str(spec["seed"]) == seed:
            hits.append(p.parent)
    return hits


def cell_status(tdir: Path, targets: list[dict[str, str]]) -> tuple[str, str]:
    """(state, detail) of one planned cell: done, failed, running, evaluating or pending.

    ``running`` comes from a heartbeat file; after a driver crash it may describe an attempt
    that is no longer alive, so the detail says how old the heartbeat is.
    """
    tdir = Path(tdir)
    missing = [
        t["name"] for t in targets if not is_evaluated(eval_dir(tdir, t["name"], t["fingerprint"]))
    ]
    if is_trained(tdir) and not missing:
        return "done", ""
    if (tdir / "failed.json").is_file():
        f = read_json(tdir / "failed.json")
        tail = "\n".join(f.get("error", "").strip().splitlines()[-3:])
        return "failed", f"{f.get('reason', 'error')}: {tail}"
    if (tdir / "running.json").is_file():
        r = read_json(tdir / "running.json")
        age = time.time() - r.get("updated", 0)
        epoch = f"epoch {r['epoch']}, " if "epoch" in r else ""
        return "running", f"{epoch}node {r.get('node', '?')[:12]}, heartbeat {age:.0f}s ago"
    if is_trained(tdir):
        return "evaluating", "trained; targets left: " + ", ".join(missing)
    return "pending", ""


# ------------------------------------------------------------------------------ aggregation


def rows_for_trial(tdir: Path, sweep: str) -> list[pd.DataFrame]:
    """The transfer-table rows of one finished trial, one frame per evaluated target."""
    info = read_json(tdir / "trial.json")
    ledger = read_json(tdir / "ledger.json")
    spec = info["spec"]
    frames = []
    for edir in sorted((tdir / "eval").glob("*")):
        if not is_evaluated(edir):
            continue  # half-written evaluation: never enters a table
        ev = read_json(edir / "eval.json")
        df = pd.read_parquet(edir / "metrics.parquet")
        df["sweep"] = sweep
        df["trial_key"] = spec["key"]
        df["source"] = spec["source"]
        df["target"] = ev["target"]
        fed = spec.get("federation")
        sites = [s["name"] for s in fed["sites"] if s["weight"] > 0] if fed else [spec["source"]]
        df["on_domain"] = ev["target"] in sites
        df["training_sites"] = ",".join(sites)
        df["seed"] = spec["seed"]
        df["model"] = spec["model"]
        df["variant"] = spec.get("variant", "standard")
        df["init"] = spec.get("init", "scratch")
        df["mia_auc"] = info.get("mia_auc")
        df["mia_tpr_at_1fpr"] = info.get("mia_tpr_at_1fpr")
        for k in (
            "epsilon_target",
            "epsilon_spent",
            "epsilon_rdp",
            "delta",
            "noise_multiplier",
            "sample_rate",
            "steps",
            "max_grad_norm",
            "accountant",
            "privacy_unit",
        ):
            df[k] = _number(ledger[k])
        df["privacy_scope"] = ledger.get("scope", "trial")
        df["n_boot"] = ev["n_boot"]
        df["image_size"] = spec["preprocessing"]["image_size"]
        df["epochs"] = spec["training"]["epochs"]
        df["best_epoch"] = info["best_epoch"]
        df["logical_batch"] = spec["training"]["logical_batch"]
        df["lr"] = spec["training"]["lr"]
        df["train_seconds"] = info["train_seconds"]
        df["eval_seconds"] = ev["eval_seconds"]
        df["node"] = info.get("node", "")
        df["versions"] = json.dumps(info.get("versions", {}), sort_keys=True)
        frames.append(df)
    return frames


def _number(value: Any) -> Any:
    if isinstance(value, str) and value in ("inf", "Infinity"):
        return math.inf
    return value


def aggregate(output: Path, keys: Iterable[str], sweep: str) -> tuple[Path, pd.DataFrame]:
    """Combine the finished trials ``keys`` into ``<output>/transfer.parquet`` (atomically)."""
    frames: list[pd.DataFrame] = []
    for key in keys:
        tdir = trial_dir(output, key)
        if is_trained(tdir):
            frames.extend(rows_for_trial(tdir, sweep))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    for field in SCHEMA:
        if field.name not in df.columns:
            df[field.name] = None
    df = df.loc[:, SCHEMA.names]
    table = pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False)
    path = Path(output) / TRANSFER
    write_parquet(path, table)
    return path, df


def load(output: str | Path) -> pd.DataFrame:
    """The transfer table of a sweep as a DataFrame."""
    path = Path(output) / TRANSFER
    if not path.is_file():
        raise FileNotFoundError(
            f"no {TRANSFER} in {output}; run the sweep first (launch.py --grid ...)"
        )
    return pd.read_parquet(path)
