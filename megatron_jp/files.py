"""Writing outputs safely: under a temporary name in the target's folder, then renamed into place, with
the permissions the user's umask gives ordinary files; cleanup that cannot itself fail; OS errors
named by what they mean (a full disk, a read-only file system). Imports nothing of megatron_jp.

    write_text(path, text)                       # file: temporary name, fsync, os.replace
    with output_dir(path) as tmp: ...            # folder: filled under a temporary name, then renamed
    with scratch_dir(path) as tmp: ...           # a temporary folder beside path, always removed
    with output_file(path) as tmp: ...           # a file some library writes (savefig, sentencepiece)
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

# what a user can do about each: the numbers errno gives for the cases worth a sentence of their own
_MEANINGS = {
    errno.ENOSPC: "no space left on the device (ENOSPC): free space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded (EDQUOT): free space or write elsewhere",
    errno.EROFS: "the file system is read-only (EROFS): write elsewhere",
    errno.EACCES: "permission denied (EACCES): write elsewhere or fix the folder's permissions",
    errno.EPERM: "operation not permitted (EPERM): write elsewhere or fix the folder's permissions",
}


def umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_as_created(path: str | os.PathLike, folder: bool = False):
    """Give `path` the mode a plain open()/mkdir() would have given it (tempfile makes 0600 / 0700)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def os_error_in(error: BaseException) -> OSError | None:
    """The first OSError with an errno we explain in `error`, its causes and its context (DCP wraps the
    real exception of every rank in a CheckpointException)."""
    seen = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _MEANINGS:
            return e
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException:
        if isinstance(failures, dict):  # {rank: (exception, traceback)}
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return None


def describe_os_error(error: BaseException) -> str | None:
    """'no space left on the device (ENOSPC): ...' for a full disk, a read-only file system, a quota or
    a permission error anywhere in `error`; None for anything else."""
    found = os_error_in(error)
    if found is None:
        return None
    where = f" at {found.filename}" if found.filename else ""
    return f"{_MEANINGS[found.errno]}{where}"


def inside(inner: str | os.PathLike, outer: str | os.PathLike) -> bool:
    """Whether `inner` is `outer` or lies inside it (after links are resolved)."""
    inner, outer = Path(os.path.realpath(inner)), Path(os.path.realpath(outer))
    return inner == outer or outer in inner.parents


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths are the same or one lies inside the other: replacing one touches the other."""
    return inside(a, b) or inside(b, a)


def holds_files(path: str | os.PathLike) -> bool:
    """An existing file, or a folder with anything in it."""
    path = Path(path)
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def remove_quietly(path: str | os.PathLike):
    """Delete a file or folder if it exists; never raises (cleanup after an error must not hide it;
    deleting needs no free space)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def close_quietly(handle):
    """Close a file whose buffered writes may fail again on a full disk: drop them, never raise."""
    try:
        handle.close()
    except OSError:
        with contextlib.suppress(OSError):
            os.close(handle.fileno())


def fsync_dir(path: str | os.PathLike):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_name(path: Path, folder: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    chmod_as_created(tmp, folder)
    return tmp


@contextlib.contextmanager
def output_file(path: str | os.PathLike):
    """Yield a temporary path beside `path` for a writer that wants a file name; on success it
    replaces `path` (umask permissions, fsynced), on any error it is removed."""
    path = Path(path)
    tmp = _temporary_name(path, folder=False)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes):
    with output_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str):
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def scratch_dir(beside: str | os.PathLike):
    """An empty temporary folder in the folder of `beside` (same file system: renames from it are
    atomic), with umask permissions; removed on exit unless it was renamed away."""
    tmp = _temporary_name(Path(beside), folder=True)
    try:
        yield tmp
    finally:
        remove_quietly(tmp)


def umask_permissions(tmp: Path):
    """Whatever a library created in `tmp` gets the umask's permissions (some write 0600 files)."""
    for f in tmp.rglob("*"):
        chmod_as_created(f, folder=f.is_dir())


def move_into(tmp: Path, path: Path):
    """A complete `tmp` folder becomes `path`; into an existing `path` its files move one rename each
    (files of `path` that `tmp` does not hold, e.g. a README, stay). Whatever a library created in
    `tmp` gets the umask's permissions (some write 0600 files)."""
    umask_permissions(tmp)
    if not path.is_dir():
        os.replace(tmp, path)
        return
    for f in tmp.iterdir():
        os.replace(f, path / f.name)


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, replace: bool = True):
    """Yield an empty temporary folder beside `path`; on success it becomes `path` (an existing folder
    is replaced when `replace`, else refused with FileExistsError), on any error it is removed."""
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(errno.EEXIST, "exists already", str(path))
    tmp = _temporary_name(path, folder=True)
    try:
        yield tmp
        umask_permissions(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old.tmp")
            remove_quietly(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            remove_quietly(old)
    except BaseException:
        remove_quietly(tmp)
        raise
