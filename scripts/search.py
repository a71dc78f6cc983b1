#!/usr/bin/env python
"""Model search steps (tlselect.search.jobs), one subcommand per workflow rule.

  rank      rank a rung's records on validation accuracy
  promote   the next rung's promotion file: the top --keep of a rung's ranking
  continue  train the candidates promoted slots hold: continue their checkpoints to --epochs (a run group)
  suggest   a round of TPE, GP-UCB or cost-aware GP-UCB from the earlier rounds' suggestions and records
  trial     train the candidates suggested slots hold (several: a run group; other flags go to scripts/train.py's)
  proxies   LogME, kNN and linear-probe accuracy per cached (backbone, init, layer)
  compare   every method's compute and chosen model (search.csv)
  figure    search_compute (accuracy vs compute) or proxy_vs_finetune

Every file comes as an argument: compare reads each job's Snakemake benchmark file (its wall time)
beside its record, in the same order.
"""

import argparse
import json
import sys
from pathlib import Path

from _cli import cli

from tlselect.report.plots import draw_search
from tlselect.search import brackets, jobs


def rank(args) -> int:
    jobs.rank_rung(args.records, args.out)
    return 0


def promote(args) -> int:
    print(jobs.promote(args.ranking, args.keep, args.out))
    return 0


def continue_slots(args) -> int:
    jobs.continue_slots(
        args.promoted, args.slot, args.epochs, args.out, args.record, args.run_id, device=args.device,
        threads=args.threads, gpus=args.gpus, gpu_jobs_per_device=args.gpu_jobs_per_device, fuse=args.fuse,
        keep=args.keep,
    )  # fmt: skip
    return 0


def suggest(args) -> int:
    trials = jobs.suggest(
        args.method, args.round, args.q, args.epochs, json.loads(args.context), args.suggested, args.records,
        args.out, delta=args.delta,
    )  # fmt: skip
    print("\n".join(f"slot {t['slot']}: {t['candidate']}" for t in trials))
    return 0


def trial(args, rest: list[str]) -> int:
    jobs.trial(args.suggested, args.slot, args.init_weights, args.out, args.record, args.run_id, rest)
    return 0


def proxies(args) -> int:
    table, taus = jobs.write_proxies(
        args.features, args.data, args.grid, args.out, args.tau_out, args.pool, args.neighbors
    )
    print(table.to_string(index=False), taus.to_string(index=False), sep="\n\n")
    return 0


def compare(args) -> int:
    records = {method: getattr(args, method) for method in brackets.METHODS}
    benchmarks = {method: getattr(args, f"{method}_benchmarks") for method in brackets.METHODS}
    finals = {method: getattr(args, f"{method}_final") for method in ("sh", "hb")}
    table = jobs.compare_methods(records, benchmarks, finals, args.out)
    print(table.to_string(index=False))
    return 0


def figure(args) -> int:
    draw_search(args.name, Path(args.table), Path(args.out), Path(args.tau) if args.tau else None)
    return 0


def shift(args) -> int:
    arms = [tuple(arm.split(",", 2)) for arm in args.arms]
    result = jobs.run_shift(
        args.data, arms, args.store, args.out, args.summary, args.eta, args.proxy, args.seed, args.resolution,
        args.neighbors, args.grid, args.seeds,
    )  # fmt: skip
    print(f"SHiFT successive halving over data: {result.winner}", flush=True)
    return 0


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("rank", help="rank a rung's records on validation accuracy (the next rung keeps the top)")
    p.add_argument("records", nargs="+", help="the rung's records (checkpoints: same path, .pt)")
    p.add_argument("--out", required=True, help="ranking file (JSON)")
    p.set_defaults(run=rank)

    p = commands.add_parser("promote", help="the next rung's promotion file: the top --keep of a ranking file")
    p.add_argument("ranking", help="the previous rung's ranking file (rank's output)")
    p.add_argument("--keep", type=int, required=True)
    p.add_argument("--out", required=True, help="promotion file (JSON)")
    p.set_defaults(run=promote)

    p = commands.add_parser("continue", help="continue the checkpoints promoted slots hold (several: a run group)")
    p.add_argument("--promoted", required=True)
    p.add_argument("--slot", type=int, nargs="+", required=True)
    p.add_argument("--epochs", type=int, required=True, help="total epochs after this rung")
    p.add_argument("--out", nargs="+", required=True, help="one checkpoint per slot")
    p.add_argument("--record", nargs="+", required=True, help="one record per slot")
    p.add_argument("--run-id", nargs="+", required=True, help="one run id per slot")
    p.add_argument("--fuse", action="store_true", help="slots of one shape train fused")
    p.add_argument("--keep", default="", help="folder keeping finished slots for a rerun (tlselect.training.groups)")
    p.add_argument("--device", default="auto")
    p.add_argument("--gpus", type=int, default=None)
    p.add_argument("--gpu-jobs-per-device", type=int, default=1, help="jobs sharing one GPU at most")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(run=continue_slots)

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
    p.add_argument("--slot", type=int, nargs="+", required=True, help="several: a run group")
    p.add_argument("--init-weights", nargs=3, action="append", default=[], metavar=("INIT", "BACKBONE", "FILE"),
                   help="the weights file of a pretrained init and backbone (repeat)")  # fmt: skip
    p.add_argument("--out", nargs="+", required=True, help="one checkpoint per slot")
    p.add_argument("--record", nargs="+", required=True, help="one record per slot")
    p.add_argument("--run-id", nargs="+", required=True, help="one run id per slot")
    p.set_defaults(run=trial)

    p = commands.add_parser("proxies", help="proxy scores per cached feature folder")
    p.add_argument("--features", nargs="+", required=True, help="folders <root>/<backbone>/<init>/<layer>")
    p.add_argument("--data", required=True, help="decoded subset folder (labels)")
    p.add_argument("--grid", nargs="*", default=[], help="grid records (fine-tuned validation accuracy)")
    p.add_argument("--pool", type=int, default=1, help="average-pool features to pool x pool")
    p.add_argument("--neighbors", type=int, default=5)
    p.add_argument("--out", required=True, help="proxies.csv")
    p.add_argument("--tau-out", required=True, help="proxy_tau.csv (weighted Kendall tau per proxy)")
    p.set_defaults(run=proxies)

    p = commands.add_parser("shift", help="SHiFT's successive halving over data on the pool's models")
    p.add_argument("--data", required=True, help="folder of the decoded train.pt and val.pt")
    p.add_argument("--arms", nargs="+", required=True, help="backbone,init,weights-file-or-empty per model")
    p.add_argument("--store", required=True, help="the content-keyed feature store's folder")
    p.add_argument("--out", required=True, help="shift.csv")
    p.add_argument("--summary", required=True, help="the winner, the images computed, each seed's winner, tau (JSON)")
    p.add_argument("--eta", type=int, default=2)
    p.add_argument("--proxy", choices=("knn", "linear"), default="knn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--neighbors", type=int, default=5)
    p.add_argument("--grid", nargs="*", default=[], help="grid records (fine-tuned validation accuracy)")
    p.add_argument("--seeds", type=int, default=1, help="orders of the training images: --seed, --seed + 1, ...")
    p.set_defaults(run=shift)

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
