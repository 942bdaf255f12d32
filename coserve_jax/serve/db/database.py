"""The server's database: a SQLAlchemy engine, its schema kept at the newest Alembic revision,
and transactions.

SQLite in the output directory by default (``sqlite:///<output_dir>/coserve.db``; WAL journal,
``synchronous=FULL``, a busy timeout, foreign keys on), or any SQLAlchemy URL
(``postgresql+psycopg://user@host/db``) for a deployment that outgrows one process or machine.
A write is one transaction: a crash at any point leaves the old state or the new one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Iterator

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine as SAEngine, make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("coserve_jax.serve.db")

MIGRATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")


def sqlite_url(path: str | os.PathLike) -> str:
    """The SQLAlchemy URL of a SQLite file."""
    return f"sqlite:///{os.path.abspath(os.fspath(path))}"


class Database:
    """One database, upgraded to the newest schema on open.

    Args:
        url: a SQLAlchemy URL (``sqlite:///path``, ``postgresql+psycopg://...``); a plain
            ``postgresql://`` URL uses psycopg 3.
        upgrade: run the Alembic migrations to ``head`` (default).
    Raises:
        sqlalchemy.exc.ArgumentError: a malformed URL; sqlalchemy.exc.OperationalError: the
        database cannot be reached or opened.
    """

    def __init__(self, url: str, upgrade: bool = True):
        u = make_url(url)
        if u.drivername == "postgresql":
            u = u.set(drivername="postgresql+psycopg")
        self.url = u
        kwargs: dict = {"future": True}
        if u.get_backend_name() == "sqlite":
            if u.database and u.database != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(u.database)), exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: SAEngine = create_engine(u, **kwargs)
        if u.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._lock = threading.Lock()
        if upgrade:
            self.upgrade()

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    def upgrade(self, revision: str = "head") -> None:
        """Bring the schema to ``revision`` (Alembic ``upgrade``); a new database gets every table."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", MIGRATIONS)
        cfg.attributes["connection_engine"] = self.engine
        with self._lock:
            command.upgrade(cfg, revision)

    def revision(self) -> str | None:
        """The schema's current Alembic revision (``None``: none applied)."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def tables(self) -> list[str]:
        """The database's table names."""
        return sorted(inspect(self.engine).get_table_names())

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction: committed when the block ends, rolled back if it raises."""
        with self._sessions() as s, s.begin():
            yield s

    def session(self) -> Session:
        """A session for reads (close it, e.g. ``with db.session() as s:``)."""
        return self._sessions()

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
