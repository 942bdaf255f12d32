"""Alembic environment of the server's database: run on the engine the server hands over
(``config.attributes["connection_engine"]``), or on ``sqlalchemy.url`` from the command line."""

from alembic import context
from sqlalchemy import engine_from_config, pool

from coserve_jax.serve.db.schema import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    engine = config.attributes.get("connection_engine")
    if engine is None:
        engine = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()


run()
