"""API keys and projects (tenants).

Every key belongs to a project; what a request makes (files, fine-tuning jobs and their models,
adapters it loads) belongs to the key's project, and another project sees none of it: its ids
answer 404, as OpenAI answers for another organization's objects. An admin key may also load
adapters from anywhere the server can read (others only under ``--lora-root``) and what it loads
is shared with every project, like the base model and the ``lora_modules`` of the config.

Where keys come from, all at once:

* ``--api-key KEY`` (or ``$COSERVE_API_KEY``): one admin key of project ``default``;
* ``--api-keys-file FILE``: a YAML or JSON list of ``{key, project, admin}``;
* the database's ``api_keys`` table, managed with ``python -m coserve_jax.serve.keys``
  (only each key's SHA-256 is stored; a revoked key is refused at once).

With none of them the server is open: every request is an admin of project ``default``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import threading
import time

from sqlalchemy import select

from coserve_jax.configfile import ConfigError
from coserve_jax.serve.db import Database
from coserve_jax.serve.db.schema import ApiKey

DEFAULT_PROJECT = "default"
"""The project of ``--api-key``, of an open server, and of what was made before projects existed."""
SHARED = "*"
"""The owner of what every project may use (the base model, adapters an admin loaded)."""


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a request is: its key's project, whether the key is an admin key, and the key's id."""

    project: str
    admin: bool = False
    key_id: str | None = None

    def sees(self, owner: str) -> bool:
        """Whether something owned by ``owner`` (a project, or :data:`SHARED`) is visible."""
        return owner == SHARED or owner == self.project


OPEN = Principal(DEFAULT_PROJECT, admin=True)


def hash_key(key: str) -> str:
    """The SHA-256 (hex) under which a key is stored and looked up."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> str:
    """A new random API key (``sk-cj-`` and 43 URL-safe characters, 256 bits)."""
    return "sk-cj-" + secrets.token_urlsafe(32)


def _check_project(project) -> str:
    if not isinstance(project, str) or not project or project == SHARED or len(project) > 256:
        raise ConfigError(f"a project is a non-empty string of at most 256 characters other than {SHARED!r}, got {project!r}")
    return project


def read_keys_file(path: str | os.PathLike) -> dict[str, Principal]:
    """``{sha256: Principal}`` of an API keys file: a YAML (or JSON) list of
    ``{key: str, project: str, admin: bool = false}``.

    Raises:
        FileNotFoundError: no such file. ConfigError: not a list of such entries, or a key twice.
    """
    import yaml

    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not YAML or JSON: {e}") from None
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a list of {{key, project, admin}} entries")
    out: dict[str, Principal] = {}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or set(entry) - {"key", "project", "admin"} or "key" not in entry or "project" not in entry:
            raise ConfigError(f"{path}: entry {i}: expected {{key, project, admin}}, got {entry!r}")
        key, admin = entry["key"], entry.get("admin", False)
        if not isinstance(key, str) or len(key) < 8:
            raise ConfigError(f"{path}: entry {i}: key must be a string of at least 8 characters")
        if not isinstance(admin, bool):
            raise ConfigError(f"{path}: entry {i}: admin must be true or false")
        h = hash_key(key)
        if h in out:
            raise ConfigError(f"{path}: entry {i}: the same key appears twice")
        out[h] = Principal(_check_project(entry["project"]), admin, f"file:{i}")
    return out


class KeyRing:
    """Looks up a request's key.

    Args:
        static: ``{sha256: Principal}`` from ``--api-key`` and ``--api-keys-file``.
        db: the database whose ``api_keys`` are looked up too (``None``: not).
    """

    def __init__(self, static: dict[str, Principal], db: Database | None = None):
        self.static = dict(static)
        self.db = db
        self._lock = threading.Lock()
        self._db_has_keys: tuple[float, bool] = (0.0, False)

    @property
    def required(self) -> bool:
        """Whether requests need a key (any key is configured; database keys re-checked every 2 s)."""
        if self.static:
            return True
        if self.db is None:
            return False
        with self._lock:
            at, has = self._db_has_keys
            if time.monotonic() - at > 2.0:
                with self.db.session() as s:
                    has = s.scalars(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)).first() is not None
                self._db_has_keys = (time.monotonic(), has)
        return has

    def authenticate(self, token: str) -> Principal | None:
        """The principal of ``token``, or ``None`` for an unknown or revoked key."""
        h = hash_key(token)
        for known, p in self.static.items():
            if hmac.compare_digest(known, h):
                return p
        if self.db is None:
            return None
        with self.db.session() as s:
            row = s.scalars(select(ApiKey).where(ApiKey.key_sha256 == h)).first()
        if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_sha256, h):
            return None
        return Principal(row.project, row.admin, row.id)


def create_key(db: Database, project: str, admin: bool = False, name: str | None = None) -> tuple[str, str]:
    """Store a new key for ``project``; returns ``(key id, the key)`` (the key is not stored)."""
    _check_project(project)
    key = new_key()
    key_id = "key-" + secrets.token_hex(8)
    with db.transaction() as s:
        s.add(ApiKey(id=key_id, key_sha256=hash_key(key), project=project, admin=admin, name=name, created_at=int(time.time())))
    return key_id, key


def revoke_key(db: Database, key_id: str) -> bool:
    """Revoke a stored key (by id); returns whether it existed and was not already revoked."""
    with db.transaction() as s:
        row = s.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            return False
        row.revoked_at = int(time.time())
        return True


def list_keys(db: Database) -> list[dict]:
    """Every stored key's id, project, admin flag, name and times (never the key)."""
    with db.session() as s:
        rows = list(s.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)))
    return [{"id": r.id, "project": r.project, "admin": r.admin, "name": r.name, "created_at": r.created_at,
             "revoked_at": r.revoked_at} for r in rows]


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2)
