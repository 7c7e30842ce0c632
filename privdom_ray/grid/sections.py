"""The grid file's sections: one parser per section, each adding its problems to a collector.

Owns the problem collector (``_Collector``: every problem of a grid, reported at once), the
section parsers and checks (epsilons, seeds, model, training, preprocessing, resources,
evaluation, ray, domains, the loss weights) and the keys a domain entry may hold; the
sections trial kinds own are parsed by their kinds (``TrialKind.parse_section``). Separate from ``privdom_ray.grid`` (the file's loading, its top-level
keys and the whole grid's assembly into a ``SweepSpec``) because each parser is one
section's rules on its own; ``privdom_ray.grid`` re-exports every name here and this module
never imports it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from privdom_ray import domains, kinds
from privdom_ray.config import (
    ACCOUNTANTS,
    CONTROLS,
    DP_MODE_NAMES,
    MEMORY_FORMATS,
    MODEL_NAMES,
    PRIVACY_UNITS,
    DomainSpec,
    EvaluationConfig,
    PretrainConfig,
    RayConfig,
    Resources,
    TrainingConfig,
)
from privdom_ray.imaging import GEOMETRIES, Preprocessing
from privdom_ray.numeric import is_infinity, parse_number

DOMAIN_KEYS = ("name", "kind", "root", "options", "delta")
MAX_SEED = 2**32 - 1  # numpy's legacy seeding and Python's random accept 0 .. 2**32 - 1


class _Collector:
    """Gathers validation errors; each check records one message and returns a usable default."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def add(self, key: str, value: Any, allowed: str) -> None:
        self.errors.append(f"{key}: {value!r} is not allowed; expected {allowed}")

    def section(self, raw: Mapping, key: str, cls: type) -> Any:
        """Build a frozen dataclass from a mapping, checking unknown keys and value types."""
        values = raw.get(key) or {}
        if not isinstance(values, Mapping):
            self.add(key, values, "a mapping")
            return cls()
        names = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for k, v in values.items():
            if k not in names:
                self.add(f"{key}.{k}", v, f"one of the known keys {sorted(names)} (typo?)")
                continue
            default = names[k].default
            converted = self._convert(f"{key}.{k}", v, default)
            if converted is not _BAD:
                kwargs[k] = converted
        return cls(**kwargs)

    def named(
        self, section: str, i: int, entry: Any, known: tuple[str, ...], required: str
    ) -> tuple[str, str] | None:
        """Check one named list entry's shape, name and keys (``_named_entry``)."""
        return _named_entry(self, section, i, entry, known, required)

    def _convert(self, key: str, value: Any, default: Any) -> Any:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            self.add(key, value, "true or false")
            return _BAD
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            self.add(key, value, "an integer")
            return _BAD
        if isinstance(default, float):
            try:
                return float(value)
            except (TypeError, ValueError):
                self.add(key, value, "a number")
                return _BAD
        if isinstance(default, tuple):
            names = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
            if names and not any(is_infinity(v) for v in value):
                return tuple(value)  # names (e.g. audit.sources)
            if isinstance(value, list):
                try:
                    return tuple(parse_number(v) for v in value)
                except (TypeError, ValueError):
                    pass
            self.add(key, value, "a list of numbers (or of names)")
            return _BAD
        if default is None or isinstance(default, str):
            if value is None or isinstance(value, str | int):
                return value
            self.add(key, value, "a string")
            return _BAD
        return value


_BAD = object()



def _parse_epsilons(c: _Collector, eps_raw: Any) -> list[float]:
    epsilons: list[float] = []
    if not isinstance(eps_raw, list) or not eps_raw:
        c.add("epsilons", eps_raw, "a non-empty list of positive numbers and/or inf")
        return epsilons
    for i, e in enumerate(eps_raw):
        try:
            eps = parse_number(e)
        except (TypeError, ValueError):
            c.add(f"epsilons[{i}]", e, "a positive number or inf")
            continue
        if not eps > 0 or math.isnan(eps):
            c.add(f"epsilons[{i}]", e, "a positive number or inf (epsilon must be > 0)")
        elif eps in epsilons:
            c.add(f"epsilons[{i}]", e, "each epsilon once (duplicate)")
        else:
            epsilons.append(eps)
    return epsilons


def _parse_controls(c: _Collector, raw: Mapping) -> tuple[str, ...]:
    controls = raw.get("controls") or []
    if not isinstance(controls, list) or any(x not in CONTROLS for x in controls):
        c.add("controls", controls, f"a list of any of {list(CONTROLS)}")
        return ()
    return tuple(dict.fromkeys(controls))


def _parse_bool(c: _Collector, raw: Mapping, key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        c.add(key, value, "true or false")
        return False
    return value


def _parse_seeds(c: _Collector, seeds_raw: Any) -> list[int]:
    seeds: list[int] = []
    if not isinstance(seeds_raw, list) or not seeds_raw:
        c.add("seeds", seeds_raw, "a non-empty list of integers")
        return seeds
    for i, s in enumerate(seeds_raw):
        if isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED and s not in seeds:
            seeds.append(s)
        elif isinstance(s, int) and not isinstance(s, bool) and s in seeds:
            c.add(f"seeds[{i}]", s, "distinct integers (a duplicate)")
        else:
            c.add(
                f"seeds[{i}]",
                s,
                f"distinct integers from 0 to {MAX_SEED} (numpy and torch refuse negative seeds)",
            )
    return seeds


def _parse_model(c: _Collector, raw: Mapping) -> str:
    model = raw.get("model", "resnet9")
    if model not in MODEL_NAMES:
        c.add("model", model, f"one of {sorted(MODEL_NAMES)}")
    return model


def _parse_training(
    c: _Collector,
    raw: Mapping,
    base: Path,
    epsilons: list[float],
    pretrain: PretrainConfig | None,
    sections: Mapping[str, Any],
) -> tuple[TrainingConfig, Path | None]:
    """The training section and, when ``training.init`` names a file, its resolved path;
    ``sections``: the kind-owned sections parsed so far, each kind checks training against
    its own (``TrialKind.check_training``)."""
    section = raw.get("training")
    fixed_weights = _fixed_pos_weight(c, raw)
    if isinstance(section, Mapping):  # "auto" and a list of numbers are parsed here
        section = dict(section)
        if section.get("physical_batch") == "auto":
            section["physical_batch"] = 0
        if isinstance(section.get("pos_weight"), list):
            section.pop("pos_weight")
    training = c.section({"training": section}, "training", TrainingConfig)
    if fixed_weights is not None:
        training = dataclasses.replace(training, pos_weight=fixed_weights)
    _check_training(c, training)
    _check_pos_weight(c, training, epsilons, pretrain is not None)
    for kind in kinds.REGISTRY.values():
        if kind.section:
            kind.check_training(c, sections.get(kind.section), training)
    if training.init == "pretrain" and pretrain is None:
        c.add("training.init", "pretrain", "a 'pretrain' section when init is 'pretrain'")
    elif training.init not in ("scratch", "pretrain"):
        init_path = _resolve(base, training.init)
        if not init_path.is_file():
            c.add(
                "training.init",
                training.init,
                f"'scratch', 'pretrain' or an existing weights file (resolved to {init_path})",
            )
        return training, init_path
    return training, None


def _parse_preprocessing(c: _Collector, raw: Mapping) -> Preprocessing:
    prep = c.section(raw, "preprocessing", Preprocessing)
    if not (isinstance(prep.image_size, int) and 8 <= prep.image_size <= 4096):
        c.add("preprocessing.image_size", prep.image_size, "an integer between 8 and 4096")
    if prep.geometry not in GEOMETRIES:
        c.add("preprocessing.geometry", prep.geometry, f"one of {list(GEOMETRIES)}")
    return prep


def _parse_resources(c: _Collector, raw: Mapping) -> Resources:
    resources = c.section(raw, "resources", Resources)
    if resources.memory_budget_mb < 0:
        c.add(
            "resources.memory_budget_mb",
            resources.memory_budget_mb,
            "a number of MiB >= 0 (0 = the trial's share of its device)",
        )
    if not resources.cpu > 0:
        c.add("resources.cpu", resources.cpu, "a positive number of CPUs per trial")
    if resources.gpu < 0:
        c.add("resources.gpu", resources.gpu, "a GPU count >= 0 (fractions like 0.25 share a GPU)")
    if resources.memory_format not in MEMORY_FORMATS:
        c.add("resources.memory_format", resources.memory_format, f"one of {list(MEMORY_FORMATS)}")
    return resources


def _parse_evaluation(c: _Collector, raw: Mapping) -> EvaluationConfig:
    evaluation = c.section(raw, "evaluation", EvaluationConfig)
    if evaluation.n_boot < 0:
        c.add("evaluation.n_boot", evaluation.n_boot, "an integer >= 0 (0 = no CIs)")
    if not 0 < evaluation.ci < 1:
        c.add("evaluation.ci", evaluation.ci, "a number between 0 and 1, e.g. 0.95")
    if not 0 < evaluation.equivalence_margin < 0.5:
        c.add(
            "evaluation.equivalence_margin",
            evaluation.equivalence_margin,
            "an AUC difference between 0 and 0.5, e.g. 0.02",
        )
    for key in ("min_positives", "min_negatives"):
        if getattr(evaluation, key) < 1:
            c.add(f"evaluation.{key}", getattr(evaluation, key), "an integer >= 1, e.g. 10")
    if evaluation.calibration_bins < 2:
        c.add("evaluation.calibration_bins", evaluation.calibration_bins, "an integer >= 2")
    bins = evaluation.age_bins
    if len(bins) < 2 or any(lo >= hi for lo, hi in zip(bins[:-1], bins[1:], strict=True)):
        c.add(
            "evaluation.age_bins",
            list(bins),
            "at least two increasing bin edges, e.g. [0, 40, 70, inf]",
        )
    return evaluation


def _parse_ray(c: _Collector, raw: Mapping) -> RayConfig:
    ray_cfg = c.section(raw, "ray", RayConfig)
    if ray_cfg.max_failures < 0:
        c.add("ray.max_failures", ray_cfg.max_failures, "an integer >= 0")
    if ray_cfg.checkpoint_every < 1:
        c.add("ray.checkpoint_every", ray_cfg.checkpoint_every, "an integer >= 1 (epochs)")
    if ray_cfg.trial_timeout_s < 0:
        c.add("ray.trial_timeout_s", ray_cfg.trial_timeout_s, "seconds >= 0 (0 = no limit)")
    return ray_cfg


def _resolve(base: Path, value: Any) -> Path:
    p = Path(str(value)).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def _parse_delta(c: _Collector, key: str, value: Any) -> float | None:
    if value is None:
        return None
    try:
        delta = float(value)
    except (TypeError, ValueError):
        c.add(key, value, "a number with 0 < delta < 1")
        return None
    if not 0 < delta < 1:
        c.add(key, value, "a number with 0 < delta < 1 (and below 1/N_train of the source)")
        return None
    return delta


def _named_entry(
    c: _Collector, section: str, i: int, entry: Any, known: tuple[str, ...], required: str
) -> tuple[str, str] | None:
    """Check one named list entry's shape, name and keys; returns (name, key for messages)."""
    if not isinstance(entry, Mapping):
        c.add(f"{section}[{i}]", entry, f"a mapping with {required} (and optional keys)")
        return None
    name = entry.get("name")
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        c.add(f"{section}[{i}].name", name, "a name of letters, digits, '-' and '_'")
        return None
    key = f"{section}[{name}]"
    for k, v in entry.items():
        if k not in known:
            c.add(f"{key}.{k}", v, f"one of {list(known)} (typo?)")
    return name, key


def _parse_domains(c: _Collector, raw: Any, base: Path) -> list[DomainSpec]:
    if not isinstance(raw, list) or not raw:
        c.add("domains", raw, "a non-empty list of domains, each with name, kind and root")
        return []
    out: list[DomainSpec] = []
    for i, d in enumerate(raw):
        named = _named_entry(c, "domains", i, d, DOMAIN_KEYS, "name, kind, root")
        if named is None:
            continue
        name, key = named
        if name in [o.name for o in out]:
            c.add(f"{key}.name", name, "unique domain names (duplicate)")
            continue
        kind = d.get("kind")
        if kind not in domains.REGISTRY:
            c.add(f"{key}.kind", kind, f"one of the known kinds {domains.kinds()}")
            continue
        adapter = domains.REGISTRY[kind]
        root_raw = d.get("root")
        if root_raw in (None, ""):
            c.add(f"{key}.root", root_raw, "the dataset's root folder")
            continue
        root = _resolve(base, root_raw)
        if root.exists() and not root.is_dir():
            c.add(
                f"{key}.root",
                str(root_raw),
                f"a folder, not a file (resolved to {root}); point it at the dataset's folder"
                + (" (generated there on first use)" if adapter.creates_root else ""),
            )
            continue
        if not root.is_dir() and not adapter.creates_root:
            c.add(f"{key}.root", str(root_raw), f"an existing folder (resolved to {root})")
            continue
        opts_raw = d.get("options") or {}
        try:
            if not isinstance(opts_raw, Mapping):
                raise TypeError("options must be a mapping")
            options = domains.make_options(kind, dict(opts_raw))
        except TypeError as exc:
            c.add(
                f"{key}.options",
                opts_raw,
                f"options of kind {kind!r}: {domains.option_names(kind)} ({exc})",
            )
            continue
        except ValueError as exc:
            c.add(f"{key}.options", opts_raw, str(exc))
            continue
        delta = _parse_delta(c, f"{key}.delta", d.get("delta"))
        out.append(DomainSpec(name=name, kind=kind, root=root, options=options, delta=delta))
    return out


def _parse_names(
    c: _Collector, raw: Mapping, key: str, names: list[str], *, allow_empty: bool = False
) -> list[str]:
    value = raw.get(key)
    if value is None or value == "all":
        return list(names)
    if allow_empty and value == []:
        return []
    if not isinstance(value, list) or not value:
        c.add(key, value, f"'all' or a non-empty list of domain names from {names}")
        return []
    unknown = [v for v in value if v not in names]
    if unknown:
        c.add(key, unknown, f"names of domains in this grid: {names}")
    return [v for v in value if v in names]


def _check_training(c: _Collector, t: TrainingConfig) -> None:
    if t.epochs <= 0:
        c.add("training.epochs", t.epochs, "a positive integer")
    if t.logical_batch <= 0:
        c.add("training.logical_batch", t.logical_batch, "a positive integer")
    if t.physical_batch < 0:
        c.add("training.physical_batch", t.physical_batch, "a positive integer or 'auto'")
    elif t.logical_batch > 0 and t.physical_batch > t.logical_batch:
        c.add(
            "training.physical_batch",
            t.physical_batch,
            f"at most training.logical_batch ({t.logical_batch}); the physical batch only "
            "splits a logical batch to fit memory",
        )
    if not t.lr > 0:
        c.add("training.lr", t.lr, "a positive learning rate")
    if not t.max_grad_norm > 0:
        c.add("training.max_grad_norm", t.max_grad_norm, "a positive clipping bound C")
    if t.accountant not in ACCOUNTANTS:
        c.add("training.accountant", t.accountant, f"one of {list(ACCOUNTANTS)}")
    if t.grad_sample_mode not in ("auto", *DP_MODE_NAMES):
        c.add("training.grad_sample_mode", t.grad_sample_mode, f"one of {['auto', *DP_MODE_NAMES]}")
    if t.privacy_unit not in PRIVACY_UNITS:
        c.add("training.privacy_unit", t.privacy_unit, f"one of {list(PRIVACY_UNITS)}")
    elif t.privacy_unit == "patient" and t.grad_sample_mode in ("bk", "ghost"):
        c.add(
            "training.grad_sample_mode",
            t.grad_sample_mode,
            "hooks, functorch, ew or auto with privacy_unit: patient (per-patient clipping "
            "sums per-image gradients, which bk and ghost never materialise)",
        )


def _fixed_pos_weight(c: _Collector, raw: Mapping) -> tuple[float, ...] | None:
    """``training.pos_weight`` given as five numbers (taken out before the section is parsed,
    whose string default would refuse a list); None when it is not a list."""
    section = raw.get("training")
    value = section.get("pos_weight") if isinstance(section, Mapping) else None
    if not isinstance(value, list):
        return None
    try:
        weights = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        weights = ()
    from privdom_ray.manifest import LABELS

    if len(weights) != len(LABELS) or not all(w > 0 and math.isfinite(w) for w in weights):
        c.add(
            "training.pos_weight", value, f"{len(LABELS)} positive numbers, one per label {LABELS}"
        )
        return None
    return weights


def _check_pos_weight(
    c: _Collector, t: TrainingConfig, epsilons: list[float], has_pretrain: bool
) -> None:
    from privdom_ray.lossweights import SETTINGS

    setting = t.pos_weight
    if isinstance(setting, str) and setting not in SETTINGS:
        c.add("training.pos_weight", setting, f"one of {list(SETTINGS)} or a list of 5 numbers")
    elif setting == "exact" and any(math.isfinite(e) for e in epsilons):
        c.add(
            "training.pos_weight",
            setting,
            "'auto', 'dp_counts', 'public', 'none' or fixed numbers when the grid has DP "
            "epsilons: exact label counts of a private training set make every example's loss "
            "depend on the whole set, which voids the DP guarantee",
        )
    elif setting == "public" and not has_pretrain:
        c.add("training.pos_weight", setting, "a 'pretrain' section (its domain is the public one)")
    if not 0 < t.pos_weight_budget <= 0.5:
        c.add("training.pos_weight_budget", t.pos_weight_budget, "a fraction in (0, 0.5]")
