"""The report's one view of the aggregate tables: :class:`ReportView` and its selections.

Built once from ``transfer.parquet`` and, when present, ``comparisons.parquet`` and
``reliability.parquet`` (never trial folders); every section, the console summary and the
figures read it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from privdom_ray.config import format_epsilon
from privdom_ray.folder import SweepFolder
from privdom_ray.kinds import row_kind
from privdom_ray.stats import comparisons, results

_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "brier", "ece")


# ------------------------------------------------------------------------------ selections


def epsilons(df: pd.DataFrame) -> list[float]:
    return sorted(df["epsilon_target"].unique(), key=lambda e: (math.isinf(e), e))


def eps_label(eps: float) -> str:
    return "ε = " + format_epsilon(eps) + (" (no DP)" if math.isinf(eps) else "")


def row_kinds(df: pd.DataFrame) -> pd.Series:
    """Each row's trial kind (``kinds.row_kind``: the one rule that reads a table's columns)."""
    none = pd.Series(None, index=df.index, dtype=object)
    variant = df["variant"] if "variant" in df.columns else none
    sites = df["training_sites"] if "training_sites" in df.columns else none
    kinds = [row_kind(v, s, t) for v, s, t in zip(variant, df["source"], sites, strict=True)]
    return pd.Series(kinds, index=df.index, dtype=object)


def is_federated(df: pd.DataFrame) -> pd.Series:
    """Rows of a model trained by several sites together (a kind whose data is its members)."""
    return row_kinds(df).map(lambda k: k.data == "sites").astype(bool)


def in_matrices(df: pd.DataFrame) -> pd.Series:
    """Rows of the compared models (single-site or federated), not controls or twins."""
    return row_kinds(df).map(lambda k: k.in_matrices).astype(bool)


def split_controls(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(standard single-site trials, the rest): controls such as clip-only never mix with
    epsilon = inf, and federated models are neither a site's own model nor an outside one."""
    standard = in_matrices(df)
    return df[standard & ~is_federated(df)], df[~standard]


# ------------------------------------------------------------------------------ the view


def _guarantees(output: str | Path) -> pd.DataFrame | None:
    """guarantees.parquet: an export's (None in the data owner's folder)."""
    path = SweepFolder(output).guarantees
    return pd.read_parquet(path) if path.is_file() else None


class ReportView:
    """The aggregate tables plus every lookup the sections and figures need.

    ``df``: standard single-site rows of the transfer table (``full``: all rows). Cells are
    averaged over seeds (``k`` seeds, ``sd`` of the AUC across them). Comparison lookups
    return the row that answers a comparison (``is_summary``: the per-seed row with one
    seed, the across-seeds row with several).
    """

    # the selections, for the kinds' sections (kinds/ sits below report/: they get the view)
    epsilons = staticmethod(epsilons)
    eps_label = staticmethod(eps_label)
    is_federated = staticmethod(is_federated)
    split_controls = staticmethod(split_controls)

    def __init__(
        self,
        transfer: pd.DataFrame,
        cmp: pd.DataFrame | None = None,
        reliability: pd.DataFrame | None = None,
        *,
        standard_only: bool = True,
        guarantees: pd.DataFrame | None = None,
    ) -> None:
        self.full = transfer
        # one row per training set: what the tables' values cost it (an export's
        # guarantees.parquet; None in the data owner's folder)
        self.guarantees = guarantees
        self.df = transfer
        if standard_only and not transfer.empty:
            self.df = split_controls(transfer)[0]
        current = cmp is not None and {"is_summary", "df", "p_tost_iut"} <= set(cmp.columns)
        self.cmp = cmp if current else None
        self.old_cmp = cmp is not None and self.cmp is None  # written by an older version
        self.reliability = reliability
        df = self.df
        if df.empty:
            self.sources, self.targets, self.eps, self.seeds = [], [], [], []
            self.subgroups, self.labels, self.cells = [], [], pd.DataFrame()
        else:
            self.sources = sorted(df["source"].unique())
            self.targets = sorted(df["target"].unique())
            self.eps = epsilons(df)
            self.seeds = sorted(int(s) for s in df["seed"].dropna().unique())
            self.subgroups = list(pd.unique(df["subgroup"]))
            self.labels = [x for x in pd.unique(df["label"]) if x != "macro"]
            self.cells = _cells(df)
        self._summary: dict[tuple, dict] = {}
        if self.cmp is not None and not self.cmp.empty:
            rows = self.cmp[self.cmp["is_summary"].fillna(False).astype(bool)]
            for r in rows.to_dict("records"):
                self._summary[_summary_key(r)] = r

    @classmethod
    def load(cls, output: str | Path) -> ReportView:
        """The view of a sweep's output folder (transfer.parquet is required)."""
        return cls(
            results.load(output), comparisons.load(output), comparisons.load_reliability(output),
            guarantees=_guarantees(output),
        )  # fmt: skip

    @classmethod
    def of_tables(
        cls,
        output: str | Path,
        transfer: pa.Table,
        cmp: pa.Table | None = None,
        reliability: pa.Table | None = None,
    ) -> ReportView:
        """The view of tables just built (and written) in memory: the same frames a reader of
        the files gets back (arrow's own conversion), without reading them again."""
        return cls(
            transfer.to_pandas(),
            None if cmp is None else cmp.to_pandas(),
            None if reliability is None else reliability.to_pandas(),
            guarantees=_guarantees(output),
        )

    @property
    def finite_eps(self) -> list[float]:
        return [e for e in self.eps if math.isfinite(e)]

    @property
    def has_nondp(self) -> bool:
        return any(math.isinf(e) for e in self.eps)

    @property
    def unit(self) -> str:
        """The resampling unit of the CIs ("patient", "image" or "patient/image")."""
        if "resampling_unit" not in self.df.columns:
            return "image"
        units = sorted(self.df["resampling_unit"].fillna("image").unique())
        return "/".join(units) or "image"

    def cell(self, eps: float, source: str, target: str, label="macro", subgroup="all") -> dict:
        """Seed-averaged metrics of one source -> target cell; NaN values (k = 0) if missing."""
        try:
            return self.cells.loc[(eps, label, subgroup, source, target)].to_dict()
        except KeyError:
            return {"k": 0}

    def matrix(self, eps: float, field: str = "auc", label="macro", subgroup="all"):
        """Rows = sources, columns = targets; NaN where the cell or value is missing."""
        return pd.DataFrame(
            [
                [self.cell(eps, s, t, label, subgroup).get(field, math.nan) for t in self.targets]
                for s in self.sources
            ],
            index=self.sources,
            columns=self.targets,
            dtype=float,
        )

    def summary(self, quantity: str, **where: Any) -> dict | None:
        """The summary comparison row of ``quantity`` at (source, target, label, subgroup,
        epsilon); None when comparisons.parquet lacks it."""
        key = (
            quantity,
            where.get("source"),
            where["target"],
            where.get("label", "macro"),
            where.get("subgroup", "all"),
            float(where["epsilon"]),
        )
        return self._summary.get(key)

    def rows(self, **where: Any) -> pd.DataFrame:
        """Summary comparison rows matching ``where`` (empty without comparisons)."""
        if self.cmp is None:
            return pd.DataFrame()
        sel = self.cmp[self.cmp["is_summary"].fillna(False).astype(bool)]
        for k, v in where.items():
            sel = sel[sel[k] == v]
        return sel


def _cells(df: pd.DataFrame) -> pd.DataFrame:
    """Seed-averaged metric columns per (epsilon, label, subgroup, source, target)."""
    cols = [
        c
        for m in _METRICS
        for c in (m, f"{m}_lo", f"{m}_hi")
        if c in df.columns and df[c].notna().any()
    ]
    cols += [c for c in ("n", "n_pos", "n_patients", "n_labels", "threshold") if c in df.columns]
    keys = ["epsilon_target", "label", "subgroup", "source", "target"]
    num = df[keys + cols].copy()
    for c in cols:
        num[c] = pd.to_numeric(num[c], errors="coerce")
    # an approximate CI (too few units of the rarer class, inference.RELIABLE_UNITS) is marked
    num["approx"] = df["ci_note"].notna().astype(float) if "ci_note" in df.columns else 0.0
    cols.append("approx")
    grp = num.groupby(keys, dropna=False)
    out = grp[cols].mean()
    out["sd"] = grp["auc"].std()
    out["k"] = grp["auc"].count()
    out["rows"] = grp.size()
    return out


def _summary_key(r: dict) -> tuple:
    source = r.get("source")
    return (
        r["quantity"],
        None if source is None or (isinstance(source, float) and math.isnan(source)) else source,
        r["target"],
        r["label"],
        r["subgroup"],
        float(r["epsilon"]),
    )
