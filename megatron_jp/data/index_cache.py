"""A folder of sample indices built once and memory-mapped read-only by every process that needs them.

    cache = IndexCache("data/index-cache")
    entry = cache.get_or_build("packed", key, build)   # build(writer) -> summary dict
    entry.arrays["offset"]                              # np.memmap, read-only

An entry is a folder `{kind}-{digest}/` holding one raw little-endian file per array and a
`manifest.json`; `digest` is a hash of `key`, a JSON-able dict of everything the arrays depend on
(shard sizes, mtimes, inodes and ctimes, config values, FORMAT_VERSION), and the manifest repeats the full key, so
a changed input gives another folder and a hash collision is caught.

Building: under an exclusive `flock` on `{kind}-{digest}.lock` (so one process per node, or per job
on a shared file system with working locks, builds while the others wait and then map the result),
into a temporary folder that is renamed into place once the manifest is written: a reader never
sees a half-written entry (the folders of a killed builder are removed by the next lock holder). Correctness never rests on the lock: without one (a file system that
refuses flock) two builders produce the same bytes and the second rename fails harmlessly.

Loading checks the manifest (format, full key), every array's file size and a CRC-32 of its first
and last 64 KiB: a truncated, overwritten or foreign entry is reported and rebuilt, never used.
A full CRC-32 of every array is in the manifest too (`verify(path)`, `tools/build_index.py
--verify`), since reading gigabytes at every start-up would defeat the purpose.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

FORMAT_VERSION = 1
_ENDS = 1 << 16  # bytes at each end of an array covered by the start-up checksum
_BLOCK = 1 << 24
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # the folder cannot take the entry: say which key moves it


class CacheError(OSError):
    """The cache folder cannot be used (not writable, ...); the message names it and the key to set."""


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class Entry:
    """A loaded entry: its folder, manifest and read-only memory maps of its arrays."""

    path: str
    manifest: dict
    arrays: dict = field(default_factory=dict)

    @property
    def summary(self) -> dict:
        return self.manifest["summary"]


class _ArrayFile:
    """An array written by appending blocks; tracks its length and CRC-32s."""

    def __init__(self, path: str, dtype):
        self.path, self.dtype = path, np.dtype(dtype).newbyteorder("<")
        self.file = open(path, "wb")
        self.length = 0
        self.crc = 0

    def append(self, values) -> None:
        data = np.ascontiguousarray(values, dtype=self.dtype)
        if data.size:
            self.file.write(data.data)
            self.crc = zlib.crc32(data.data, self.crc)
            self.length += data.size

    def close(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {"dtype": self.dtype.str, "length": self.length, "crc32": self.crc, "ends_crc32": _ends_crc(self.path)}


class EntryWriter:
    """Handed to a build function: `writer.array(name, dtype)` returns an appendable array file."""

    def __init__(self, folder: str):
        self.folder, self.files = folder, {}

    def array(self, name: str, dtype) -> _ArrayFile:
        self.files[name] = _ArrayFile(os.path.join(self.folder, name + ".bin"), dtype)
        return self.files[name]

    def close(self) -> dict:
        return {name: f.close() for name, f in self.files.items()}


def _ends_crc(path: str) -> int:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        crc = zlib.crc32(f.read(_ENDS))
        if size > _ENDS:
            f.seek(max(size - _ENDS, _ENDS))
            crc = zlib.crc32(f.read(), crc)
    return crc


def _map(path: str, meta: dict):
    dtype = np.dtype(meta["dtype"])
    if meta["length"] == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(meta["length"],))


class IndexCache:
    """Entries under `root` (see the module docstring); `log` receives one line per build or rebuild."""

    def __init__(self, root: str, log=None):
        self.root = root
        self.log = log or _to_stderr
        self.built = self.mapped = 0  # entries this object built / found ready
        self.build_seconds = 0.0

    def path_of(self, kind: str, key: dict) -> str:
        return os.path.join(self.root, f"{kind}-{digest(key)}")

    def load(self, kind: str, key: dict) -> Entry | None:
        """The entry if present and sound; None if absent; a damaged entry is logged and treated as absent."""
        path = self.path_of(kind, key)
        if not os.path.isdir(path):
            return None
        problem = _check(path, key)
        if problem:
            self.log(f"index cache: {path} is unusable ({problem}); rebuilding it")
            return None
        manifest = _read_manifest(path)
        arrays = {name: _map(os.path.join(path, name + ".bin"), meta) for name, meta in manifest["arrays"].items()}
        return Entry(path, manifest, arrays)

    def get_or_build(self, kind: str, key: dict, build) -> Entry:
        """Map the entry of (kind, key), building it first (once, under the lock) when needed."""
        entry = self.load(kind, key)
        if entry is not None:
            self.mapped += 1
            return entry
        self._make_root()
        with _Lock(self.path_of(kind, key) + ".lock", self.log) as lock:
            entry = self.load(kind, key)  # another process may have built it while we waited
            if entry is None and lock.fd is not None:  # nobody else builds this key: leftovers are garbage
                for leftover in glob.glob(glob.escape(self.path_of(kind, key)) + ".tmp-*"):
                    shutil.rmtree(leftover, ignore_errors=True)
            if entry is None:
                self._build(kind, key, build)
                entry = self.load(kind, key)
                self.built += 1
            else:
                self.mapped += 1
        if entry is None:
            raise CacheError(f"index cache: {self.path_of(kind, key)} was built but does not load back")
        return entry

    def _make_root(self) -> None:
        try:
            os.makedirs(self.root, exist_ok=True)
            probe = os.path.join(self.root, f".probe-{socket.gethostname()}-{os.getpid()}")
            open(probe, "w").close()
            os.unlink(probe)
        except OSError as err:
            raise CacheError(f"index cache folder {self.root} is not writable ({err.strerror}); set "
                             "data.cache_dir to a writable folder (or build it ahead with tools/build_index.py "
                             "where it is writable)") from None

    def _build(self, kind: str, key: dict, build) -> None:
        final = self.path_of(kind, key)
        tmp = f"{final}.tmp-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        t0 = time.perf_counter()
        try:
            writer = EntryWriter(tmp)
            summary = build(writer)
            manifest = {"format": FORMAT_VERSION, "kind": kind, "key": key, "arrays": writer.close(),
                        "summary": summary, "built": {"host": socket.gethostname(), "pid": os.getpid(),
                                                      "seconds": round(time.perf_counter() - t0, 3)}}
            _write_json(os.path.join(tmp, "manifest.json"), manifest)
            if os.path.isdir(final) and _check(final, key) is None:  # a builder without the lock was faster
                shutil.rmtree(tmp, ignore_errors=True)
                return
            if os.path.isdir(final):  # damaged (load refused it): move it away first, then drop it
                stale = f"{final}.stale-{os.getpid()}"
                os.rename(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            _publish(tmp, final)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if err.errno not in _NO_ROOM:
                raise
            raise CacheError(f"index cache folder {self.root}: {err.strerror} while building {final}; free space "
                             "there, or set data.cache_dir to a folder with room (tools/build_index.py can build "
                             "it ahead)") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        seconds = time.perf_counter() - t0
        self.build_seconds += seconds
        if seconds >= 10:  # say so for the slow ones; the start-up summary counts the rest
            self.log(f"index cache: built {final} in {seconds:.1f} s")

    def describe(self) -> str:
        return (f"index cache {self.root}: {self.built} entries built ({self.build_seconds:.1f} s), "
                f"{self.mapped} mapped ready-made")


def _publish(tmp: str, final: str) -> None:
    try:
        os.rename(tmp, final)
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another builder won the race: same bytes, keep theirs
    try:  # make the rename durable; some network file systems refuse fsync on a folder
        dir_fd = os.open(os.path.dirname(final), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _read_manifest(path: str) -> dict:
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


def _check(path: str, key: dict) -> str | None:
    """Why the entry at `path` cannot be used for `key`, or None when it can."""
    try:
        manifest = _read_manifest(path)
    except FileNotFoundError:
        return "no manifest.json"
    except (OSError, ValueError) as err:
        return f"manifest.json unreadable: {err}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        return f"format {manifest.get('format') if isinstance(manifest, dict) else '?'}, expected {FORMAT_VERSION}"
    if manifest.get("key") != json.loads(json.dumps(key)):
        return "built for another key"
    for name, meta in manifest.get("arrays", {}).items():
        file = os.path.join(path, name + ".bin")
        want = int(meta["length"]) * np.dtype(meta["dtype"]).itemsize
        if not os.path.isfile(file):
            return f"{name}.bin is missing"
        if os.path.getsize(file) != want:
            return f"{name}.bin has {os.path.getsize(file)} bytes, the manifest says {want} (truncated?)"
        if _ends_crc(file) != meta["ends_crc32"]:
            return f"{name}.bin does not match its checksum (overwritten?)"
    return None


def verify(path: str) -> list[str]:
    """Full CRC-32 of every array of the entry at `path` against its manifest; the names that differ."""
    bad = []
    for name, meta in _read_manifest(path)["arrays"].items():
        crc = 0
        with open(os.path.join(path, name + ".bin"), "rb") as f:
            while block := f.read(_BLOCK):
                crc = zlib.crc32(block, crc)
        if crc != meta["crc32"]:
            bad.append(name)
    return bad


class _Lock:
    """An exclusive flock on `path`; says so when it has to wait; proceeds unlocked where flock fails."""

    def __init__(self, path: str, log):
        self.path, self.log, self.fd = path, log, None

    def __enter__(self):
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.log(f"index cache: waiting for another process building {self.path[:-5]}")
                fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as err:  # e.g. ENOLCK on a file system without locks: build anyway (see module doc)
            self.log(f"index cache: no lock on {self.path} ({err.strerror}); building without it")
            self._close()
        return self

    def _close(self):
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None

    def __exit__(self, *exc):
        self._close()
        return False
