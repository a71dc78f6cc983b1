"""A table beside the images (``data.table``): structured columns per image, checked, aligned to the
subset and encoded for the downstream models on the join (:mod:`tlselect.training.join`).

The subset picks the images (seeded, as without a table); the table supplies their columns. Its
image column names each image by its path inside the image folder, as ``subset.json`` does
(``train/cat/0001.jpg``); its label column must agree with the image's class folder and is never a
feature. Every other column is numeric, categorical or ignored: inferred from its values,
overridable in ``data.table.types``. Problems are found before any job runs (:func:`check_table`,
called by the config check) and again against the subset's actual picks (:func:`align`): rows
naming no image of the folder, images without a row and missing values are refused or dropped as
``data.table.unmatched`` and ``data.table.missing`` say, never silently. Encoding is fitted on
the training split only: numeric columns standardized (missing values imputed with the training
mean plus an indicator column), categorical ones one-hot (missing values a category of their own).
Plain Python and numpy, no torch.
"""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path

import numpy as np

from tlselect.core.errors import TLSelectError
from tlselect.core.files import atomic_path, verify, write_json, write_text

MISSING = {"", "na", "n/a", "nan", "null", "none"}
TYPES = ("numeric", "categorical", "ignore")
MISSING_CATEGORY = "(missing)"


class TableError(TLSelectError):
    """The table beside the images cannot be used as configured; the message names the fix."""


def is_missing(value: str) -> bool:
    return value.strip().lower() in MISSING


def _listed(items, limit: int = 5) -> str:
    items = list(items)
    return ", ".join(map(str, items[:limit])) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def read_table(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """``(header, rows)`` of a CSV file, each row ``{column: text}``."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"data.table.path: {path} does not exist; give the path of a CSV file with one row per image")
    if path.suffix.lower() in (".parquet", ".pq"):
        raise TableError(f"data.table.path: {path} is Parquet; only CSV is read: write the table as CSV")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        rows = list(reader)
    duplicates = sorted({c for c in header if header.count(c) > 1})
    if not header or duplicates:
        raise TableError(
            f"data.table.path: {path} has {'no header' if not header else f'duplicate columns {duplicates}'}"
        )
    if any(None in row for row in rows):
        raise TableError(f"data.table.path: {path} has rows with more fields than its header")
    return header, rows


def _float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def column_types(settings: dict, header: list[str], rows: list[dict]) -> dict[str, str]:
    """``{column: numeric | categorical | ignore}`` of the feature columns (not the image or label
    column): ``settings["types"]`` where given, else inferred. A column declared numeric with a
    non-number, a column naming nothing, or one that is neither numeric nor has at most
    ``max_categories`` distinct values is an error naming it and the fix."""
    declared = settings["types"]
    unknown = [c for c in declared if c not in header]
    if unknown:
        raise TableError(f"data.table.types names columns the table lacks: {unknown}; its columns: {header}")
    types, problems = {}, []
    for column in header:
        if column in (settings["image_column"], settings["label_column"]):
            continue
        values = {row[column].strip() for row in rows if not is_missing(row[column])}
        not_numbers = sorted(v for v in values if _float(v) is None)
        kind = declared.get(column)
        if kind == "numeric" and not_numbers:
            problems.append(
                f"column {column!r} is declared numeric but holds {_listed(repr(v) for v in not_numbers)}: "
                "fix the values or declare it categorical or ignore"
            )
        elif kind is None and not_numbers and len(values) > settings["max_categories"]:
            problems.append(
                f"column {column!r} has an unknown type: not numeric, and {len(values)} distinct values (more "
                f"than data.table.max_categories, {settings['max_categories']}); set data.table.types.{column} "
                "to categorical or ignore"
            )
        types[column] = kind or ("categorical" if not_numbers else "numeric")
    if problems:
        raise TableError("data.table: " + "; ".join(problems))
    return types


def check_table(
    settings: dict, header: list[str], rows: list[dict], images: list[str] | None = None, picks: list[str] | None = None
) -> dict:
    """Check the table against ``settings`` (``data.table``) and, when given, the image folder:
    ``images`` (the path of every image it holds) and ``picks`` (the images that need a row: those
    of the study's classes, which the subset may pick, or those it picked). Raises
    :class:`TableError` listing what is refused; returns the report: the column types, missing
    values per column, the rows naming no image and the picks without a row (with ``images``)."""
    image_col, label_col = settings["image_column"], settings["label_column"]
    absent = [c for c in (image_col, label_col) if c not in header]
    if absent:
        raise TableError(
            f"data.table: the table has no column {absent[0]!r}; its columns: {header}; set "
            "data.table.image_column and data.table.label_column"
        )
    types = column_types(settings, header, rows)
    keys = [row[image_col].strip().removeprefix("./") for row in rows]
    problems = []
    seen, repeated = set(), set()
    for key in keys:
        (repeated if key in seen else seen).add(key)
    if repeated:
        problems.append(f"images named by more than one row: {_listed(sorted(repeated))}; keep one row per image")
    no_image = [i + 2 for i, key in enumerate(keys) if is_missing(key)]
    if no_image:
        problems.append(f"rows without an image path (CSV lines {_listed(no_image)}): fill them in or remove them")
    wrong = [
        f"{key} ({row[label_col]!r})"
        for key, row in zip(keys, rows, strict=True)
        if key.count("/") >= 2 and row[label_col].strip() != key.split("/")[-2]
    ]
    if wrong:
        problems.append(
            f"{len(wrong)} row(s) whose {label_col} differs from the image's class folder: {_listed(wrong)}; "
            "the class folder is the label: fix the column"
        )
    used = [c for c, kind in types.items() if kind != "ignore"]
    missing = {c: sum(is_missing(row[c]) for row in rows) for c in used}
    missing = {c: n for c, n in missing.items() if n}
    if missing and settings["missing"] == "refuse":
        problems.append(
            f"missing values in {_listed(f'{c} ({n})' for c, n in missing.items())}: set data.table.missing to "
            "impute (numeric: training mean plus an indicator; categorical: its own category) or drop (leave "
            "those images out of the join runs), or fill them in"
        )
    report = {"rows": len(rows), "types": types, "missing": missing}
    if images is not None:
        have = set(keys)
        report["rows_without_image"] = sorted(have - set(images) - {""})
        report["images_without_row"] = sorted(set(images if picks is None else picks) - have)
        if settings["unmatched"] == "refuse":
            for what, found, fix in (
                ("row(s) name no image of the image folder", report["rows_without_image"],
                 "fix their paths (as subset.json names images: train/<class>/<file>) or remove them"),
                ("image(s) of the study's classes have no row (the subset may pick them)",
                 report["images_without_row"], "add their rows"),
            ):  # fmt: skip
                if found:
                    problems.append(f"{len(found)} {what}: {_listed(found)}; {fix}, or set data.table.unmatched: drop")
    if problems:
        raise TableError(f"data.table ({settings['path'] or 'the example table'}): " + "; ".join(problems))
    return report


def align(settings: dict, header: list[str], rows: list[dict], subset: dict, images: list[str]) -> dict:
    """The table's rows for the subset's picks (``images``: every image of the folder):
    ``{"splits": {split: {"rows": [index into the split], "labels": [...], "values": {column: [text]}}},
    "report": {...}}``. Images without a row and (with ``missing: drop``) images with a missing value
    are left out, counted in the report."""
    picked = {split: [path for path, _ in entries] for split, entries in subset["splits"].items()}
    report = check_table(settings, header, rows, images, [p for paths in picked.values() for p in paths])
    by_key = {row[settings["image_column"]].strip().removeprefix("./"): row for row in rows}
    used = [c for c, kind in report["types"].items() if kind != "ignore"]
    out, counts = {}, {}
    for split, entries in subset["splits"].items():
        kept, without_row, with_missing = [], 0, 0
        for index, (path, _) in enumerate(entries):
            row = by_key.get(path)
            if row is None:
                without_row += 1
            elif settings["missing"] == "drop" and any(is_missing(row[c]) for c in used):
                with_missing += 1
            else:
                kept.append(index)
        out[split] = {
            "rows": kept,
            "labels": [entries[i][1] for i in kept],
            "values": {c: [by_key[entries[i][0]][c] for i in kept] for c in used},
        }
        counts[split] = {"images": len(entries), "kept": len(kept), "without_row": without_row,
                         "dropped_missing": with_missing}  # fmt: skip
        if not kept:
            raise TableError(f"data.table: no {split} image of the subset is left to join ({counts[split]})")
    report["rows_without_image"] = len(report["rows_without_image"])
    report["images_without_row"] = len(report["images_without_row"])
    return {"splits": out, "report": {**report, "splits": counts, "unmatched": settings["unmatched"],
                                      "missing_policy": settings["missing"]}}  # fmt: skip


def encode(aligned: dict, types: dict[str, str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """``({split: float32 rows x encoded columns}, column names)``, fitted on the training split:
    numeric columns standardized (missing: the training mean, i.e. 0, plus a ``<col>=missing``
    indicator where the column has missing values), categorical ones one-hot over the training
    split's values (missing: the ``(missing)`` category; a value unseen in training: all zeros)."""
    splits = aligned["splits"]
    parts: dict[str, list[np.ndarray]] = {split: [] for split in splits}
    names: list[str] = []
    for column, kind in types.items():
        if kind == "ignore":
            continue
        texts = {split: [v.strip() for v in data["values"][column]] for split, data in splits.items()}
        if kind == "numeric":
            numbers = {s: np.array([np.nan if is_missing(v) else float(v) for v in t]) for s, t in texts.items()}
            train = numbers["train"][~np.isnan(numbers["train"])]
            mean = float(train.mean()) if len(train) else 0.0
            std = float(train.std()) if len(train) and train.std() > 0 else 1.0
            gaps = any(np.isnan(n).any() for n in numbers.values())
            for split, n in numbers.items():
                parts[split].append(np.nan_to_num((n - mean) / std, nan=0.0)[:, None])
                if gaps:
                    parts[split].append(np.isnan(n)[:, None].astype(float))
            names += [column] + ([f"{column}=missing"] if gaps else [])
        else:
            values = {s: [MISSING_CATEGORY if is_missing(v) else v for v in t] for s, t in texts.items()}
            categories = sorted(set(values["train"]))
            for split, vals in values.items():
                parts[split].append(
                    np.array([[v == c for c in categories] for v in vals], dtype=float).reshape(-1, len(categories))
                )
            names += [f"{column}={c}" for c in categories]
    width = len(names)
    return {
        split: (np.concatenate(p, axis=1) if p else np.zeros((len(splits[split]["rows"]), 0))).astype(np.float32)
        for split, p in parts.items()
    }, names if width else []


def listed_images(images: dict[str, dict[str, list[str]]], classes: list[str] | None = None) -> list[str]:
    """The paths of an image folder's listing ``{split: {class: paths}}``, of ``classes`` only when given."""
    return [
        p for split in images.values() for c, paths in split.items() if classes is None or c in classes for p in paths
    ]


def example_table(images: dict[str, dict[str, list[str]]], seed: int) -> str:
    """The example table (CSV text) for every image of an image folder's listing ``{split: {class: paths}}``.

    Columns, seeded with ``seed``, with the class index ``k`` over the folder's sorted classes:
    ``site`` (categorical, informative): ``site_<k mod 3>`` for 70% of the images, a random site
    otherwise; ``weight`` (numeric, weakly informative): ``k`` plus Gaussian noise of standard
    deviation 2, missing for 10%; ``noise`` (numeric, uninformative), missing for 5%; ``batch``
    (categorical, uninformative): one of four values.
    """
    rng = random.Random(seed)
    classes = sorted({c for split in images.values() for c in split})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", "label", "site", "weight", "noise", "batch"])
    for split in sorted(images):
        for name in sorted(images[split]):
            k = classes.index(name)
            for path in sorted(images[split][name]):
                site = k % 3 if rng.random() < 0.7 else rng.randrange(3)
                weight = k + rng.gauss(0, 2)
                noise = rng.gauss(0, 1)
                batch = "abcd"[rng.randrange(4)]
                writer.writerow([
                    path, name, f"site_{site}",
                    "" if rng.random() < 0.10 else f"{weight:.3f}",
                    "" if rng.random() < 0.05 else f"{noise:.3f}",
                    batch,
                ])  # fmt: skip
    return out.getvalue()


def write_example_table(root: str | Path, out: str | Path, seed: int) -> None:
    """Write :func:`example_table` for the image folder ``root`` to ``out``."""
    from tlselect.data.folders import scan_image_folder

    write_text(out, example_table(scan_image_folder(Path(root)), seed))


def load_table(path: str | Path) -> dict:
    """The table job's encoded columns (``columns.npz``), checked against its checksum."""
    with np.load(verify(Path(path)), allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def save_table(path: str | Path, encoded: dict, aligned: dict, names: list[str], num_classes: int, checksum: str):
    """Write the encoded columns, kept rows and labels of every split (``columns.npz``)."""
    arrays = {"names": np.array(names, dtype=str), "num_classes": np.array(num_classes),
              "data_checksum": np.array(checksum)}  # fmt: skip
    for split in aligned["splits"]:
        arrays[f"{split}_columns"] = encoded[split]
        arrays[f"{split}_rows"] = np.asarray(aligned["splits"][split]["rows"], dtype=np.int64)
        arrays[f"{split}_labels"] = np.asarray(aligned["splits"][split]["labels"], dtype=np.int64)
    with atomic_path(path, checksum=True) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def prepare(settings: dict, table: str | Path, subset: str | Path, columns_out: str | Path, report_out: str | Path,
            log=print) -> dict:  # fmt: skip
    """The table job: align the table with the subset (``subset.json``) and the image folder it came
    from (:func:`align`), encode it (:func:`encode`), write the columns (:func:`save_table`) and the
    report (JSON: types, missing values, what was kept and dropped per split). Returns the report."""
    import json

    from tlselect.data.folders import scan_image_folder

    chosen = json.loads(Path(subset).read_text())
    images = listed_images(scan_image_folder(Path(chosen["source"]["root"])))
    header, rows = read_table(table)
    aligned = align(settings, header, rows, chosen, images)
    encoded, names = encode(aligned, aligned["report"]["types"])
    report = {**aligned["report"], "encoded_columns": names}
    save_table(columns_out, encoded, aligned, names, len(chosen["classes"]), chosen["source"]["sha256"])
    write_json(report_out, report)
    for split, counts in report["splits"].items():
        log(f"{split}: {counts}")
    log(f"{len(names)} encoded columns: {', '.join(names)}")
    return report
