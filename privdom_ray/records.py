"""The run record: how a trained model was made (``trial.json`` without its spec), typed.

Writers (``trial.py``) build a :class:`RunRecord`; the trial store alone turns it into JSON
and back (:meth:`RunRecord.to_json`, :meth:`RunRecord.from_json`); tables, audits and exports
read its fields. What only one kind of trial records (an audit twin's result, a federation's
members) is that kind's typed ``part``, defined by the kind (``TrialKind.record_part`` and
``record_json``; the store resolves the kind: this module sits below kinds/ and holds the part
opaquely). Keys this version does not know (older or newer writers, kind-specific timings)
are kept in ``extra`` and written back unchanged: a record read and written again loses
nothing (a ``null`` field and an absent one both read as None).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from privdom_ray.numeric import parse_number


@dataclass(frozen=True)
class RunRecord:
    """What a trained trial's record holds besides its spec (every field optional: records
    of older versions lack some; a reader decides what a missing one means)."""

    name: str = ""
    best_epoch: int | None = None  # the kept epoch (a federation: round), 1-based
    val_macro_auc: float | None = None
    selection: str = ""  # how the kept epoch was chosen
    train_seconds: float | None = None
    resumed_from_epoch: int | None = None
    n_train: int | None = None
    n_val: int | None = None
    units: int | None = None  # what Poisson sampling drew from: images, or patients
    # the loss-threshold membership attack (private: read without noise)
    mia_auc: float | None = None
    mia_tpr_at_1fpr: float | None = None
    mia_n: int | None = None
    node: str = ""
    device: str = ""
    slot_share: float | None = None
    versions: Mapping[str, str] = field(default_factory=dict)
    code_version: str = ""
    finished_at: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)  # every key not named above
    # its kind's own part (``TrialKind.record_part``: e.g. kinds.audit.TwinRun,
    # kinds.federated.FederatedRun), typed by the kind; None for a kind without one
    part: object | None = None

    @property
    def audit(self) -> Mapping[str, Any] | None:
        """An audit twin's result (read-only, for readers written before kinds owned it)."""
        return getattr(self.part, "audit", None)

    @classmethod
    def make(cls, **fields: Any) -> RunRecord:
        """A record from keyword fields; the ones not named above go to ``extra``."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in fields.items() if k not in names}
        return cls(**{k: v for k, v in fields.items() if k in names}, extra=extra)

    def to_json(self, part: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The record as ``trial.json`` holds it (the store adds the spec); ``part``: its
        kind's part as JSON (``TrialKind.record_json``), written where those keys always were."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = {} if f.default is dataclasses.MISSING else f.default
            if f.name not in ("extra", "part") and (value != default or f.name in _NULLABLE):
                out[f.name] = dict(value) if isinstance(value, Mapping) else value
            if f.name == _PART_AFTER:
                out.update(part or {})
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], *, part: object | None = None) -> RunRecord:
        """The typed record of a stored ``trial.json`` (its ``spec`` left out; ``part``: its
        kind's part, read by the kind from the keys it owns, which ``d`` no longer holds):
        ValueError or TypeError when a named field is not of its type (a damaged record)."""
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        extra = {}
        for k, v in d.items():
            if k == "spec":
                continue
            if k not in kinds or k in ("extra", "part"):
                extra[k] = v
            else:
                try:
                    kw[k] = typed(kinds[k], v)
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(f"{k}: {exc}") from None
        return cls(**kw, extra=extra, part=part)


#: written as null when None, as the writers always wrote them ("measured nothing"); other
#: fields at their default are left out (absent reads as the default)
_NULLABLE = ("val_macro_auc", "resumed_from_epoch", "mia_auc", "mia_tpr_at_1fpr")
#: a kind's part is written after this field: where its keys ("audit", "sites") were written
#: when they were fields of this record, so trial.json keeps its bytes
_PART_AFTER = "mia_n"


def typed(kind: str, value: Any) -> Any:
    """A stored value as the annotation ``kind`` says (``from __future__``: a string); the
    kinds' parts parse their fields with it too."""
    if value is None and kind.endswith("| None"):
        return None
    base = kind.removesuffix(" | None")
    if base == "float":
        return parse_number(value)
    if base == "int":
        number = parse_number(value)
        if not number.is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        return int(number)
    if base == "str":
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a string")
        return value
    if base.startswith("Mapping"):
        if not isinstance(value, Mapping):
            raise ValueError(f"{value!r} is not a mapping")
        return dict(value)
    return value
