"""The table beside the images: reading, type inference, problems reported before any job runs,
alignment with the subset and encoding fitted on the training split."""

import csv
import io
import json

import numpy as np
import pytest
from helpers import SCHEMA, default_config
from snakemake.utils import validate

from tlselect.config import ConfigError, load_and_check
from tlselect.data.folders import make_subset, scan_image_folder
from tlselect.data.table import (
    TableError,
    align,
    check_table,
    encode,
    example_table,
    listed_images,
    load_table,
    prepare,
    read_table,
)


def settings(**changes) -> dict:
    """``data.table`` with the schema's defaults, then ``changes``."""
    config = default_config()
    config["data"]["table"] = {"path": "t.csv", **changes}
    validate(config, SCHEMA)
    return config["data"]["table"]


def write_csv(path, header, rows):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def example_rows(image_folder, seed=0):
    text = example_table(scan_image_folder(image_folder), seed)
    reader = csv.reader(io.StringIO(text))
    return next(reader), list(reader)


def test_example_table_is_seeded_complete_and_typed(image_folder, tmp_path):
    listing = scan_image_folder(image_folder)
    assert example_table(listing, 0) == example_table(listing, 0)
    assert example_table(listing, 0) != example_table(listing, 1)
    header, rows = read_table(write_csv(tmp_path / "t.csv", *example_rows(image_folder)))
    images = listed_images(listing)
    report = check_table(settings(missing="impute"), header, rows, images)
    assert report["types"] == {"site": "categorical", "weight": "numeric", "noise": "numeric", "batch": "categorical"}
    assert report["rows_without_image"] == [] and report["images_without_row"] == []
    assert len(rows) == len(images)


def test_missing_rows_are_refused_before_jobs_or_dropped_and_counted(image_folder, tmp_path):
    header, rows = example_rows(image_folder)
    gone = {row[0] for row in rows[:3]}
    header, rows = read_table(write_csv(tmp_path / "t.csv", header, rows[3:]))
    images = listed_images(scan_image_folder(image_folder))
    with pytest.raises(TableError, match=r"3 image\(s\) of the study's classes have no row.*unmatched: drop"):
        check_table(settings(missing="impute"), header, rows, images)
    report = check_table(settings(missing="impute", unmatched="drop"), header, rows, images)
    assert set(report["images_without_row"]) == gone
    subset = make_subset(image_folder, None, 12, 4, 6, 0)  # every image: the removed rows are picked
    aligned = align(settings(missing="impute", unmatched="drop"), header, rows, subset, images)
    counts = aligned["report"]["splits"]
    assert sum(c["without_row"] for c in counts.values()) == 3
    kept = {subset["splits"][s][i][0] for s, data in aligned["splits"].items() for i in data["rows"]}
    assert not kept & gone and len(kept) == len(images) - 3


def test_extra_rows_are_refused_or_ignored(image_folder, tmp_path):
    header, rows = example_rows(image_folder)
    rows.append(["train/cat/9999.jpg", "cat", "site_0", "1.0", "0.5", "a"])
    header, rows = read_table(write_csv(tmp_path / "t.csv", header, rows))
    images = listed_images(scan_image_folder(image_folder))
    with pytest.raises(TableError, match=r"1 row\(s\) name no image of the image folder: train/cat/9999.jpg"):
        check_table(settings(missing="impute"), header, rows, images)
    report = check_table(settings(missing="impute", unmatched="drop"), header, rows, images)
    assert report["rows_without_image"] == ["train/cat/9999.jpg"]


def test_rows_of_classes_outside_the_study_are_not_extra(image_folder, tmp_path):
    header, rows = read_table(write_csv(tmp_path / "t.csv", *example_rows(image_folder)))
    listing = scan_image_folder(image_folder)
    report = check_table(
        settings(missing="impute"), header, rows, listed_images(listing), listed_images(listing, ["cat"])
    )
    assert report["rows_without_image"] == [] and report["images_without_row"] == []


@pytest.mark.parametrize(
    "column, values, types, message",
    [
        ("code", ["x1", "1", "2"], {"code": "numeric"}, r"'code' is declared numeric but holds 'x1'"),
        ("note", [f"text {i}" for i in range(60)], {}, r"'note' has an unknown type.*data.table.types.note"),
        ("size", ["1", "2", "3"], {"colour": "numeric"}, r"types names columns the table lacks: \['colour'\]"),
    ],
)
def test_a_bad_column_type_is_a_clear_error(tmp_path, column, values, types, message):
    rows = [[f"train/cat/{i:04d}.jpg", "cat", values[i % len(values)]] for i in range(60)]
    header, rows = read_table(write_csv(tmp_path / "t.csv", ["image", "label", column], rows))
    with pytest.raises(TableError, match=message):
        check_table(settings(types=types), header, rows)


def test_a_declared_type_overrides_the_inferred_one(tmp_path):
    rows = [[f"train/cat/{i:04d}.jpg", "cat", f"text {i}", str(i % 3)] for i in range(60)]
    header, rows = read_table(write_csv(tmp_path / "t.csv", ["image", "label", "note", "grade"], rows))
    report = check_table(settings(types={"note": "ignore", "grade": "categorical"}), header, rows)
    assert report["types"] == {"note": "ignore", "grade": "categorical"}


def test_missing_values_labels_and_duplicates_are_named(tmp_path):
    rows = [["train/cat/0000.jpg", "cat", ""], ["train/dog/0000.jpg", "cat", "2"], ["train/dog/0000.jpg", "dog", "3"]]
    header, rows = read_table(write_csv(tmp_path / "t.csv", ["image", "label", "size"], rows))
    with pytest.raises(TableError) as error:
        check_table(settings(), header, rows)
    message = str(error.value)
    assert "more than one row: train/dog/0000.jpg" in message
    assert "whose label differs from the image's class folder: train/dog/0000.jpg ('cat')" in message
    assert "missing values in size (1): set data.table.missing to impute" in message
    with pytest.raises(TableError, match="no column 'label'"):
        check_table(settings(label_column="label"), ["image", "size"], [])


def test_encoding_is_fitted_on_the_training_split_only():
    aligned = {
        "splits": {
            "train": {"rows": [0, 1, 2], "values": {"w": ["1", "3", ""], "c": ["a", "b", "a"]}},
            "val": {"rows": [0, 1], "values": {"w": ["5", ""], "c": ["z", ""]}},
        }
    }
    encoded, names = encode(aligned, {"w": "numeric", "c": "categorical"})
    assert names == ["w", "w=missing", "c=a", "c=b"]
    np.testing.assert_allclose(encoded["train"], [[-1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0]])
    # 5 is standardized with the training mean 2 and deviation 1; unseen and missing categories: zeros
    np.testing.assert_allclose(encoded["val"], [[3, 0, 0, 0], [0, 1, 0, 0]])


def test_prepare_writes_the_encoded_columns_and_the_report(image_folder, tmp_path):
    table = write_csv(tmp_path / "t.csv", *example_rows(image_folder))
    subset = make_subset(image_folder, None, 8, 2, 4, 0)
    (tmp_path / "subset.json").write_text(json.dumps(subset))
    report = prepare(settings(missing="drop"), table, tmp_path / "subset.json", tmp_path / "c.npz",
                     tmp_path / "r.json", log=lambda _: None)  # fmt: skip
    columns = load_table(tmp_path / "c.npz")
    for split in ("train", "val", "test"):
        kept = report["splits"][split]["kept"]
        assert kept + report["splits"][split]["dropped_missing"] == len(subset["splits"][split])
        assert columns[f"{split}_columns"].shape == (kept, len(report["encoded_columns"]))
        labels = [subset["splits"][split][i][1] for i in columns[f"{split}_rows"]]
        assert columns[f"{split}_labels"].tolist() == labels
    assert json.loads((tmp_path / "r.json").read_text()) == report
    assert int(columns["num_classes"]) == 3


def test_the_config_check_reports_table_problems_before_any_job(tiny_archive, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from tlselect.data.fetch import archive_images

    listing = archive_images(tiny_archive)
    rows = [[path, path.split("/")[1], str(i)] for i, path in enumerate(listed_images(listing)[1:])]
    write_csv(tmp_path / "t.csv", ["image", "label", "size"], rows)
    config = default_config(validated=False)
    config["data"] = {"archive": str(tiny_archive), "name": "tiny", "train_per_class": 8, "val_per_class": 2,
                      "test_per_class": 4, "table": {"path": str(tmp_path / "t.csv")}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"invalid configuration: data.table .*1 image\(s\) of the study's classes"):
        load_and_check(config, SCHEMA, validate)
    config["data"]["table"]["unmatched"] = "drop"
    load_and_check(config, SCHEMA, validate)
