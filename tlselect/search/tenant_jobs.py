"""What the many-users steps do (``scripts/tenants.py <step>``, one per rule of rules/tenants.smk).

- :func:`schedule_round`: a scheduling round: every tenant's history from the earlier rounds'
  assignment files and job records, then :func:`tlselect.search.tenants.schedule` (the round's
  jobs: which tenant, which candidate) written as an assignment file;
- :func:`job`: one assigned job trained on its tenant's data (the search's
  :func:`tlselect.search.jobs.trial`);
- :func:`write_tables`: each tenant's runs table, summary and registry, and the global table:
  every tenant's incumbent against the seconds spent on all tenants, per scheduler.

Every file comes as an argument (the rules own the paths). Only :func:`job` imports torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from tlselect.core.files import atomic_path, write_json, write_text
from tlselect.core.registry import RegistryError, rank, read_record
from tlselect.report.tables import markdown_table, runs_table, write_csv
from tlselect.runs import candidate_spec
from tlselect.search import jobs, replay, tenants
from tlselect.search.space import Space


def job_seconds(record: dict) -> float:
    """A job's training and evaluation seconds, as the replay counts them."""
    return sum(replay.table([record])[record["name"]].seconds)


def assigned_jobs(assigned: list[str], records: list[str]) -> list[tuple[dict, dict]]:
    """``(assignment, record)`` of every job of the given rounds; ``records`` in round and slot order."""
    trials = [t for path in assigned for t in json.loads(Path(path).read_text())["trials"]]
    if len(trials) != len(records):
        raise RegistryError(f"{len(trials)} jobs were assigned but {len(records)} records were given: one per job")
    out = []
    for trial, path in zip(trials, records, strict=True):
        record = read_record(path)
        if record["name"] != trial["candidate"]:
            raise RegistryError(f"{path} is {record['name']}, but its slot was assigned {trial['candidate']}")
        out.append((trial, {**record, "_path": str(path)}))
    return out


def build_tenants(contexts: dict, done: list[tuple[dict, dict]], seed: int) -> list[tenants.Tenant]:
    """The tenants (config order) with the history of every finished job."""
    out = []
    for i, (name, tenant) in enumerate(contexts.items()):
        history = [
            (trial["params"], record["metrics"]["val_accuracy"], job_seconds(record))
            for trial, record in done
            if trial["tenant"] == name
        ]
        points = Space.from_config(tenant["context"]).grid()
        out.append(tenants.Tenant(name, points, history, tenant["strategy"], tenant["weight"], seed * 1000 + i))
    return out


def schedule_round(scheduler: str, round_: int, slots: int, contexts: dict, assigned: list[str],
                   records: list[str], out: str | Path, seed: int, delta: float = 0.1,
                   threshold: float = 0.01, patience: int = 3) -> list[dict]:  # fmt: skip
    """Write round ``round_`` of ``scheduler``: ``slots`` jobs, each its tenant, candidate id,
    parameters, settings and weights (the search's suggestion file format, plus ``tenant``).
    ``contexts``: :func:`tlselect.search.tenancy.contexts`. Returns the jobs."""
    built = build_tenants(contexts, assigned_jobs(assigned, records), seed)
    chosen = tenants.schedule(built, scheduler, slots, seed, round_, delta, threshold, patience)
    trials = []
    for slot, (name, params) in enumerate(chosen):
        spec = candidate_spec(contexts[name]["context"], params)
        trials.append({"slot": slot, "tenant": name, "candidate": spec.id, "params": params,
                       "settings": {**spec.settings, "epochs": contexts[name]["epochs"]},
                       "weights": spec.weights})  # fmt: skip
    write_json(out, {"scheduler": scheduler, "round": round_, "trials": trials})
    return trials


def job(assigned: str | Path, slot: int, tenant_data: list[tuple[str, str]], init_weights,
        files: tuple[str, str, str], train_args: list[str]) -> dict:  # fmt: skip
    """Train slot ``slot`` of an assignment file on its tenant's decoded subset (``tenant_data``:
    ``(tenant, folder)`` pairs) to ``files`` (checkpoint, record, run id). Writes and returns the record."""
    tenant = json.loads(Path(assigned).read_text())["trials"][slot]["tenant"]
    folders = dict(tenant_data)
    if tenant not in folders:
        raise RegistryError(f"{assigned} assigns slot {slot} to tenant {tenant!r}, whose data was not given")
    out, record, run_id = files
    job_args = [*train_args, "--data", folders[tenant]]
    return jobs.trial(assigned, [slot], init_weights, [out], [record], [run_id], job_args)[0]


def global_table(contexts: dict, runs: dict[str, list[tuple[dict, dict]]]) -> pd.DataFrame:
    """Per scheduler and job (in round and slot order): the seconds spent on all tenants so far, and
    every tenant's incumbent (best on validation) with its test accuracy; tenant ``average`` is the
    weighted mean of the tenants' test accuracies (0 for a tenant without a run yet)."""
    rows = []
    weights = {name: c["weight"] for name, c in contexts.items()}
    for scheduler, done in runs.items():
        spent, seen = 0.0, {name: [] for name in contexts}
        for index, (trial, record) in enumerate(done, 1):
            spent += job_seconds(record)
            seen[trial["tenant"]].append(record)
            tests = {}
            for name, records in seen.items():
                best = rank(records)[0] if records else None
                tests[name] = (best["metrics"]["test_accuracy"] or 0.0) if best else 0.0
                rows.append({"scheduler": scheduler, "job": index, "compute_seconds": spent, "tenant": name,
                             "jobs": len(records), "candidate": best["name"] if best else "",
                             "val_accuracy": best["metrics"]["val_accuracy"] if best else None,
                             "test_accuracy": tests[name] if best else None})  # fmt: skip
            average = sum(weights[n] * t for n, t in tests.items()) / sum(weights.values())
            rows.append({"scheduler": scheduler, "job": index, "compute_seconds": spent, "tenant": "average",
                         "jobs": index, "candidate": "", "val_accuracy": None, "test_accuracy": average})  # fmt: skip
    return pd.DataFrame(rows)


def tenant_summary(name: str, table: pd.DataFrame) -> str:
    """A tenant's summary: per scheduler, the jobs it got and the run it would pick."""
    lines = [f"# Tenant {name}", ""]
    if table.empty:
        return "\n".join([*lines, "No scheduler gave this tenant a job.", ""])
    picks = table[table["selected"]][["scheduler", "name", "backbone", "init", "freeze", "lr", "val_accuracy",
                                      "test_accuracy"]]  # fmt: skip
    jobs_per = table.groupby("scheduler", sort=False).size().rename("jobs").reset_index()
    lines += ["The run each scheduler's jobs would pick (best on validation):", "",
              markdown_table(picks.merge(jobs_per, on="scheduler")), ""]  # fmt: skip
    return "\n".join(lines)


def write_tables(contexts: dict, assigned: dict[str, list[str]], records: dict[str, list[str]],
                 tenant_dirs: dict[str, str | Path], global_csv: str | Path) -> pd.DataFrame:  # fmt: skip
    """Each tenant's ``runs.csv`` (one row per job any scheduler gave it, ``selected`` per scheduler),
    ``summary.md`` and ``registry/`` (a copy of each of its records, ``<scheduler>-<job file>``) under
    ``tenant_dirs[tenant]``, and the global table (:func:`global_table`) at ``global_csv``."""
    runs = {s: assigned_jobs(assigned[s], records[s]) for s in assigned}
    for name, folder in tenant_dirs.items():
        folder = Path(folder)
        registry = folder / "registry"
        if registry.exists():
            shutil.rmtree(registry)
        registry.mkdir(parents=True)
        frames = []
        for scheduler, done in runs.items():
            mine = [record for trial, record in done if trial["tenant"] == name]
            for record in mine:
                source = Path(record["_path"])
                with atomic_path(registry / f"{scheduler}-{source.parent.name}-{source.name}") as tmp:
                    shutil.copyfile(source, tmp)
            if mine:
                frame = runs_table([{k: v for k, v in r.items() if k != "_path"} for r in mine])
                frames.append(frame.assign(scheduler=scheduler))
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["scheduler", "selected"])
        table = table[["scheduler", *[c for c in table.columns if c != "scheduler"]]]
        write_csv(table, folder / "runs.csv")
        write_text(folder / "summary.md", tenant_summary(name, table))
    frame = global_table(contexts, runs)
    write_csv(frame, global_csv)
    return frame
