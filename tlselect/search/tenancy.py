"""The ``tenants`` block: each tenant's own config, its checks, and the shared budget's rounds.

A tenant is a study of its own (its data, its candidate pool, optionally its training defaults)
inside the study's config: :func:`tenant_configs` merges the tenant's ``data``, ``search`` and
``train`` blocks over the top-level config, as Snakemake merges config files, so everything a
tenant does not set is the study's. :func:`check` runs the schema and
:func:`tlselect.config.check` on every tenant's merged config before any job runs, and names the
tenant in every error. Plain Python without torch or scikit-learn: the Snakefile imports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from tlselect.config import ConfigError, merged
from tlselect.config import check as check_study
from tlselect.core.settings import resolve_init
from tlselect.runs import candidate_config
from tlselect.search.space import Space

OVERLAYS = ("data", "search", "train")


def studies(config: dict) -> list[dict]:
    return config.get("tenants", {}).get("studies", [])


def tenant_config(config: dict, study: dict) -> dict:
    """A tenant's config: its ``data``, ``search`` and ``train`` blocks merged over the study's
    (without the ``tenants`` block itself)."""
    base = {k: v for k, v in config.items() if k != "tenants"}
    return merged(base, {k: study[k] for k in OVERLAYS if k in study})


def tenant_configs(config: dict) -> dict[str, dict]:
    """``{tenant name: its config}`` (:func:`tenant_config`), in config order."""
    return {s["name"]: tenant_config(config, s) for s in studies(config)}


def pool_size(config: dict) -> int:
    """Candidates in a (tenant's) grid."""
    return len(Space.from_config(config).grid())


def rounds(config: dict) -> int:
    """Scheduling rounds of each scheduler: ``jobs`` in rounds of ``q`` (the last may hold fewer)."""
    block = config["tenants"]
    return math.ceil(block["jobs"] / block["q"]) if studies(config) else 0


def slots(config: dict, round_: int) -> int:
    """Jobs of scheduling round ``round_``."""
    block = config["tenants"]
    return min(block["q"], block["jobs"] - round_ * block["q"])


def contexts(config: dict) -> dict[str, dict]:
    """What a scheduling job needs of each tenant: its space and runs
    (:func:`tlselect.runs.candidate_config`), strategy, weight and epochs per job."""
    block = config["tenants"]
    out = {}
    for study, (name, tenant) in zip(studies(config), tenant_configs(config).items(), strict=True):
        out[name] = {
            "context": candidate_config(tenant),
            "strategy": study.get("strategy") or block["strategy"],
            "weight": study["weight"],
            "epochs": tenant["search"]["max_epochs"],
        }
    return out


def check(config: dict, validate: Callable[[dict, str], None], schema_path: str) -> None:
    """Every tenant's merged config against the schema and :func:`tlselect.config.check`, then the
    shared budget against the pools; each error names the tenant (``tenants.studies[i] (name)``)."""
    seen, total = set(), 0
    for i, study in enumerate(studies(config)):
        name, tenant = study["name"], tenant_config(config, study)
        key = f"tenants.studies[{i}] ({name})"
        if name in seen or name == "average":
            what = "duplicate tenant name" if name in seen else "the global table's name for the average:"
            raise ConfigError(f"{key}: {what} {name!r}; tenant names must be unique and not 'average'")
        seen.add(name)
        try:
            validate(tenant, schema_path)
            check_study(tenant)
        except ConfigError as error:
            raise ConfigError(f"{key}: {error}") from None
        except Exception as error:  # the schema's own error (Snakemake's WorkflowError)
            raise ConfigError(f"{key}: {str(error).strip().splitlines()[0]}") from None
        if "source" in {resolve_init(tenant, i) for i in tenant["search"]["inits"]}:
            raise ConfigError(
                f"{key}.search.inits: init source pretrains on the study's own classes, not the tenant's; "
                "use scratch, imagenet or a state-dict path"
            )
        total += pool_size(tenant)
    if studies(config) and config["tenants"]["jobs"] > total:
        raise ConfigError(
            f"tenants.jobs: {config['tenants']['jobs']} jobs but the tenants' pools hold {total} candidates "
            "in all; lower tenants.jobs or widen a tenant's search lists"
        )
