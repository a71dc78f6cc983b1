"""The per-user cache of decoded subsets: a second study folder of the same archive gets the same
tensors without unpacking or decoding; a corrupt entry is ignored and written anew; it can be off."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import REPO, flip_byte

from tlselect.data import subset_cache
from tlselect.data.subset_cache import CACHE_ENV, cache_dir, subset_key

sys.path.insert(0, str(REPO / "scripts"))
import prepare_data  # noqa: E402

SIZES = ["--train-per-class", "6", "--val-per-class", "2", "--test-per-class", "3", "--image-size", "16"]


def decode_into(study, archive, *extra: str) -> None:
    """The workflow's subset and source steps in the study folder ``study`` (its image folder
    under resources/, never written: each step unpacks the archive into a folder of its own where
    the cache does not have its files)."""
    root, data = study / "resources" / "tiny", study / "results" / "data"
    prepare_data.main(["subset", "--root", str(root), "--out", str(data), *SIZES, "--archive", str(archive), *extra])
    prepare_data.main(["source", "--root", str(root), "--subset", str(data / "subset.json"), "--out",
                       str(study / "results" / "source"), "--train-per-class", "4", "--val-per-class", "1",
                       "--image-size", "16", "--archive", str(archive), *extra])  # fmt: skip


@pytest.fixture
def unpacks(monkeypatch) -> list:
    """Every unpacking of an archive from here on."""
    calls, real = [], subset_cache.fetch_image_folder
    monkeypatch.setattr(subset_cache, "fetch_image_folder", lambda *args: calls.append(args) or real(*args))
    return calls


def tensors(folder) -> dict:
    return {path.name: torch.load(path, weights_only=True) for path in sorted(folder.glob("*.pt"))}


def same_files(first, second) -> None:
    for name in ("results/data", "results/source"):
        a, b = tensors(first / name), tensors(second / name)
        assert a.keys() == b.keys() and len(a) >= 2
        for split in a:
            assert torch.equal(a[split]["images"], b[split]["images"]) and torch.equal(
                a[split]["labels"], b[split]["labels"]
            )
        chosen = [json.loads((study / name / "subset.json").read_text()) for study in (first, second)]
        for study, each in zip((first, second), chosen, strict=True):  # each names its own image folder
            assert each["source"].pop("root") == str(study / "resources" / "tiny")
        assert chosen[0] == chosen[1]


def test_a_second_study_restores_the_decoded_subset_without_unpacking(tmp_path, tiny_archive, unpacks, capsys):
    decode_into(tmp_path / "first", tiny_archive)
    assert len(unpacks) == 2  # the first study unpacks once per step, each into a folder of its own
    decode_into(tmp_path / "second", tiny_archive)
    assert len(unpacks) == 2 and not (tmp_path / "second" / "resources").exists()
    assert capsys.readouterr().out.count("subset cache: restored") == 2  # the subset and the source task
    same_files(tmp_path / "first", tmp_path / "second")


def test_a_corrupt_entry_is_ignored_and_written_anew(tmp_path, tiny_archive, unpacks, capsys):
    decode_into(tmp_path / "first", tiny_archive)
    (entry,) = [p for p in cache_dir().iterdir() if (p / "train.pt").is_file() and (p / "test.pt").is_file()]
    flip_byte(entry / "train.pt")
    capsys.readouterr()
    decode_into(tmp_path / "second", tiny_archive)
    out = capsys.readouterr().out
    assert out.count("ignoring the corrupt entry") == 1 and "train.pt does not match" in out
    assert len(unpacks) == 3  # the subset decoded again, from the archive (the source task's entry is whole)
    same_files(tmp_path / "first", tmp_path / "second")
    decode_into(tmp_path / "third", tiny_archive)  # the entry written anew serves the next study
    assert len(unpacks) == 3
    same_files(tmp_path / "first", tmp_path / "third")


@pytest.mark.parametrize("off", ["flag", "environment"])
def test_the_cache_can_be_off(tmp_path, tiny_archive, unpacks, monkeypatch, off):
    extra = ["--no-cache"] if off == "flag" else []
    if off == "environment":
        monkeypatch.setenv(CACHE_ENV, "off")
        assert cache_dir() is None
    folder = tmp_path / "cache"
    if off == "flag":
        monkeypatch.setenv(CACHE_ENV, str(folder))
    decode_into(tmp_path / "first", tiny_archive, *extra)
    decode_into(tmp_path / "second", tiny_archive, *extra)
    assert len(unpacks) == 4 and not folder.exists()
    same_files(tmp_path / "first", tmp_path / "second")


def test_the_key_changes_with_the_archive_the_settings_and_the_decoder(tmp_path, tiny_archive, monkeypatch):
    settings = {"step": "subset", "seed": 0}
    key = subset_key(tiny_archive, settings)
    assert subset_key(tiny_archive, {"step": "subset", "seed": 1}) != key
    copy = tmp_path / "copy.tar.gz"
    copy.write_bytes(tiny_archive.read_bytes())
    assert subset_key(copy, settings) != key
    monkeypatch.setattr(subset_cache, "decoder_version", lambda: "another decoder")
    assert subset_key(tiny_archive, settings) != key


def test_the_cache_folder_is_the_environments_or_the_users(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "here"))
    assert cache_dir() == tmp_path / "here"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "tlselect" / "subsets"
