"""Model search over a candidate pool: the config check, successive halving's and Hyperband's
brackets (which candidates start, how many epochs each rung trains, how many it keeps), promotion.

The pool (``search`` in ``config.yaml``; :func:`tlselect.runs.candidate_runs`) is the product of
backbones, inits, freeze depths and hyperparameters. Brackets are static: they are worked out from
the config when the Snakefile is parsed, so every rung is a set of ordinary jobs.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from tlselect.config import ConfigError, check_init
from tlselect.core.files import write_json
from tlselect.core.registry import rank
from tlselect.core.settings import resolve_init
from tlselect.runs import candidate_runs

# Methods trained in rounds of suggestions (tlselect.search.strategies), after the statically planned ones.
MODEL_BASED = ("tpe", "gp_ucb", "cost_gp_ucb")


METHODS = ("grid", "random", "sh", "hb", *MODEL_BASED)


def check(config: dict) -> None:
    """Reject a search block that cannot run; the message names the key."""
    search = config["search"]
    for init in search["inits"]:
        check_init("search.inits", resolve_init(config, init))
    for key in ("lr", "weight_decay", "label_smoothing"):
        low, high = search["distributions"][key]
        if low > high:
            raise ConfigError(f"search.distributions.{key}: the low bound {low} exceeds the high bound {high}")
    if search["min_epochs"] > search["max_epochs"]:
        raise ConfigError(
            f"search.min_epochs ({search['min_epochs']}) must not exceed search.max_epochs ({search['max_epochs']})"
        )
    pool = benchmark_pool(config)
    if search["replay"]["benchmark"]["enabled"] and not pool.is_file():
        raise ConfigError(
            f"search.replay.benchmark.pool: {pool} does not exist; give a pool table such as "
            "benchmarks/pools/cifar10-deer-horse.csv (docs/model-search.md), or set enabled: false"
        )
    if not search["enabled"]:
        return
    pool = len({spec.name for spec in candidate_runs(config).values()})  # configurations, not their seeds
    if not pool:
        raise ConfigError("search: the candidate pool is empty (scratch is never frozen); add an init or freezes: none")
    if search["rounds"] * search["q"] > pool:
        raise ConfigError(
            f"search.rounds x search.q ({search['rounds']} x {search['q']}) exceeds the pool's {pool} candidates: "
            "GP-UCB trains each grid point at most once"
        )


def benchmark_pool(config: dict) -> Path:
    """The pool table the benchmark replay reads: a relative path is the workflow's own (its repository)."""
    path = Path(config["search"]["replay"]["benchmark"]["pool"])
    return path if path.is_absolute() else Path(__file__).resolve().parents[2] / path


def sample(candidates: list[str], count: int, seed: int, stream: str) -> list[str]:
    """A seeded sample of ``count`` candidates (all when ``count`` exceeds them), in pool order."""
    chosen = set(random.Random(f"{seed}-{stream}").sample(sorted(candidates), min(count, len(candidates))))
    return [c for c in candidates if c in chosen]


@dataclass(frozen=True)
class Bracket:
    """One successive-halving bracket: candidates at rung 0, survivors and epochs per rung."""

    candidates: tuple[str, ...]
    keep: tuple[int, ...]  # candidates trained at each rung
    epochs: tuple[int, ...]  # total epochs a candidate has trained after each rung

    @property
    def rungs(self) -> int:
        return len(self.keep)

    def cost(self) -> int:
        """Epochs trained in all: survivors continue, so a rung costs only its extra epochs."""
        return sum(k * (e - p) for k, e, p in zip(self.keep, self.epochs, (0, *self.epochs), strict=False))


def _rungs(n: int, s: int, eta: int, max_epochs: int, min_epochs: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    keep = tuple(max(1, n // eta**i) for i in range(s + 1))
    epochs = tuple(max(min_epochs, round(max_epochs / eta ** (s - i))) for i in range(s + 1))
    return keep, epochs


def max_bracket(search: dict) -> int:
    """s_max = floor(log_eta(max_epochs / min_epochs)): the most aggressive bracket's rungs minus one."""
    ratio, s = search["max_epochs"] / search["min_epochs"], 0
    while search["eta"] ** (s + 1) <= ratio * (1 + 1e-9):
        s += 1
    return s


def brackets(config: dict, method: str, pool: dict | None = None) -> list[Bracket]:
    """The static brackets of ``sh`` (one bracket over the whole pool) or ``hb`` (``search.brackets``).

    ``pool``: the config's :func:`tlselect.runs.candidate_runs`, when the caller has it already.
    With ``repeats``, the brackets are unrolled over configurations (the candidates' names) and each
    rung trains every seed of each configuration it keeps: its slots hold the seeds one after another,
    so ``keep`` counts runs (configurations times seeds) and a rung's :func:`promote` keeps whole
    configurations, ranked on their mean.
    """
    pool = candidate_runs(config) if pool is None else pool
    seeds: dict[str, list[str]] = {}
    for run_id, spec in pool.items():
        seeds.setdefault(spec.name, []).append(run_id)
    repeats = max((len(ids) for ids in seeds.values()), default=1)
    return [
        Bracket(tuple(i for name in b.candidates for i in seeds[name]), tuple(k * repeats for k in b.keep), b.epochs)
        for b in unroll(list(seeds), config["search"], config["seed"], method)
    ]


def unroll(candidates: list[str], search: dict, seed: int, method: str) -> list[Bracket]:
    """The brackets of ``sh`` or ``hb`` over ``candidates`` with the ``search`` block's eta and epochs.

    Hyperband's bracket ``s`` (from s_max down) starts ceil((s_max+1)/(s+1) * eta^s) candidates,
    a seeded sample of the pool, at max_epochs * eta^-s epochs, and keeps 1/eta of them per rung.
    """
    s_max = max_bracket(search)
    eta, top, low = search["eta"], search["max_epochs"], search["min_epochs"]
    if method == "sh":
        return [Bracket(tuple(candidates), *_rungs(len(candidates), s_max, eta, top, low))]
    out = []
    for s in range(s_max, max(-1, s_max - search["brackets"]), -1):
        n = min(len(candidates), math.ceil((s_max + 1) / (s + 1) * eta**s))
        chosen = sample(candidates, n, seed, f"hb-{s}")
        out.append(Bracket(tuple(chosen), *_rungs(n, s, eta, top, low)))
    return out


def promote(records: dict[str, dict], keep: int) -> list[dict]:
    """The ``keep`` best of the previous rung: ``[{slot, candidate, checkpoint, record, val_accuracy}]``.

    ``records`` maps each record's path to the record; its checkpoint is the same path with ``.pt``.
    The order is :func:`tlselect.core.registry.rank`'s: configurations by their mean validation
    accuracy over their seeds, each configuration's runs together, so the first ``keep`` are whole
    configurations when ``keep`` is a multiple of the seeds (as :func:`brackets` makes it).
    """
    paths = {id(r): p for p, r in records.items()}
    ranked = rank(list(records.values()))[:keep]
    return [
        {
            "slot": slot,
            "candidate": r["name"],
            "record": paths[id(r)],
            "checkpoint": str(Path(paths[id(r)]).with_suffix(".pt")),
            "val_accuracy": r["metrics"]["val_accuracy"],
        }
        for slot, r in enumerate(ranked)
    ]


def write_promotion(ranking: str | Path, keep: int, out: str | Path) -> str:
    """Write the promotion file of a rung, the first ``keep`` of the previous rung's ranking file; say what it kept."""
    ranked = json.loads(Path(ranking).read_text())["ranking"]
    write_json(out, {"keep": keep, "slots": ranked[:keep]})
    names = ", ".join(slot["candidate"] for slot in ranked[:keep])
    return f"kept {min(keep, len(ranked))} of {len(ranked)} from {ranking}: {names}"
