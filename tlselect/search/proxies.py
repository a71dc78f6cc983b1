"""Transferability proxies on cached features: LogME, kNN accuracy, linear-probe accuracy.

They score a (backbone, init, layer) without fine-tuning it (SHiFT, Renggli et al. VLDB 2022).
LogME (You et al., ICML 2021) is the log marginal likelihood (evidence) of a Bayesian linear model
from features to each one-hot label column, maximized over its prior precision alpha and noise
precision beta by the paper's fixed-point iteration, divided by the number of samples and averaged
over classes. No maintained package exists; this follows the paper's Algorithm 1.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler


def log_evidence(features: np.ndarray, target: np.ndarray, alpha: float, beta: float) -> float:
    """log p(target | features, alpha, beta) of y = F w + noise, w ~ N(0, I/alpha), noise ~ N(0, I/beta)."""
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    sigma, vectors = np.linalg.eigh(f.T @ f)
    projected = vectors.T @ (f.T @ target)
    m = vectors @ (beta * projected / (alpha + beta * sigma))  # posterior mean of w
    residual = float(np.sum((target - f @ m) ** 2))
    return float(
        d / 2 * np.log(alpha)
        + n / 2 * np.log(beta)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * residual
        - alpha / 2 * float(m @ m)
        - np.sum(np.log(alpha + beta * sigma)) / 2
    )


def maximize_evidence(
    features: np.ndarray, target: np.ndarray, iterations: int = 100, tol: float = 1e-8
) -> tuple[float, float, float]:
    """The paper's fixed point: gamma = sum beta s/(alpha + beta s), alpha = gamma/m'm,
    beta = (n - gamma)/|y - F m|^2. Returns (evidence / n, alpha, beta)."""
    f = np.asarray(features, dtype=np.float64)
    n = len(f)
    sigma, vectors = np.linalg.eigh(f.T @ f)
    sigma = np.clip(sigma, 0, None)
    projected = vectors.T @ (f.T @ target)
    alpha, beta = 1.0, 1.0
    for _ in range(iterations):
        gamma = float(np.sum(beta * sigma / (alpha + beta * sigma)))
        m = vectors @ (beta * projected / (alpha + beta * sigma))
        # clipped: features without signal (gamma = 0) leave alpha free, and its terms cancel
        alpha_new = float(np.clip(gamma / max(float(m @ m), 1e-12), 1e-10, 1e10))
        beta_new = float(np.clip((n - gamma) / max(float(np.sum((target - f @ m) ** 2)), 1e-12), 1e-10, 1e10))
        done = abs(alpha_new / beta_new - alpha / beta) <= tol * alpha / beta
        alpha, beta = alpha_new, beta_new
        if done:
            break
    return log_evidence(f, target, alpha, beta) / n, alpha, beta


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME: the maximized evidence per sample, averaged over the one-hot label columns."""
    labels = np.asarray(labels)
    f = np.asarray(features, dtype=np.float64).reshape(len(labels), -1)
    return float(np.mean([maximize_evidence(f, (labels == c).astype(np.float64))[0] for c in np.unique(labels)]))


def knn_accuracy(train_x, train_y, val_x, val_y, neighbors: int = 5) -> float:
    """Validation accuracy of a k-nearest-neighbour classifier on the (flattened) training features."""
    model = KNeighborsClassifier(n_neighbors=min(neighbors, len(train_y)))
    model.fit(np.asarray(train_x).reshape(len(train_y), -1), train_y)
    return float(model.score(np.asarray(val_x).reshape(len(val_y), -1), val_y))


def linear_probe_accuracy(train_x, train_y, val_x, val_y) -> float:
    """Validation accuracy of a logistic-regression probe on standardized (flattened) features."""
    scaler = StandardScaler().fit(np.asarray(train_x).reshape(len(train_y), -1))
    model = LogisticRegression(max_iter=500)
    model.fit(scaler.transform(np.asarray(train_x).reshape(len(train_y), -1)), train_y)
    return float(model.score(scaler.transform(np.asarray(val_x).reshape(len(val_y), -1)), val_y))


def weighted_tau(scores, accuracies) -> float | None:
    """Weighted Kendall tau (scipy, hyperbolic weights on the top ranks) between a proxy and fine-tuning."""
    scores, accuracies = np.asarray(scores, dtype=float), np.asarray(accuracies, dtype=float)
    keep = np.isfinite(scores) & np.isfinite(accuracies)
    if keep.sum() < 2:
        return None
    tau = stats.weightedtau(scores[keep], accuracies[keep]).statistic
    return None if np.isnan(tau) else float(tau)
