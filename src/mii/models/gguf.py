"""GGUF files as models: each file is converted once into a Hugging Face checkpoint
directory under mii's cache, and every later load reads that directory.

The cache entry is keyed by the file's identity (resolved path, size, mtime) and
the converter's version, so an edited or replaced file is converted again. A
conversion is written into a temporary directory and renamed into place only
when complete: a failure (corrupt file, unsupported type, Ctrl-C) leaves no
entry behind. A lock file makes concurrent loaders of one file (a deployment's
replicas and its gateway) wait for one conversion instead of repeating it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import mii.envs as envs
from mii.cache import cache_dir

# Bump when the converted layout changes: old entries are then left unused.
CONVERTER_VERSION = "1"
_TMP_PREFIX = ".tmp-"


def is_gguf_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix, as users name them)."""
    p = Path(path).expanduser()
    return p.suffix.lower() == ".gguf" and not p.is_dir()


def gguf_cache_root() -> Path:
    """Where converted GGUF checkpoints live: ``MII_GGUF_CACHE_DIR``, else
    ``<mii cache>/gguf``."""
    return envs.GGUF_CACHE_DIR.get() or cache_dir() / "gguf"


def gguf_checkpoint_dir(path: str | os.PathLike) -> Path:
    """The converted checkpoint directory of GGUF file ``path``, converting it on first use."""
    from mii.errors import ModelLoadError

    source = Path(path).expanduser().resolve()
    if not source.is_file():
        raise ModelLoadError(f"GGUF file {str(path)!r} does not exist")
    target = gguf_cache_root() / _entry_name(source)
    if target.is_dir():  # renamed into place only when complete
        return target
    from mii.models.gguf_convert import inspect

    checked = inspect(source)  # a bad file fails here, before anything is written
    try:
        with _locked(target.with_name(target.name + ".lock")):
            if target.is_dir():  # another process converted it while we waited
                return target
            _remove_stale_temporaries(target.parent)
            # Said on stderr, as a hub download's progress is: a large file takes
            # minutes, which would look like a hang (logging's INFO is not shown).
            print(f"[mii] converting {source.name} once into {target} ...", file=sys.stderr)
            started = time.perf_counter()
            _convert_atomically(checked, target)
            print(f"[mii] converted in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    finally:
        with contextlib.suppress(OSError):  # only when empty: a failure leaves no trace
            target.parent.rmdir()
    return target


def _entry_name(source: Path) -> str:
    stat = source.stat()
    identity = f"{CONVERTER_VERSION}|{source}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return f"{source.stem}-{digest}"


def _convert_atomically(source, target: Path) -> None:
    """Convert ``source`` (a checked ``GgufSource``) into ``target``, all or nothing."""
    from mii.models import gguf_convert

    # The pid tells a later converter whether this one still runs; the random
    # part keeps two threads of one process apart.
    tmp = target.with_name(f"{_TMP_PREFIX}{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        gguf_convert.convert(source, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # converted meanwhile (no lock): keep theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_temporaries(root: Path) -> None:
    """Temporary directories of converters that were killed (their process is gone)."""
    for entry in root.glob(f"{_TMP_PREFIX}*"):
        pid = entry.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, not ours
        return True
    return True


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive lock on ``lock_path``, which is removed when released (so that
    no lock file outlives a conversion); where there is no fcntl, no lock."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent conversions stay correct (atomic rename)
        yield
        return
    while True:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        except FileNotFoundError:  # the folder was removed (emptied) meanwhile: again
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file that its holder removed meanwhile
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)
