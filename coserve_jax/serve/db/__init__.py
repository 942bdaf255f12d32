"""The server's state in a database (SQLAlchemy; SQLite by default, PostgreSQL or any SQLAlchemy
URL for larger deployments), its schema under Alembic migrations."""

from coserve_jax.serve.db.database import Database, sqlite_url
from coserve_jax.serve.db import schema

__all__ = ["Database", "schema", "sqlite_url"]
