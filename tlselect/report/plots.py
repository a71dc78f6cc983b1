"""Report figures (matplotlib, PNG), drawn from the aggregated tables only; accuracies carry their 95%
intervals as error bars: Wilson intervals where the table knows the image counts, t-intervals over
the repeats where it has them (each configuration's mean, :func:`tlselect.report.answer.candidates`)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from tlselect.core.backbones import backbone_spec  # noqa: E402
from tlselect.core.files import atomic_path  # noqa: E402
from tlselect.report.answer import candidates, pareto_front, t_interval, wilson, with_intervals  # noqa: E402


def error_bars(frame: pd.DataFrame, split: str = "val"):
    """``yerr`` of :meth:`ax.errorbar` for the rows' ``split`` accuracy (nan where unknown: no bar)."""
    value = frame[f"{split}_accuracy"].astype(float)
    return [value - frame[f"{split}_low"], frame[f"{split}_high"] - value]


def accuracy_vs_time(runs: pd.DataFrame, curves: pd.DataFrame, ax) -> None:
    """Validation accuracy against training time, one point per candidate, with the Pareto front."""
    runs = candidates(runs)
    done = with_intervals(runs)
    ax.errorbar(done["train_seconds"], done["val_accuracy"], yerr=error_bars(done), fmt="none", ecolor="grey",
                elinewidth=0.8, alpha=0.6, zorder=1)  # fmt: skip
    probes = done[done["kind"] == "probe"]
    ax.scatter(probes["train_seconds"], probes["val_accuracy"], s=18, color="grey", label="layer probes", zorder=3)
    for row in done[done["kind"] == "policy"].itertuples():
        ax.scatter(row.train_seconds, row.val_accuracy, s=60, zorder=3)
        ax.annotate(
            row.name, (row.train_seconds, row.val_accuracy), textcoords="offset points", xytext=(5, 4), fontsize=8
        )
    front = pareto_front(runs)
    ax.plot(front["train_seconds"], front["val_accuracy"], "k--", lw=1, label="Pareto front", zorder=2)
    for row in runs[runs["status"] == "diverged"].itertuples():
        ax.scatter(row.train_seconds, 0, marker="x", color="red", s=60, zorder=3)
        ax.annotate(
            f"{row.name} (diverged)",
            (row.train_seconds, 0),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
            color="red",
        )
    ax.set_xscale("symlog", linthresh=1)
    ax.margins(x=0.12, y=0.08)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Accuracy vs training time")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)


def accuracy_by_policy(runs: pd.DataFrame, curves: pd.DataFrame, ax) -> None:
    """Validation and test accuracy per policy (selection on validation; test reported)."""
    runs = candidates(runs)
    ordered = runs[runs["kind"] == "policy"].sort_values("name")
    positions = range(len(ordered))
    val = ordered["val_accuracy"].fillna(0).astype(float)
    test = ordered["test_accuracy"].fillna(0).astype(float)
    bounds = with_intervals(ordered).reindex(ordered.index)  # diverged runs: no bar, no interval
    ax.bar([p - 0.2 for p in positions], val, width=0.4, label="validation", yerr=error_bars(bounds), capsize=3)
    ax.bar([p + 0.2 for p in positions], test, width=0.4, label="test", yerr=error_bars(bounds, "test"), capsize=3)
    labels = [f"{r.name}\n({r.status})" if r.status != "completed" else r.name for r in ordered.itertuples()]
    ax.set_xticks(list(positions), labels, rotation=20, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("Accuracy per policy")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)


def validation_curves(runs: pd.DataFrame, curves: pd.DataFrame, ax) -> None:
    """Validation accuracy per epoch, one line per policy: the mean over its repeats and folds with
    their 95% t-interval, or one run's with its Wilson interval."""
    runs = runs[runs["row"] == "run"] if "row" in runs else runs
    policies = runs[runs["kind"] == "policy"]
    images = dict(zip(policies["run_id"], policies.get("val_images", pd.Series(dtype=float)), strict=True))
    for policy, group in curves[curves["run_id"].isin(set(policies["run_id"]))].groupby("name", sort=True):
        per_epoch = pd.DataFrame(
            [epoch_interval(epoch, rows, images) for epoch, rows in group.groupby("epoch", sort=True)]
        )
        ax.errorbar(per_epoch["epoch"], per_epoch["val_accuracy"], yerr=error_bars(per_epoch), marker="o", ms=3,
                    capsize=2, label=policy)  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Validation curves")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def epoch_interval(epoch: int, rows: pd.DataFrame, images: dict) -> dict:
    """One epoch of a policy's curves: the mean validation accuracy over its runs with the 95%
    t-interval over them, or one run's with its Wilson interval (``images``: validation images by run)."""
    if len(rows) > 1:
        mean, low, high = t_interval(rows["val_accuracy"])
    else:
        mean = rows["val_accuracy"].iloc[0]
        low, high = wilson(mean, images.get(rows["run_id"].iloc[0]))
    return {"epoch": epoch, "val_accuracy": mean, "val_low": low, "val_high": high}


def accuracy_by_layer(runs: pd.DataFrame, curves: pd.DataFrame, ax) -> None:
    """Linear-probe validation accuracy per cached layer, one line per init (Yosinski et al.'s curve)."""
    runs = candidates(runs)
    probes = with_intervals(runs[runs["kind"] == "probe"])
    for (backbone, init), group in probes.groupby(["backbone", "init"], sort=True):
        stages = backbone_spec(backbone).stage_names
        group = group.sort_values("layer", key=lambda column: column.map(stages.index))
        ax.errorbar(group["layer"], group["val_accuracy"], yerr=error_bars(group), marker="o", capsize=3,
                    label=f"init {init}")  # fmt: skip
    ax.set_xlabel("layer (cached features, average-pooled)")
    ax.set_ylabel("linear-probe validation accuracy")
    ax.set_title("Which layer transfers: accuracy by layer")
    if len(probes):
        ax.legend()
    ax.grid(alpha=0.3)


JOIN_STYLES = {"join": "-", "features": "--", "columns": ":"}


def join_by_layer(runs: pd.DataFrame, curves: pd.DataFrame, ax) -> None:
    """Test accuracy of the downstream models per cached layer: on the table joined with the layer
    (solid), on the layer alone (dashed), on the table's columns alone (dotted, the same at every
    layer); one colour per model and init."""
    joins = with_intervals(runs[(runs["kind"] == "join") & (runs["status"] == "completed")])
    layered = joins[joins["inputs"] != "columns"]
    layers = []
    for backbone in sorted(layered["backbone"].dropna().unique()):
        stages = backbone_spec(backbone).stage_names
        layers += [s for s in stages if s in set(layered["layer"]) and s not in layers]
    colors = dict(zip(sorted(joins["model"].unique()), plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for (model, init, inputs), group in layered.groupby(["model", "init", "inputs"], sort=True):
        group = group.set_index("layer").reindex(layers).dropna(subset=["test_accuracy"])
        ax.errorbar(group.index, group["test_accuracy"], yerr=error_bars(group, "test"), marker="o", capsize=3,
                    ls=JOIN_STYLES[inputs], color=colors[model], label=f"{model}, {inputs} ({init})")  # fmt: skip
    for row in joins[joins["inputs"] == "columns"].itertuples():
        ax.axhline(row.test_accuracy, ls=JOIN_STYLES["columns"], color=colors[row.model], label=f"{row.model}, columns")
    ax.set_xlabel("layer (cached features, average-pooled)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Which layer, with or without the table")
    if len(joins):
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def speedups(runs: pd.DataFrame, curves: pd.DataFrame, ax, optimizations: pd.DataFrame | None = None) -> None:
    """Measured speedup of each optimization over its baseline, with the goal where there is one."""
    if optimizations is None or optimizations.empty:
        ax.text(0.5, 0.5, "no benchmark output", ha="center", va="center")
        return
    rows = optimizations.iloc[::-1]
    positions = range(len(rows))
    colors = ["tab:green" if m is True else "tab:red" if m is False else "tab:blue" for m in rows["meets_goal"]]
    ax.barh(list(positions), rows["speedup"], color=colors)
    for p, r in zip(positions, rows.itertuples(), strict=True):
        ax.text(r.speedup, p, f" {r.speedup:.2f}x", va="center", fontsize=8)
        if pd.notna(r.goal):
            ax.plot([r.goal, r.goal], [p - 0.4, p + 0.4], "k:", lw=1)
    ax.set_yticks(list(positions), [f"{r.suite}: {r.optimization}" for r in rows.itertuples()], fontsize=7)
    ax.axvline(1, color="grey", lw=0.8)
    ax.set_xlabel("speedup over its baseline (dotted: goal; green met, red not met)")
    ax.set_title(f"Optimizations measured on {optimizations['device'].iloc[0]}")
    ax.grid(axis="x", alpha=0.3)


FIGURES = {
    f.__name__: f
    for f in (accuracy_vs_time, accuracy_by_policy, validation_curves, accuracy_by_layer, join_by_layer, speedups)
}


def draw(name: str, runs_csv: Path, curves_csv: Path, out: Path, optimizations_csv: Path | None = None) -> None:
    """Draw figure ``name`` from the tables into ``out`` (PNG, written atomically)."""
    runs = pd.read_csv(runs_csv)
    curves = (
        pd.read_csv(curves_csv)
        if Path(curves_csv).stat().st_size > 1
        else pd.DataFrame(columns=["run_id", "name", "epoch", "val_accuracy"])
    )
    fig, ax = plt.subplots(figsize=(9, 4.5) if name == "speedups" else (7, 4.5), dpi=120)
    if name == "speedups":
        optimizations = pd.read_csv(optimizations_csv) if optimizations_csv else None
        if optimizations is not None:
            optimizations["meets_goal"] = optimizations["meets_goal"].map({True: True, False: False})
        speedups(runs, curves, ax, optimizations)
    else:
        FIGURES[name](runs, curves, ax)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def search_compute(search: pd.DataFrame, ax) -> None:
    """Chosen model's validation and test accuracy against the epochs each search method spent, with
    their 95% intervals as error bars (search.csv's ``{val,test}_{low,high}``; none in older tables)."""
    for row in search.itertuples():
        for split, style in (("val", {"fmt": "o", "ms": 8}), ("test", {"fmt": "x", "ms": 6, "color": "black"})):
            value = getattr(row, f"{split}_accuracy")
            low, high = (getattr(row, f"{split}_{side}", math.nan) for side in ("low", "high"))
            error = None if pd.isna(low) else [[value - low], [high - value]]
            ax.errorbar(row.epochs, value, yerr=error, capsize=3, zorder=3, **style)
        label = f"{row.method} ({row.epochs} ep, {row.wall_seconds:.0f} s)"
        ax.annotate(label, (row.epochs, row.val_accuracy), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.15)
    ax.set_xlabel("compute spent (training epochs, all jobs)")
    ax.set_ylabel("accuracy of the chosen model")
    ax.set_title("Model search: accuracy vs compute (o validation, x test; bars: 95% intervals)")
    ax.grid(alpha=0.3)


def proxy_vs_finetune(proxies: pd.DataFrame, taus: pd.DataFrame | None, axes) -> None:
    """Each proxy's score against the best fine-tuned validation accuracy, per (backbone, init), with
    its 95% interval (proxies.csv's ``finetune_val_{low,high}``; none in older tables)."""
    tau = {} if taus is None else dict(zip(taus["proxy"], taus["weighted_kendall_tau"], strict=True))
    for ax, proxy in zip(axes, ("logme", "knn_accuracy", "linear_probe_accuracy"), strict=True):
        for row in proxies.itertuples():
            value = row.finetune_val_accuracy
            low, high = (getattr(row, f"finetune_val_{side}", math.nan) for side in ("low", "high"))
            error = None if pd.isna(low) else [[value - low], [high - value]]
            ax.errorbar(getattr(row, proxy), value, yerr=error, fmt="o", ms=6, capsize=3, zorder=3)
            ax.annotate(
                f"{row.backbone}/{row.init}",
                (getattr(row, proxy), row.finetune_val_accuracy),
                textcoords="offset points",
                xytext=(4, 3),
                fontsize=7,
            )
        value = tau.get(proxy)
        ax.set_title(f"{proxy} (weighted tau {value:.2f})" if pd.notna(value) else proxy, fontsize=9)
        ax.set_xlabel(proxy)
        ax.margins(0.2)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fine-tuned validation accuracy (best grid run)")


def draw_search(name: str, table_csv: Path, out: Path, tau_csv: Path | None = None) -> None:
    """Draw ``search_compute`` (from search.csv) or ``proxy_vs_finetune`` (proxies.csv, proxy_tau.csv)."""
    table = pd.read_csv(table_csv)
    if name == "search_compute":
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        search_compute(table, ax)
    else:
        fig, axes = plt.subplots(1, 3, figsize=(12, 4), dpi=120, sharey=True)
        proxy_vs_finetune(table, pd.read_csv(tau_csv) if tau_csv else None, axes)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def draw_replay(curve: pd.DataFrame, out: Path, pool: str = "the grid's records") -> None:
    """Anytime regret of every replayed method on ``pool``: mean and 95% interval against the share of
    the grid's compute, in epochs (left) and seconds (right); drawn where every seed of the method has
    chosen a model."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120, sharey=True)
    for ax, axis in zip(axes, ("epochs", "seconds"), strict=True):
        for i, (method, rows) in enumerate(curve[curve["axis"] == axis].groupby("method", sort=False)):
            rows = rows[rows["seeds"] == rows["seeds"].max()]  # where every seed of the method has chosen
            label = f"{method} ({rows['seeds'].max()} seeds)"
            line = ax.plot(rows["share"], rows["regret_points"], label=label, ls="-" if i < 6 else "--")[0]
            ax.fill_between(rows["share"], rows["ci95_low"], rows["ci95_high"], color=line.get_color(), alpha=0.2)
        ax.set_xscale("log")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(f"share of the grid's compute ({axis})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean regret (test points)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Replayed model search on {pool}: regret of the model chosen on validation")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
