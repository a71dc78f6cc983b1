"""Downstream models on a table joined with cached features (VISTA's feature transfer with
structured data: Nakandala and Kumar, "Vista: Optimized System for Declarative Feature Transfer
from Deep CNNs at Scale", SIGMOD 2020).

One run fits one scikit-learn model (logistic regression or histogram gradient boosting) on the
table's encoded columns (:mod:`tlselect.data.table`) joined with one cached layer's features
(pooled as the probes pool them, standardized with training statistics), on the features alone,
or on the columns alone. The join is never materialized beyond the memory budget
(``features.memory_mb``): rows stream from the memory-mapped feature cache in chunks, and where the
training matrix would not fit, the run's plan says what it chose instead (``join.over_budget``):
logistic regression by SGD over the chunks, the features reduced by incremental PCA to
``join.pca_width``, or refused with the size. The record keeps the plan and the peak memory the
join allocated once its inputs were opened (tracemalloc) next to the job's resident peak.
"""

from __future__ import annotations

import platform
import resource
import sys
import time
import tracemalloc
from importlib.metadata import version
from pathlib import Path

import numpy as np

from tlselect.core.registry import write_record
from tlselect.data.table import load_table
from tlselect.training.features import SPLITS, open_features

# Bytes per value of the training matrix in a fit: float32 rows plus scikit-learn's float64 copy.
FIT_BYTES = 12
# The share of a budget that chunks fill; the rest is headroom for the model, scikit-learn's working
# arrays and the chunk before (on the 2-core CPU a chunk sized to the whole budget peaked 8-16% above it).
CHUNK_SHARE = 0.75
# Histogram gradient boosting's working memory beyond its matrix: one histogram (256 bins of a
# float64 gradient sum, a float64 hessian sum and a count) per feature and leaf, plus a fixed part
# (on the 2-core CPU it peaked at 3 MB for 11 columns, 9 MB for 75, 53 MB for 523; this is above each).
HISTOGRAM_BYTES = 256 * 20
# Incremental PCA's bytes per feature of a chunk's row: float64 copies for its centring and SVD (a
# chunk sized without them peaked at 17.4 MB in a 16 MB budget on the 2-core CPU).
PCA_BYTES = 32
BOOSTING_FIXED_BYTES = 1.5 * 2**20
MODELS = ("logistic", "boosting")


def adaptive_pool(x: np.ndarray, pool: int) -> np.ndarray:
    """Rows of activations ``N x C x H x W`` average-pooled to ``pool`` x ``pool`` and flattened, as
    float32 (PyTorch's adaptive average pooling bins; 0 or a map already that small: as stored)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 4 and pool and x.shape[-1] > pool:
        h, w = x.shape[-2:]
        bins = [
            x[:, :, (i * h) // pool : -((-(i + 1) * h) // pool), (j * w) // pool : -((-(j + 1) * w) // pool)].mean(
                axis=(2, 3)
            )
            for i in range(pool)
            for j in range(pool)
        ]
        x = np.stack(bins, axis=-1)
    return x.reshape(len(x), -1)


class JoinedSplit:
    """One split of the join, read in chunks: pooled, standardized features of the kept rows (when
    ``features`` is given) followed by the table's encoded columns (when ``columns`` is given)."""

    def __init__(self, rows, labels, columns=None, features=None, pool: int = 1):
        self.rows, self.labels = np.asarray(rows, dtype=np.int64), np.asarray(labels, dtype=np.int64)
        self.columns, self.features, self.pool = columns, features, pool
        self.mean = self.scale = None
        self.feature_width = adaptive_pool(features[:1], pool).shape[1] if features is not None else 0
        self.table_width = columns.shape[1] if columns is not None else 0

    @property
    def width(self) -> int:
        return self.feature_width + self.table_width

    def __len__(self) -> int:
        return len(self.rows)

    def raw_row_bytes(self) -> int:
        """Bytes one row of the cached features takes while it is pooled: read (float16) and as float32."""
        return 6 * int(np.prod(self.features.shape[1:])) if self.features is not None else 0

    def chunk(self, index: np.ndarray) -> np.ndarray:
        """The joined rows at positions ``index`` (float32)."""
        parts = []
        if self.features is not None:
            rows = self.rows[index]
            order = np.argsort(rows, kind="stable")  # read the memory map forward, then restore the order
            pooled = np.empty((len(rows), self.feature_width), dtype=np.float32)
            pooled[order] = adaptive_pool(self.features[rows[order]], self.pool)
            if self.mean is not None:
                pooled -= self.mean
                pooled /= self.scale
            parts.append(pooled)
        if self.columns is not None:
            parts.append(self.columns[index])
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def chunks(self, rows_per_chunk: int, order: np.ndarray | None = None):
        order = np.arange(len(self)) if order is None else order
        for start in range(0, len(order), rows_per_chunk):
            index = order[start : start + rows_per_chunk]
            yield index, self.chunk(index)

    def fit_scaler(self, rows_per_chunk: int) -> None:
        """Training statistics of the pooled features (streamed), applied by :meth:`chunk` from then on."""
        if self.features is None:
            return
        total = np.zeros(self.feature_width)
        squares = np.zeros(self.feature_width)
        for _, x in self.chunks(rows_per_chunk):
            total += x[:, : self.feature_width].sum(axis=0, dtype=np.float64)
            squares += np.square(x[:, : self.feature_width], dtype=np.float64).sum(axis=0)
        mean = total / len(self)
        std = np.sqrt(np.maximum(squares / len(self) - mean**2, 0.0))
        self.mean, self.scale = mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)


def rows_per_chunk(memory_mb: float, split: JoinedSplit, pca: bool = False) -> int:
    """Rows per chunk so that one chunk (its raw features, its joined float32 rows while they are
    put together, and scikit-learn's float64 copy; with ``pca``, incremental PCA's float64 working
    copies of the chunk's features too) fills ``CHUNK_SHARE`` of ``memory_mb``."""
    per_row = split.raw_row_bytes() + (FIT_BYTES + 4) * split.width + (PCA_BYTES * split.feature_width if pca else 0)
    return max(1, int(CHUNK_SHARE * memory_mb * 2**20) // per_row)


def model_bytes(model: str, hyper: dict, width: int) -> float:
    """Working memory of fitting ``model`` beyond its training matrix: boosting's histograms."""
    if model != "boosting":
        return 0.0
    return hyper.get("max_leaf_nodes", 31) * width * HISTOGRAM_BYTES + BOOSTING_FIXED_BYTES


def plan(model: str, hyper: dict, train: JoinedSplit, memory_mb: float, over_budget: str, pca_width: int) -> dict:
    """How to fit ``model`` (with ``hyper``) on ``train`` within ``memory_mb``. The training matrix
    (``FIT_BYTES`` a value) is held in memory when it fits half the budget, the chunks being read
    taking the other half, and with the model's working memory (:func:`model_bytes`) the whole;
    else ``over_budget`` says: ``chunked`` (logistic regression by SGD over chunks of the whole
    budget; with ``chunk``, boosting takes ``pca``), ``pca`` (the features reduced to ``pca_width``
    columns by incremental PCA, the reduced matrix held as above, the table's columns kept), or
    ``refused``; PCA is refused too where even the reduced matrix does not fit, a chunk holds fewer
    rows than ``pca_width`` or there are no features to reduce."""
    budget = memory_mb * 2**20
    need = len(train) * train.width * FIT_BYTES
    out = {"budget_mb": round(memory_mb, 3), "need_mb": round(need / 2**20, 3), "rows": len(train),
           "width": train.width, "rows_per_chunk": rows_per_chunk(memory_mb / 2, train),
           "model_mb": round(model_bytes(model, hyper, train.width) / 2**20, 3)}  # fmt: skip
    if need <= budget / 2 and need + model_bytes(model, hyper, train.width) <= budget:
        return {**out, "chose": "in_memory"}
    if over_budget == "refuse":
        return {**out, "chose": "refused", "why": "join.over_budget is refuse"}
    if over_budget == "chunk" and model == "logistic":
        return {**out, "rows_per_chunk": rows_per_chunk(memory_mb, train), "chose": "chunked"}
    width = min(pca_width, train.feature_width) + train.table_width
    reduced = len(train) * width * FIT_BYTES
    out = {**out, "reduced_width": width, "reduced_need_mb": round(reduced / 2**20, 3),
           "model_mb": round(model_bytes(model, hyper, width) / 2**20, 3),
           "rows_per_chunk": rows_per_chunk(memory_mb / 2, train, pca=True)}  # fmt: skip
    if not train.feature_width:
        return {**out, "chose": "refused", "why": "no features to reduce by PCA"}
    if reduced > budget / 2 or reduced + model_bytes(model, hyper, width) > budget:
        return {
            **out,
            "chose": "refused",
            "why": "even the PCA-reduced matrix and the model's working memory exceed the budget",
        }
    if out["rows_per_chunk"] < min(pca_width, train.feature_width):
        return {**out, "chose": "refused", "why": "a chunk within the budget holds fewer rows than join.pca_width"}
    return {**out, "chose": "pca"}


def make_model(model: str, hyper: dict, seed: int, rows: int = 0, sgd: bool = False):
    """The scikit-learn estimator of ``model`` with ``hyper``; ``sgd``: logistic regression fitted by
    SGD over chunks (the same L2 penalty: alpha = 1 / (C x ``rows``)), one pass over a chunk at a time."""
    if model == "logistic" and sgd:
        from sklearn.linear_model import SGDClassifier

        return SGDClassifier(loss="log_loss", alpha=1.0 / (hyper["C"] * rows), shuffle=False, random_state=seed)
    if model == "logistic":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=hyper["C"], max_iter=hyper["max_iter"])
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(**hyper, early_stopping=False, random_state=seed)


def fit_sgd(estimator, train: JoinedSplit, rows_per_chunk: int, epochs: int, seed: int, classes):
    """Fit ``estimator`` (``partial_fit``) over ``epochs`` passes of ``train`` in chunks, each pass in a
    seeded random order: the same steps whatever the chunk size (one chunk gives the same model up to
    rounding)."""
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(train))
        for index, x in train.chunks(rows_per_chunk, order):
            estimator.partial_fit(x, train.labels[index], classes=classes)
    return estimator


class Reduced:
    """A split seen through incremental PCA of its features (the table's columns kept as they are)."""

    def __init__(self, split: JoinedSplit, pca):
        self.split, self.pca = split, pca

    def chunks(self, rows_per_chunk: int):
        f = self.split.feature_width
        for index, x in self.split.chunks(rows_per_chunk):
            yield index, np.concatenate([self.pca.transform(x[:, :f]).astype(np.float32), x[:, f:]], axis=1)


def fit_pca(train: JoinedSplit, rows_per_chunk: int, width: int):
    from sklearn.decomposition import IncrementalPCA

    pca = IncrementalPCA(n_components=min(width, train.feature_width))
    rows = max(rows_per_chunk, pca.n_components)
    for _, x in train.chunks(rows):
        if len(x) >= pca.n_components:  # a last chunk smaller than the width adds too little to matter
            pca.partial_fit(x[:, : train.feature_width])
    return pca


def gather(chunks) -> np.ndarray:
    return np.concatenate([x for _, x in chunks])


def accuracy(estimator, chunks, labels) -> tuple[float, str]:
    """Accuracy of ``estimator`` over a split's chunks, and its per-row hits as a 0/1 string."""
    hits = np.concatenate([estimator.predict(x) == labels[index] for index, x in chunks])
    return float(hits.mean()), "".join("1" if h else "0" for h in hits)


def parameter_count(estimator, pca=None) -> int:
    if hasattr(estimator, "coef_"):
        count = estimator.coef_.size + estimator.intercept_.size
    else:  # boosting: the nodes of every tree
        count = sum(len(tree.nodes) for trees in estimator._predictors for tree in trees)
    return int(count + (pca.components_.size if pca is not None else 0))


def splits_of(table: dict, settings: dict, features: str | Path | None) -> dict[str, JoinedSplit]:
    """Each split of a run's inputs: the table's columns unless it is features-only, the cached layer's
    features (folder ``features``) unless it is columns-only."""
    out = {}
    for split in SPLITS:
        columns = table[f"{split}_columns"] if settings["inputs"] != "features" else None
        feats = open_features(Path(features) / f"{split}.npy") if settings["inputs"] != "columns" else None
        out[split] = JoinedSplit(table[f"{split}_rows"], table[f"{split}_labels"], columns, feats, settings["pool"])
    if not out["train"].width:
        raise ValueError("the join has no columns: the table encodes none and the run reads no features")
    return out


def _print(message: str) -> None:
    print(message, flush=True)


def fit_run(settings: dict, table_path: str | Path, features: str | Path | None, record_path: str | Path,
            run_id: str, threads: int = 1, log=_print) -> dict:  # fmt: skip
    """One run on the join (``settings``: a :func:`tlselect.runs.join_runs` spec's): fit its model
    within the memory budget, evaluate it on validation and test, and write its registry record."""
    import sklearn.decomposition  # noqa: F401 (imported before tracemalloc starts: not the join's memory)
    import sklearn.ensemble  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    table = load_table(table_path)
    splits = splits_of(table, settings, features)  # checksums verified (a 4 MiB read buffer), then memory-mapped
    train = splits["train"]
    classes = np.arange(int(table["num_classes"]))
    chosen = plan(settings["model"], settings["hyper"], train, settings["memory_mb"], settings["over_budget"],
                  settings["pca_width"])  # fmt: skip
    rows = chosen["rows_per_chunk"]
    log(f"{settings['name']}: {len(train)} training rows x {train.width} columns; plan {chosen}")
    with threadpool_limits(limits=threads):
        tracemalloc.start()
        if chosen["chose"] != "refused":
            train.fit_scaler(rows)
        for split in ("val", "test"):
            splits[split].mean, splits[split].scale = train.mean, train.scale
        data_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        estimator = pca = None
        views = {split: splits[split] for split in SPLITS}
        if chosen["chose"] == "in_memory":
            estimator = make_model(settings["model"], settings["hyper"], settings["seed"])
            estimator.fit(gather(train.chunks(rows)), train.labels)
        elif chosen["chose"] == "chunked":
            estimator = make_model(settings["model"], settings["hyper"], settings["seed"], len(train), sgd=True)
            fit_sgd(estimator, train, rows, settings["chunk_epochs"], settings["seed"], classes)
        elif chosen["chose"] == "pca":
            pca = fit_pca(train, rows, settings["pca_width"])
            views = {split: Reduced(splits[split], pca) for split in SPLITS}
            estimator = make_model(settings["model"], settings["hyper"], settings["seed"])
            estimator.fit(gather(views["train"].chunks(rows)), train.labels)
        train_seconds = time.perf_counter() - t1
        t2 = time.perf_counter()
        scores = {}
        if estimator is not None:
            for split in ("val", "test"):
                scores[split] = accuracy(estimator, views[split].chunks(rows), splits[split].labels)
        eval_seconds = time.perf_counter() - t2
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    chosen["peak_mb"] = round(peak / 2**20, 3)
    chosen["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    done = estimator is not None
    if done:
        log(
            f"{settings['name']}: val {scores['val'][0]:.4f}, test {scores['test'][0]:.4f}; peak {chosen['peak_mb']} MB"
        )
    else:
        log(f"{settings['name']}: refused ({chosen['why']}): needs {chosen['need_mb']} MB of {chosen['budget_mb']} MB")
    params = parameter_count(estimator, pca) if done else 0
    record = {
        "run_id": run_id,
        "kind": "join",
        "name": settings["name"],
        "status": "completed" if done else "refused",
        "config": settings,
        "seed": settings["seed"],
        "data_checksum": str(table["data_checksum"]) or None,
        "init": {"source": settings["init"] or "none", "classifier_replaced": False},
        "num_classes": len(classes),
        "parameters": {"trainable": params, "total": max(params, 1)},
        "data": {split: len(splits[split]) for split in SPLITS},
        "timings": {"data_seconds": data_seconds, "cache_seconds": 0.0, "train_seconds": train_seconds,
                    "eval_seconds": eval_seconds, "wall_seconds": time.perf_counter() - t0, "epoch_seconds": []},
        "throughput_images_per_second": len(train) / train_seconds if done and train_seconds > 0 else None,
        "metrics": {
            "val_accuracy": scores["val"][0] if done else None,
            "best_val_accuracy": scores["val"][0] if done else None,
            "test_accuracy": scores["test"][0] if done else None,
            "test_loss": None,
            **({"val_correct": scores["val"][1]} if done else {}),
        },
        "curves": [],
        "join": {"plan": chosen, "feature_width": train.feature_width, "table_width": train.table_width,
                 "columns": [str(n) for n in table["names"]] if settings["inputs"] != "features" else []},
        "hardware": {"platform": platform.platform(), "device": "cpu", "threads": threads},
        "versions": {"python": sys.version.split()[0], "torch": version("torch"), "torchvision": version("torchvision"),
                     "scikit_learn": version("scikit-learn"), "numpy": np.__version__},
    }  # fmt: skip
    write_record(record_path, record)
    return record
