"""Where a study lives, and the two things workers must agree on: who is alive, and how many trials to start.

- A **journal file** (the default, ``results/sweeps/<study>/journal.log``): Optuna's ``JournalStorage`` on a
  ``JournalFileBackend``, safe for many processes on one node (and on a shared filesystem with working
  locks). Optuna 5 gives journal storages no heartbeat, so ``HeartbeatJournalStorage`` adds one: a running
  trial writes its time into the journal every ``heartbeat.interval`` seconds.
- A **database**: ``postgresql://...`` for many nodes (``sqlite:///FILE`` also works on one node), Optuna's
  ``RDBStorage`` with its own heartbeat. ``postgresql://`` means whichever driver is installed (psycopg 3,
  else psycopg2).

Either way a trial whose heartbeat stops for ``heartbeat.grace`` seconds (its worker was killed) is marked
failed by the next worker that looks, and ``RetryHeartbeatStaleTrialCallback`` queues it again with the
same parameters.

**Budget lock.** Several workers must never start more trials than the study asks for, so "count the trials,
then ask for one" runs under a lock: ``flock`` on a file beside a journal or SQLite file, a PostgreSQL
advisory lock on a database. Both are released by the kernel or the server when their holder dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.storages import BaseStorage, JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from experiments.sweeps.space import SweepError

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.log"
HEARTBEAT_ATTR = "tlit:heartbeat"
CONNECT_TIMEOUT_S = 5
LOCK_SUFFIX = ".tlit.lock"


class StorageError(SweepError):
    """A storage URL that cannot be used: unknown scheme, unwritable folder, unreachable server."""


@dataclass(frozen=True)
class Storage:
    """A parsed ``--storage`` value.

    Attributes:
        kind: ``journal``, ``sqlite`` or ``postgresql``.
        url: What Optuna gets: a file path for a journal, an SQLAlchemy URL (driver added) for a database.
        path: The file of a journal or SQLite storage (its lock lives beside it).
    """

    kind: Literal["journal", "sqlite", "postgresql"]
    url: str
    path: Path | None = None

    def __str__(self) -> str:
        if self.kind == "journal":
            return str(self.url)
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)


def default_storage(sweeps_root: str | Path, study: str) -> str:
    return str(Path(sweeps_root) / study / JOURNAL_NAME)


def parse_storage(text: str) -> Storage:
    """A journal file path, ``sqlite:///FILE`` or ``postgresql://...``, else a one-line StorageError."""
    if "://" not in text:
        return Storage("journal", text, Path(text))
    scheme, _, rest = text.partition("://")
    base = scheme.split("+", 1)[0].lower()
    if base == "sqlite":
        from sqlalchemy.engine import make_url

        database = make_url(text).database
        if not database or database == ":memory:":
            raise StorageError(
                f"--storage {text}: an in-memory SQLite database cannot be shared; give a file"
            )
        return Storage("sqlite", text, Path(database))
    if base in ("postgresql", "postgres"):
        if "+" not in scheme:
            driver = "psycopg" if importlib.util.find_spec("psycopg") else "psycopg2"
            scheme = f"postgresql+{driver}"
        return Storage("postgresql", f"{scheme}://{rest}")
    raise StorageError(
        f"--storage: unknown scheme {scheme!r}; use a journal file path, sqlite:///FILE or "
        "postgresql://USER@HOST/DB"
    )


def check_storage(storage: Storage, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast, before any trial, on a folder we cannot write or a database we cannot reach."""
    if storage.path is not None:
        folder = storage.path.resolve().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"--storage {storage}: cannot create {folder}: {err.strerror}") from None
        if not os.access(folder, os.W_OK) or (storage.path.exists() and not os.access(storage.path, os.W_OK)):
            raise StorageError(f"--storage {storage}: not writable")
        return
    try:
        with _engine(storage.url, timeout).connect() as conn:
            import sqlalchemy

            conn.execute(sqlalchemy.text("SELECT 1"))
    except Exception as err:  # driver errors have no common base worth naming
        first = " ".join(str(err).split("\n")[0].split())
        raise StorageError(f"--storage {storage}: cannot connect: {first}") from None


_ENGINES: dict[str, Any] = {}


def _engine(url: str, timeout: float = CONNECT_TIMEOUT_S) -> Any:
    """One small SQLAlchemy engine per URL for our own statements (connect check, advisory lock)."""
    if url not in _ENGINES:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        args = {"connect_timeout": max(2, int(timeout))} if url.startswith("postgresql") else {}
        _ENGINES[url] = sqlalchemy.create_engine(url, poolclass=NullPool, connect_args=args)
    return _ENGINES[url]


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha1(f"tlit-sweep:{name}".encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def budget_lock(storage: Storage, name: str) -> Iterator[None]:
    """Exclusive between every process using ``storage`` under ``name`` (a study name, or "schema")."""
    if storage.path is not None:
        lock_path = storage.path.with_name(storage.path.name + LOCK_SUFFIX)
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock
        return
    import sqlalchemy

    key = _lock_key(name)
    with _engine(storage.url).connect() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})


# ----------------------------------------------------------------------------------------------------------
# Opening, with heartbeats


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal storage with Optuna's heartbeat protocol (which Optuna 5 implements only for databases).

    A heartbeat is a trial system attribute holding the writer's clock: fine on one node; across nodes the
    clocks must agree to within the grace period. A running trial that never beat is judged by its start.
    """

    def __init__(
        self,
        backend: JournalFileBackend,
        *,
        heartbeat_interval: int,
        grace_period: int,
        stale_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    ) -> None:
        super().__init__(backend)
        self._heartbeat_interval = heartbeat_interval
        self._grace_period = grace_period
        self._stale_callback = stale_callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = t.system_attrs.get(HEARTBEAT_ATTR)
            if beat is None and t.datetime_start is not None:
                beat = t.datetime_start.timestamp()
            if beat is not None and now - float(beat) > self._grace_period:
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._stale_callback


def open_storage(
    storage: Storage, *, heartbeat_interval: int, grace_period: int, retries: int
) -> BaseStorage:
    """An Optuna storage with heartbeats; a trial of a dead worker is retried up to ``retries`` times."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=retries, inherit_intermediate_values=True)
        if storage.kind == "journal":
            assert storage.path is not None
            storage.path.parent.mkdir(parents=True, exist_ok=True)
            return HeartbeatJournalStorage(
                JournalFileBackend(str(storage.path)),
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                stale_callback=retry,
            )
        engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if storage.kind == "postgresql":
            engine_kwargs["connect_args"] = {"connect_timeout": 10}
        with budget_lock(storage, "schema"):  # two processes creating the tables at once collide
            return optuna.storages.RDBStorage(
                storage.url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=retry,
            )


def heartbeat_ages(study: optuna.Study) -> dict[int, float]:
    """Seconds since each running trial's last heartbeat (its start if it never beat), by trial number;
    empty when the storage keeps no heartbeats or cannot say."""
    storage = study._storage
    now = time.time()
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if isinstance(storage, HeartbeatJournalStorage):
        ages = {}
        for t in running:
            beat = t.system_attrs.get(HEARTBEAT_ATTR)
            if beat is None and t.datetime_start is not None:
                beat = t.datetime_start.timestamp()
            if beat is not None:
                ages[t.number] = now - float(beat)
        return ages
    try:  # RDBStorage: its heartbeats table, read against the database's clock as Optuna does
        import sqlalchemy
        from optuna.storages._rdb import models

        rdb = getattr(storage, "_backend", storage)  # optuna wraps an RDBStorage in a _CachedStorage
        with rdb.scoped_session() as session:
            db_now = session.execute(sqlalchemy.func.now()).scalar().replace(tzinfo=None)
            beats = {
                row.trial_id: row.heartbeat
                for row in session.query(models.TrialHeartbeatModel).filter(
                    models.TrialHeartbeatModel.trial_id.in_([t._trial_id for t in running])
                )
            }
        return {
            t.number: (db_now - beats[t._trial_id]).total_seconds() for t in running if t._trial_id in beats
        }
    except Exception:  # another storage, or the database went away: no detail, nothing breaks
        log.debug("no heartbeat ages", exc_info=True)
        return {}


def grace_period(study: optuna.Study) -> float | None:
    """Seconds without heartbeat after which a running trial is failed (and retried)."""
    storage = study._storage
    rdb = getattr(storage, "_backend", storage)
    grace = getattr(storage, "_grace_period", None) or getattr(rdb, "grace_period", None)
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    return float(grace) if grace else (2.0 * interval if interval else None)


def fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's ``fail_stale_trials`` without its experimental warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
