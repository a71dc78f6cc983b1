"""A per-user cache of decoded subsets, so that a new study of the same archive neither unpacks it
nor decodes its images again.

An entry holds what a decoding step writes (``{split}.pt`` with their checksum sidecars, and
``subset.json``) under ``${XDG_CACHE_HOME:-~/.cache}/tlselect/subsets/<key>`` (or
``$TLSELECT_SUBSET_CACHE``; ``off`` there, or the config's ``data.subset_cache: false``, turns the
cache off). The key is a SHA-256 of the archive (its real path, size and modification time), the
step's settings (classes, images per class, image size, seed, ...; for the source task also the
target's subset.json), and the decoder's code (the source of ``tlselect.data.tensors`` and
``tlselect.data.folders``), so a changed archive, setting or decoder is another entry. A new study
folder restores an entry by copies; an entry is written to a
temporary folder and renamed into place, and one whose files no longer match the CRC-32s of its
manifest is ignored with a one-line message, removed and written anew.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from tlselect.core.files import checksum_path, corrupt_path, file_digest, write_json
from tlselect.data.fetch import fetch_image_folder

CACHE_ENV = "TLSELECT_SUBSET_CACHE"
MANIFEST = "manifest.json"
DECODER_MODULES = ("tensors.py", "folders.py")


def cache_dir() -> Path | None:
    """The cache's folder: ``$TLSELECT_SUBSET_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/tlselect/subsets``;
    None when ``$TLSELECT_SUBSET_CACHE`` is ``off``."""
    override = os.environ.get(CACHE_ENV, "")
    if override.lower() == "off":
        return None
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tlselect" / "subsets"


def decoder_version() -> str:
    """A digest of the decoder's code: a change to it makes every entry another one."""
    digest = hashlib.sha256()
    for name in DECODER_MODULES:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:16]


def subset_key(archive: str | os.PathLike, settings: dict) -> str:
    """The entry of a decoding step: the archive (real path, size, modification time), the step's
    ``settings`` (JSON-able) and the decoder's version."""
    path = Path(archive).resolve()
    stat = path.stat()
    what = {"archive": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "settings": settings,
            "decoder": decoder_version()}  # fmt: skip
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def choice_digest(subset: str | os.PathLike) -> str:
    """A digest of what a subset.json chose, whatever image folder it names (the source task's key:
    the target images it leaves out)."""
    chosen = json.loads(Path(subset).read_text())
    chosen["source"] = {k: v for k, v in chosen["source"].items() if k != "root"}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()


def restore(entry: Path, out: Path, log) -> bool:
    """Put ``entry``'s files into ``out`` (copies); False, with a one-line message,
    when it is missing or its files no longer match its manifest (it is then removed)."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        for name, digest in manifest["files"].items():
            if file_digest(entry / name) != digest:
                raise ValueError(f"{name} does not match its checksum")
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log(f"subset cache: ignoring the corrupt entry {entry} ({error}); decoding again")
        shutil.rmtree(entry, ignore_errors=True)
        return False
    out.mkdir(parents=True, exist_ok=True)
    for name in manifest["files"]:
        for source in (entry / name, checksum_path(entry / name)):
            if source.is_file():
                _place(source, out / source.name)
    log(f"subset cache: restored {', '.join(manifest['files'])} from {entry} (no unpacking, no decoding)")
    return True


def _place(source: Path, target: Path) -> None:
    """``source`` at ``target``, atomically: a copy renamed into place (not a hard link, which a
    study's file damaged or rewritten in place would share with the cache)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    shutil.copy2(source, tmp)
    os.replace(tmp, target)
    corrupt_path(target).unlink(missing_ok=True)  # computed anew: the corrupt copy has served


def store(entry: Path, out: Path, files: list[str], log) -> None:
    """Copy ``files`` of ``out`` (with their checksum sidecars) into ``entry``, atomically; a cache
    that cannot be written leaves the study as it is, with a message."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        try:
            for name in files:
                for source in (out / name, checksum_path(out / name)):
                    if source.is_file():
                        shutil.copy2(source, staging / source.name)
            digests = {name: file_digest(staging / name) for name in files}
            write_json(staging / MANIFEST, {"files": digests})
            with contextlib.suppress(FileExistsError, OSError):  # another study wrote it meanwhile: keep theirs
                os.rename(staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        log(f"subset cache: could not write {entry} ({error}); this study keeps its own copy only")
        return
    if entry.is_dir():
        log(f"subset cache: stored {', '.join(files)} in {entry}")


def decoded_files(out: Path) -> list[str]:
    """What a decoding step wrote into ``out``: a tensor file per split of its subset.json, and that file."""
    splits = json.loads((out / "subset.json").read_text())["splits"]
    return [*(f"{split}.pt" for split in splits), "subset.json"]


def cached_decode(archive: str, root: str | os.PathLike, settings: dict, out: str | os.PathLike,
                  decode: Callable[[Path], object], log=print, enabled: bool = True) -> bool:  # fmt: skip
    """``out``'s decoded subset from the cache's entry of ``archive`` and ``settings`` when it has
    one; else ``decode(images)`` (``archive`` unpacked into a temporary folder of its own, or without
    an archive the image folder ``root``), then stored. Without an archive, or with the cache off, just
    ``decode(root)``.
    Returns whether the cache had it."""
    folder = cache_dir() if enabled and archive else None
    entry = folder / subset_key(archive, settings) if folder else None
    if entry is not None and restore(entry, Path(out), log):
        _name_root(Path(out), root)
        return True
    if archive:
        # Unpacked into a folder of this job's own: fetch_data may be unpacking into ``root`` meanwhile.
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=Path(out).parent, prefix=".unpack-") as tmp:
            fetch_image_folder(Path(tmp) / "images", Path(archive), log)
            decode(Path(tmp) / "images")
        _name_root(Path(out), root)
    else:
        decode(root)
    if entry is not None:
        store(entry, Path(out), decoded_files(Path(out)), log)
    return False


def _name_root(out: Path, root: str | os.PathLike) -> None:
    """Make ``out``'s subset.json name ``root``, this study's image folder (not the one decoded from)."""
    chosen = json.loads((out / "subset.json").read_text())
    if chosen["source"]["root"] != str(root):
        write_json(out / "subset.json", chosen | {"source": chosen["source"] | {"root": str(root)}})
