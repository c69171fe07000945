"""Where a store's objects live, and how a written part becomes visible to readers.

A store is a tree of objects addressed by ``/``-separated names relative to its root. Readers
see a part only once it is *committed*; how that is made atomic is this module's one job.

``LocalBackend`` (a directory): a part is written under ``.staging/<part>/``, fsynced, and
renamed into ``parts/<part>/`` under an exclusive ``flock`` on ``.lock``. A part directory
holding a manifest is committed.

``FsspecBackend`` (object storage through fsspec, e.g. ``s3://bucket/prefix``): objects cannot
be renamed and there is no lock, but one PUT is atomic and a conditional PUT (``If-None-Match:
*``, fsspec ``mode="create"``) fails when the object exists. A part's chunks and manifest are
written straight under ``parts/<part>/``, where nobody reads them, and the part is committed
by creating the next entry of a commit log, ``log/<seq>.json`` (``{"commit": part}``), with a
conditional PUT. Two writers racing for one sequence number: one PUT wins; the other re-reads
the log, drops the keys the winner stored and retries at the next number, so commits are
serialised exactly as under the local lock. The committed parts are those the log names (a
later ``{"retract": part}`` entry, written by ``repair``, sets one aside). Log entries are
never overwritten or deleted, so they are cached once read.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.storage import FsspecStore, MemoryStore

from .atomic import fsync_dir, fsync_tree
from .errors import BadInputError, SketchStoreError, StoreNotFoundError

PARTS_DIR = "parts"
SCORES_DIR = "scores"
STAGING_DIR = ".staging"
QUARANTINE_DIR = ".quarantine"
LOCK_FILE = ".lock"
MANIFEST_NAME = "manifest.parquet"
ROOT_METADATA = "zarr.json"
LOG_DIR = "log"
PROBE_DIR = ".probe"
LOG_DIGITS = 12
MAX_COMMIT_TRIES = 1000
STALE_WRITE_SECONDS = 24 * 3600
# fsspec caches directory listings per filesystem instance; a store must always see fresh ones
STORAGE_OPTIONS = {"use_listings_cache": False}

Commit = Callable[[], pa.Table]


def _write_time(name: str) -> float | None:
    """Part and staging names are ``<time_ns>-<pid>-<random>``: when was it started?"""
    head = name.split("-", 1)[0]
    return int(head) / 1e9 if head.isdigit() else None


class Backend(ABC):
    """The objects of one store and its commit protocol."""

    #: the store's root as given to users: a Path for a directory, a URL for object storage
    root: Path | str

    def location(self, name: str) -> str:
        """Absolute path or URL of the object ``name`` (for messages, DuckDB and Zarr)."""
        return f"{str(self.root).rstrip('/')}/{name}" if name else str(self.root)

    @abstractmethod
    def exists(self, name: str = "") -> bool:
        """Whether the object (or, for ``""``, the store root) exists."""

    @abstractmethod
    def read_bytes(self, name: str) -> bytes: ...

    @abstractmethod
    def read_many(self, names: list[str]) -> list[bytes]:
        """The contents of several objects (of committed, hence immutable, parts)."""

    @abstractmethod
    def glob(self, pattern: str) -> list[str]:
        """Locations of the objects matching ``pattern`` (relative, with ``*``), sorted."""

    @abstractmethod
    def part_bytes(self) -> dict[str, int]:
        """Bytes stored under each part name (committed or not)."""

    @abstractmethod
    def zarr_store(self, name: str, read_only: bool) -> Any:
        """What ``zarr.open_array``/``create_array`` take as ``store=`` for the array at ``name``."""

    @abstractmethod
    def duckdb(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection able to read this backend's locations."""

    @abstractmethod
    def create(self, attrs: dict) -> None:
        """Create an empty store whose root group carries ``attrs``; refuse a non-empty root."""

    @abstractmethod
    def check_writable(self) -> None:
        """Raise BadInputError naming the store when it cannot be written."""

    @abstractmethod
    def put(self, name: str, data: bytes) -> None:
        """Write one object so that it is visible whole or not at all."""

    @abstractmethod
    def committed_parts(self) -> list[str]:
        """Names of the committed parts, sorted."""

    @abstractmethod
    def manifest_sources(self) -> list[str]:
        """Paths or globs DuckDB reads to see exactly the committed manifests."""

    @abstractmethod
    def staging_dir(self, part: str) -> str:
        """Where a new part's array is written before its commit."""

    @abstractmethod
    def commit_part(self, part: str, finish: Commit) -> int:
        """Make ``part`` visible with the manifest ``finish()`` returns; returns its rows.

        ``finish`` is called with commits serialised (it sees every earlier commit) and may be
        called again if another writer committed first. An empty manifest discards the part.
        """

    @abstractmethod
    def discard_part(self, part: str) -> None:
        """Remove an uncommitted part's objects (best effort)."""

    @abstractmethod
    def orphan_parts(self) -> list[str]:
        """Committed-looking parts that readers ignore (damage, for ``verify``)."""

    @abstractmethod
    def stale_writes(self) -> list[str]:
        """Uncommitted writes whose writer is gone (never read by anyone)."""

    @abstractmethod
    def remove_stale(self, name: str) -> None:
        """Delete one of ``stale_writes``."""

    @abstractmethod
    def quarantine(self, part: str) -> None:
        """Set a committed part aside so that readers no longer see it."""


class LocalBackend(Backend):
    """A store in a local (or mounted) directory: staging, fsync, rename under a flock."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        return self.root / name if name else self.root

    def exists(self, name: str = "") -> bool:
        return self._path(name).exists()

    def read_bytes(self, name: str) -> bytes:
        return self._path(name).read_bytes()

    def read_many(self, names: list[str]) -> list[bytes]:
        return [self.read_bytes(name) for name in names]

    def glob(self, pattern: str) -> list[str]:
        return [str(p) for p in sorted(self.root.glob(pattern))]

    def part_bytes(self) -> dict[str, int]:
        return {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                for p in (self.root / PARTS_DIR).iterdir() if p.is_dir()}

    def zarr_store(self, name: str, read_only: bool) -> str:
        return str(self._path(name))

    def duckdb(self) -> duckdb.DuckDBPyConnection:
        return duckdb.connect()

    def create(self, attrs: dict) -> None:
        path = self.root
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise StoreNotFoundError(f"cannot create a store at {path}: it exists and is not an empty directory")
        staging = path.parent / f".{path.name}.creating-{uuid.uuid4().hex[:8]}"
        try:
            group = zarr.open_group(store=str(staging), mode="w", zarr_format=3)
            group.attrs.update(attrs)
            for sub in (PARTS_DIR, SCORES_DIR, STAGING_DIR):
                (staging / sub).mkdir()
            if path.exists():
                path.rmdir()
            staging.rename(path)
        except OSError as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise BadInputError(f"cannot create store at {path}: {err.strerror or err}") from err

    def check_writable(self) -> None:
        if not os.access(self.root, os.W_OK) or not os.access(self.root / STAGING_DIR, os.W_OK):
            raise BadInputError(f"store {self.root} is read-only: it can be read, queried and verified, not written")

    def put(self, name: str, data: bytes) -> None:
        staging = self.root / STAGING_DIR / new_name()
        target = self._path(name)
        try:
            with open(staging, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, target)
            fsync_dir(target.parent)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise

    def committed_parts(self) -> list[str]:
        return sorted(p.name for p in (self.root / PARTS_DIR).iterdir() if (p / MANIFEST_NAME).is_file())

    def manifest_sources(self) -> list[str]:
        return [str(self.root / PARTS_DIR / "*" / MANIFEST_NAME)]

    def staging_dir(self, part: str) -> str:
        return f"{STAGING_DIR}/{part}"

    @contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.root / LOCK_FILE, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def commit_part(self, part: str, finish: Commit) -> int:
        staging = self.root / STAGING_DIR / part
        with self._lock():
            table = finish()
            if table.num_rows == 0:
                self.discard_part(part)
                return 0
            pq.write_table(table, staging / MANIFEST_NAME)
            fsync_tree(staging)
            os.rename(staging, self.root / PARTS_DIR / part)
            fsync_dir(self.root / PARTS_DIR)
        return table.num_rows

    def discard_part(self, part: str) -> None:
        shutil.rmtree(self.root / STAGING_DIR / part, ignore_errors=True)

    def orphan_parts(self) -> list[str]:
        return sorted(p.name for p in (self.root / PARTS_DIR).iterdir() if not (p / MANIFEST_NAME).is_file())

    def stale_writes(self) -> list[str]:
        return sorted(p.name for p in (self.root / STAGING_DIR).iterdir() if not _writer_alive(p.name))

    def remove_stale(self, name: str) -> None:
        shutil.rmtree(self.root / STAGING_DIR / name, ignore_errors=True)

    def quarantine(self, part: str) -> None:
        target = self.root / QUARANTINE_DIR
        target.mkdir(exist_ok=True)
        os.rename(self.root / PARTS_DIR / part, target / part)


class FsspecBackend(Backend):
    """A store on object storage (``s3://bucket/prefix``): parts committed through a log of
    conditional PUTs (see the module docstring). Credentials and endpoint come from the
    filesystem's usual configuration (for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_ENDPOINT_URL``, ...)."""

    def __init__(self, url: str) -> None:
        self.root = url.rstrip("/")
        self.protocol = url.split("://", 1)[0]
        self.fs = fsspec.filesystem(self.protocol, **STORAGE_OPTIONS)
        self.base = self.fs._strip_protocol(self.root).rstrip("/")
        self._log: dict[str, dict] = {}
        self._cache: dict[str, bytes] = {}

    def _key(self, name: str) -> str:
        return f"{self.base}/{name}" if name else self.base

    def exists(self, name: str = "") -> bool:
        return self.fs.exists(self._key(name))

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self._key(name))

    def read_many(self, names: list[str]) -> list[bytes]:
        missing = [self._key(n) for n in names if self._key(n) not in self._cache]
        if missing:  # concurrent GETs, without the existence checks fs.cat makes first
            fetched = self.fs.cat_ranges(missing, None, None, on_error="return")
            for key, value in zip(missing, fetched):
                if isinstance(value, BaseException):
                    raise OSError(f"{self.protocol}://{key}: {value}") from value
                self._cache[key] = value
        return [self._cache[self._key(n)] for n in names]

    def glob(self, pattern: str) -> list[str]:
        return sorted(f"{self.protocol}://{key}" for key in self.fs.glob(self._key(pattern)))

    def part_bytes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        prefix = self._key(PARTS_DIR) + "/"
        for key, info in self.fs.find(self._key(PARTS_DIR), detail=True).items():
            part = key[len(prefix):].split("/", 1)[0]
            sizes[part] = sizes.get(part, 0) + int(info.get("size") or 0)
        return sizes

    def zarr_store(self, name: str, read_only: bool) -> FsspecStore:
        return FsspecStore.from_url(self.location(name), storage_options=STORAGE_OPTIONS, read_only=read_only)

    def duckdb(self) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect()
        con.register_filesystem(self.fs)
        return con

    def create(self, attrs: dict) -> None:
        if self._list(""):
            raise StoreNotFoundError(f"cannot create a store at {self.root}: it exists and is not empty")
        self.check_writable()
        memory = MemoryStore()
        zarr.open_group(store=memory, mode="w", zarr_format=3).attrs.update(attrs)
        root = memory._store_dict[ROOT_METADATA].to_bytes()
        try:
            self.fs.pipe_file(self._key(ROOT_METADATA), root, mode="create")
        except FileExistsError as err:
            raise StoreNotFoundError(f"cannot create a store at {self.root}: another store was created there") from err

    def check_writable(self) -> None:
        """Write access, and conditional PUTs actually honoured: the commit protocol needs both."""
        probe = self._key(f"{PROBE_DIR}/{uuid.uuid4().hex}")
        try:
            self.fs.pipe_file(probe, b"1", mode="create")
        except PermissionError as err:
            raise BadInputError(f"store {self.root} is read-only here ({reason(err)}): it can be read, queried "
                                f"and verified, not written") from err
        try:
            self.fs.pipe_file(probe, b"2", mode="create")
        except FileExistsError:
            pass
        else:
            raise BadInputError(f"object storage at {self.root} ignores conditional writes (If-None-Match); "
                                f"sketchstore needs them to commit parts safely")
        finally:
            self.fs.rm_file(probe)

    def put(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._key(name), data)

    def _list(self, name: str) -> list[str]:
        """Names directly under ``name`` (empty when there is nothing)."""
        try:
            return [key.rstrip("/").rsplit("/", 1)[-1] for key in self.fs.ls(self._key(name), detail=False)]
        except FileNotFoundError:
            return []

    def _entries(self) -> list[tuple[int, dict]]:
        """The commit log, in order; new entries are fetched, known ones come from the cache."""
        names = [n for n in self._list(LOG_DIR) if n.endswith(".json") and n[:-5].isdigit()]
        fresh = [n for n in names if n not in self._log]
        if fresh:
            for name, data in zip(fresh, self.read_many([f"{LOG_DIR}/{n}" for n in fresh])):
                self._log[name] = json.loads(data)
        return sorted((int(n[:-5]), self._log[n]) for n in names)

    def _parts(self, entries: list[tuple[int, dict]]) -> tuple[set[str], set[str]]:
        """(committed, retracted) part names after replaying ``entries``."""
        committed, retracted = set(), set()
        for _, entry in entries:
            if "commit" in entry:
                committed.add(entry["commit"])
            if "retract" in entry:
                committed.discard(entry["retract"])
                retracted.add(entry["retract"])
        return committed, retracted

    def committed_parts(self) -> list[str]:
        return sorted(self._parts(self._entries())[0])

    def manifest_sources(self) -> list[str]:
        return [self.location(f"{PARTS_DIR}/{part}/{MANIFEST_NAME}") for part in self.committed_parts()]

    def staging_dir(self, part: str) -> str:
        return f"{PARTS_DIR}/{part}"

    def _append(self, entry: Callable[[], dict | None]) -> dict | None:
        """Add ``entry()`` (computed after re-reading the log) as the next log entry; None adds nothing."""
        for _ in range(MAX_COMMIT_TRIES):
            entries = self._entries()
            seq = entries[-1][0] + 1 if entries else 0
            value = entry()
            if value is None:
                return None
            key = self._key(f"{LOG_DIR}/{seq:0{LOG_DIGITS}d}.json")
            try:
                self.fs.pipe_file(key, json.dumps(value).encode(), mode="create")
                return value
            except FileExistsError:
                if json.loads(self.fs.cat_file(key)) == value:
                    return value  # our own PUT, retried by the client after it had succeeded
                # another writer took this sequence number: look again
        raise SketchStoreError(f"could not commit to {self.root}: {MAX_COMMIT_TRIES} tries lost to other writers")

    def commit_part(self, part: str, finish: Commit) -> int:
        rows = 0

        def entry() -> dict | None:
            nonlocal rows
            table = finish()
            rows = table.num_rows
            if rows == 0:
                return None
            self.fs.pipe_file(self._key(f"{PARTS_DIR}/{part}/{MANIFEST_NAME}"), _parquet_bytes(table))
            return {"commit": part, "rows": rows}

        if self._append(entry) is None:
            self.discard_part(part)
            return 0
        return rows

    def discard_part(self, part: str) -> None:
        """Delete an uncommitted part; one the log names (a commit whose reply was lost) is kept."""
        try:
            if part not in set.union(*self._parts(self._entries())):
                self.fs.rm(self._key(f"{PARTS_DIR}/{part}"), recursive=True)
        except (OSError, ValueError):
            pass  # best effort: an uncommitted part is never read

    def orphan_parts(self) -> list[str]:
        return []  # a part is committed exactly when the log names it

    def stale_writes(self) -> list[str]:
        committed, retracted = self._parts(self._entries())
        horizon = time.time() - STALE_WRITE_SECONDS
        return sorted(name for name in self._list(PARTS_DIR) if name not in committed | retracted
                      and _write_time(name) is not None and _write_time(name) < horizon)

    def remove_stale(self, name: str) -> None:
        self.discard_part(name)

    def quarantine(self, part: str) -> None:
        self._append(lambda: {"retract": part})


def open_backend(location: str | os.PathLike) -> Backend:
    """The backend for a directory path or an fsspec URL such as ``s3://bucket/prefix``."""
    text = os.fspath(location)
    if "://" in text and not text.startswith("file://"):
        return FsspecBackend(text)
    return LocalBackend(Path(text.removeprefix("file://")))


def new_name() -> str:
    """A unique, time-ordered name for a part or a file: ``<time_ns>-<pid>-<random>``."""
    return f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def reason(err: BaseException) -> str:
    """The one-line cause of an I/O error."""
    return (getattr(err, "strerror", None) or str(err) or type(err).__name__).splitlines()[0]


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _writer_alive(name: str) -> bool:
    """Is the local writer process named in a staging name still running?"""
    fields = name.split("-")
    if len(fields) < 3 or not fields[1].isdigit():
        return False
    try:
        os.kill(int(fields[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


