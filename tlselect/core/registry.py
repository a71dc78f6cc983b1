"""The run registry: one JSON record per run, validated against ``schemas/registry.schema.json``."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from tlselect.core.errors import TLSelectError
from tlselect.core.files import write_json

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "registry.schema.json"


class RegistryError(TLSelectError):
    """A registry record is missing or does not match the schema."""


def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def validate_record(record: dict, name: str = "record") -> None:
    errors = sorted(jsonschema.Draft202012Validator(schema()).iter_errors(record), key=lambda e: list(e.path))
    if errors:
        where = "/".join(str(p) for p in errors[0].path) or "(top level)"
        raise RegistryError(f"{name} does not match the registry schema at {where}: {errors[0].message}")


def write_record(path: str | Path, record: dict) -> None:
    """Validate and write a record atomically."""
    validate_record(record, str(path))
    write_json(path, record)


def read_record(path: str | Path) -> dict:
    """Read and validate one record; errors name the file."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RegistryError(f"cannot read registry record {path}: {error}") from error
    validate_record(record, str(path))
    return record


# Settings that tell runs of one configuration apart (its repeats and folds, the checkpoint each
# seed of a search candidate continues), only say where and how fast it ran, or are the same for
# every run of a study (the number of folds, which records written before folds existed lack): a
# configuration is a record's settings without them.
RUN_ONLY_SETTINGS = {"seed", "fold", "folds", "run_id", "out", "record", "threads", "device", "workers",
                     "eval_batch_size", "plans", "continue_from"}  # fmt: skip


def configuration(record: dict) -> str:
    """The configuration a run is one repeat or fold of: its kind, name and settings without
    :data:`RUN_ONLY_SETTINGS`, as a string (the same for every seed and fold of it)."""
    settings = {k: v for k, v in record.get("config", {}).items() if k not in RUN_ONLY_SETTINGS}
    return json.dumps({"kind": record.get("kind"), "name": record["name"], **settings}, sort_keys=True)


def mean_val_accuracy(records: list[dict]) -> float | None:
    """The runs' mean final validation accuracy; None unless every one completed with one."""
    values = [r["metrics"]["val_accuracy"] for r in records]
    if any(r["status"] != "completed" for r in records) or None in values:
        return None
    return sum(values) / len(values)


def rank(records: list[dict]) -> list[dict]:
    """Configurations by mean final validation accuracy over their runs (descending; a run's
    configuration, :func:`configuration`, gathers its repeats and folds), completed ones first, ties by
    name; within a configuration, its runs in the given order. Never by test.

    The one selection rule: the study's table, its summary and notebook, and the model search
    all choose ``rank(records)[0]`` (a run of the best configuration). Without repeats or folds every
    configuration is one run, and this is the runs by their own validation accuracy.
    """
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(configuration(record), []).append(record)

    def key(group):
        val = mean_val_accuracy(group)
        return (val is None, -(val or 0.0), group[0]["name"])

    return [record for group in sorted(groups.values(), key=key) for record in group]
