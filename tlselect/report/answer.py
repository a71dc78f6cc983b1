"""The study's answer in words, computed from its tables: what the report says first, and the one
or two sentences that say what each figure and table shows.

Every function takes the tables (pandas frames of ``runs.csv``, ``curves.csv`` and the search's
tables) and returns Markdown; the notebook, ``summary.md`` and the front page of
``snakemake --report`` all say the same thing because they all call these. Intervals are 95% Wilson
intervals over a run's validation (or test) images (``val_images``, ``test_images`` in
``runs.csv``); without those counts no interval is claimed. With repeats or folds the candidates
are the configurations' means (:func:`candidates`), with 95% t-intervals over the repeats.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

Z95 = 1.959964


def pareto_front(table: pd.DataFrame, cost: str = "train_seconds", value: str = "val_accuracy") -> pd.DataFrame:
    """Completed candidates (:func:`candidates`) that no other beats on both lower ``cost`` and higher ``value``."""
    done = candidates(table)
    done = done[done["status"] == "completed"].sort_values([cost, value], ascending=[True, False])
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


def t_interval(values) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval of ``values`` (one score per repeat); the interval is
    (nan, nan) for fewer than two."""
    values = np.asarray([v for v in values if not pd.isna(v)], dtype=float)
    if not len(values):
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def probability_best(correct: dict[str, str | list[str]], draws: int = 2000, seed: int = 0) -> dict[str, float]:
    """Each configuration's probability of the best validation accuracy, by a paired bootstrap over
    validation images: ``correct`` maps a configuration to its per-image hits (``"0110..."``, the
    record's ``val_correct``, the same images in the same order for every configuration), or to one
    such string per repeat. Each draw resamples the images (the same for every configuration) and,
    for a configuration with repeats, its repeats; its score is the mean accuracy over the drawn
    repeats on the drawn images, and the configurations tied for the best score share the draw."""
    if not correct:
        return {}
    names = list(correct)
    repeats = {name: [hits] if isinstance(hits, str) else list(hits) for name, hits in correct.items()}
    lengths = {len(hits) for runs in repeats.values() for hits in runs}
    if len(lengths) != 1 or not lengths.pop():
        return {name: math.nan for name in names}
    hits = {
        name: np.array([[c == "1" for c in run] for run in runs], dtype=np.float32) for name, runs in repeats.items()
    }
    images = next(iter(hits.values())).shape[1]
    rng = np.random.default_rng(seed)
    wins = np.zeros(len(names))
    for chunk in np.array_split(np.arange(draws), max(1, draws // 250)):
        picks = rng.integers(0, images, size=(len(chunk), images))
        scores = []
        for name in names:
            runs = hits[name]  # repeats x images
            drawn = rng.integers(0, len(runs), size=(len(chunk), len(runs))) if len(runs) > 1 else [[0]] * len(chunk)
            per_repeat = runs[np.asarray(drawn)]  # draws x repeats x images
            scores.append(np.take_along_axis(per_repeat, picks[:, None, :], axis=2).mean(axis=(1, 2)))
        accuracy = np.stack(scores)  # configurations x draws
        best = accuracy == accuracy.max(axis=0)
        wins += (best / best.sum(axis=0)).sum(axis=1)
    return {name: float(w / draws) for name, w in zip(names, wins, strict=True)}


def candidates(runs: pd.DataFrame) -> pd.DataFrame:
    """The rows that compete for the pick: each configuration's mean over its repeats and folds
    (``row`` ``mean``) where the table has them, else the runs; never a refit."""
    if "row" not in runs:
        return runs
    means = runs[runs["row"] == "mean"]
    return means if len(means) else runs[runs["row"] == "run"]


def with_intervals(runs: pd.DataFrame) -> pd.DataFrame:
    """The completed runs with ``{val,test}_{low,high}`` columns: the table's own (a mean's t-interval
    over repeats), else the Wilson interval (nan where the image count is unknown)."""
    done = runs[runs["status"] == "completed"].copy()
    for split in ("val", "test"):
        counts = done[f"{split}_images"] if f"{split}_images" in done else pd.Series(math.nan, index=done.index)
        bounds = [wilson(a, n) for a, n in zip(done[f"{split}_accuracy"], counts, strict=True)]
        for side, computed in (("low", [b[0] for b in bounds]), ("high", [b[1] for b in bounds])):
            column = f"{split}_{side}"
            given = done[column] if column in done else pd.Series(math.nan, index=done.index)
            done[column] = given.where(given.notna(), pd.Series(computed, index=done.index, dtype=float))
    return done


def accuracy(row, split: str = "val") -> str:
    """An accuracy with its interval, e.g. ``0.712 [0.671, 0.750]``."""
    value, low, high = row[f"{split}_accuracy"], row[f"{split}_low"], row[f"{split}_high"]
    return f"{value:.3f}" if pd.isna(low) else f"{value:.3f} [{low:.3f}, {high:.3f}]"


def seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.0f} s"


def label(row) -> str:
    if row["kind"] == "join":
        on = {"join": f"the table joined with {row['layer']}", "features": f"{row['layer']} alone"}
        where = f"{row['model']} on {on.get(row['inputs'], 'the table alone')}"
    else:
        where = f"freeze {row['freeze']}" if row["kind"] == "policy" else f"probe on {row['layer']}"
    return f"`{row['name']}` (init {row['init']}, {where})"


def within_noise(done: pd.DataFrame, best) -> pd.DataFrame:
    """The other runs whose validation interval reaches the selected run's (empty without intervals)."""
    if pd.isna(best["val_low"]):
        return done.iloc[0:0]
    return done[(done.index != best.name) & (done["val_high"] >= best["val_low"])]


def answer(runs: pd.DataFrame) -> str:
    """The answer, as Markdown bullets: the selected run, its margin over the next ones, the cheapest
    run within noise of it, what transfer gained over scratch, and the refit's test accuracy (folds)."""
    refits = runs[runs["row"].isin(["refit", "refit mean"])] if "row" in runs else runs.iloc[0:0]
    runs = candidates(runs)
    done = with_intervals(runs)
    selected = done[done["selected"].astype(bool)] if "selected" in done else done.iloc[0:0]
    if selected.empty:
        return "**No run completed**: every run diverged. Lower the learning rates in `config.yaml`."
    best = selected.iloc[0]
    sure = "" if pd.isna(best.get("p_best", math.nan)) else f", probability of being the best {best['p_best']:.2f}"
    over = f" (mean over {best['runs']:.0f} runs: {repeats_and_folds(best)})" if best.get("row") == "mean" else ""
    lines = [
        f"- **Selected**: {label(best)}{over}, validation {accuracy(best)}, test {accuracy(best, 'test')}, "
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
    lines += transfer_gain(done) + refit_line(refits)
    diverged = runs[runs["status"] == "diverged"]
    if len(diverged):
        lines.append("- **Diverged**: " + ", ".join(diverged["name"]) + " (non-finite loss; see their logs).")
    return "\n".join(lines)


def repeats_and_folds(row) -> str:
    """``3 seeds x 5 folds``-style words for a mean row."""
    folds = row.get("folds")
    seeds = f"{row['repeats']:.0f} seed" + ("s" if row["repeats"] != 1 else "")
    return seeds + (f" x {folds:.0f} folds" if not pd.isna(folds) and folds > 1 else "")


def refit_line(refits: pd.DataFrame) -> list[str]:
    """The selected configuration retrained on every training image (folds): its test accuracy (a
    bullet, or none)."""
    if refits.empty:
        return []
    shown = refits[refits["row"] == "refit mean"]
    row = with_intervals(shown if len(shown) else refits).iloc[0]
    return [
        f"- **Refit**: {label(row)} retrained on all {row['train_images']:.0f} training images, as selected on "
        f"the folds' mean: test {accuracy(row, 'test')} (the number to report; it never chose anything)."
    ]


def repeats_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Each configuration's mean row (:func:`candidates`) with its runs' validation accuracies beside
    it, then the refit rows: what the report shows of repeats and folds (empty without them)."""
    if "row" not in runs or not (runs["row"] == "mean").any():
        return pd.DataFrame()
    means = with_intervals(runs[runs["row"] == "mean"]).sort_values("val_accuracy", ascending=False)
    singles = runs[runs["row"] == "run"]
    rows = []
    for _, mean in means.iterrows():
        own = singles[(singles["kind"] == mean["kind"]) & (singles["name"] == mean["name"])]
        own = own[own["init"] == mean["init"]].sort_values(["seed", "fold"])
        rows.append(
            {"configuration": label(mean), "runs": repeats_and_folds(mean), "val": accuracy(mean),
             "test": accuracy(mean, "test"), "each run's val": " / ".join(f"{v:.3f}" for v in own["val_accuracy"]),
             "p_best": mean["p_best"], "selected": bool(mean["selected"])}
        )  # fmt: skip
    refits = with_intervals(runs[runs["row"].isin(["refit", "refit mean"])])
    for _, refit in refits.iterrows():
        seed = "mean" if refit["row"] == "refit mean" else f"seed {refit['seed']:.0f}"
        rows.append({"configuration": f"refit of {label(refit)}", "runs": seed, "val": "",
                     "test": accuracy(refit, "test")})  # fmt: skip
    return pd.DataFrame(rows)


def repeats_sentence(runs: pd.DataFrame) -> str:
    """What the repeats and folds say of the pick: how sure it is, and how many configurations are
    within noise of it (t-intervals overlapping)."""
    shown = repeats_table(runs)
    if shown.empty:
        return (
            "Each policy and probe trained once, with one seed, on the one validation split (`repeats: 1`, "
            "`validation.folds: 1`): the intervals above are over images only, not over seeds."
        )
    done = with_intervals(candidates(runs))
    best = done[done["selected"].astype(bool)]
    if best.empty:
        return "No configuration completed every one of its runs."
    best = best.iloc[0]
    noise = within_noise(done, best)
    return (
        f"Each configuration trained {repeats_and_folds(best)}; ranked on the mean, {label(best)} is selected "
        f"(validation {accuracy(best)}, probability of being the best {best['p_best']:.2f}); "
        f"{len(noise)} other configuration(s) have a t-interval reaching its own."
    )


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
    runs = candidates(runs)
    done = runs[runs["status"] == "completed"]
    if done.empty:
        return "No run completed."
    kinds = done["kind"].value_counts()
    means = "row" in done and (done["row"] == "mean").any()
    what = "configurations completed every run" if means else "runs completed"
    return (
        f"{len(done)} {what} ({kinds.get('policy', 0)} policies, {kinds.get('probe', 0)} probes); "
        f"validation accuracy ranges from {done.val_accuracy.min():.3f} to {done.val_accuracy.max():.3f}."
    )


def front_sentence(runs: pd.DataFrame) -> str:
    runs = candidates(runs)
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
    runs = candidates(runs)
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
    runs = candidates(runs)
    probes = with_intervals(runs[runs["kind"] == "probe"])
    if probes.empty:
        return "No probes in this study (`features.layers` is empty)."
    best = probes.loc[probes.groupby("init")["val_accuracy"].idxmax()]
    text = "; ".join(
        f"for init `{r['init']}` the best layer is **{r['layer']}** ({accuracy(r)})" for _, r in best.iterrows()
    )
    return text[0].upper() + text[1:] + "."


def join_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """The downstream models on the table beside the images (kind ``join``), with their intervals."""
    return with_intervals(runs[runs["kind"] == "join"]) if "inputs" in runs else runs.iloc[0:0]


def join_sentence(runs: pd.DataFrame) -> str:
    """Per model: the best run (on validation) on the join, on the features alone and on the columns
    alone, and the test accuracy the join gains over the better of the other two."""
    joins = join_rows(runs)
    if joins.empty:
        return "No table beside the images in this study (`data.table`)."
    parts = []
    for model, group in joins.groupby("model", sort=True):
        best = {inputs: rows.loc[rows["val_accuracy"].idxmax()] for inputs, rows in group.groupby("inputs")}
        shown = [
            f"{inputs}{'' if inputs == 'columns' else ' on ' + best[inputs]['layer']} {accuracy(best[inputs], 'test')}"
            for inputs in ("join", "features", "columns")
            if inputs in best
        ]
        text = f"{model}: " + ", ".join(shown)
        if {"join", "features", "columns"} <= set(best):
            other = max(best["features"]["test_accuracy"], best["columns"]["test_accuracy"])
            gain = round(100 * (best["join"]["test_accuracy"] - other), 1)
            verdict = "ties with" if gain == 0 else f"{'gains' if gain > 0 else 'loses'} {abs(gain):.1f} points over"
            text += f" (the join {verdict} the better of the other two)"
        parts.append(text)
    refused = joins.shape[0] - len(runs[(runs["kind"] == "join") & (runs["status"] == "completed")])
    return (
        "Test accuracy of the best run of each kind, chosen on validation: "
        + "; ".join(parts)
        + "."
        + (f" {refused} run(s) refused over the memory budget." if refused else "")
    )


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


def shift_rounds(table: pd.DataFrame) -> pd.DataFrame:
    """shift.csv as one row per model: the last round it reached, its score and the training images
    it read there, the winner first."""
    last = table.sort_values("round").groupby("model", sort=False).tail(1)
    return last.sort_values(["round", "score"], ascending=False).reset_index(drop=True)


def shift_sentence(table: pd.DataFrame) -> str:
    last = shift_rounds(table)
    everything = len(last) * int(table["images"].max())
    read = int(last["images"].sum())
    return (
        f"Successive halving over data picks **{last['model'].iloc[0]}** from {len(last)} models after "
        f"{int(table['round'].max()) + 1} rounds; the models read {read:,} training images, "
        f"{read / everything:.0%} of the {everything:,} a proxy on every image of every model reads."
    )


def markdown_to_rst(text: str) -> str:
    """The answer's Markdown as reStructuredText (for ``snakemake --report``): the same bullets and
    bold; names lose their backticks (reStructuredText does not nest literals in bold)."""
    return text.replace("`", "")
