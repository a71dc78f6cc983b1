"""What the model search's script steps do (``scripts/search.py <step>``, one per search rule).

- :func:`rank_rung`: a rung's records ranked on validation accuracy (``ranking.json``);
- :func:`promote`: the next rung's promotion file, the top ``keep`` of that ranking;
- :func:`continue_slots`: promoted slots' candidates trained on from their checkpoints;
- :func:`suggest`: a round of a model-based method (TPE, GP-UCB, cost-aware GP-UCB);
- :func:`trial`: one suggested candidate trained (:func:`trial_flags` are its settings);
- :func:`proxy_tables`: LogME, kNN and linear-probe scores per cached feature folder;
- :func:`compare_methods`: every method's compute and chosen model (``search.csv``).

Every file comes as an argument (the rules own the paths). Importing this module does not import
torch: the steps that train or read tensors import the trainer when they run, so the bookkeeping
steps (rank, promote, suggest, compare) stay light.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pandas as pd

from tlselect.core.files import write_json
from tlselect.core.registry import RegistryError, configuration, mean_val_accuracy, rank, read_record
from tlselect.core.settings import init_label
from tlselect.report.tables import write_csv
from tlselect.runs import RunSpec, candidate_repeats
from tlselect.search import brackets, compare, proxies, replay, shift, strategies
from tlselect.search.space import Space
from tlselect.training.gpus import assign

PROXIES = ("logme", "knn_accuracy", "linear_probe_accuracy")


def rank_rung(records: list[str], out: str | Path) -> list[dict]:
    """Rank a rung's records (checkpoints: the same paths with ``.pt``) on validation accuracy; write
    ``{"ranking": [...]}`` to ``out`` (:func:`tlselect.search.brackets.promote` of every record)."""
    loaded = {path: read_record(path) for path in records}
    ranking = brackets.promote(loaded, len(loaded))
    write_json(out, {"ranking": ranking})
    return ranking


def promote(ranking: str | Path, keep: int, out: str | Path) -> str:
    """Write the next rung's promotion file, the top ``keep`` of ``ranking``; return what it kept."""
    return brackets.write_promotion(ranking, keep, out)


def continue_slots(
    promoted: str | Path,
    slots: list[int],
    epochs: int,
    outs: list[str],
    records: list[str],
    run_ids: list[str],
    device: str = "auto",
    threads: int = 0,
    gpus: int | None = None,
    gpu_jobs_per_device: int = 1,
    fuse: bool = False,
    keep: str = "",
) -> list[dict]:
    """Train the candidate that each of ``slots`` of a promotion file holds on to ``epochs`` epochs in
    all, continuing its previous rung's checkpoint with that run's settings; write each one's
    checkpoint (``outs``) and record (``records``), and return the records. Several slots train as a
    run group (:func:`tlselect.training.groups.train_group`; ``fuse``, ``keep``: as there)."""
    from tlselect.training.groups import train_runs  # torch: only for the training steps
    from tlselect.training.options import TrainConfig

    promotion = json.loads(Path(promoted).read_text())["slots"]
    configs = []
    for slot, out, record, run_id in zip(slots, outs, records, run_ids, strict=True):
        chosen = promotion[slot]
        previous = read_record(chosen["record"])["config"]
        configs.append(
            TrainConfig(
                **{
                    **previous,
                    "epochs": epochs,
                    "out": out,
                    "record": record,
                    "run_id": run_id,
                    "continue_from": chosen["checkpoint"],
                    "keep_state": True,
                    "device": device,
                    "threads": threads,
                }
            )
        )
    assign(gpus, configs[0].device, per_device=gpu_jobs_per_device)
    return train_runs(configs, fuse=fuse, keep=keep)


def history(suggested: list[str], records: list[str]) -> list[tuple[dict, float | None, float]]:
    """``(params, validation accuracy, seconds)`` of every configuration the earlier rounds tried, from
    their suggestion files and trial records (each suggested run needs its record): with repeats, the
    mean validation accuracy over its seeds (None unless every seed completed, as
    :func:`tlselect.core.registry.mean_val_accuracy`) and the seconds of all of them."""
    by_run = {(r["name"], r["config"]["seed"]): r for r in map(read_record, records)}
    runs: dict[str, tuple[dict, list[dict]]] = {}
    for path in suggested:
        for trial in json.loads(Path(path).read_text())["trials"]:
            name = trial.get("name", trial["candidate"])  # files of one seed name only the candidate
            record = by_run.get((name, trial["settings"]["seed"]))
            if record is None:
                raise RegistryError(f"{path} names {trial['candidate']}, but no record given is that run's")
            runs.setdefault(name, (trial["params"], []))[1].append(record)
    return [
        (params, mean_val_accuracy(found), sum(sum(replay.table([r])[r["name"]].seconds) for r in found))
        for params, found in runs.values()
    ]


def suggest(
    method: str,
    round: int,
    q: int,
    epochs: int,
    context: dict,
    suggested: list[str],
    records: list[str],
    out: str | Path,
    delta: float = 0.1,
) -> list[dict]:
    """Write round ``round`` of ``method`` to ``out``: the runs of the ``q`` configurations that
    :func:`tlselect.search.strategies.suggest` picks from the earlier rounds' :func:`history`, one
    per seed of ``repeats`` (a configuration's seeds one after another), each with its run id,
    configuration name, settings (trained for ``epochs``) and weights. ``context`` is
    :func:`tlselect.runs.candidate_config` (the space and its runs). Returns the trials."""
    space = Space.from_config(context)
    asked = strategies.suggest(method, space, history(suggested, records), round, q, context["seed"], delta)
    specs = [(params, spec) for params in asked for spec in candidate_repeats(context, params)]
    trials = []
    for slot, (params, spec) in enumerate(specs):
        settings = {**spec.settings, "epochs": epochs}
        trials.append({"slot": slot, "candidate": spec.id, "name": spec.name, "params": params,
                       "settings": settings, "weights": spec.weights})  # fmt: skip
    write_json(out, {"method": method, "round": round, "trials": trials})
    return trials


def trial_flags(suggested: str | Path, slot: int, init_weights: list[tuple[str, str, str]]) -> list[str]:
    """``scripts/train.py``'s flags for ``slot`` of a suggestion file: its settings and, for a
    pretrained init, the weights file ``init_weights`` (``(init, backbone, file)`` each) names."""
    trials = json.loads(Path(suggested).read_text())["trials"]
    if slot >= len(trials):
        raise RegistryError(f"{suggested} holds {len(trials)} trials; there is no slot {slot}")
    chosen = trials[slot]
    flags = shlex.split(RunSpec(chosen["candidate"], chosen["settings"]).flags())
    if chosen["weights"]:
        files = {(init, backbone): path for init, backbone, path in init_weights}
        flags += ["--weights", files[tuple(chosen["weights"])]]
    return flags


def trial(
    suggested: str | Path,
    slots: list[int],
    init_weights: list[tuple[str, str, str]],
    outs: list[str],
    records: list[str],
    run_ids: list[str],
    job_args: list[str],
) -> list[dict]:
    """Train the candidates that ``slots`` of a suggestion file hold (:func:`trial_flags`), each to
    its checkpoint (``outs``), record (``records``) and run id; ``job_args`` are the job's other
    ``scripts/train.py`` flags (data, plan, device, GPUs, and a run group's ``--fuse`` and ``--keep``).
    Several slots train as a run group, parsed like ``scripts/train.py``'s (:func:`group_job`).
    Writes and returns the records."""
    from tlselect.training.groups import train_runs  # torch: only for the training steps
    from tlselect.training.options import group_job

    members = []
    for slot, out, record, run_id in zip(slots, outs, records, run_ids, strict=True):
        flags = trial_flags(suggested, slot, init_weights) + ["--out", out, "--record", record, "--run-id", run_id]
        members += ["--run", shlex.join(flags)]
    job = group_job(job_args + members)
    return train_runs(job.runs, fuse=job.fuse, keep=job.keep)


def best_finetuned(records: list[dict]) -> dict[tuple[str, str], dict]:
    """The best of the grid's ``records`` (by :func:`rank`) of each backbone and init label: a run of
    the best configuration carrying that configuration's mean validation accuracy over its seeds and
    its 95% interval (``val_low``, ``val_high``: :func:`tlselect.search.compare.accuracy_interval`)."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        runs.setdefault((record["config"]["backbone"], init_label(record["config"]["init"])), []).append(record)
    out = {}
    for key, group in runs.items():
        best = rank(group)[0]
        seeds = [r for r in group if configuration(r) == configuration(best)]
        val, low, high = compare.accuracy_interval(seeds, "val")
        out[key] = {**best, "metrics": {**best["metrics"], "val_accuracy": val, "val_low": low, "val_high": high}}
    return out


def proxy_tables(
    features: list[str], data: str | Path, grid: list[str], pool: int = 1, neighbors: int = 5
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The proxies table and its weighted Kendall tau per proxy.

    One row per feature folder (``<root>/<backbone>/<init>/<layer>``): LogME, kNN and linear-probe
    accuracy on the cached train and val features (average-pooled to ``pool`` x ``pool``), beside the
    best fine-tuned validation accuracy among the ``grid`` records of that backbone and init. The
    second table has, per proxy, the weighted Kendall tau against fine-tuning and the top folder by each.
    """
    from tlselect.data.tensors import load_split  # torch: only for this step
    from tlselect.training.features import load_features

    finetuned = best_finetuned([read_record(path) for path in grid])
    labels = {split: load_split(Path(data) / f"{split}.pt")[1].numpy() for split in ("train", "val")}
    rows = []
    for folder in map(Path, features):
        layer, init, backbone = folder.parts[-1], folder.parts[-2], folder.parts[-3]
        x = {split: load_features(folder / f"{split}.npy", pool).flatten(1).numpy() for split in labels}
        best = finetuned.get((backbone, init))
        rows.append(
            {
                "backbone": backbone,
                "init": init,
                "layer": layer,
                "logme": proxies.logme(x["train"], labels["train"]),
                "knn_accuracy": proxies.knn_accuracy(x["train"], labels["train"], x["val"], labels["val"], neighbors),
                "linear_probe_accuracy": proxies.linear_probe_accuracy(
                    x["train"], labels["train"], x["val"], labels["val"]
                ),
                "finetune_val_accuracy": best["metrics"]["val_accuracy"] if best else None,
                "finetune_val_low": best["metrics"]["val_low"] if best else None,
                "finetune_val_high": best["metrics"]["val_high"] if best else None,
                "finetune_candidate": best["name"] if best else "",
            }
        )
    table = pd.DataFrame(rows)
    taus = pd.DataFrame(
        [
            {
                "proxy": proxy,
                "weighted_kendall_tau": proxies.weighted_tau(table[proxy], table["finetune_val_accuracy"]),
                "top_by_proxy": top_folder(table, proxy),
                "top_by_finetune": top_folder(table, "finetune_val_accuracy"),
            }
            for proxy in PROXIES
        ]
    )
    return table, taus


def top_folder(table: pd.DataFrame, column: str) -> str:
    """``backbone/init/layer`` of the proxies table's row with the highest ``column`` ("" if none has one)."""
    valid = table.dropna(subset=[column])
    if valid.empty:
        return ""
    row = valid.loc[valid[column].astype(float).idxmax()]
    return f"{row['backbone']}/{row['init']}/{row['layer']}"


def write_proxies(
    features: list[str],
    data: str | Path,
    grid: list[str],
    out: str | Path,
    tau_out: str | Path,
    pool: int = 1,
    neighbors: int = 5,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`proxy_tables` written to ``out`` (proxies.csv) and ``tau_out`` (proxy_tau.csv); returns both."""
    table, taus = proxy_tables(features, data, grid, pool, neighbors)
    write_csv(table, out)
    write_csv(taus, tau_out)
    return table, taus


def arm_name(backbone: str, init: str) -> str:
    """A SHiFT arm's name: ``<backbone>/<init label>``."""
    return f"{backbone}/{init_label(init)}"


def finetune_tau(results: list[shift.Result], arms: list[tuple[str, str, str]], records: list[dict]) -> dict:
    """Each arm's fine-tuned validation accuracy (the best of the grid's ``records`` of its backbone and
    init, as in :func:`proxy_tables`) and the weighted Kendall tau of successive halving's rankings
    against it, its mean and interval over the seeds' ``results`` (:func:`shift.tau_interval`)."""
    best = best_finetuned(records)
    finetuned = {
        arm_name(b, i): best[(b, init_label(i))]["metrics"]["val_accuracy"]
        for b, i, _ in arms
        if (b, init_label(i)) in best
    }
    return {"finetuned": finetuned, "tau": shift.tau_interval(results, finetuned)}


def run_shift(
    data: str | Path,
    arms: list[tuple[str, str, str]],
    store: str | Path,
    out: str | Path,
    summary: str | Path,
    eta: int = 2,
    proxy: str = "knn",
    seed: int = 0,
    resolution: int = 32,
    neighbors: int = 5,
    grid: list[str] | None = None,
    seeds: int = 1,
) -> shift.Result:
    """SHiFT's successive halving over data on ``arms`` (``(backbone, init, weights file or "")``),
    with the training images in ``seeds`` orders (``seed``, ``seed + 1``, ...; the models' own seed
    stays ``seed``): ``out`` (shift.csv) has a row per arm and round of the first (images read,
    score), ``summary`` (JSON) its winner and the images each arm ran through its model against the
    full proxy's count, each seed's winner, and :func:`finetune_tau` against the ``grid`` records.
    Features come from the content-keyed ``store`` (:mod:`tlselect.training.store`), chunk by chunk,
    so the later seeds compute only the images the earlier ones had not read. Returns the first."""
    from tlselect.data.tensors import load_split  # torch: only for this step
    from tlselect.training.store import Embedder, image_hashes

    (train_x, train_y), (val_x, val_y) = (load_split(Path(data) / f"{split}.pt") for split in ("train", "val"))
    hashes = {"train": image_hashes(train_x), "val": image_hashes(val_x)}
    embedders = {arm_name(b, i): Embedder(b, i, store, weights, resolution, seed) for b, i, weights in arms}

    def features(arm, indices):
        return embedders[arm](train_x[indices], [hashes["train"][i] for i in indices])

    def validation(arm):
        return embedders[arm](val_x, hashes["val"]), val_y.numpy()

    def halving(order_seed):
        return shift.successive_halving(
            list(embedders), train_y.numpy(), features, validation, eta, proxy, order_seed, neighbors
        )

    result = halving(seed)
    computed = {arm: e.computed for arm, e in embedders.items()}
    results = [result] + [halving(s) for s in range(seed + 1, seed + seeds)]
    write_csv(pd.DataFrame(result.rows), out)
    full = len(embedders) * (len(train_x) + len(val_x))
    against = finetune_tau(results, arms, [read_record(path) for path in grid or []])
    write_json(
        summary,
        {
            "winner": result.winner,
            "proxy": proxy,
            "eta": eta,
            "rounds": [vars(r) for r in shift.schedule(len(embedders), eta)],
            "chunk": shift.chunk_size(len(train_x), shift.schedule(len(embedders), eta)),
            "computed": computed,
            "computed_all_seeds": {arm: e.computed for arm, e in embedders.items()},
            "full_proxy_images": full,
            "seeds": [{"seed": seed + k, "winner": r.winner} for k, r in enumerate(results)],
            "finetune_val_accuracy": against["finetuned"],
            "finetune_tau": against["tau"],
        },
    )
    return result


def jobs(records: list[str], benchmarks: list[str]) -> list[compare.Job]:
    """Each record with the epochs it continued from (those came before) and its benchmark file,
    given in the same order (one per record)."""
    if len(records) != len(benchmarks):
        raise RegistryError(f"{len(records)} records but {len(benchmarks)} benchmark files: give one per record")
    out = []
    for path, benchmark in zip(records, benchmarks, strict=True):
        record = read_record(path)
        first = 0
        if record.get("continued_from"):
            first = read_record(Path(record["continued_from"]).with_suffix(".json"))["config"]["epochs"]
        out.append(compare.Job(record, first, benchmark))
    return out


def compare_methods(
    records: dict[str, list[str]],
    benchmarks: dict[str, list[str]],
    finals: dict[str, list[str]],
    out: str | Path,
) -> pd.DataFrame:
    """Write ``search.csv`` to ``out`` (:func:`tlselect.search.compare.compare`) and return it.

    Per method of :data:`tlselect.search.brackets.METHODS`: ``records[method]`` are every job's
    record, ``benchmarks[method]`` their Snakemake benchmark files in the same order, and
    ``finals[method]`` the records it chooses from (SH and HB: the last rung of every bracket;
    missing or empty: every job's). A method without records is left out.
    """
    method_jobs, chosen_from = {}, {}
    for method in brackets.METHODS:
        found = jobs(records.get(method, []), benchmarks.get(method, []))
        if found:
            method_jobs[method] = found
            final = finals.get(method)
            chosen_from[method] = [read_record(p) for p in final] if final else [j.record for j in found]
    table = pd.DataFrame(compare.compare(method_jobs, chosen_from))
    write_csv(table, out)
    return table
