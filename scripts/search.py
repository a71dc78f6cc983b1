#!/usr/bin/env python
"""Model search steps (tlselect.search, tlselect.search.proxies), one subcommand per workflow rule.

  rank      rank a rung's records on validation accuracy
  promote   the next rung's promotion file: the top --keep of a rung's ranking
  continue  train the candidate a promoted slot holds: continue its checkpoint to --epochs
  suggest   a round of TPE, GP-UCB or cost-aware GP-UCB from the earlier rounds' suggestions and records
  trial     train the candidate a suggested slot holds (other flags go to scripts/train.py's)
  proxies   LogME, kNN and linear-probe accuracy per cached (backbone, init, layer)
  compare   every method's compute and chosen model (search.csv)
  figure    search_compute (accuracy vs compute) or proxy_vs_finetune

Every file comes as an argument: compare reads each job's Snakemake benchmark file (its wall time)
beside its record, in the same order.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

from _cli import cli

import pandas as pd

from tlselect.core.files import atomic_path, write_json
from tlselect.core.registry import RegistryError, rank, read_record, write_record
from tlselect.core.settings import init_label
from tlselect.data.tensors import load_split
from tlselect.report.plots import draw_search
from tlselect.runs import RunSpec, candidate_spec
from tlselect.search import brackets, compare, proxies, replay, strategies
from tlselect.search.space import Space
from tlselect.training.features import load_features
from tlselect.training.gpus import assign
from tlselect.training.options import TrainConfig, config_from_args
from tlselect.training.trainer import train


def rank_rung(args) -> int:
    records = {path: read_record(path) for path in args.records}
    write_json(args.out, {"ranking": brackets.promote(records, len(records))})
    return 0


def promote(args) -> int:
    print(brackets.write_promotion(args.ranking, args.keep, args.out))
    return 0


def continue_slot(args) -> int:
    promoted = json.loads(Path(args.promoted).read_text())["slots"]
    slot = promoted[args.slot]
    previous = read_record(slot["record"])["config"]
    config = TrainConfig(
        **{
            **previous,
            "epochs": args.epochs,
            "out": args.out,
            "record": args.record,
            "run_id": args.run_id,
            "continue_from": slot["checkpoint"],
            "keep_state": True,
            "device": args.device,
            "threads": args.threads,
        }
    )
    assign(args.gpus, config.device, per_device=args.gpu_jobs_per_device)
    record = train(config)
    write_record(config.record, record)
    return 0


def suggest(args) -> int:
    """Rebuild the history from the earlier rounds' suggestion files and records; write this round's."""
    context = json.loads(args.context)
    records = {r["name"]: r for r in map(read_record, args.records)}
    history = []
    for path in args.suggested:
        for trial in json.loads(Path(path).read_text())["trials"]:
            if trial["candidate"] not in records:
                raise RegistryError(f"{path} names {trial['candidate']}, but no record given is that run's")
            record = records[trial["candidate"]]
            seconds = sum(replay.table([record])[record["name"]].seconds)
            history.append((trial["params"], record["metrics"]["val_accuracy"], seconds))
    space = Space.from_config(context)
    asked = strategies.suggest(args.method, space, history, args.round, args.q, context["seed"], args.delta)
    trials = []
    for slot, params in enumerate(asked):
        spec = candidate_spec(context, params)
        settings = {**spec.settings, "epochs": args.epochs}
        trials.append({"slot": slot, "candidate": spec.id, "params": params, "settings": settings,
                       "weights": spec.weights})  # fmt: skip
    write_json(args.out, {"method": args.method, "round": args.round, "trials": trials})
    print("\n".join(f"slot {t['slot']}: {t['candidate']}" for t in trials))
    return 0


def trial(args, rest: list[str]) -> int:
    """Train a suggested slot's candidate: its settings and weights file, then the rule's other flags."""
    trials = json.loads(Path(args.suggested).read_text())["trials"]
    if args.slot >= len(trials):
        raise RegistryError(f"{args.suggested} holds {len(trials)} trials; there is no slot {args.slot}")
    chosen = trials[args.slot]
    flags = shlex.split(RunSpec(chosen["candidate"], chosen["settings"]).flags())
    if chosen["weights"]:
        files = {(init, backbone): path for init, backbone, path in args.init_weights}
        flags += ["--weights", files[tuple(chosen["weights"])]]
    config = config_from_args(flags + rest)
    assign(args.gpus, config.device, per_device=args.gpu_jobs_per_device)
    write_record(config.record, train(config))
    return 0


def proxy_scores(args) -> int:
    """Rows per feature folder (<root>/<backbone>/<init>/<layer>), with fine-tuned grid accuracy."""
    grid = [read_record(path) for path in args.grid]
    labels = {split: load_split(Path(args.data) / f"{split}.pt")[1].numpy() for split in ("train", "val")}
    rows = []
    for folder in map(Path, args.features):
        layer, init, backbone = folder.parts[-1], folder.parts[-2], folder.parts[-3]
        x = {split: load_features(folder / f"{split}.npy", args.pool).flatten(1).numpy() for split in labels}
        runs = [r for r in grid if r["config"]["backbone"] == backbone and init_label(r["config"]["init"]) == init]
        best = rank(runs)[0] if runs else None
        rows.append(
            {
                "backbone": backbone,
                "init": init,
                "layer": layer,
                "logme": proxies.logme(x["train"], labels["train"]),
                "knn_accuracy": proxies.knn_accuracy(
                    x["train"], labels["train"], x["val"], labels["val"], args.neighbors
                ),
                "linear_probe_accuracy": proxies.linear_probe_accuracy(
                    x["train"], labels["train"], x["val"], labels["val"]
                ),
                "finetune_val_accuracy": best["metrics"]["val_accuracy"] if best else None,
                "finetune_candidate": best["name"] if best else "",
            }
        )
    table = pd.DataFrame(rows)
    taus = pd.DataFrame(
        [
            {
                "proxy": proxy,
                "weighted_kendall_tau": proxies.weighted_tau(table[proxy], table["finetune_val_accuracy"]),
                "top_by_proxy": _top(table, proxy),
                "top_by_finetune": _top(table, "finetune_val_accuracy"),
            }
            for proxy in ("logme", "knn_accuracy", "linear_probe_accuracy")
        ]
    )
    for frame, name in ((table, args.out), (taus, args.tau_out)):
        with atomic_path(Path(name)) as tmp:
            frame.to_csv(tmp, index=False)
    print(table.to_string(index=False), taus.to_string(index=False), sep="\n\n")
    return 0


def _top(table: pd.DataFrame, column: str) -> str:
    valid = table.dropna(subset=[column])
    if valid.empty:
        return ""
    row = valid.loc[valid[column].astype(float).idxmax()]
    return f"{row['backbone']}/{row['init']}/{row['layer']}"


def _jobs(paths: list[str], benchmarks: list[str]) -> list[compare.Job]:
    """Each record with the epochs it continued from (those came before) and its benchmark file."""
    if len(paths) != len(benchmarks):
        raise RegistryError(f"{len(paths)} records but {len(benchmarks)} benchmark files: give one per record")
    jobs = []
    for path, benchmark in zip(paths, benchmarks, strict=True):
        record = read_record(path)
        first = 0
        if record.get("continued_from"):
            first = read_record(Path(record["continued_from"]).with_suffix(".json"))["config"]["epochs"]
        jobs.append(compare.Job(record, first, benchmark))
    return jobs


def compare(args) -> int:
    jobs, finals = {}, {}
    for method in brackets.METHODS:
        method_jobs = _jobs(getattr(args, method), getattr(args, f"{method}_benchmarks"))
        if method_jobs:
            jobs[method] = method_jobs
            final = getattr(args, f"{method}_final", None)
            finals[method] = [read_record(p) for p in final] if final else [j.record for j in method_jobs]
    table = pd.DataFrame(compare.compare(jobs, finals))
    with atomic_path(Path(args.out)) as tmp:
        table.to_csv(tmp, index=False)
    print(table.to_string(index=False))
    return 0


def figure(args) -> int:
    draw_search(args.name, Path(args.table), Path(args.out), Path(args.tau) if args.tau else None)
    return 0


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("rank", help="rank a rung's records on validation accuracy (the next rung keeps the top)")
    p.add_argument("records", nargs="+", help="the rung's records (checkpoints: same path, .pt)")
    p.add_argument("--out", required=True, help="ranking file (JSON)")
    p.set_defaults(run=rank_rung)

    p = commands.add_parser("promote", help="the next rung's promotion file: the top --keep of a ranking file")
    p.add_argument("ranking", help="the previous rung's ranking file (rank's output)")
    p.add_argument("--keep", type=int, required=True)
    p.add_argument("--out", required=True, help="promotion file (JSON)")
    p.set_defaults(run=promote)

    p = commands.add_parser("continue", help="continue the checkpoint a promoted slot holds")
    p.add_argument("--promoted", required=True)
    p.add_argument("--slot", type=int, required=True)
    p.add_argument("--epochs", type=int, required=True, help="total epochs after this rung")
    p.add_argument("--out", required=True)
    p.add_argument("--record", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--gpus", type=int, default=None)
    p.add_argument("--gpu-jobs-per-device", type=int, default=1, help="jobs sharing one GPU at most")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(run=continue_slot)

    p = commands.add_parser("suggest", help="a round of a model-based method's trials (JSON)")
    p.add_argument("--method", required=True, choices=brackets.MODEL_BASED)
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--q", type=int, required=True, help="trials to suggest")
    p.add_argument("--epochs", type=int, required=True, help="epochs each trial trains")
    p.add_argument("--delta", type=float, default=0.1, help="GP-UCB's beta_t confidence")
    p.add_argument("--context", required=True, help="JSON of tlselect.runs.candidate_config: the space and its runs")
    p.add_argument("--suggested", nargs="*", default=[], help="the earlier rounds' suggestion files")
    p.add_argument("--records", nargs="*", default=[], help="the earlier rounds' trial records")
    p.add_argument("--out", required=True, help="this round's suggestion file (JSON)")
    p.set_defaults(run=suggest)

    p = commands.add_parser(
        "trial", help="train a suggested slot; other flags are scripts/train.py's", allow_abbrev=False
    )
    p.add_argument("--suggested", required=True)
    p.add_argument("--slot", type=int, required=True)
    p.add_argument("--init-weights", nargs=3, action="append", default=[], metavar=("INIT", "BACKBONE", "FILE"),
                   help="the weights file of a pretrained init and backbone (repeat)")  # fmt: skip
    p.add_argument("--gpus", type=int, default=None)
    p.add_argument("--gpu-jobs-per-device", type=int, default=1, help="jobs sharing one GPU at most")
    p.set_defaults(run=trial)

    p = commands.add_parser("proxies", help="proxy scores per cached feature folder")
    p.add_argument("--features", nargs="+", required=True, help="folders <root>/<backbone>/<init>/<layer>")
    p.add_argument("--data", required=True, help="decoded subset folder (labels)")
    p.add_argument("--grid", nargs="*", default=[], help="grid records (fine-tuned validation accuracy)")
    p.add_argument("--pool", type=int, default=1, help="average-pool features to pool x pool")
    p.add_argument("--neighbors", type=int, default=5)
    p.add_argument("--out", required=True, help="proxies.csv")
    p.add_argument("--tau-out", required=True, help="proxy_tau.csv (weighted Kendall tau per proxy)")
    p.set_defaults(run=proxy_scores)

    p = commands.add_parser("compare", help="search.csv: one row per method")
    for method in brackets.METHODS:
        flag = "--" + method.replace("_", "-")
        p.add_argument(flag, nargs="*", default=[], help=f"every {method} job's record")
        p.add_argument(f"{flag}-benchmarks", nargs="*", default=[], help="their benchmark files, in order")
    for method in ("sh", "hb"):
        p.add_argument(f"--{method}-final", nargs="*", default=[], help="records of every bracket's last rung")
    p.add_argument("--out", required=True)
    p.set_defaults(run=compare)

    p = commands.add_parser("figure", help="draw a search figure")
    p.add_argument("name", choices=["search_compute", "proxy_vs_finetune"])
    p.add_argument("--table", required=True, help="search.csv or proxies.csv")
    p.add_argument("--tau", default="", help="proxy_tau.csv (proxy_vs_finetune)")
    p.add_argument("--out", required=True)
    p.set_defaults(run=figure)

    args, rest = parser.parse_known_args(argv)
    if args.run is trial:
        return trial(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
