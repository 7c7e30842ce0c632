"""The report's figures (matplotlib, imported only here and only when drawing): transfer
heatmaps, AUC against epsilon, subgroup and drop bars, the equivalence plot and reliability
diagrams, all drawn from the same :class:`~privdom_ray.report.view.ReportView`, then the
kinds' own figures (``TrialKind.report_figures``: the audit twins' plot).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from privdom_ray import atomic, kinds
from privdom_ray.config import format_epsilon
from privdom_ray.markdown import missing as _missing
from privdom_ray.report.formatting import (
    MISSING,
    NO_DP,
    _privacy_note,
    _verdict,
)
from privdom_ray.report.secondary import _n_labels
from privdom_ray.report.view import ReportView, epsilons
from privdom_ray.stats import inference, quantities

# ------------------------------------------------------------------------------ figures


def _draw_figures(view: ReportView, folder: Path) -> list[Path]:
    """All PNGs; matplotlib's object API with the Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def new(figsize: tuple[float, float], **kw) -> tuple[Any, Any]:
        fig = Figure(figsize=figsize, layout="constrained")
        FigureCanvasAgg(fig)
        return fig, fig.subplots(**kw)

    paths = [_heatmap(view, eps, new, folder / f"transfer_matrix_eps-{format_epsilon(eps)}.png")
             for eps in view.eps]  # fmt: skip
    paths.append(_auc_vs_epsilon(view, new, folder / "auc_vs_epsilon.png"))
    paths.append(_subgroup_bars(view, new, folder / "subgroup_auc.png"))
    if view.finite_eps and view.has_nondp and view.cmp is not None:
        paths.append(_drop_bars(view, new, folder / "auc_drop.png"))
        paths.append(_equivalence_plot(view, new, folder / "equivalence.png"))
    if view.reliability is not None and not view.reliability.empty:
        paths.append(_reliability_plot(view, new, folder / "reliability.png"))
    for kind in kinds.REGISTRY.values():  # the kinds' own figures (the audit twins' plot)
        for decl in kind.report_figures():
            fig = decl.draw(view, new)
            if fig is not None:
                paths.append(_save(fig, folder / decl.file))
    return paths


def _save(fig: Any, path: Path) -> Path:
    atomic.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    return path


def _accountant_title(view: ReportView, eps: float) -> str:
    if math.isinf(eps):
        return "ε = ∞ (no DP)"
    return _privacy_note(view.df, eps).replace("target ε", "ε")


def _heatmap(view: ReportView, eps: float, new, path: Path) -> Path:
    from matplotlib.patches import Rectangle

    auc = view.matrix(eps).to_numpy()
    lo, hi = view.matrix(eps, "auc_lo").to_numpy(), view.matrix(eps, "auc_hi").to_numpy()
    n_s, n_t = auc.shape
    fig, ax = new((1.6 * n_t + 2.6, 1.1 * n_s + 1.8))
    finite = auc[~np.isnan(auc)]
    vmin = min(0.5, float(finite.min())) if finite.size else 0.5
    im = ax.imshow(np.ma.masked_invalid(auc), cmap=_cmap("viridis"), vmin=vmin, vmax=1.0)
    for i in range(n_s):
        for j in range(n_t):
            if np.isnan(auc[i, j]):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.85", hatch="//",
                                       edgecolor="0.6", linewidth=0))  # fmt: skip
                ax.text(j, i, MISSING, ha="center", va="center", fontsize=14, color="0.3")
                continue
            text = f"{auc[i, j]:.3f}"
            if not (np.isnan(lo[i, j]) or np.isnan(hi[i, j])):
                text += f"\n[{lo[i, j]:.2f}, {hi[i, j]:.2f}]"
            light = (auc[i, j] - vmin) / max(1e-9, 1.0 - vmin) > 0.6
            weight = "bold" if view.sources[i] == view.targets[j] else "normal"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, fontweight=weight,
                    color="black" if light else "white")  # fmt: skip
    ax.set_xticks(range(n_t), view.targets)
    ax.set_yticks(range(n_s), view.sources)
    ax.set_xlabel("tested on (target)")
    ax.set_ylabel("trained on (source)")
    seeds = f", mean of {len(view.seeds)} seeds" if len(view.seeds) > 1 else ""
    ax.set_title(f"Macro AUC [95% CI, {view.unit} jackknife t]{seeds}\n"
                 f"{_accountant_title(view, eps)}", fontsize=9)  # fmt: skip
    fig.colorbar(im, ax=ax, shrink=0.8, label="macro AUC")
    return _save(fig, path)


def _cmap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="0.85")


def _eps_positions(eps_list: list[float]) -> dict[float, float]:
    """x positions: log10(eps) for finite eps, inf one step to the right of the largest."""
    finite = [e for e in eps_list if math.isfinite(e)]
    pos = {e: math.log10(e) for e in finite}
    if any(math.isinf(e) for e in eps_list):
        if finite:
            span = max(pos.values()) - min(pos.values())
            pos[math.inf] = max(pos.values()) + max(0.5, 0.25 * span)
        else:
            pos[math.inf] = 0.0
    return pos


def _eps_axis(ax: Any, pos: dict[float, float]) -> None:
    ticks = sorted(pos, key=lambda e: pos[e])
    ax.set_xticks([pos[e] for e in ticks],
                  [NO_DP if math.isinf(e) else format_epsilon(e) for e in ticks])  # fmt: skip
    ax.set_xlabel("ε (target; log scale)")
    ax.grid(alpha=0.3)


def _accountants_used(view: ReportView) -> str:
    finite = view.df.loc[np.isfinite(view.df["epsilon_target"]), "accountant"]
    used = sorted(finite.dropna().unique())
    return ("ε by " + ", ".join(used) + " accountant") if used else "no DP trials"


def _errorbars(ax: Any, xs: list, ys: list, err: list, **kw) -> None:
    if xs:
        yerr = np.nan_to_num(np.array(err, dtype=float).T, nan=0.0)
        ax.errorbar(xs, ys, yerr=yerr, capsize=3, **kw)


def _auc_vs_epsilon(view: ReportView, new, path: Path) -> Path:
    pos = _eps_positions(view.eps)
    fig, (ax_on, ax_off) = new((11, 4.4), ncols=2, sharey=True)
    width = 0.04 * max(1.0, max(pos.values()) - min(pos.values()))
    for i, s in enumerate(view.sources):
        shift = (i - (len(view.sources) - 1) / 2) * width
        pts = [(pos[e] + shift, view.cell(e, s, s)) for e in view.eps]
        pts = [(x, c) for x, c in pts if not _missing(c.get("auc"))]
        _errorbars(ax_on, [x for x, _ in pts], [c["auc"] for _, c in pts],
                   [(c["auc"] - c.get("auc_lo", np.nan), c.get("auc_hi", np.nan) - c["auc"])
                    for _, c in pts], marker="o", label=s)  # fmt: skip
    for i, t in enumerate(view.targets):
        shift = (i - (len(view.targets) - 1) / 2) * width
        xs, ys, err = [], [], []
        for e in view.eps:
            y = inference.nanmean([view.cell(e, s, t).get("auc", np.nan) for s in view.sources
                                   if s != t])  # fmt: skip
            if math.isnan(y):
                continue
            r = view.summary("drop", target=t, epsilon=e)
            lo = r.get("auc_off_lo") if r else None
            hi = r.get("auc_off_hi") if r else None
            xs.append(pos[e] + shift)
            ys.append(y)
            err.append((0.0, 0.0) if _missing(lo) or _missing(hi) else (y - lo, hi - y))
        _errorbars(ax_off, xs, ys, err, marker="s", label=t)
    ax_on.set_title("On-domain (trained and tested on the same site)\nerror bars: 95% CI",
                    fontsize=9)  # fmt: skip
    off_note = "95% CI of the mean" if view.cmp is not None else "no CIs: comparisons missing"
    ax_off.set_title(f"Off-domain: mean over other sources, per test site\n{off_note}", fontsize=9)
    ax_on.set_ylabel("macro AUC")
    for ax in (ax_on, ax_off):
        _eps_axis(ax, pos)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, title="source" if ax is ax_on else "test site")
    fig.suptitle(f"Macro AUC vs ε ({_accountants_used(view)})", fontsize=10)
    return _save(fig, path)


def _subgroup_bars(view: ReportView, new, path: Path) -> Path:
    on = [s for s in view.sources if s in view.targets]
    n_e = max(1, len(view.eps))
    fig, axes = new((max(6.0, 1.3 * len(view.subgroups) * n_e / 2 + 2), 2.8 * max(1, len(on))),
                    nrows=max(1, len(on)), squeeze=False)  # fmt: skip
    width = 0.8 / n_e
    x = np.arange(len(view.subgroups))
    for ax, s in zip(axes[:, 0], on or [None], strict=False):
        if s is None:
            ax.text(0.5, 0.5, "no on-domain cells", ha="center", transform=ax.transAxes)
            continue
        for k, e in enumerate(view.eps):
            cells = [view.cell(e, s, s, subgroup=g) for g in view.subgroups]
            h, lo, hi = (np.array([c.get(f, np.nan) for c in cells], dtype=float)
                         for f in ("auc", "auc_lo", "auc_hi"))  # fmt: skip
            xs = x + (k - (n_e - 1) / 2) * width
            label = NO_DP if math.isinf(e) else f"ε = {format_epsilon(e)}"
            # NaN heights and error bars draw nothing: a missing bar stays visibly missing
            ax.bar(xs, h, width, yerr=np.vstack([h - lo, hi - h]), capsize=2, label=label)
            for xi, hv in zip(xs, h, strict=True):
                if np.isnan(hv):
                    ax.text(xi, 0.02, MISSING, ha="center", va="bottom", fontsize=9)
        ticks = [f"{g}\n{_n_labels(view, s, g)} labels" for g in view.subgroups]
        ax.set_xticks(x, ticks, fontsize=8)
        ax.set_xlim(-0.5, len(view.subgroups) - 0.5)  # all-missing groups keep their slot
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("macro AUC")
        ax.set_title(f"{s} → {s} (on-domain); error bars: 95% CI", fontsize=9)
        ax.legend(fontsize=7, ncols=n_e)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Macro AUC by subgroup ({_accountants_used(view)}; — = missing); the "
                 "subgroups of one family (sex, age) average the same labels", fontsize=9)  # fmt: skip
    return _save(fig, path)


def _drop_bars(view: ReportView, new, path: Path) -> Path:
    fig, axes = new((max(6.0, 1.6 * len(view.targets) + 2), 3.2 * len(view.finite_eps)),
                    nrows=len(view.finite_eps), squeeze=False)  # fmt: skip
    series = (
        (quantities.PRIMARY_QUANTITY, math.inf, "value_nondp", "drop non-DP"),
        (quantities.PRIMARY_QUANTITY, None, "value_dp", "drop DP"),
        (quantities.ON_DOMAIN, None, "delta", "on-domain ΔAUC (DP − non-DP)"),
        (quantities.OFF_DOMAIN, None, "delta", "off-domain ΔAUC (DP − non-DP)"),
    )
    for ax, eps in zip(axes[:, 0], view.finite_eps, strict=True):
        x = np.arange(len(view.targets))
        for k, (q, e, col, label) in enumerate(series):
            rows = [view.summary(q, target=t, epsilon=e or eps) or {} for t in view.targets]
            ci = ("delta_lo", "delta_hi") if col == "delta" else (f"{col}_lo", f"{col}_hi")
            h, lo, hi = (np.array([r.get(c, np.nan) for r in rows], dtype=float)
                         for c in (col, *ci))  # fmt: skip
            xs = x + (k - 1.5) * 0.2
            ax.bar(xs, np.nan_to_num(h), 0.2, yerr=np.nan_to_num(np.vstack([h - lo, hi - h])),
                   capsize=2, label=label)  # fmt: skip
            for xi, hv in zip(xs, h, strict=True):
                if np.isnan(hv):
                    ax.text(xi, 0, MISSING, ha="center", va="bottom", fontsize=9)
        ax.axhline(0, color="0.3", linewidth=0.8)
        ax.set_xticks(x, view.targets)
        ax.set_xlabel("test site")
        ax.set_ylabel("AUC")
        ax.set_title(f"{_accountant_title(view, eps)} vs no DP; error bars: 95% CI", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Each side's own AUC drop (on-domain − mean off-domain) per test site, and "
                 "DP's on- and off-domain costs", fontsize=10)  # fmt: skip
    return _save(fig, path)


def _equivalence_plot(view: ReportView, new, path: Path) -> Path:
    """Forest plot of the primary endpoint: Δ with its 90% (TOST) and 95% CIs vs ±margin."""
    rows = [(eps, t, view.summary(quantities.PRIMARY_QUANTITY, target=t, epsilon=eps))
            for eps in view.finite_eps for t in view.targets]  # fmt: skip
    fig, ax = new((7.5, 0.45 * len(rows) + 1.8))
    margin = next((r["margin"] for *_, r in rows if r and not _missing(r.get("margin"))), None)
    if margin is not None:
        ax.axvspan(-margin, margin, color="tab:green", alpha=0.12, label=f"±{margin:g} margin")
    ax.axvline(0, color="0.3", linewidth=0.8)
    for i, (*_, r) in enumerate(rows):
        if r is None or _missing(r.get("delta")):
            ax.text(0, i, MISSING, ha="center", va="center")
            continue
        for lo, hi, lw in (("delta_lo", "delta_hi", 1.2), ("tost_lo", "tost_hi", 3.5)):
            if not _missing(r.get(lo)):
                ax.plot([r[lo], r[hi]], [i, i], color="tab:blue", linewidth=lw)
        ax.plot(r["delta"], i, "o", color="black")
        ax.text(1.01, i, _verdict(r), transform=ax.get_yaxis_transform(), va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [f"{t}, ε = {format_epsilon(e)}" for e, t, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("Δdrop = drop(DP) − drop(non-DP), each side's own drop (AUC; > 0: DP "
                  "transfers worse)")  # fmt: skip
    ax.set_title("Primary endpoint: thick = 90% CI (TOST), thin = 95% CI; per-site verdicts "
                 "on Holm p", fontsize=9)  # fmt: skip
    if margin is not None:
        ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def _reliability_plot(view: ReportView, new, path: Path) -> Path:
    """Reliability diagram pooled over labels and seeds: on- vs off-domain, per epsilon."""
    rel = view.reliability
    rel = rel[rel["label"] == "pooled"]
    fig, axes = new((9, 4.2), ncols=2, sharey=True)
    for ax, on in zip(axes, (True, False), strict=True):
        ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=0.8)
        for eps in epsilons(rel.rename(columns={"epsilon": "epsilon_target"})):
            sel = rel[(rel["on_domain"] == on) & (rel["epsilon"] == eps)]
            grp = sel.assign(s=sel["mean_score"] * sel["n"], o=sel["observed"] * sel["n"])
            agg = grp.groupby("bin")[["n", "s", "o"]].sum()
            agg = agg[agg["n"] > 0]
            label = NO_DP if math.isinf(eps) else f"ε = {format_epsilon(eps)}"
            ax.plot(agg["s"] / agg["n"], agg["o"] / agg["n"], marker="o", label=label)
        ax.set_title("on-domain" if on else "off-domain", fontsize=9)
        ax.set_xlabel("mean predicted probability")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("observed fraction positive")
    fig.suptitle("Reliability diagram (test images, pooled over labels)", fontsize=10)
    return _save(fig, path)
