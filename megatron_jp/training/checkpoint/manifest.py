"""The manifest in a checkpoint's meta.json: every data file with its size and SHA-256, checked before a
single tensor (or the .metadata pickle) is read.

    "files": {"__0_0.distcp": {"bytes": 123, "sha256": "..."}, ".metadata": {...}, ...}

Sizes are checked for every file first (cheap: a truncated or missing file is named at once); then
the content hashes, each file read once, split over the ranks of a distributed load. Checkpoints from
before the hashes (`{"name": bytes}`) are checked for sizes only.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CONFIG, META = "config.yaml", "meta.json"
HASH = "sha256"
_BLOCK = 8 << 20


class ManifestError(RuntimeError):
    """A data file that is missing, truncated or changed since it was written; the message names it."""


def hash_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_BLOCK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            sha.update(view[:n])  # hashlib releases the GIL on large blocks
    return sha.hexdigest()


def data_files(folder: Path) -> list[str]:
    """Every file but config.yaml (editable) and meta.json (the record), as relative POSIX paths."""
    return [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (CONFIG, META)]


def build(folder: Path, known: dict[str, tuple[int, str]] | None = None) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of the data files in `folder`; `known` holds what writers already
    hashed on the way to disk (the large tensor files), the rest (.metadata, rank states) is read."""
    known = known or {}
    out = {}
    for name in data_files(folder):
        size = (folder / name).stat().st_size
        if name in known and known[name][0] == size:
            out[name] = {"bytes": size, HASH: known[name][1]}
        else:
            out[name] = {"bytes": size, HASH: hash_file(folder / name)}
    return out


def _entry(value) -> tuple[int, str | None]:
    if isinstance(value, dict):
        return int(value.get("bytes", -1)), value.get(HASH)
    return int(value), None  # a manifest of sizes only (before the hashes)


def check_sizes(iter_dir: Path, files: dict):
    """Every listed file exists with the recorded size."""
    for name, value in files.items():
        size, _ = _entry(value)
        path = iter_dir / name
        if not path.is_file():
            raise ManifestError(f"{path} is missing ({size} bytes in {META}'s manifest): restore the file "
                                f"or load an earlier iteration")
        actual = path.stat().st_size
        if actual != size:
            raise ManifestError(f"{path} has {actual} bytes, {META} records {size}: the file is truncated "
                                f"or damaged; restore it or load an earlier iteration")


def check_hashes(iter_dir: Path, files: dict, rank: int = 0, world: int = 1, first: tuple[str, ...] = ()):
    """This rank's share of the files (every world-th, after `first`, which every rank checks) has the
    recorded SHA-256."""
    names = [n for n in files if n not in first]
    for name in [*[n for n in first if n in files], *names[rank::world]]:
        _, digest = _entry(files[name])
        if digest is not None and hash_file(iter_dir / name) != digest:
            raise ManifestError(f"{iter_dir / name} does not have the content {META} records (SHA-256 "
                                f"differs): the file was damaged or replaced after it was written; restore it "
                                f"or load an earlier iteration")


def has_hashes(files: dict) -> bool:
    return any(_entry(v)[1] for v in files.values())


def write_durably(path: Path, data: bytes):
    """Write `path` and fsync it (inside a temporary folder: the folder's rename publishes it)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
