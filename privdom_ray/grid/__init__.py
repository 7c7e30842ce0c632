"""The grid file: YAML -> a validated ``config.SweepSpec``.

Validation collects every problem before anything runs, so a user fixes a grid in one pass:
each error names the key, the bad value and what is allowed. Relative paths are resolved
against the grid file's folder, so a grid works from any working directory. Planning the
trials of a grid is ``kinds.plan_trials``'s job.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from privdom_ray import kinds
from privdom_ray.config import (  # noqa: F401 (grid.MODEL_NAMES etc. stay reachable)
    ACCOUNTANTS,
    CONTROLS,
    DP_MODE_NAMES,
    MEMORY_FORMATS,
    MODEL_NAMES,
    PRIVACY_UNITS,
    DomainSpec,
    EvaluationConfig,
    FederationConfig,
    GridError,
    PretrainConfig,
    RayConfig,
    Resources,
    SweepSpec,
    TrainingConfig,
)
from privdom_ray.folder import CACHE
from privdom_ray.grid.sections import (  # noqa: F401 (re-exported: the old privdom_ray.grid names)
    _BAD,
    DOMAIN_KEYS,
    FEDERATION_KEYS,
    MAX_SEED,
    _check_pos_weight,
    _check_training,
    _Collector,
    _fixed_pos_weight,
    _named_entry,
    _parse_bool,
    _parse_controls,
    _parse_delta,
    _parse_domains,
    _parse_epsilons,
    _parse_evaluation,
    _parse_federations,
    _parse_model,
    _parse_names,
    _parse_preprocessing,
    _parse_ray,
    _parse_resources,
    _parse_seeds,
    _parse_training,
    _resolve,
)

# ----------------------------------------------------------------------------------- parsing

TOP_KEYS = {
    "name": "sweep name (str)",
    "output": "output folder",
    "cache_dir": "preprocessed-image cache folder (default <output>/cache)",
    "domains": "list of domains",
    "sources": "domain names to train on (default: all)",
    "targets": "domain names to test on (default: all)",
    "epsilons": "list of positive numbers and/or inf",
    "controls": f"extra control trials, any of {list(CONTROLS)}",
    "delta": "DP delta (default 1e-5, must be < 1/N_train)",
    "allow_large_delta": "accept delta >= 1/N_train (default false: refused)",
    "seeds": "list of integers from 0 to 2**32 - 1",
    "model": f"one of {sorted(MODEL_NAMES)}",
    "training": "training hyper-parameters",
    "pretrain": "non-private pretraining on a public domain (domain, epochs, lr, ...)",
    "federations": "federated sources: list of {name, sites, weights, rounds, local_epochs}",
    "preprocessing": "image preprocessing",
    "resources": "per-trial cpu/gpu",
    "evaluation": "bootstrap and subgroup settings",
    "ray": "Ray cluster settings",
    "audit": "one-run canary audit twins: {canaries, kind: gradient|input, sources, epsilons, "
    "cells: per_epsilon|all|N, cells_seed}",
    "tuning": "honest tuning: every cell the best of K candidates from a search space "
    "{space, runs, search: random, score, thresholds, validation_shares}",
}


def load_grid(path: str | Path, *, output: str | Path | None = None) -> SweepSpec:
    """Read and validate a grid file; raise ``GridError`` listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise GridError(str(path), [f"grid file {str(path)!r} does not exist"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise GridError(str(path), [f"not valid YAML: {exc}"]) from None
    if not isinstance(raw, Mapping):
        raise GridError(
            str(path), ["the file must be a YAML mapping of the keys " + ", ".join(TOP_KEYS)]
        )
    return parse_grid(raw, base=path.parent.resolve(), grid_path=path.resolve(), output=output)


def parse_grid(
    raw: Mapping[str, Any],
    *,
    base: Path,
    grid_path: Path | None = None,
    output: str | Path | None = None,
) -> SweepSpec:
    """A validated ``SweepSpec`` from a grid mapping; ``GridError`` lists every problem."""
    c = _Collector()
    for k, v in raw.items():
        if k not in TOP_KEYS:
            c.add(str(k), v, f"one of the known top-level keys {sorted(TOP_KEYS)} (typo?)")
    name = str(raw.get("name") or (grid_path.stem if grid_path else "sweep"))
    out_path = _output(c, raw, base, name, output)
    doms = _parse_domains(c, raw.get("domains"), base)
    names = [d.name for d in doms]
    pretrain = _kind_sections(c, raw, {}, stage=0).get("pretrain")
    # a public pretraining domain is neither trained on privately nor tested on by default
    private = [n for n in names if pretrain is None or n != pretrain.domain]
    # a sweep of federations alone trains no single-site model: `sources: []`
    sources = _parse_names(c, raw, "sources", private, allow_empty=bool(raw.get("federations")))
    targets = _parse_names(c, raw, "targets", private if "targets" not in raw else names)
    federations = _parse_federations(c, raw.get("federations"), private, names)
    epsilons = _parse_epsilons(c, raw.get("epsilons", [math.inf]))
    training, init_path = _parse_training(c, raw, base, epsilons, pretrain, bool(federations))
    seeds = tuple(_parse_seeds(c, raw.get("seeds", [0])))
    parsed = dict(
        controls=_parse_controls(c, raw),
        delta=_parse_delta(c, "delta", raw.get("delta")),
        allow_large_delta=_parse_bool(c, raw, "allow_large_delta"),
        seeds=seeds,
        model=_parse_model(c, raw),
        preprocessing=_parse_preprocessing(c, raw),
        resources=_parse_resources(c, raw),
        evaluation=_parse_evaluation(c, raw),
        ray=_parse_ray(c, raw),
    )
    common = dict(sources=sources, epsilons=epsilons, seeds=seeds, training=training)
    parsed.update(_kind_sections(c, raw, common, stage=1))
    if c.errors:
        raise GridError(str(grid_path or "grid"), c.errors)
    return SweepSpec(
        name=name,
        grid_path=grid_path or base,
        output=out_path,
        cache_dir=_resolve(base, raw["cache_dir"]) if raw.get("cache_dir") else out_path / CACHE,
        domains=tuple(doms),
        sources=tuple(sources),
        targets=tuple(targets),
        epsilons=tuple(epsilons),
        training=training,
        pretrain=pretrain,
        federations=tuple(federations),
        init_path=init_path,
        **parsed,
    )


def _kind_sections(
    c: _Collector, raw: Mapping, common: Mapping[str, Any], *, stage: int
) -> dict[str, Any]:
    """The grid sections trial kinds own (``pretrain``, ``audit``), each parsed by its kind
    (``TrialKind.parse_section``), by SweepSpec field name. Stage 0 sections are read before
    the common ones (a pretraining domain is neither a source nor a target by default);
    stage 1 sections see the parsed common sections (``common``)."""
    return {
        k.section: k.parse_section(c, raw, common)
        for k in kinds.REGISTRY.values()
        if k.section and k.stage == stage
    }


def _output(c: _Collector, raw: Mapping, base: Path, name: str, output: Any) -> Path:
    out_raw = output if output is not None else raw.get("output")
    if out_raw in (None, ""):
        c.add("output", out_raw, "an output folder (in the grid or as --out DIR)")
        return base / "runs" / name
    return _resolve(base, out_raw) if output is None else Path(out_raw).expanduser().resolve()


def check_sample_rates(
    spec: SweepSpec, n_train: Mapping[str, int], n_patients: Mapping[str, int] | None = None
) -> None:
    """Every logical batch must fit its training set: q = logical_batch / N_train is a
    probability (DP's Poisson sampling; non-private trials record it too), so a batch larger
    than the training split is a mistake in the grid, refused with the numbers and the fix.

    ``n_train``: training images per domain (the manifest's; again with the decoded counts
    once the cache is built); ``n_patients``: training patients (``privacy_unit: patient``
    samples patients). Raises ``GridError`` listing every source that is too small.
    """
    errors = []

    def check(key: str, batch: int, units: int, unit: str, where: str) -> None:
        if batch > units:
            q = f"{batch / units:.3g}" if units else "infinite"
            errors.append(
                f"{key}: {batch} is more than the {units} training {unit} of {where} (a "
                f"sample rate q = {q}, but q must be at most 1); set {key} to at most {units}, "
                f"or give {where} more training data"
            )

    t = spec.training
    unit = "patients" if t.privacy_unit == "patient" else "images"
    counts = n_patients if t.privacy_unit == "patient" and n_patients is not None else n_train
    for s in spec.sources:
        if s in counts:
            check("training.logical_batch", t.logical_batch, counts[s], unit, f"source {s!r}")
    for fed in spec.federations:
        for site in fed.sites:
            if site in n_train:
                where = f"site {site!r} of federation {fed.name!r}"
                check("training.logical_batch", t.logical_batch, n_train[site], "images", where)
    pre = spec.pretrain
    if pre is not None and pre.domain in n_train:
        where = f"pretraining domain {pre.domain!r}"
        check("pretrain.logical_batch", pre.logical_batch, n_train[pre.domain], "images", where)
    if errors:
        raise GridError(str(spec.grid_path), errors)
