"""privdom-ray command line.

    python launch.py --grid experiments/demo.yaml [--out DIR] [--address HOST:PORT]
    python launch.py evaluate <output> --grid domains.yaml   (stored models on the grid's targets)
    python launch.py report <output>
    python launch.py status <output>
    python launch.py audit <output>      (recompute every DP epsilon from its ledger)
    python launch.py show <output> <trial key | source/epsilon/seed>
    python launch.py manifest <kind> <root> --out manifest.parquet [--option key=value ...]

Exit codes: 0 success, 1 a cell failed (re-run to retry), 2 bad input (grid, data, paths).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="launch.py", description="Run a privacy/domain-transfer sweep."
    )
    p.add_argument("--grid", required=True, help="grid file (YAML), e.g. experiments/demo.yaml")
    p.add_argument("--out", help="output folder (overrides the grid's 'output')")
    p.add_argument(
        "--address", help="existing Ray cluster (default: RAY_ADDRESS, else an embedded one)"
    )
    args = p.parse_args(argv)
    from privdom_ray import sweep

    try:
        sweep.run(args.grid, output=args.out, address=args.address)
    except sweep.SweepFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _evaluate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="launch.py evaluate",
        description="Evaluate the stored models of a sweep on the grid's targets (no training).",
    )
    p.add_argument("output", help="the sweep's output folder")
    p.add_argument("--grid", required=True, help="grid file naming the targets")
    p.add_argument("--address", help="existing Ray cluster (default: an embedded one)")
    args = p.parse_args(argv)
    from privdom_ray import sweep

    try:
        sweep.run(args.grid, output=args.output, address=args.address, train=False)
    except sweep.SweepFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _show(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="launch.py show", description="Print a trial's record.")
    p.add_argument("output", help="the sweep's output folder")
    p.add_argument("trial", help="a trial key (or prefix) or source/epsilon/seed, e.g. site_a/1/0")
    args = p.parse_args(argv)
    import pandas as pd

    from privdom_ray import results

    hits = results.find_trials(Path(args.output), args.trial)
    if not hits:
        raise FileNotFoundError(f"no trial matching {args.trial!r} in {args.output}")
    for tdir in hits:
        print(f"# trial {tdir.name} ({tdir})")
        config = tdir / "config.yaml"
        print(config.read_text() if config.is_file() else "(not finished: no config.yaml yet)")
        for edir in sorted((tdir / "eval").glob("*/metrics.parquet")):
            m = pd.read_parquet(edir)
            macro = m[(m["label"] == "macro") & (m["subgroup"] == "all")].iloc[0]
            print(f"target {edir.parent.name}: macro AUC {macro['auc']:.3f}")
        print()
    return 0


def _status(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="launch.py status", description="List done, running, failed and pending cells."
    )
    p.add_argument("output", help="the sweep's output folder (holds plan.json)")
    args = p.parse_args(argv)
    from collections import Counter

    from privdom_ray import results

    plan_path = Path(args.output) / "plan.json"
    if not plan_path.is_file():
        raise FileNotFoundError(f"no plan.json in {args.output}; has a sweep been started there?")
    plan = results.read_json(plan_path)
    counts: Counter[str] = Counter()
    for cell in plan["cells"]:
        state, detail = results.cell_status(
            results.trial_dir(Path(args.output), cell["key"]),
            plan["targets"] if cell.get("evaluated", True) else [],
        )
        counts[state] += 1
        print(f"{state:10s} {cell['name']:32s} {cell['key']}  {detail}".rstrip())
    print(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return 0


def _audit(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="launch.py audit",
        description="Recompute every DP trial's epsilon from its ledger; exit 1 on a mismatch.",
    )
    p.add_argument("output", help="the sweep's output folder")
    args = p.parse_args(argv)
    from privdom_ray import results
    from privdom_ray.privacy import audit_ledger

    ledgers = sorted((Path(args.output) / results.TRIALS).glob("*/ledger.json"))
    if not ledgers:
        raise FileNotFoundError(f"no trial ledgers in {args.output}")
    bad = checked = 0
    print(
        "trial          site        accountant  target    reported  recomputed  (rdp)     verdict"
    )
    for path in ledgers:
        ledger = results.read_json(path)
        # a federated trial: every site's own ledger (the summary repeats the largest)
        for site, entry in [("", ledger), *sorted(ledger.get("sites", {}).items())]:
            if entry["accountant"] == "none" or (site and entry["steps"] == 0):
                continue  # non-private, or a weight-0 site that never trained
            row = audit_ledger(entry)
            checked += 1
            bad += not row.ok
            print(
                f"{path.parent.name:14s} {site or '-':11s} {row.accountant:11s} {row.target:<9.4g} "
                f"{row.reported:<9.6g} {row.recomputed:<11.6g} {row.recomputed_rdp:<9.4g} "
                f"{'ok' if row.ok else row.problem}"
            )
    print(f"{checked} DP ledger(s) audited, {bad} problem(s)")
    return 1 if bad else 0


def _report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="launch.py report", description="Print a sweep's transfer matrices."
    )
    p.add_argument("output", help="the sweep's output folder (holds transfer.parquet)")
    args = p.parse_args(argv)
    from privdom_ray import report

    print(report.write_report(Path(args.output)))
    print(f"report: {Path(args.output) / 'report.md'}; figures: {Path(args.output) / 'figures'}")
    return 0


def _manifest(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="launch.py manifest", description="Build one domain's manifest and print its summary."
    )
    p.add_argument("kind", help="dataset kind, e.g. chexpert, padchest, synthetic")
    p.add_argument("root", help="the dataset's root folder")
    p.add_argument("--out", required=True, help="where to write the manifest (.parquet)")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a kind option (YAML value)",
    )
    args = p.parse_args(argv)
    import yaml

    from privdom_ray import domains

    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise domains.ManifestError(f"--option {item!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
    if args.kind not in domains.REGISTRY:
        raise domains.ManifestError(
            f"unknown kind {args.kind!r}; known kinds: {', '.join(domains.kinds())}"
        )
    try:
        opts = domains.make_options(args.kind, options)
    except TypeError as exc:
        raise domains.ManifestError(
            f"options of kind {args.kind!r} are {domains.option_names(args.kind)}: {exc}"
        ) from None
    except ValueError as exc:
        raise domains.ManifestError(f"--option: {exc}") from None
    df = domains.build_manifest(args.kind, args.root, opts)
    out = Path(args.out)
    from privdom_ray import results

    results.write_parquet(out, df)
    print(domains.summarize(df))
    print(f"manifest: {out} ({len(df)} rows)")
    return 0


VERBS = {
    "audit": _audit,
    "evaluate": _evaluate,
    "report": _report,
    "show": _show,
    "status": _status,
    "manifest": _manifest,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from privdom_ray.grid import GridError
    from privdom_ray.manifest import ManifestError

    try:
        if argv and argv[0] in VERBS:
            return VERBS[argv[0]](argv[1:])
        return _run(argv)
    except (GridError, ManifestError, FileNotFoundError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
