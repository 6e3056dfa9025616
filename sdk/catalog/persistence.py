"""A catalogue folder on disk: written whole, replaced atomically, read consistently, checked.

Why this much care: other processes read the folder while one saves it, two may save it at once,
and a save may be killed. So:

* **Writers** take an exclusive lock file beside the folder (``.NAME.lock``, ``flock``: released
  by the kernel if the process dies), so saves of one folder are serialised; one that waits longer
  than ``lock_timeout`` is refused with one line. Holding it, a writer first removes what killed
  saves left (``.NAME.tmp-*``, ``.NAME.old-*``), writes the new catalogue into ``.NAME.tmp-*``
  (fsynced), and swaps it with the old folder in one ``renameat2(RENAME_EXCHANGE)`` where the
  kernel has it (Linux), else two renames (a reader may then briefly find no folder, and retries).
* **Readers** open the folder once and read every file through that handle, so all files come
  from one catalogue even if it is swapped meanwhile; each file is hashed from the open file and
  parsed from the same one. If a swap removed a file under a reader, it starts again on the new
  folder (a few times). A load also removes a killed save's leftovers when no save is running.
* ``catalog.json`` lists each file's size and SHA-256 and carries ``header_sha256``, the SHA-256
  of its own other keys (canonical JSON), so an edited counter is refused like a tampered file.
  Catalogues saved before that key existed still load (their counters are checked against the
  entries instead).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import IO, Any, Callable, Iterator

from sdk.catalog.errors import CatalogError, CatalogFormatError

log = logging.getLogger(__name__)

CATALOG_FORMAT = "ibc-catalog"
CATALOG_SCHEMA_VERSION = 1
CATALOG_FILE = "catalog.json"
HEADER_HASH_KEY = "header_sha256"
LOCK_TIMEOUT_S = 120.0
READ_ATTEMPTS = 5
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def header_digest(header: dict) -> str:
    body = {k: v for k, v in header.items() if k != HEADER_HASH_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_of(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    f.seek(0)
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    f.seek(0)
    return h.hexdigest()


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return sha256_of(f)


def _siblings(directory: str, what: str) -> list[str]:
    parent, name = os.path.split(directory)
    return glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.{what}-*"))


def lock_path(directory: str) -> str:
    parent, name = os.path.split(directory)
    return os.path.join(parent, f".{name}.lock")


@contextlib.contextmanager
def save_lock(directory: str, timeout: float = LOCK_TIMEOUT_S, wait: bool = True) -> Iterator[bool]:
    """Hold the folder's lock file; yields False (without waiting) when ``wait`` is False and it is taken."""
    path = lock_path(directory)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    yield False
                    return
                if time.monotonic() > deadline:
                    raise CatalogError(f"{directory}: another process has been saving this catalogue for over "
                                       f"{timeout:.0f}s (lock file {path}); try again later") from None
                time.sleep(0.02)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def clean_leftovers(directory: str) -> int:
    """Remove what killed saves left beside ``directory`` (call with the lock held); restore a lost folder."""
    old = _siblings(directory, "old")
    if not os.path.exists(directory):  # killed between the two renames of the fallback swap
        whole = [d for d in old if os.path.isfile(os.path.join(d, CATALOG_FILE))]
        if whole:
            os.rename(whole[0], directory)
            log.warning("restored %s from %s (a save was killed half-way)", directory, whole[0])
            old.remove(whole[0])
    gone = 0
    for d in _siblings(directory, "tmp") + old:
        shutil.rmtree(d, ignore_errors=True)
        gone += 1
    if gone:
        log.info("removed %d leftover(s) of interrupted saves beside %s", gone, directory)
    return gone


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the kernel or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_catalogue(directory: str, write_files: Callable[[str], list[str]], header: dict,
                    lock_timeout: float = LOCK_TIMEOUT_S) -> str:
    """Write a catalogue folder: ``write_files(tmp)`` writes the data files and names them; then the header."""
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    with save_lock(directory, lock_timeout):
        clean_leftovers(directory)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
        try:
            files = {}
            for name in write_files(tmp):
                full = os.path.join(tmp, name)
                with open(full, "rb") as f:
                    os.fsync(f.fileno())
                    files[name] = {"bytes": os.fstat(f.fileno()).st_size, "sha256": sha256_of(f)}
            header = {**header, "files": files}
            header[HEADER_HASH_KEY] = header_digest(header)
            with open(os.path.join(tmp, CATALOG_FILE), "w", encoding="utf-8") as f:
                json.dump(header, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            _replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(parent)
    return directory


def _replace(tmp: str, directory: str) -> None:
    if not os.path.exists(directory):
        os.rename(tmp, directory)
        return
    if _exchange(tmp, directory):  # tmp now holds the old catalogue
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=os.path.dirname(directory))
    os.rmdir(old)
    os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def check_header(header: Any, path: str) -> dict:
    if not isinstance(header, dict) or header.get("format") != CATALOG_FORMAT:
        raise CatalogFormatError(f"{path}: not an ibc catalogue")
    if header.get("schema_version") != CATALOG_SCHEMA_VERSION:
        raise CatalogFormatError(
            f"{path}: unknown catalogue schema version {header.get('schema_version')!r}; "
            f"this SDK reads version {CATALOG_SCHEMA_VERSION}"
        )
    if HEADER_HASH_KEY in header and header[HEADER_HASH_KEY] != header_digest(header):
        raise CatalogFormatError(f"{path}: its {HEADER_HASH_KEY} does not match its contents (edited or tampered)")
    return header


def _parse_header(f: IO[bytes], path: str) -> dict:
    try:
        header = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CatalogFormatError(f"{path}: unreadable ({e})") from None
    return check_header(header, path)


def read_header(directory: str | os.PathLike) -> dict:
    """Read and check ``catalog.json`` (format, schema, its own hash) without loading the index."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CatalogFormatError(f"{directory}: no such catalogue directory")
    path = os.path.join(directory, CATALOG_FILE)
    try:
        with open(path, "rb") as f:
            return _parse_header(f, path)
    except FileNotFoundError:
        raise CatalogFormatError(f"{directory}: no {CATALOG_FILE} (not a catalogue, or a partial write)") from None


def _open_files(dfd: int, directory: str) -> tuple[dict, dict[str, IO[bytes]]]:
    """Header and every listed file, opened through the folder handle ``dfd`` and checked."""
    path = os.path.join(directory, CATALOG_FILE)
    try:
        hfd = os.open(CATALOG_FILE, os.O_RDONLY, dir_fd=dfd)
    except FileNotFoundError:
        raise CatalogFormatError(f"{directory}: no {CATALOG_FILE} (not a catalogue, or a partial write)") from None
    with os.fdopen(hfd, "rb") as f:
        header = _parse_header(f, path)
    opened: dict[str, IO[bytes]] = {}
    try:
        files = header["files"]
        if not isinstance(files, dict):
            raise CatalogFormatError(f"{path}: 'files' is not a table")
        for name, entry in files.items():
            full = os.path.join(directory, name)
            if not isinstance(name, str) or "/" in name or os.sep in name or name.startswith("."):
                raise CatalogFormatError(f"{directory}: bad file name {name!r} in {CATALOG_FILE}")
            try:
                f = opened[name] = os.fdopen(os.open(name, os.O_RDONLY, dir_fd=dfd), "rb")
            except FileNotFoundError:
                raise CatalogFormatError(f"{full}: missing (partial write or incomplete copy?)") from None
            if os.fstat(f.fileno()).st_size != entry["bytes"] or sha256_of(f) != entry["sha256"]:
                raise CatalogFormatError(f"{full}: size or SHA-256 does not match {CATALOG_FILE} (corrupt or tampered)")
    except BaseException:
        for f in opened.values():
            f.close()
        raise
    return header, opened


def read_catalogue(directory: str | os.PathLike, parse: Callable[[dict, dict[str, IO[bytes]]], Any]) -> Any:
    """``parse(header, open files)`` on one whole catalogue, even while other processes replace it."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.isdir(os.path.dirname(directory)) and (_siblings(directory, "tmp") or _siblings(directory, "old")):
        try:
            with save_lock(directory, wait=False) as mine:
                if mine:  # no save under way: what is there was left by a killed one
                    clean_leftovers(directory)
        except OSError as e:  # a read-only location: read it as it is
            log.debug("could not clean leftovers beside %s: %s", directory, e)
    for attempt in range(READ_ATTEMPTS):
        try:
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            if attempt + 1 < READ_ATTEMPTS and (_siblings(directory, "old") or _siblings(directory, "tmp")):
                time.sleep(0.05)  # between the two renames of a fallback swap
                continue
            raise CatalogFormatError(f"{directory}: no such catalogue directory") from None
        try:
            header, files = _open_files(dfd, directory)
            try:
                return parse(header, files)
            finally:
                for f in files.values():
                    f.close()
        except CatalogFormatError:
            if attempt + 1 < READ_ATTEMPTS and _swapped(directory, dfd):
                log.debug("%s was replaced while being read; reading the new one", directory)
                continue
            raise
        finally:
            os.close(dfd)
    raise CatalogFormatError(f"{directory}: replaced {READ_ATTEMPTS} times while being read; try again")


def _swapped(directory: str, dfd: int) -> bool:
    try:
        now = os.stat(directory)
    except OSError:
        return True
    was = os.fstat(dfd)
    return (now.st_ino, now.st_dev) != (was.st_ino, was.st_dev)
