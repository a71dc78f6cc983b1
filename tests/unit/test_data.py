"""Subset materialization: determinism, stratification, class restriction and bad folders."""

import io
import json
import shutil
import tarfile

import pytest
import torch

from tlselect.data import fetch, folders, tensors


def subset(root, **kw):
    args = dict(classes=None, train_per_class=8, val_per_class=2, test_per_class=4, seed=3)
    args.update(kw)
    return folders.make_subset(root, **args)


def test_subset_is_deterministic_and_seed_dependent(image_folder):
    first = json.dumps(subset(image_folder), sort_keys=True)
    assert json.dumps(subset(image_folder), sort_keys=True) == first
    assert json.dumps(subset(image_folder, seed=4), sort_keys=True) != first


def test_subset_is_stratified_and_disjoint(image_folder):
    chosen = subset(image_folder)
    for split, per_class in (("train", 6), ("val", 2), ("test", 4)):
        labels = [label for _, label in chosen["splits"][split]]
        assert sorted(set(labels)) == [0, 1, 2]
        assert all(labels.count(c) == per_class for c in range(3))
    train = {f for f, _ in chosen["splits"]["train"]}
    val = {f for f, _ in chosen["splits"]["val"]}
    assert not train & val
    assert all(f.startswith("test/") for f, _ in chosen["splits"]["test"])
    assert len(chosen["source"]["sha256"]) == 64


def test_class_list_restricts_and_orders_labels(image_folder):
    chosen = subset(image_folder, classes=["frog", "cat"])
    assert chosen["classes"] == ["frog", "cat"]
    assert {f.split("/")[1] for f, label in chosen["splits"]["train"] if label == 0} == {"frog"}
    with pytest.raises(folders.DataError, match="bird"):
        subset(image_folder, classes=["bird"])


def test_checksum_changes_with_content(image_folder):
    before = subset(image_folder)["source"]["sha256"]
    victim = next((image_folder / "train" / "cat").iterdir())
    victim.write_bytes(victim.read_bytes() + b"x")
    assert subset(image_folder)["source"]["sha256"] != before


def test_subset_larger_than_data_is_rejected(image_folder):
    with pytest.raises(folders.DataError, match="has 12 images in train/ but the subset asks for 50"):
        subset(image_folder, train_per_class=50)


def test_decode_gives_uint8_tensors_in_subset_order(image_folder):
    chosen = subset(image_folder)
    decoded = tensors.decode_images(image_folder, chosen["splits"]["val"], 32)
    assert decoded["images"].dtype == torch.uint8 and decoded["images"].shape == (6, 3, 32, 32)
    assert decoded["labels"].tolist() == [label for _, label in chosen["splits"]["val"]]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: shutil.rmtree(root / "test"), "test is missing"),
        (lambda root: (root / "test" / "cat").rename(root / "test" / "kitten"), "differ between"),
        (lambda root: [p.unlink() for p in (root / "train" / "dog").iterdir()], "without images"),
    ],
)
def test_bad_layouts_are_named(image_folder, damage, message):
    damage(image_folder)
    with pytest.raises(folders.DataError, match=message):
        subset(image_folder)


def test_corrupt_image_is_named(image_folder):
    chosen = subset(image_folder)
    victim = chosen["splits"]["train"][0][0]
    (image_folder / victim).write_bytes(b"not an image")
    with pytest.raises(folders.DataError, match=victim):
        tensors.decode_images(image_folder, chosen["splits"]["train"], 32)


def test_archive_extraction_finds_nested_root(tiny_archive, tmp_path):
    dest = tmp_path / "resources" / "tiny"
    fetch.extract_archive(tiny_archive, dest)
    assert sorted(folders.scan_image_folder(dest)["train"]) == ["cat", "dog", "frog"]


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_system_tar_and_tarfile_extract_the_same_tree(tiny_archive, tmp_path, monkeypatch):
    fetch.extract_archive(tiny_archive, tmp_path / "tar")
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)  # no tar installed
    fetch.extract_archive(tiny_archive, tmp_path / "tarfile")
    assert tree(tmp_path / "tar") == tree(tmp_path / "tarfile") and len(tree(tmp_path / "tar")) > 20


def test_an_archive_with_links_or_escaping_names_extracts_nothing_outside(tiny_archive, tmp_path):
    base = tmp_path / "evil"
    with tarfile.open(tiny_archive) as tf:
        members = [(m, tf.extractfile(m).read() if m.isfile() else None) for m in tf.getmembers()]
    for name, link in [("up", "../../outside.txt"), ("absolute", "/etc/passwd")]:
        archive = tmp_path / f"{name}.tar"
        with tarfile.open(archive, "w") as tf:
            for member, content in members:
                tf.addfile(member, io.BytesIO(content) if content is not None else None)
            escape = tarfile.TarInfo("tiny-dataset/train/cat/escape.png")
            escape.type, escape.linkname = tarfile.SYMTYPE, link
            tf.addfile(escape)
            outside = tarfile.TarInfo("../outside.txt")
            outside.size = 3
            tf.addfile(outside, io.BytesIO(b"bad"))
        with pytest.raises(tarfile.FilterError):
            fetch.extract_archive(archive, base / name / "dest")
        assert not (tmp_path / "outside.txt").exists() and not (base / "outside.txt").exists()
        assert not (base / name / "dest").exists()


def test_source_task_avoids_target_images(image_folder):
    chosen = subset(image_folder, train_per_class=6, val_per_class=2)
    source = folders.source_task_files(chosen, image_folder, chosen["classes"], per_class=6, val_per_class=1, seed=0)
    target = {f for split in ("train", "val") for f, _ in chosen["splits"][split]}
    picked = {f for split in ("train", "val") for f, _ in source[split]}
    assert len(picked) == 18 and not picked & target
    with pytest.raises(folders.DataError, match="only 6 training images outside"):
        folders.source_task_files(chosen, image_folder, chosen["classes"], per_class=7, val_per_class=1, seed=0)
