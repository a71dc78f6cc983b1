"""The model search's space: what a candidate chooses, as distributions, and the grid that discretizes it.

A candidate's parameters are ``backbone``, ``init`` (categorical), ``freeze`` (a generic depth of
:data:`tlselect.core.settings.FREEZE_DEPTHS`, conditional: scratch is never frozen, and each depth names a
stage of the chosen backbone, :func:`tlselect.core.settings.freeze_stage`), ``lr`` and ``weight_decay``
(log-uniform), ``label_smoothing`` (uniform), ``batch_size`` and ``resolution`` (categorical).

:meth:`Space.grid` is today's pool: the product of the ``search`` lists, with weight decay, label
smoothing and batch size at the search runs' defaults. :meth:`Space.sample` draws as scikit-learn's
``ParameterSampler`` (``RandomizedSearchCV``) does: a list uniformly, a distribution as scipy's
``loguniform``/``uniform`` ``rvs(random_state=rng)`` would (the same draws, without importing scipy
when the Snakefile is parsed). :func:`tlselect.runs.candidate_spec` turns either into a run spec.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from tlselect.core.settings import FREEZE_DEPTHS, hyperparameters, resolve_init

# Parameters the grid fixes at the search runs' defaults and random search samples.
SAMPLED = ("weight_decay", "label_smoothing", "batch_size")


@dataclass(frozen=True)
class Space:
    """The search space of ``config['search']``: categorical lists, grid values and distribution bounds."""

    backbones: tuple[str, ...]
    inits: tuple[str, ...]  # resolved inits
    freezes: tuple[str, ...]  # generic depths
    lrs: tuple[float, ...]  # the grid's learning rates
    resolutions: tuple[int, ...]
    lr: tuple[float, float]  # log-uniform bounds
    weight_decay: tuple[float, float]  # log-uniform bounds
    label_smoothing: tuple[float, float]  # uniform bounds
    batch_sizes: tuple[int, ...]
    defaults: dict  # the grid's weight_decay, label_smoothing and batch_size
    choices: dict = field(default_factory=dict)  # those of them a replayed grid varies: {key: values}

    @classmethod
    def from_config(cls, config: dict) -> Space:
        search = config["search"]
        dist = search["distributions"]
        hyper = hyperparameters(config, search["train"])
        return cls(
            backbones=tuple(search["backbones"]),
            inits=tuple(dict.fromkeys(resolve_init(config, i) for i in search["inits"])),
            freezes=tuple(search["freezes"]),
            lrs=tuple(search["lrs"]),
            resolutions=tuple(search["resolutions"]),
            lr=tuple(dist["lr"]),
            weight_decay=tuple(dist["weight_decay"]),
            label_smoothing=tuple(dist["label_smoothing"]),
            batch_sizes=tuple(dist["batch_sizes"]),
            defaults={k: hyper[k] for k in SAMPLED},
        )

    @classmethod
    def of_grid(cls, points: list[dict]) -> Space:
        """The discrete space whose grid holds ``points`` (a replayed grid's candidates), in their order;
        a parameter of :data:`SAMPLED` with several values among them is one of its ``choices``."""

        def values(key):
            return tuple(dict.fromkeys(p[key] for p in points))

        lrs = values("lr")
        choices = {k: tuple(sorted(values(k))) for k in SAMPLED if len(values(k)) > 1}
        return cls(
            backbones=values("backbone"),
            inits=values("init"),
            freezes=tuple(d for d in FREEZE_DEPTHS if d in values("freeze")),
            lrs=lrs,
            resolutions=values("resolution"),
            lr=(min(lrs), max(lrs)),
            weight_decay=(min(values("weight_decay")), max(values("weight_decay"))),
            label_smoothing=(min(values("label_smoothing")), max(values("label_smoothing"))),
            batch_sizes=values("batch_size"),
            defaults={k: points[0][k] for k in SAMPLED},
            choices=choices,
        )

    def freeze_choices(self, init: str) -> tuple[str, ...]:
        """The depths valid for ``init``: scratch is never frozen (every backbone has every depth)."""
        return ("none",) if init == "scratch" else self.freezes

    def arms(self) -> list[tuple[str, str, str]]:
        """The model types ``(backbone, init, freeze depth)`` of the grid, in grid order."""
        return [(b, i, d) for b in self.backbones for i in self.inits for d in self.freeze_choices(i)]

    def grid(self) -> list[dict]:
        """Every grid point, in the pool's order (backbone, init, depth, lr, resolution, then ``choices``)."""
        extra = [dict(zip(self.choices, v, strict=True)) for v in itertools.product(*self.choices.values())]
        return [
            {"backbone": b, "init": i, "freeze": d, "lr": lr, "resolution": r, **self.defaults, **e}
            for (b, i, d), lr, r in itertools.product(self.arms(), self.lrs, self.resolutions)
            for e in extra
        ]

    def distributions(self) -> dict:
        """``{parameter: list, or ("loguniform" or "uniform", low, high)}`` of the unconditional parameters."""
        return {
            "backbone": list(self.backbones),
            "init": list(self.inits),
            "lr": ("loguniform", *self.lr),
            "weight_decay": ("loguniform", *self.weight_decay),
            "label_smoothing": ("uniform", *self.label_smoothing),
            "batch_size": list(self.batch_sizes),
            "resolution": list(self.resolutions),
        }

    def sample(self, rng) -> dict:
        """One draw (a numpy ``RandomState`` or ``Generator``); floats keep 3 significant digits."""
        out = {}
        for key, dist in sorted(self.distributions().items()):  # ParameterSampler's order: sorted keys
            if isinstance(dist, tuple):
                out[key] = float(f"{draw(rng, *dist):.3g}")
            else:
                out[key] = dist[rng.choice(len(dist))]
        choices = self.freeze_choices(out["init"])
        out["freeze"] = choices[rng.choice(len(choices))]
        return out


def draw(rng, kind: str, low: float, high: float) -> float:
    """One value as ``scipy.stats.loguniform(low, high)`` or ``uniform(low, high - low)`` draws it (inverse CDF)."""
    u = rng.uniform()
    if kind == "loguniform":
        return float(np.exp(np.log(low) + u * (np.log(high) - np.log(low))))
    return float(u * (high - low) + low)
