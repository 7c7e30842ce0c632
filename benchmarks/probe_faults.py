"""Fault probes: damage one stored record of a finished sweep, re-run it, judge the result.

    uv run python benchmarks/probe_faults.py /tmp/probes              # this checkout
    uv run python benchmarks/probe_faults.py /tmp/probes_old --code /tmp/old_checkout

A tiny 2-site grid (2 sources x epsilon {2, inf} x 1 seed, 2 targets: a 288-row table) is run
once; every probe starts from a copy of that finished output, injects one fault (truncate,
zero-fill a block inside, or delete one record; or one of the other faults of issue 23), asks
``status`` whether it names the damaged file, runs the sweep again and judges its table. A
probe of the cache (or of the image files) runs the grid with one more epsilon (8), so that
new cells train and evaluate on the cache (288 + 144 rows expected): a damaged cache harms
only the cells that read it next.

- rows lost: rows of the expected table missing from the new one;
- rows wrong: rows whose AUC differs from the AUC of the model now on disk, predicted on
  images decoded afresh from the image files (not from the cache, which may be the damaged
  record);
- survived: exit 0, no row lost, no row wrong.

``--code`` runs another checkout's ``launch.py`` (its package first on PYTHONPATH, so Ray's
workers import it too) with this environment; the judging always uses this checkout.
Prints one markdown table. Takes about a minute per probe on 2 cores.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny grid is shared with test_fault_injection
from helpers.grids import tiny_grid  # noqa: E402

GRID = tiny_grid("probe", "ab", n_patients=60, epochs=2, image_size=24, max_failures=1)
ROWS = 288


def launch(
    code: Path, args: list[str], cwd: Path, timeout: float = 900
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(code)}
    try:
        return subprocess.run(
            [sys.executable, str(code / "launch.py"), *args], cwd=cwd, env=env,
            capture_output=True, text=True, timeout=timeout, start_new_session=True,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(exc.cmd, 124, str(exc.stdout), str(exc.stderr))


# ------------------------------------------------------------------------------ faults


def dp_trial(case: Path) -> Path:
    for info in sorted((case / "out" / "trials").glob("*/trial.json")):
        spec = json.loads(info.read_text())["spec"]
        if spec["source"] == "a" and str(spec["epsilon"]) == "2":
            return info.parent
    raise LookupError("no DP trial of source a")


def cache_entry(case: Path) -> Path:
    return next(
        p for p in (case / "out" / "cache").glob("a-*") if p.is_dir() and "tmp" not in p.name
    )


def damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
        return
    size = path.stat().st_size
    if how == "truncate":
        os.truncate(path, size // 2)
        return
    block = min(4096, max(1, size // 3))
    with open(path, "r+b") as f:  # zero-fill a block inside (mtime changes; size does not)
        f.seek(max(0, size // 2 - block // 2))
        f.write(b"\0" * block)


RECORDS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "model": (dp_trial, "model.pt"),
    "ledger": (dp_trial, "ledger.json"),
    "trial record": (dp_trial, "trial.json"),
    "history": (dp_trial, "history.json"),
    "thresholds": (dp_trial, "thresholds.json"),
    "eval.json": (dp_trial, "eval/b-*/eval.json"),
    "metrics": (dp_trial, "eval/b-*/metrics.parquet"),
    "predictions": (dp_trial, "eval/b-*/predictions.parquet"),
    "cache images": (cache_entry, "images.npy"),
    "cache rows": (cache_entry, "rows.parquet"),
    "cache meta": (cache_entry, "meta.json"),
}


def record_fault(record: str, how: str) -> Callable[[Path], str]:
    folder, pattern = RECORDS[record]

    def inject(case: Path) -> str:
        (path,) = [Path(p) for p in glob.glob(str(folder(case) / pattern))]
        damage(path, how)
        return path.name

    return inject


def delete_done(case: Path) -> str:
    (dp_trial(case) / "done").unlink()
    return ""


def replace_pngs(case: Path) -> str:
    pngs = sorted((case / "data" / "a" / "images").glob("*.png"))
    for png in pngs[:3]:
        png.write_text("not an image any more")
    return ""


def negative_seed(case: Path) -> str:
    grid = yaml.safe_load((case / "grid.yaml").read_text())
    (case / "grid.yaml").write_text(yaml.safe_dump({**grid, "seeds": [-1]}))
    return ""


def probes() -> list[tuple[str, Callable[[Path], str], str]]:
    """(name, inject, verb): verb 'run' re-runs the sweep, 'run+' with one more epsilon (new
    cells read the cache), 'evaluate' runs launch.py evaluate."""
    out = [
        (f"{record}: {how}", record_fault(record, how), "run+" if "cache" in record else "run")
        for record in RECORDS
        for how in ("truncate", "zero-fill", "delete")
    ]
    out += [
        ("done deleted (DP trial)", delete_done, "run"),
        ("3 PNGs replaced by text after the build", replace_pngs, "run+"),
        ("history zero-filled, then `evaluate`", record_fault("history", "zero-fill"), "evaluate"),
        ("seeds: [-1] on a finished output", negative_seed, "run"),
    ]
    return out


# ------------------------------------------------------------------------------ judging


def reference_images(case: Path, domain: str) -> tuple[np.ndarray, np.ndarray]:
    """The target's test split decoded afresh from its image files: (images, labels)."""
    from privdom_ray.domains import build_manifest
    from privdom_ray.grid import parse_grid
    from privdom_ray.imaging import load
    from privdom_ray.manifest import LABELS

    spec = parse_grid(GRID, base=case)  # the probed grid.yaml may be a bad one
    d = spec.domain(domain)
    df = build_manifest(d.kind, d.root, d.options, name=d.name)
    test = df[df["split"] == "test"]
    images, labels = [], []
    for _, row in test.iterrows():
        try:
            images.append(load(row["path"], spec.preprocessing))
        except Exception:  # noqa: BLE001 - undecodable: skipped, as the cache does
            continue
        labels.append(row[list(LABELS)].to_numpy(dtype=float))
    return np.stack(images), np.stack(labels)


def wrong_rows(case: Path, table: pd.DataFrame) -> int:
    """Rows of (trial, target) evaluations whose AUCs differ from the model on disk."""
    import torch
    from sklearn.metrics import roc_auc_score

    from privdom_ray.manifest import LABELS
    from privdom_ray.train import load_model, predict

    refs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    wrong = 0
    for (key, target), rows in table.groupby(["trial_key", "target"]):
        refs.setdefault(target, reference_images(case, target))
        images, labels = refs[target]
        try:
            state = torch.load(case / "out" / "trials" / key / "model.pt", weights_only=True)
            model = load_model(rows["model"].iloc[0], state, num_outputs=len(LABELS))
            scores = predict(model, images)
        except Exception:  # noqa: BLE001 - no loadable model on disk: every row is wrong
            wrong += len(rows)
            continue
        allrows = rows[rows["subgroup"] == "all"].set_index("label")
        for j, label in enumerate(LABELS):
            y = labels[:, j]
            keep = ~np.isnan(y)
            stored = allrows.loc[label, "auc"] if label in allrows.index else None
            if stored is None or pd.isna(stored) or len(set(y[keep])) < 2:
                continue
            if abs(roc_auc_score(y[keep], scores[keep, j]) - float(stored)) > 1e-3:
                wrong += len(rows)
                break
    return wrong


IDENT = ["source", "epsilon_target", "seed", "target", "label", "subgroup"]


def expected_rows(base: pd.DataFrame, more: bool) -> set[tuple]:
    """The rows a complete table holds: the base's, and with ``more`` those of epsilon 8."""
    rows = set(map(tuple, base[IDENT].astype(str).to_numpy()))
    if more:
        dp = base[base["epsilon_target"] == 2].assign(epsilon_target=8.0)
        rows |= set(map(tuple, dp[IDENT].astype(str).to_numpy()))
    return rows


def judge(case: Path, expected: set[tuple]) -> tuple[int, int]:
    path = case / "out" / "transfer.parquet"
    try:
        table = pd.read_parquet(path)
    except Exception:  # noqa: BLE001 - missing or unreadable: every row lost
        return len(expected), 0
    have = set(map(tuple, table[IDENT].astype(str).to_numpy()))
    return len(expected - have), wrong_rows(case, table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path, help="scratch folder (created)")
    p.add_argument("--code", type=Path, default=ROOT, help="checkout whose launch.py runs")
    p.add_argument(
        "--only", default="", help="run only probes whose name contains one of these (a,b,...)"
    )
    args = p.parse_args()
    code, work = args.code.resolve(), args.work.resolve()
    base_dir = work / "base"
    if not (base_dir / "out" / "transfer.parquet").is_file():
        shutil.rmtree(base_dir, ignore_errors=True)
        base_dir.mkdir(parents=True)
        (base_dir / "grid.yaml").write_text(yaml.safe_dump(GRID))
        proc = launch(code, ["--grid", "grid.yaml"], base_dir)
        if proc.returncode != 0:
            sys.exit(f"the baseline sweep failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    base = pd.read_parquet(base_dir / "out" / "transfer.parquet")
    assert len(base) == ROWS, len(base)
    lines = [
        "| fault | status names it | exit | survived | rows lost | rows wrong | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, inject, verb in probes():
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        case = work / "case"
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(base_dir, case, symlinks=True)
        time.sleep(0.05)
        named = inject(case)
        status = launch(code, ["status", "out"], case, timeout=300)
        said = "n/a" if not named else ("yes" if named in status.stdout + status.stderr else "no")
        if verb == "run+":
            grid = yaml.safe_load((case / "grid.yaml").read_text())
            (case / "grid.yaml").write_text(yaml.safe_dump({**grid, "epsilons": [2, 8, "inf"]}))
        t0 = time.perf_counter()
        extra = (
            ["evaluate", "out", "--grid", "grid.yaml"]
            if verb == "evaluate"
            else ["--grid", "grid.yaml"]
        )
        proc = launch(code, extra, case)
        seconds = time.perf_counter() - t0
        lost, wrong = judge(case, expected_rows(base, verb == "run+"))
        ok = proc.returncode in (0, 2 if "seeds" in name else 0) and lost == 0 and wrong == 0
        lines.append(
            f"| {name} | {said} | {proc.returncode} | {'yes' if ok else 'NO'} | {lost} | "
            f"{wrong} | {seconds:.0f} |"
        )
        print(lines[-1], flush=True)
        (work / "logs").mkdir(exist_ok=True)
        (work / "logs" / f"{name.replace('/', '_').replace(' ', '_')}.log").write_text(
            status.stdout + status.stderr + "\n----\n" + proc.stdout + proc.stderr
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
