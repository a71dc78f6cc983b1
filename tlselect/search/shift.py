"""SHiFT's successive halving over data (Renggli et al., "SHiFT: An Efficient, Flexible Search
Engine for Transfer Learning", VLDB 2022, Section 4): the arms are the pool's models, pulling an arm
runs its inference on one more chunk of the training images and updates its proxy classifier (kNN
or a linear probe on the features), which is scored on the validation images; each round keeps the
best 1/eta.

Budget and chunks follow SHiFT's rule for ``M`` models: ``K = ceil(log_eta M)`` rounds, budget
``B = M K`` pulls; in round ``k`` the ``S_k`` surviving arms get ``r_k = floor(B / (S_k K))`` more
pulls each (``S_0 = M``, ``S_{k+1} = ceil(S_k / eta)``), so an arm in round ``k`` has read
``R_k = r_0 + ... + r_k`` chunks. SHiFT's released code sizes a chunk from the sum of the ``R_k``;
here a chunk is ``ceil(N / R_{K-1})`` images, so that the last round's survivors read all ``N``
training images and the last round ranks them as the full proxy would.

Numpy and scikit-learn only: the features come from a callable (:mod:`tlselect.training.store`
extracts them chunk by chunk, so a model dropped early never reads the rest).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tlselect.search import proxies


@dataclass(frozen=True)
class Round:
    survivors: int  # S_k: models scored in this round
    chunks: int  # R_k: chunks each of them has read by the end of it


def schedule(models: int, eta: int) -> list[Round]:
    """SHiFT's rounds for ``models`` arms (none for a single model: it is the winner)."""
    if models <= 1:
        return []
    rounds = math.ceil(math.log(models) / math.log(eta) - 1e-9)
    budget = models * rounds
    out, survivors, read = [], models, 0
    for _ in range(rounds):
        read += budget // (survivors * rounds)
        out.append(Round(survivors, read))
        survivors = math.ceil(survivors / eta)
    return out


def chunk_size(train_size: int, rounds: list[Round]) -> int:
    """Images per chunk: the last round's survivors read all ``train_size`` images."""
    return math.ceil(train_size / rounds[-1].chunks) if rounds else train_size


def score(proxy: str, train_x, train_y, val_x, val_y, neighbors: int = 5) -> float:
    """The proxy's validation accuracy with the classifier fit on ``train_x``."""
    if proxy == "knn":
        return proxies.knn_accuracy(train_x, train_y, val_x, val_y, neighbors)
    if len(np.unique(train_y)) < 2:  # a linear probe needs two classes; it would predict the one it saw
        return float(np.mean(val_y == train_y[0]))
    return proxies.linear_probe_accuracy(train_x, train_y, val_x, val_y)


@dataclass
class Result:
    winner: str
    rows: list[dict] = field(default_factory=list)  # one per model and round: model, round, images, score


# features(model, indices) -> the model's features of those training images (extracting what is missing);
# validation(model) -> (features, labels) of the validation images
Features = Callable[[str, np.ndarray], np.ndarray]


def successive_halving(
    models: list[str],
    labels: np.ndarray,
    features: Features,
    validation: Callable[[str], tuple[np.ndarray, np.ndarray]],
    eta: int = 2,
    proxy: str = "knn",
    seed: int = 0,
    neighbors: int = 5,
) -> Result:
    """SHiFT's successive halving over the training images, read in a seeded order; ties go to the
    earlier model in ``models``."""
    rounds = schedule(len(models), eta)
    order = np.random.RandomState(seed).permutation(len(labels))
    chunk = chunk_size(len(labels), rounds)
    survivors, rows = list(models), []
    for k, step in enumerate(rounds):
        seen = order[: min(len(order), step.chunks * chunk)]
        scores = {}
        for model in survivors:
            val_x, val_y = validation(model)
            scores[model] = score(proxy, features(model, seen), labels[seen], val_x, val_y, neighbors)
            rows.append({"model": model, "round": k, "images": len(seen), "score": scores[model]})
        keep = math.ceil(len(survivors) / eta) if k < len(rounds) - 1 else 1
        survivors = sorted(survivors, key=lambda m: (-scores[m], models.index(m)))[:keep]
    return Result(survivors[0], rows)


def full_proxy(
    models: list[str],
    labels: np.ndarray,
    features: Features,
    validation: Callable[[str], tuple[np.ndarray, np.ndarray]],
    proxy: str = "knn",
    neighbors: int = 5,
) -> Result:
    """The proxy of every model on all training images; the winner has the best score."""
    everything = np.arange(len(labels))
    rows = []
    for model in models:
        val_x, val_y = validation(model)
        value = score(proxy, features(model, everything), labels, val_x, val_y, neighbors)
        rows.append({"model": model, "round": 0, "images": len(labels), "score": value})
    best = max(rows, key=lambda row: (row["score"], -models.index(row["model"])))
    return Result(best["model"], rows)


def final_scores(result: Result) -> dict[str, tuple[int, float]]:
    """Each model's (last round reached, its score there): SH's ranking, later rounds first."""
    out: dict[str, tuple[int, float]] = {}
    for row in result.rows:
        out[row["model"]] = (row["round"], row["score"])
    return out


def tau_interval(results: list[Result], finetuned: dict[str, float]) -> dict:
    """Weighted Kendall tau between SH's ranking (round reached, then score) and fine-tuned accuracy,
    per seed's result: its mean and the 2.5 and 97.5 percentiles over the seeds."""
    taus = []
    for result in results:
        ranked = final_scores(result)
        names = [m for m in ranked if m in finetuned]
        keys = [2 * ranked[m][0] + ranked[m][1] for m in names]  # later rounds first: scores are in [0, 1]
        tau = proxies.weighted_tau(keys, [finetuned[m] for m in names])
        if tau is not None:
            taus.append(tau)
    if not taus:
        return {"tau": None, "low": None, "high": None, "seeds": 0}
    return {
        "tau": float(np.mean(taus)),
        "low": float(np.percentile(taus, 2.5)),
        "high": float(np.percentile(taus, 97.5)),
        "seeds": len(taus),
    }
