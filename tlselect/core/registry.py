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


def rank(records: list[dict]) -> list[dict]:
    """Completed runs first, by final validation accuracy (descending), ties by name. Never by test.

    The one selection rule: the study's table, its summary and notebook, and the model search
    all choose ``rank(records)[0]``.
    """

    def key(record):
        val = record["metrics"]["val_accuracy"]
        ok = record["status"] == "completed" and val is not None
        return (not ok, -(val if ok else 0.0), record["name"])

    return sorted(records, key=key)
