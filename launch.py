"""privdom-ray command line.

    python launch.py --grid experiments/demo.yaml [--out DIR] [--address HOST:PORT]
    python launch.py evaluate <output> --grid domains.yaml   (stored models on the grid's targets)
    python launch.py report <output>
    python launch.py status <output>
    python launch.py audit <output>      (recompute every DP epsilon; check ledgers vs records)
    python launch.py export <output> --to DIR [--with-audit]   (the shareable outputs only)
    python launch.py plan <grid.yaml> [--images-per-s R [R_DP]] [--slots N]
                          [--variance-from OUTPUT | --variance V] [--power P]   (cost, no run)
    python launch.py show <output> <trial key | source/epsilon/seed>
    python launch.py manifest <kind> <root> --out manifest.parquet [--option key=value ...]

Exit codes: 0 success, 1 a cell failed (re-run to retry), `audit` found a problem or `export`
refused (a failed audit, a damaged file), 2 bad input (grid, data, paths).
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
    from privdom_ray.store import DamagedRecord, TrialStore

    store = TrialStore(args.output)
    hits = store.find(args.trial)
    if not hits:
        raise FileNotFoundError(f"no trial matching {args.trial!r} in {args.output}")
    for key in hits:
        print(f"# trial {key} ({store.folder(key)})")
        print(store.config_text(key) or "(not finished: no config.yaml yet)")
        try:
            evaluations = store.evaluations(key)
        except DamagedRecord as exc:
            print(f"(damaged: {exc})")
            continue
        for ev in evaluations:
            m = ev.metrics()
            macro = m[(m["label"] == "macro") & (m["subgroup"] == "all")].iloc[0]
            print(f"target {ev.target} (data {ev.fingerprint}): macro AUC {macro['auc']:.3f}")
        print()
    return 0


def _status(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="launch.py status",
        description="List done, running, interrupted, failed, damaged and pending cells, the "
        "driver holding the folder, and the state of every cache entry and table; every "
        "record is verified against its checksum.",
    )
    p.add_argument("output", help="the sweep's output folder (holds plan.json)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="do not hash the caches' image blocks (about a second per GB); their seals, "
        "sizes and identity are still checked, and every trial record is verified",
    )
    args = p.parse_args(argv)
    from collections import Counter

    from privdom_ray import lease
    from privdom_ray.folder import PLAN, PlanDamaged, SweepFolder
    from privdom_ray.store import TrialStore

    output = Path(args.output)
    try:
        plan = SweepFolder(output).read_plan()
    except PlanDamaged as exc:
        raise LookupError(f"{exc}; run the sweep again to rewrite it") from None
    if plan is None:
        raise FileNotFoundError(f"no {PLAN} in {args.output}; has a sweep been started there?")
    targets = list(plan.targets)
    holder = lease.current(output)
    live = holder is not None and not holder.stale()
    print(f"driver: {holder.describe()}" if live else "driver: none running")
    store = TrialStore(output)
    counts: Counter[str] = Counter()
    for cell in plan.cells:
        cell_targets = targets if cell.evaluated else []
        state, detail = store.status(cell.key, cell_targets, holder.run_id if live else "")
        counts[state] += 1
        print(f"{state:11s} {cell.name:32s} {cell.key}  {detail}".rstrip())
    caches = plan.cache_paths(output)
    for line in _cache_lines(caches, blocks=not args.quick) + _table_lines(output):
        print(line)
    print(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return 0


def _cache_lines(caches: dict[str, Path], *, blocks: bool = True) -> list[str]:
    """One line per cache entry of the last plan: verified (in full unless ``blocks`` is
    False), and stale when its image files or decoders changed since it was built."""
    from privdom_ray import cache

    lines = []
    for name, path in caches.items():
        found = cache.entry_status(Path(path), blocks=blocks)
        if found.ok:
            meta = found.meta
            what = "every checksum" if blocks else "seal, sizes and identity (not the blocks)"
            detail = (
                f"{meta['n_images']} images, {meta['n_skipped']} skipped; {what} "
                f"verified in {found.seconds:.1f}s"
            )
        else:
            detail = f"{found.detail} (the next run builds it again)"
        lines.append(f"cache {found.state:9s} {name:26s} {Path(path).name}  {detail}")
    return lines


def _table_lines(output: Path) -> list[str]:
    """The sealed tables (outputs.json) verified: a damaged one is rewritten by the next run."""
    from privdom_ray import integrity
    from privdom_ray.folder import TABLES

    lines = []
    for name in TABLES:
        if not (output / name).is_file():
            continue
        try:
            integrity.verified_bytes(output, name)
            state, detail = "ok", ""
        except integrity.Damage as exc:
            state, detail = "damaged", f"{exc.reason} (the next run writes it again)"
        lines.append(f"table {state:9s} {name}  {detail}".rstrip())
    return lines


def _audit(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="launch.py audit",
        description="Recompute every DP trial's epsilon from its ledger and check the ledger "
        "against the trial's own record; exit 1 on any problem.",
    )
    p.add_argument("output", help="the sweep's output folder")
    args = p.parse_args(argv)
    from privdom_ray.audit import audit_output

    rows = audit_output(Path(args.output))
    if not rows:
        raise FileNotFoundError(f"no trials in {args.output}")
    print(
        "trial          site        accountant  target    reported  recomputed  (pld)     verdict"
    )
    print(
        "  (recomputed: from the trial's spec, by the ledger's accountant; pld: the independent "
        "PLD accountant; audit twins, site 'canaries': spent epsilon, epsilon_lower, the most "
        "its m canaries can show; site 'history': the training history against the ledger)"
    )
    for r in rows:
        print(r.line())
    bad = sum(not r.ok for r in rows)
    print(f"{sum(r.checked for r in rows)} check(s) of DP ledgers, histories and canary audits, "
          f"{bad} problem(s)")  # fmt: skip
    return 1 if bad else 0


def _plan(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="launch.py plan",
        description="What a grid will cost before it runs: images and cache size per domain, "
        "trainings and evaluations, memory per trial, compute time. Starts no Ray and trains "
        "nothing.",
    )
    p.add_argument("grid", help="grid file (YAML)")
    p.add_argument("--out", help="output folder (overrides the grid's): done trials are counted")
    p.add_argument(
        "--images-per-s",
        type=float,
        nargs="+",
        metavar="RATE",
        help="training images/s of one trial slot on the sweep's device, plain [and DP]; "
        "default: measured here with a few steps of the grid's model (and its step memory)",
    )
    p.add_argument("--slots", type=int, default=1, help="trial slots the cluster will hold")
    p.add_argument("--variance-from", metavar="OUTPUT", help="a finished sweep's output folder "
                   "whose primary rows give the per-patient variance (default: the demo's)")
    p.add_argument("--variance", type=float, help="per-patient variance of the primary endpoint")
    p.add_argument("--power", type=float, default=0.8, help="power of the equivalence test")
    args = p.parse_args(argv)
    if not 0 < args.power < 1:
        p.error(f"--power {args.power}: a probability between 0 and 1, e.g. 0.8")
    if args.variance is not None and not args.variance > 0:
        p.error(f"--variance {args.variance}: a positive per-patient variance")
    from privdom_ray import checks, costs, grid, sweep

    spec = grid.load_grid(args.grid, output=args.out)
    inputs = checks.check_inputs(spec, log=lambda _m: None, writable=False)
    splits = {name: df.groupby("split").size().to_dict() for name, df in inputs.manifests.items()}
    rate = None
    if args.images_per_s:
        plain = args.images_per_s[0]
        dp = args.images_per_s[1] if len(args.images_per_s) > 1 else plain / sweep.DP_COST
        rate = costs.Rate(plain, dp, "given")
    cost = costs.estimate(
        spec, splits, inputs.fingerprints, rate=rate, slots=args.slots,
        init_file_hash=inputs.init_file_hash, public_pos_weight=inputs.public_pos_weight,
    )  # fmt: skip
    device = "cuda" if spec.resources.gpu > 0 and _has_cuda() else "cpu"
    measured, cost.step_bytes = costs.measure(spec, device, steps=0 if rate else 3)
    cost.step_device = device
    cost.rate = rate or measured
    print(costs.render(cost, spec))
    uv = costs.UnitVariance(costs.DEMO_UNIT_VARIANCE, "the demo sweep's (docs/operations.md)")
    if args.variance is not None:
        uv = costs.UnitVariance(args.variance, "given")
    elif args.variance_from:
        uv = costs.unit_variance_from(Path(args.variance_from))
    units = {t: int(inputs.manifests[t].loc[inputs.manifests[t]["split"] == "test",
                                              "patient_id"].nunique()) for t in spec.targets}  # fmt: skip
    print(costs.render_sample_size(spec.evaluation, units, uv, args.power))
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="launch.py export",
        description="Copy the shareable outputs of a sweep (tables with each column's privacy "
        "class, a report drawn from them, released DP models with ledgers and cards) to a "
        "folder, and nothing else. Refuses a folder that fails `audit` or holds a damaged "
        "file (exit 1) and a destination inside the output folder (exit 2).",
    )
    p.add_argument("output", help="the sweep's output folder")
    p.add_argument("--to", required=True, help="destination folder (created; must be empty)")
    p.add_argument(
        "--with-non-private-models",
        action="store_true",
        help="also copy the weights of non-private (epsilon = inf) models, which carry no "
        "privacy guarantee",
    )
    p.add_argument(
        "--with-audit",
        action="store_true",
        help="also export the audit twins' columns (audit_*); each training set's stated "
        "epsilon then composes its models with their twins (a second DP training on the same "
        "images). Default: they stay home (the data owner's check)",
    )
    args = p.parse_args(argv)
    from privdom_ray.export import BadDestination, ExportRefused, export
    from privdom_ray.folder import PRIVACY_NOTE

    try:
        written = export(
            Path(args.output), Path(args.to), non_private=args.with_non_private_models,
            with_audit=args.with_audit,
        )  # fmt: skip
    except ExportRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BadDestination as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    print(f"exported {len(written)} file(s) to {args.to}; see {Path(args.to) / PRIVACY_NOTE}")
    return 0


def _report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="launch.py report", description="Print a sweep's transfer matrices."
    )
    p.add_argument("output", help="the sweep's output folder (holds transfer.parquet)")
    args = p.parse_args(argv)
    from privdom_ray import report
    from privdom_ray.folder import SweepFolder

    out = SweepFolder(args.output)
    print(report.write_report(out.root))
    print(f"report: {out.report} and {out.html.name}; figures: {out.figures}")
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
    from privdom_ray.stats import results

    results.write_parquet(out, df)
    print(domains.summarize(df))
    print(f"manifest: {out} ({len(df)} rows)")
    return 0


VERBS = {
    "audit": _audit,
    "export": _export,
    "plan": _plan,
    "evaluate": _evaluate,
    "report": _report,
    "show": _show,
    "status": _status,
    "manifest": _manifest,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from privdom_ray.config import GridError
    from privdom_ray.lease import Fenced, LockHeld
    from privdom_ray.manifest import ManifestError

    try:
        if argv and argv[0] in VERBS:
            return VERBS[argv[0]](argv[1:])
        return _run(argv)
    except (
        GridError,
        ManifestError,
        FileNotFoundError,
        FileExistsError,
        LookupError,
        LockHeld,
        Fenced,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
