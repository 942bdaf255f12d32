"""A throwaway PostgreSQL server for the database tests: ``$COSERVE_TEST_DATABASE_URL`` if set
(an empty database the tests may create databases next to), else a cluster started from the
machine's ``initdb`` / ``pg_ctl`` (Debian's ``postgresql`` package) on a Unix socket in a
temporary directory, run as the ``postgres`` user when the tests run as root. ``None`` (with the
reason) where neither is possible."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from typing import Iterator


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@contextlib.contextmanager
def postgres_server() -> Iterator[tuple[str | None, str]]:
    """Yields ``(SQLAlchemy URL of the server's admin database, "")`` or ``(None, why not)``."""
    url = os.environ.get("COSERVE_TEST_DATABASE_URL")
    if url:
        yield url, ""
        return
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb is None or pg_ctl is None:
        yield None, "no PostgreSQL: initdb/pg_ctl not on PATH (Debian's postgresql package) and COSERVE_TEST_DATABASE_URL unset"
        return
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            yield None, "no PostgreSQL: running as root and there is no 'postgres' user to run the server as"
            return
    root = tempfile.mkdtemp(prefix="coserve-pg-")
    data = os.path.join(root, "data")
    os.chmod(root, 0o755)
    if os.geteuid() == 0:
        os.chown(root, pw.pw_uid, pw.pw_gid)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = False
    try:
        r = subprocess.run(_as_postgres([initdb, "-D", data, "-A", "trust", "-U", "coserve", "--no-sync"]),
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            yield None, f"no PostgreSQL: initdb failed: {r.stderr.strip()[-300:]}"
            return
        opts = f"-k {root} -p {port} -c listen_addresses='' -c fsync=off"
        r = subprocess.run(_as_postgres([pg_ctl, "-D", data, "-o", opts, "-l", os.path.join(root, "log"), "-w", "start"]),
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            yield None, f"no PostgreSQL: pg_ctl start failed: {r.stderr.strip()[-300:]}"
            return
        started = True
        yield f"postgresql+psycopg://coserve@/postgres?host={root}&port={port}", ""
    finally:
        if started:
            subprocess.run(_as_postgres([pg_ctl, "-D", data, "-m", "immediate", "stop"]), capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(admin_url: str) -> str:
    """Create an empty database on the server of ``admin_url``; returns its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"t_{uuid.uuid4().hex[:12]}"
    eng = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)
