#!/usr/bin/env python
"""What one training job costs outside its training and evaluation, part by part.

On a synthetic subset of the default study's size (4,500 training and 500 validation images,
32x32, 10 classes) and a ResNet18 state-dict standing in for the source model, it measures:

- interpreter and imports: a fresh ``python -c 'import tlselect.train, tlselect.core.registry'`` (and
  ``python -c pass`` alone), with the slowest imports from ``python -X importtime``;
- data load, model build and init load, first-step warm-up (first training step minus a later
  one), the resume file written after each epoch, and the final checkpoint and record: the
  trainer's own steps (tlselect.training.trainer), timed one by one in a fresh process;
- a whole job: ``scripts/train.py`` for ``--epochs`` epochs, its wall time minus the training and
  validation seconds its record reports, in a fresh process (cold) and handed to a running fork server
  (forked, tlselect.training.forkserver);
- Snakemake's gap between jobs: a three-job chain of shell jobs that write timestamps, the time
  from one job's end to the next one's start.

Prints a Markdown table (``--json`` for the numbers).
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _path  # noqa: F401 (the package, importable)

from tlselect.core.errors import cli
from tlselect.core.files import write_text
from tlselect.training.speedups import job_fixed_cost

REPO = Path(__file__).resolve().parent.parent
IMPORTS = "import tlselect.train, tlselect.core.registry"

# Runs in a fresh process: the trainer's steps, as tlselect.training.trainer.train calls them, timed one by one.
STEPS = """
import itertools, json, sys, time
start = time.perf_counter()
import torch
from tlselect.training import options
from tlselect.training import trainer
from tlselect.training import loop
from tlselect.core.registry import write_record
imports = time.perf_counter() - start
data, weights, out, threads = sys.argv[1:5]
config = options.TrainConfig(data=data, out=f"{out}/m.pt", record=f"{out}/m.json", init="source", weights=weights,
                       epochs=1, threads=int(threads), device="cpu", kind="policy", name="finetune")
torch.set_num_threads(config.threads)
device = loop.resolve_device(config.device)
times = {"imports (in process)": imports}
t = time.perf_counter(); splits = trainer.load_splits(config, device); times["data load"] = time.perf_counter() - t
t = time.perf_counter(); torch.manual_seed(0); model, note = trainer.build_model(config, splits, device)
times["model build and init load"] = time.perf_counter() - t
optimizer = loop.build_optimizer(config, [p for p in model.parameters() if p.requires_grad])
state = trainer.TrainingState(
    config, model, optimizer, torch.Generator().manual_seed(0), len(splits.tensors["train"][1])
)
batches = trainer.batch_source(config, splits, state.generator)
one = lambda split, shuffled=False: itertools.islice(batches(split, shuffled), 1)
scaler = torch.amp.GradScaler("cpu", enabled=False)
steps = []
for _ in range(3):
    t = time.perf_counter()
    trainer.fit_epoch(state, model, one, 0, 17, scaler, device)
    steps.append(time.perf_counter() - t)
times["first-step warm-up"] = steps[0] - min(steps[1:])
t = time.perf_counter(); trainer.save_torch(options.resume_path(config), state.snapshot())
times["resume file (each epoch)"] = time.perf_counter() - t
state.curves.append({"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.1, "val_loss": 1.0, "val_accuracy": 0.1,
                     "lr": 0.1, "train_seconds": 1.0, "eval_seconds": 1.0, "images": 256})
t = time.perf_counter()
timings = {"data_seconds": 0.0, "cache_seconds": 0.0, "wall_seconds": 1.0}
record = trainer.make_record(state, "completed", splits, note, (None, None), timings, device, None)
trainer.save_checkpoint(state, "completed", None)
write_record(config.record, record)
times["checkpoint and record"] = time.perf_counter() - t
print(json.dumps(times))
"""

CHAIN = """
rule all:
    input: "c.txt"
rule a:
    output: "a.txt"
    shell: "date +%s.%N > {output}; date +%s.%N >> {output}"
rule b:
    input: "a.txt"
    output: "b.txt"
    shell: "date +%s.%N > {output}; date +%s.%N >> {output}"
rule c:
    input: "b.txt"
    output: "c.txt"
    shell: "date +%s.%N > {output}; date +%s.%N >> {output}"
"""


def run(command, cwd=REPO) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if result.returncode:
        raise SystemExit(f"{' '.join(map(str, command))} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start, result


def synthetic_inputs(folder: Path, classes: int = 10, train: int = 4500, val: int = 500) -> tuple[Path, Path]:
    """Decoded splits of the default subset's size and a ResNet18 state-dict (the source model's stand-in)."""
    script = f"""
import torch
from tlselect.training.models import StagedNet
g = torch.Generator().manual_seed(0)
for split, n in (("train", {train}), ("val", {val})):
    torch.save({{"images": torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                "labels": torch.arange(n) % {classes}}}, "{folder}/data/" + split + ".pt")
torch.save(StagedNet("resnet18", {classes}, 32).net.state_dict(), "{folder}/source.pt")
"""
    (folder / "data").mkdir(parents=True)
    run([sys.executable, "-c", script])
    return folder / "data", folder / "source.pt"


def slowest_imports(stderr: str, count: int = 8) -> list[tuple[str, float]]:
    """The packages (no submodules) with the largest cumulative import time in ``-X importtime`` output."""
    rows = re.findall(r"import time:\s+\d+ \|\s+(\d+) \| +(\S+)", stderr)
    top = [(name, int(cumulative) / 1e6) for cumulative, name in rows if "." not in name and name != "tlselect"]
    return sorted(top, key=lambda row: -row[1])[:count]


def snakemake_gaps(folder: Path) -> list[float]:
    """Seconds from each job's end to the next one's start in a three-job shell chain."""
    write_text(folder / "Snakefile", CHAIN)
    run([sys.executable, "-m", "snakemake", "--cores", "2", "--snakefile", folder / "Snakefile", "-d", folder])
    stamps = [[float(x) for x in (folder / f"{job}.txt").read_text().split()] for job in "abc"]
    return [stamps[i + 1][0] - stamps[i][1] for i in range(2)]


def measure(threads: int, epochs: int, repo: Path = REPO) -> dict:
    with tempfile.TemporaryDirectory(prefix="fixed-cost-") as tmp:
        folder = Path(tmp)
        data, weights = synthetic_inputs(folder)
        bare, _ = run([sys.executable, "-c", "pass"])
        imports, _ = run([sys.executable, "-c", IMPORTS], repo)
        _, timed = run([sys.executable, "-X", "importtime", "-c", IMPORTS], repo)
        (folder / "steps").mkdir()
        _, steps = run([sys.executable, "-c", STEPS, data, weights, folder / "steps", str(threads)], repo)
        args = ["--data", str(data), "--weights", str(weights), "--init", "source", "--epochs", str(epochs),
                "--threads", str(threads), "--device", "cpu"]  # fmt: skip
        job = {}
        for mode, server_dir in (("cold", None), ("forked", folder / "forked")):
            if server_dir:
                job_fixed_cost(args, str(server_dir), repo)  # starts the fork server
            wall, inside = job_fixed_cost(args, str(server_dir) if server_dir else None, repo)
            job[mode] = {"epochs": epochs, "wall": wall, "train_and_eval": inside, "outside": wall - inside}
        (folder / "chain").mkdir()
        gaps = snakemake_gaps(folder / "chain")
    parts = {"interpreter": bare, "interpreter and imports": imports, **json.loads(steps.stdout)}
    parts["Snakemake's gap between jobs"] = statistics.mean(gaps)
    return {
        "parts": parts,
        "slowest_imports": slowest_imports(timed.stderr),
        "job": job,
    }


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the job (the rules' threads)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the whole job")
    parser.add_argument("--repeat", type=int, default=1, help="runs per checkout; each number is its fastest run")
    parser.add_argument(
        "--repos", type=Path, nargs="+", default=[REPO], help="checkouts to compare, run in turn (default: this one)"
    )
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    repos = [repo.resolve() for repo in args.repos]
    runs = {repo: [] for repo in repos}
    for _ in range(args.repeat):
        for repo in repos:  # in turn, so a busy spell of a shared machine hits every checkout alike
            runs[repo].append(measure(args.threads, args.epochs, repo))
    best = {repo: fastest(results) for repo, results in runs.items()}
    if args.json:
        print(json.dumps({str(repo): result for repo, result in best.items()}, indent=1))
        return 0
    print("| part | " + " | ".join(f"{repo} s" for repo in repos) + " |\n|---|" + "---:|" * len(repos))
    for name in best[repos[0]]["parts"]:
        print(f"| {name} | " + " | ".join(f"{best[repo]['parts'][name]:.2f}" for repo in repos) + " |")
    for mode in ("cold", "forked"):
        for label, key in (("whole job, wall", "wall"), ("of it training and validation", "train_and_eval")):
            print(f"| {label} ({mode}) | " + " | ".join(f"{best[repo]['job'][mode][key]:.2f}" for repo in repos) + " |")
        print(f"| **whole job outside training and validation ({mode})** | " + " | ".join(
            f"**{best[repo]['job'][mode]['outside']:.2f}**" for repo in repos) + " |")  # fmt: skip
    print(f"\nWhole job: scripts/train.py, {args.epochs} epoch(s); fastest of {args.repeat} run(s) per number.")
    imports = best[repos[-1]]["slowest_imports"]
    print("Slowest imports (cumulative s): " + ", ".join(f"{n} {s:.2f}" for n, s in imports))
    return 0


def fastest(results: list[dict]) -> dict:
    """Each number's smallest value over ``results`` (the outside of the job: from the fastest whole job)."""
    job = {mode: min((r["job"][mode] for r in results), key=lambda j: j["outside"]) for mode in ("cold", "forked")}
    parts = {name: min(r["parts"][name] for r in results) for name in results[0]["parts"]}
    return {"parts": parts, "job": job, "slowest_imports": results[0]["slowest_imports"]}


if __name__ == "__main__":
    sys.exit(main())
