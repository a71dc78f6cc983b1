"""The study's answer in words, computed from its tables: what the report says first, and the one
or two sentences that say what each figure and table shows.

Every function takes the tables (pandas frames of ``runs.csv``, ``curves.csv`` and the search's
tables) and returns Markdown; the notebook, ``summary.md`` and the front page of
``snakemake --report`` all say the same thing because they all call these. Intervals are 95% Wilson
intervals over a run's validation (or test) images (``val_images``, ``test_images`` in
``runs.csv``); without those counts no interval is claimed.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

Z95 = 1.959964


def pareto_front(table: pd.DataFrame, cost: str = "train_seconds", value: str = "val_accuracy") -> pd.DataFrame:
    """Completed runs that no other run beats on both lower ``cost`` and higher ``value``."""
    done = table[table["status"] == "completed"].sort_values([cost, value], ascending=[True, False])
    front, best = [], float("-inf")
    for index, row in done.iterrows():
        if row[value] > best:
            front.append(index)
            best = row[value]
    return done.loc[front]


def wilson(accuracy: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy measured on ``n`` images; (nan, nan) without ``n``."""
    if not n or pd.isna(n) or pd.isna(accuracy):
        return math.nan, math.nan
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def probability_best(correct: dict[str, str], draws: int = 2000, seed: int = 0) -> dict[str, float]:
    """Each run's probability of the best validation accuracy, by a paired bootstrap over validation
    images: ``correct`` maps a run to its per-image hits (``"0110..."``, the record's ``val_correct``,
    the same images in the same order for every run); each draw resamples the images, and the runs
    tied for the best accuracy share that draw."""
    if not correct:
        return {}
    names = list(correct)
    lengths = {len(hits) for hits in correct.values()}
    if len(lengths) != 1 or not lengths.pop():
        return {name: math.nan for name in names}
    hits = np.array([[c == "1" for c in correct[name]] for name in names], dtype=np.float32)
    rng = np.random.default_rng(seed)
    wins = np.zeros(len(names))
    for chunk in np.array_split(np.arange(draws), max(1, draws // 250)):
        picks = rng.integers(0, hits.shape[1], size=(len(chunk), hits.shape[1]))
        accuracy = hits[:, picks].mean(axis=2)  # runs x draws
        best = accuracy == accuracy.max(axis=0)
        wins += (best / best.sum(axis=0)).sum(axis=1)
    return {name: float(w / draws) for name, w in zip(names, wins, strict=True)}


def with_intervals(runs: pd.DataFrame) -> pd.DataFrame:
    """The completed runs with ``{val,test}_{low,high}`` columns (nan where the image count is unknown)."""
    done = runs[runs["status"] == "completed"].copy()
    for split in ("val", "test"):
        counts = done[f"{split}_images"] if f"{split}_images" in done else pd.Series(math.nan, index=done.index)
        bounds = [wilson(a, n) for a, n in zip(done[f"{split}_accuracy"], counts, strict=True)]
        done[f"{split}_low"] = [low for low, _ in bounds]
        done[f"{split}_high"] = [high for _, high in bounds]
    return done


def accuracy(row, split: str = "val") -> str:
    """An accuracy with its interval, e.g. ``0.712 [0.671, 0.750]``."""
    value, low, high = row[f"{split}_accuracy"], row[f"{split}_low"], row[f"{split}_high"]
    return f"{value:.3f}" if pd.isna(low) else f"{value:.3f} [{low:.3f}, {high:.3f}]"


def seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.0f} s"


def label(row) -> str:
    where = f"freeze {row['freeze']}" if row["kind"] == "policy" else f"probe on {row['layer']}"
    return f"`{row['name']}` (init {row['init']}, {where})"


def within_noise(done: pd.DataFrame, best) -> pd.DataFrame:
    """The other runs whose validation interval reaches the selected run's (empty without intervals)."""
    if pd.isna(best["val_low"]):
        return done.iloc[0:0]
    return done[(done.index != best.name) & (done["val_high"] >= best["val_low"])]


def answer(runs: pd.DataFrame) -> str:
    """The answer, as Markdown bullets: the selected run, its margin over the next ones, the cheapest
    run within noise of it, and what transfer gained over scratch."""
    done = with_intervals(runs)
    selected = done[done["selected"].astype(bool)] if "selected" in done else done.iloc[0:0]
    if selected.empty:
        return "**No run completed**: every run diverged. Lower the learning rates in `config.yaml`."
    best = selected.iloc[0]
    sure = "" if pd.isna(best.get("p_best", math.nan)) else f", probability of being the best {best['p_best']:.2f}"
    lines = [
        f"- **Selected**: {label(best)}, validation {accuracy(best)}, test {accuracy(best, 'test')}, "
        f"{seconds(best.train_seconds)} of training{sure}."
    ]
    others = done.drop(index=best.name).sort_values("val_accuracy", ascending=False)
    if len(others):
        runner, noise = others.iloc[0], within_noise(done, best)
        if pd.isna(best["val_low"]):
            verdict = "no interval is known (the table has no image counts)"
        elif noise.empty:
            verdict = "its validation interval is clear of every other run's"
        else:
            ordered = noise.sort_values("val_accuracy", ascending=False)[:4]
            named = ", ".join(f"`{r['name']}` ({r['init']})" for _, r in ordered.iterrows())
            more = f" and {len(noise) - 4} more" if len(noise) > 4 else ""
            verdict = f"within noise of it (validation intervals overlapping): {named}{more}"
        lines.append(
            f"- **Margin**: {(best.val_accuracy - runner.val_accuracy) * 100:.1f} points of validation accuracy "
            f"ahead of the next best, {label(runner)} at {accuracy(runner)}; {verdict}."
        )
        contenders = pd.concat([selected.iloc[:1], noise])
        cheapest = contenders.loc[contenders["train_seconds"].idxmin()]
        if cheapest.name == best.name:
            lines.append("- **Cheapest within noise**: the selected run itself; no run within noise trains faster.")
        else:
            lines.append(
                f"- **Cheapest within noise**: {label(cheapest)}, validation {accuracy(cheapest)} in "
                f"{seconds(cheapest.train_seconds)} against the selected run's {seconds(best.train_seconds)}."
            )
    lines += transfer_gain(done)
    diverged = runs[runs["status"] == "diverged"]
    if len(diverged):
        lines.append("- **Diverged**: " + ", ".join(diverged["name"]) + " (non-finite loss; see their logs).")
    return "\n".join(lines)


def transfer_gain(done: pd.DataFrame) -> list[str]:
    """Full fine-tuning from pretrained weights against training from scratch (a bullet, or none)."""
    policies = done[done["kind"] == "policy"]
    scratch = policies[policies["init"] == "scratch"]
    transfer = policies[(policies["init"] != "scratch") & (policies["freeze"] == "none")]
    if scratch.empty or transfer.empty:
        return []
    s, t = scratch.iloc[0], transfer.iloc[0]
    known = not (pd.isna(t["val_low"]) or pd.isna(s["val_low"]))
    apart = known and (t["val_low"] > s["val_high"] or s["val_low"] > t["val_high"])
    noise = (
        "" if not known else " (the intervals do not overlap)" if apart else " (within noise: the intervals overlap)"
    )
    return [
        f"- **Transfer over scratch**: fine-tuning from `{t.init}` reaches validation {accuracy(t)} against "
        f"{accuracy(s)} from scratch, {(t.val_accuracy - s.val_accuracy) * 100:+.1f} points{noise}."
    ]


def runs_sentence(runs: pd.DataFrame) -> str:
    done = runs[runs["status"] == "completed"]
    if done.empty:
        return "No run completed."
    kinds = done["kind"].value_counts()
    return (
        f"{len(done)} runs completed ({kinds.get('policy', 0)} policies, {kinds.get('probe', 0)} probes); "
        f"validation accuracy ranges from {done.val_accuracy.min():.3f} to {done.val_accuracy.max():.3f}."
    )


def front_sentence(runs: pd.DataFrame) -> str:
    front = pareto_front(runs)
    if front.empty:
        return "No run completed, so there is no front."
    return (
        f"{len(front)} run(s) are on the Pareto front (no other run is both faster and better on validation): "
        + ", ".join(
            f"`{r['name']}` ({r['init']}, {seconds(r.train_seconds)}, {r.val_accuracy:.3f})"
            for _, r in front.iterrows()
        )
        + "."
    )


def policy_sentence(runs: pd.DataFrame) -> str:
    policies = with_intervals(runs[runs["kind"] == "policy"])
    if policies.empty:
        return "No policy completed."
    by_val = policies.loc[policies["val_accuracy"].idxmax()]
    by_test = policies.loc[policies["test_accuracy"].idxmax()]
    if by_val.name == by_test.name:
        return (
            f"Validation and test agree on the best of {len(policies)} policies, `{by_val['name']}` "
            f"(validation {accuracy(by_val)}, test {accuracy(by_val, 'test')})."
        )
    return (
        f"Validation picks `{by_val['name']}` ({accuracy(by_val)}) but test favours `{by_test['name']}` "
        f"({accuracy(by_test, 'test')}): on these subsets the two splits rank the policies differently."
    )


def curves_sentence(curves: pd.DataFrame) -> str:
    policy = curves[curves["kind"] == "policy"]
    if policy.empty:
        return "No policy curves."
    peaks = policy.loc[policy.groupby("name")["val_accuracy"].idxmax(), ["name", "epoch"]]
    last = policy.groupby("name")["epoch"].max()
    rising = [name for name, epoch in zip(peaks["name"], peaks["epoch"], strict=True) if epoch == last[name]]
    if not rising:
        return "Every policy peaked before its last epoch: more epochs would not have helped on validation."
    return (
        f"{len(rising)} of {len(last)} policies peak at their last epoch ("
        + ", ".join(f"`{name}`" for name in rising)
        + "): they may gain from more epochs."
    )


def layers_sentence(runs: pd.DataFrame) -> str:
    probes = with_intervals(runs[runs["kind"] == "probe"])
    if probes.empty:
        return "No probes in this study (`features.layers` is empty)."
    best = probes.loc[probes.groupby("init")["val_accuracy"].idxmax()]
    text = "; ".join(
        f"for init `{r['init']}` the best layer is **{r['layer']}** ({accuracy(r)})" for _, r in best.iterrows()
    )
    return text[0].upper() + text[1:] + "."


def plans_sentence(plans: pd.DataFrame) -> str:
    kept = plans[plans["kept"].astype(str) == "True"]
    if kept.empty:
        return f"None of the {len(plans)} measured knobs was faster than the default; the runs used the defaults."
    return (
        f"{len(kept)} of {len(plans)} measured knobs were kept: "
        + ", ".join(f"**{r.knob} = {r.value}** ({r.gain:.2f}x)" for r in kept.itertuples())
        + "."
    )


def speedups_sentence(optimizations: pd.DataFrame) -> str:
    if optimizations["speedup"].isna().all():
        return "The speedups benchmark measured no speedup."
    top = optimizations.loc[optimizations["speedup"].idxmax()]
    goals = optimizations.dropna(subset=["goal"])
    return (
        f"The largest speedup is **{top.optimization}**, {top.speedup:.2f}x over {top.baseline} (measured on "
        f"{optimizations['device'].iloc[0]}); {int(goals['meets_goal'].astype(bool).sum())} of {len(goals)} goals met."
    )


def search_sentence(search: pd.DataFrame) -> str:
    near = search[(search["method"] != "grid") & (search["test_gap_points"].abs() <= 1)].sort_values("epochs")
    if near.empty:
        return "No method came within 1 test point of the grid's choice."
    first = near.iloc[0]
    return (
        f"**{first.method}** came within 1 test point of the grid's choice for {first.compute_share:.0%} of its "
        "epochs, the least compute of any method that did."
    )


def replay_sentence(replay: pd.DataFrame) -> str:
    epochs = replay[replay["axis"] == "epochs"].set_index(["method", "share"])
    fifth = epochs.xs(1 / 5, level="share")["regret_points"].dropna()
    if fifth.empty:
        return "No method had chosen a model in every seed at a fifth of the grid's epochs."
    return f"At a fifth of the grid's epochs the lowest mean regret is **{fifth.min():.2f}** points ({fifth.idxmin()})."


def regret_table(replay: pd.DataFrame, axis: str) -> pd.DataFrame:
    """replay.csv's mean regrets on one compute ``axis`` as "mean [low, high]" cells, a method per row
    and a share of the grid's compute per column."""
    rows = replay[replay["axis"] == axis].assign(
        cell=lambda f: [f"{r.regret_points:.2f} [{r.ci95_low:.2f}, {r.ci95_high:.2f}]" for r in f.itertuples()]
    )
    table = rows.pivot(index="method", columns="share", values="cell").loc[rows["method"].unique()]
    table.columns = [f"{share:.3g} of the {axis}" for share in table.columns]
    return table.reset_index()


def goals_sentence(goals: pd.DataFrame) -> str:
    """What the replay on the shipped pool says of its three goals (tlselect.search.replay.goals)."""
    parts = []
    best = goals[(goals["goal"] == "a") & (goals["axis"] == "epochs")]
    if len(best):
        a = best.iloc[0]
        parts.append(
            f"At a fifth of the grid's epochs **{a.method}** holds the least mean regret, {a.regret_points:.2f} "
            f"points [{a.ci95_low:.2f}, {a.ci95_high:.2f}]: {'within' if a.met else 'not within'} 1 point of the "
            "pool's best."
        )
    b = goals[(goals["goal"] == "b") & (goals["axis"] == "epochs")]
    below = b[b["met"].astype(bool)]["method"].tolist()
    parts.append(
        f"At a third of them {' and '.join(below)} {'is' if len(below) == 1 else 'are'} below random search, "
        "intervals apart."
        if below
        else "At a third of them neither TPE nor BOHB is below random search with intervals apart."
    )
    c = goals[goals["goal"] == "c"]
    if len(c):
        c = c.iloc[0]
        if pd.isna(c.share):
            parts.append(f"Cost-aware GP-UCB never reaches plain GP-UCB's final regret ({c.reference}).")
        else:
            parts.append(
                f"Cost-aware GP-UCB reaches plain GP-UCB's final regret at {c.share:.3f} of the grid's seconds "
                f"({c.reference}): {'half or less' if c.met else 'more than half'} of plain GP-UCB's."
            )
    return " ".join(parts)


def proxies_sentence(taus: pd.DataFrame) -> str:
    known = taus.dropna(subset=["weighted_kendall_tau"])
    if known.empty:
        return (
            f"None of the {len(taus)} proxies' rankings could be compared with fine-tuning (the weighted "
            f"Kendall tau is undefined: too few candidates, or ties); fine-tuning ranks "
            f"`{taus['top_by_finetune'].iloc[0]}` first."
            if len(taus)
            else "No proxy was scored."
        )
    top = known.loc[known["weighted_kendall_tau"].idxmax()]
    return (
        f"**{top.proxy}** agrees best with fine-tuning (weighted Kendall tau {top.weighted_kendall_tau:.2f}); "
        f"it ranks `{top.top_by_proxy}` first, fine-tuning `{top.top_by_finetune}`."
    )


def markdown_to_rst(text: str) -> str:
    """The answer's Markdown as reStructuredText (for ``snakemake --report``): the same bullets and
    bold; names lose their backticks (reStructuredText does not nest literals in bold)."""
    return text.replace("`", "")
