"""Figures of the many-users runs (tlselect.search.tenants), drawn from their tables only."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
import pandas as pd  # noqa: E402

from tlselect.core.files import atomic_path  # noqa: E402


def _save(fig, out: Path) -> None:
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def draw_tenants(table: pd.DataFrame, out: Path) -> None:
    """The global table: one panel per tenant and one for the weighted average, each tenant's
    incumbent test accuracy against the seconds spent on all tenants, one line per scheduler."""
    panels = [*[t for t in dict.fromkeys(table["tenant"]) if t != "average"], "average"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.4), dpi=120, sharex=True, squeeze=False)
    for ax, tenant in zip(axes[0], panels, strict=True):
        for scheduler, rows in table[table["tenant"] == tenant].groupby("scheduler", sort=False):
            ax.step(rows["compute_seconds"], rows["test_accuracy"].fillna(0.0), where="post", label=scheduler)
        ax.set_title("weighted average" if tenant == "average" else f"tenant {tenant}", fontsize=9)
        ax.set_xlabel("seconds spent on all tenants")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy of the pick")
    axes[0][-1].legend(fontsize=8)
    _save(fig, out)


def draw_replay(curve: pd.DataFrame, summary: pd.DataFrame, out: Path) -> None:
    """Replayed schedulers: mean global regret and its 95% interval against the share of all pools'
    seconds; the dotted line is round robin's mean regret at the end of the budget, the dashed one the
    least compute in which an oracle scheduler reaches it (the summary's ``oracle`` row, if any)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for scheduler, rows in curve.groupby("scheduler", sort=False):
        line = ax.plot(rows["share"], rows["regret_points"], label=scheduler)[0]
        ax.fill_between(rows["share"], rows["ci95_low"], rows["ci95_high"], color=line.get_color(), alpha=0.2)
    if not summary.empty:
        ax.axhline(summary["round_robin_final_regret_points"].iloc[0], color="grey", lw=0.8, ls=":")
        oracle = summary[summary["scheduler"] == "oracle"]
        if not oracle.empty and np.isfinite(oracle["compute_to_round_robin_final"].iloc[0]):
            share = oracle["compute_to_round_robin_final"].iloc[0] * oracle["budget_share"].iloc[0]
            ax.axvline(share, color="grey", lw=0.8, ls="--", label="oracle reaches it")
    ax.set_yscale("log")
    ax.set_xlabel("share of all tenants' pools' seconds spent")
    ax.set_ylabel(f"global average regret (test points), {curve['seeds'].max()} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Schedulers replayed on recorded learning curves", fontsize=10)
    _save(fig, out)


def tenants_sentence(table: pd.DataFrame) -> str:
    """What the global table says: each scheduler's weighted average test accuracy at the end of the
    budget and the seconds it spent, the best first."""
    last = table[(table["tenant"] == "average") & (table["job"] == table["job"].max())]
    last = last.sort_values(["test_accuracy", "compute_seconds"], ascending=[False, True])
    parts = [f"{r.scheduler} {r.test_accuracy:.3f} in {r.compute_seconds:.0f} s" for r in last.itertuples()]
    tenants = [t for t in dict.fromkeys(table["tenant"]) if t != "average"]
    return (
        f"After {int(last['job'].max())} jobs shared by {len(tenants)} tenants, the weighted average test accuracy "
        f"of the tenants' picks is: {'; '.join(parts)}."
    )
