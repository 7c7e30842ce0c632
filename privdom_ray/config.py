"""The typed configuration a grid file becomes, and the identity of a trial.

``SweepSpec`` is a validated grid (``grid.py`` parses and checks the YAML); ``TrialSpec`` is
everything that determines one trained model, and its ``key`` hashes exactly that: the target
list is not in it, so adding a target evaluates finished models instead of retraining. No
torch here: the driver and Tune's coordinating process import it cheaply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privdom_ray.imaging import Preprocessing
from privdom_ray.numeric import parse_number

ACCOUNTANTS = ("prv", "rdp")
CONTROLS = ("clip_only",)  # extra control trials per (source, seed): kinds/clip_only.py
PRIVACY_UNITS = ("image", "patient")  # what one unit of the DP guarantee is
DEFAULT_DELTA = 1e-5


class GridError(ValueError):
    """One or more problems in a grid file; ``errors`` lists each one."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{source}: {len(errors)} problem(s) in the grid file:\n{lines}")


@dataclass(frozen=True)
class DomainSpec:
    name: str
    kind: str
    root: Path
    options: Any  # the kind's frozen options dataclass
    delta: float | None = None


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters that determine a trained model (all of them are in the trial key)."""

    epochs: int = 5
    logical_batch: int = 64
    # memory only; 0 (written `auto` in the grid) = the largest batch whose measured step fits
    # resources.memory_budget_mb on the trial's device. Accounting uses the logical batch alone.
    physical_batch: int = 32
    lr: float = 1e-3
    max_grad_norm: float = 1.5
    accountant: str = "prv"
    augment: bool = False
    # how per-sample gradients are clipped: "auto" (the fastest mode verified for the model,
    # see dpstep.py), "bk", or an Opacus grad_sample_mode (hooks, functorch, ew, ghost)
    grad_sample_mode: str = "auto"
    # the unit the guarantee protects: "image", or "patient" (Poisson sampling over patients,
    # all images of a sampled patient together, clipping per patient)
    privacy_unit: str = "image"
    # where training starts: "scratch", "pretrain" (the grid's pretraining stage), or the path
    # of a state_dict file. Keys hash the resolved identity (TrialSpec.init), not this text.
    init: str = "scratch"
    # the loss's positive-class weights (lossweights.py): "auto" (DP trials: "dp_counts", the
    # label counts released with Gaussian noise and accounted; others: exact counts),
    # "dp_counts", "public" (the pretraining domain's counts), "none", or five numbers
    pos_weight: str | tuple[float, ...] = "auto"
    # dp_counts: the fraction of the privacy budget (mu-GDP) the count release takes
    pos_weight_budget: float = 0.05


@dataclass(frozen=True)
class PretrainConfig:
    """Non-private pretraining on a domain that is public by declaration (never in a ledger)."""

    domain: str = ""
    epochs: int = 5
    lr: float = 1e-3
    logical_batch: int = 64
    physical_batch: int = 32
    image_size: int = 0  # 0 = the grid's preprocessing.image_size


MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
# Names a grid may use whose implementations need torch (models.MODELS) or Opacus
# (dpstep.DP_MODES): listed here so that a grid is validated, and a bad one refused, without
# importing either (seconds per CLI call); tests/test_grid.py checks them against both.
MODEL_NAMES = ("resnet9", "resnet18", "resnet34", "resnet50", "smallcnn")
DP_MODE_NAMES = ("hooks", "functorch", "ew", "ghost", "bk")


@dataclass(frozen=True)
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0
    # per trial, for physical_batch: auto. 0 = auto: on a GPU the trial's share of the device
    # (its resources.gpu fraction of the total memory, less a 10% margin), on a CPU 2048 MiB
    memory_budget_mb: int = 0
    # activations' memory layout: "channels_last" (NHWC), "contiguous" (NCHW), or "auto" =
    # channels_last on GPUs, contiguous on CPUs. Speed only: not in the trial key.
    memory_format: str = "auto"


@dataclass(frozen=True)
class EvaluationConfig:
    n_boot: int = 1000
    ci: float = 0.95
    age_bins: tuple[float, ...] = (0.0, 40.0, 70.0, math.inf)
    oracle_threshold: bool = False
    seed: int = 0
    # AUC difference within which DP and non-DP count as equivalent (TOST); see
    # privdom_ray/stats/comparisons.py (margin): above the <= 0.013 off-domain shifts the paper saw,
    # below its 0.03-0.05 on-domain DP cost, so the test can both confirm and refute
    equivalence_margin: float = 0.02
    # a label's metrics (and its place in the macro's fixed label set) need this many
    # positives and negatives in the evaluated set; below, they are null with a reason
    min_positives: int = 10
    min_negatives: int = 10
    calibration_bins: int = 10  # equal-width probability bins of the ECE and reliability plot


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None = start an embedded local cluster
    dashboard_host: str = "127.0.0.1"
    num_cpus: int | None = None  # embedded cluster only
    max_failures: int = 2  # Tune retries of a crashed trial (it resumes from its checkpoint)
    checkpoint_every: int = 1  # epochs between trial checkpoints
    trial_timeout_s: float = 0.0  # wall-clock limit per trial attempt; 0 = none


AUDIT_KINDS = ("gradient", "input")
AUDIT_CELLS = ("per_epsilon", "all")  # or a number of cells (kinds/audit/: choose)


@dataclass(frozen=True)
class AuditConfig:
    """``audit:`` in the grid: which cells get an audit twin, and its canaries."""

    # m, or "auto": gradient canaries sized so that the audit can exceed the cell's epsilon
    # (audit_bound.canaries_for: 2^17 and up); input canaries 1000
    canaries: int | str = "auto"
    kind: str = "gradient"  # white-box gradient canaries, or black-box input canaries
    sources: tuple[str, ...] = ()  # the audited sources (empty: every source)
    epsilons: tuple[float, ...] = ()  # the audited epsilons (empty: every epsilon)
    auditor_seed: int = 0  # public: which coordinates (or input patterns) the canaries use
    # which of those cells get a twin: "per_epsilon" (one per epsilon), "all", or a number N
    # (a sample spread over the epsilons); chosen from the grid alone (kinds/audit/: choose)
    cells: int | str = "per_epsilon"
    cells_seed: int = 0  # public: orders the cells for that choice (never in a trial key)


@dataclass(frozen=True)
class AuditSpec:
    """What makes a trial an audit twin: its canaries (part of the twin's key)."""

    canaries: int
    kind: str
    auditor_seed: int


@dataclass(frozen=True)
class FederationConfig:
    """A federated source as written in the grid: sites train together with FedAvg."""

    name: str
    sites: tuple[str, ...]
    weights: tuple[float, ...] | None = None  # aligned with sites; None = by training-set size
    rounds: int = 5
    local_epochs: int = 1
    parallel_sites: int = 0  # N whole task slots (resources only); 0 = every site at once


@dataclass(frozen=True)
class Site:
    """One member of a federated trial, resolved: its data, aggregation weight and delta."""

    name: str
    data_fingerprint: str
    weight: float  # un-normalised FedAvg weight (default: the site's training-set size)
    delta: float  # the site's own delta (0 for non-private trials)


@dataclass(frozen=True)
class Federation:
    """What makes a trial federated; part of the trial key (parallelism is not)."""

    sites: tuple[Site, ...]
    rounds: int
    local_epochs: int

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Federation:
        return cls(
            sites=tuple(Site(**s) for s in d["sites"]),
            rounds=int(d["rounds"]),
            local_epochs=int(d["local_epochs"]),
        )


@dataclass(frozen=True)
class SearchDomain:
    """One hyperparameter of a tuning space, in Ray Tune's conventions: ``tune.<sampler>(*args)``
    (kinds/tuning.py parses and checks it; the edge maps it to a Tune domain)."""

    name: str  # the training field it sets (lr, max_grad_norm, logical_batch, epochs)
    sampler: str  # loguniform | uniform | choice | randint
    args: tuple[float, ...]  # the bounds, or the choices


@dataclass(frozen=True)
class TuningConfig:
    """``tuning:`` in the grid: every cell becomes the best of K candidates drawn from
    ``space`` (docs/tuning-design.md); part of a tuned trial's key, as written."""

    space: tuple[SearchDomain, ...] = ()
    runs: tuple[tuple[str, Any], ...] = ()  # the distribution of K, as written (sorted items)
    search: str = "random"
    score_bound: float = 1.0  # B of the clipped validation loss
    bins: int = 20  # the threshold histograms' public bins
    validation_shares: tuple[tuple[str, float], ...] = ()  # sorted items; () = the default

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TuningConfig:
        return cls(
            space=tuple(SearchDomain(s["name"], s["sampler"], tuple(s["args"]))
                        for s in d["space"]),  # fmt: skip
            runs=tuple((str(k), v) for k, v in d["runs"]),
            search=d.get("search", "random"),
            score_bound=float(d.get("score_bound", 1.0)),
            bins=int(d.get("bins", 20)),
            validation_shares=tuple((str(k), float(v)) for k, v in d.get("validation_shares", ())),
        )


@dataclass(frozen=True)
class SweepSpec:
    name: str
    grid_path: Path
    output: Path
    cache_dir: Path
    domains: tuple[DomainSpec, ...]
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    epsilons: tuple[float, ...]
    controls: tuple[str, ...]
    delta: float | None
    allow_large_delta: bool
    seeds: tuple[int, ...]
    model: str
    training: TrainingConfig
    pretrain: PretrainConfig | None
    federations: tuple[FederationConfig, ...]
    init_path: Path | None  # training.init resolved to a weights file, when it names one
    preprocessing: Preprocessing
    resources: Resources
    evaluation: EvaluationConfig
    ray: RayConfig
    audit: AuditConfig | None = None
    tuning: TuningConfig | None = None

    def domain(self, name: str) -> DomainSpec:
        return next(d for d in self.domains if d.name == name)

    @property
    def trained_domains(self) -> tuple[str, ...]:
        """Domains whose training split some trial uses: sources and federation sites."""
        fed = [s for f in self.federations for s in f.sites]
        return tuple(dict.fromkeys([*self.sources, *fed]))


@dataclass(frozen=True)
class TrialSpec:
    """Everything that determines one trained model; ``key`` hashes exactly this."""

    source: str
    data_fingerprint: str
    epsilon: float
    delta: float
    seed: int
    model: str
    training: TrainingConfig
    preprocessing: Preprocessing
    # "standard", or a control: "clip_only" = DP-SGD's clipping and Poisson sampling without
    # noise (epsilon = inf), which separates the effect of clipping from the effect of noise.
    variant: str = "standard"
    # resolved initialisation: "scratch", "pretrain:<trial key>" or "file:<sha256 prefix>"
    init: str = "scratch"
    # set for a federated trial: ``source`` is then the federation's name, ``delta`` the
    # largest site delta and ``training.epochs`` = rounds x local epochs
    federation: Federation | None = None
    # training.pos_weight "public", resolved: the pretraining domain's exact weights
    public_pos_weight: tuple[float, ...] = ()
    # set for an audit twin (variant "audit"): its canaries
    audit: AuditSpec | None = None
    # set for a tuned cell (the grid's ``tuning`` section): the best of K candidates
    tuning: TuningConfig | None = None
    key: str = field(default="", compare=False)

    @property
    def is_private(self) -> bool:
        return math.isfinite(self.epsilon)

    @property
    def kind(self) -> str:
        """The name of the trial's kind (``kinds.REGISTRY``): a federation's, else its variant.
        Derived from the keyed fields, so it is not in the key itself (pinned keys hold)."""
        if self.tuning is not None:
            return "tuning"
        return "federated" if self.federation is not None else self.variant

    @property
    def clips(self) -> bool:
        """Whether training clips per-sample gradients (DP trials and the clip-only control)."""
        return self.is_private or self.variant == "clip_only"

    @property
    def loss_weight_source(self) -> str:
        """Where this trial's pos_weight comes from (lossweights.resolve)."""
        from privdom_ray.lossweights import resolve

        return resolve(self.training.pos_weight, private=self.is_private)

    @property
    def name(self) -> str:
        """Human-readable trial name (Ray dashboard, logs): source, epsilon, seed."""
        cell = f"{self.source}_eps{format_epsilon(self.epsilon)}_seed{self.seed}"
        if self.variant == "audit":
            return f"{cell}_audit"
        if self.variant != "standard":
            return f"{self.source}_{self.variant.replace('_', '-')}_seed{self.seed}"
        return cell

    def identity(self) -> dict[str, Any]:
        """The fields the key hashes: what determines the model, and nothing that does not.

        Two rules keep the keys of finished trials stable across upgrades (tests pin them):
        a field added after keys were first written is left out at its default
        (``ADDED_FIELDS``), and a setting the trial cannot use is left out (DP settings of a
        non-private trial, clipping settings of one that does not clip).
        """
        d = dataclasses.asdict(self)
        d.pop("key")
        d["epsilon"] = format_epsilon(self.epsilon)
        d["training"].pop("init")  # the user's text (a path may move); ``init`` is what counts
        for path, default in ADDED_FIELDS.items():
            *parents, name = path.split(".")
            node = d
            for parent in parents:
                node = node[parent]
            if node.get(name) == default:
                node.pop(name)
        unused = () if self.is_private else _UNUSED_WITHOUT_DP
        unused += () if self.clips else _UNUSED_WITHOUT_CLIPPING
        unused += () if self.loss_weight_source == "dp_counts" else ("pos_weight_budget",)
        for name in unused:
            d["training"].pop(name, None)
        return d

    def with_key(self) -> TrialSpec:
        return dataclasses.replace(self, key=content_key(self.identity()))

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["epsilon"] = format_epsilon(self.epsilon)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TrialSpec:
        return cls(
            source=d["source"],
            data_fingerprint=d["data_fingerprint"],
            epsilon=parse_number(d["epsilon"]),
            delta=float(d["delta"]),
            seed=int(d["seed"]),
            model=d["model"],
            training=_training_from_json(d["training"]),
            preprocessing=Preprocessing(**d["preprocessing"]),
            variant=d.get("variant", "standard"),
            init=d.get("init", "scratch"),
            federation=Federation.from_json(d["federation"]) if d.get("federation") else None,
            public_pos_weight=tuple(d.get("public_pos_weight", ())),
            audit=AuditSpec(**d["audit"]) if d.get("audit") else None,
            tuning=TuningConfig.from_json(d["tuning"]) if d.get("tuning") else None,
            key=d.get("key", ""),
        )


#: Fields added after trial keys were first written, with their defaults: left out of the key
#: at the default, so every earlier trial keeps its key ("training.x" = a training field).
ADDED_FIELDS: dict[str, Any] = {
    "variant": "standard",
    "init": "scratch",
    "federation": None,
    "public_pos_weight": (),
    "training.privacy_unit": "image",
    "training.pos_weight": "auto",
    "training.pos_weight_budget": 0.05,
    "audit": None,
    "tuning": None,
}
_UNUSED_WITHOUT_DP = ("accountant",)
_UNUSED_WITHOUT_CLIPPING = ("max_grad_norm", "privacy_unit", "grad_sample_mode")


def _training_from_json(d: Mapping[str, Any]) -> TrainingConfig:
    d = dict(d)
    if isinstance(d.get("pos_weight"), list):  # five fixed numbers come back as a JSON list
        d["pos_weight"] = tuple(float(v) for v in d["pos_weight"])
    return TrainingConfig(**d)


def format_epsilon(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def content_key(obj: Any) -> str:
    """Short stable hash of canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
