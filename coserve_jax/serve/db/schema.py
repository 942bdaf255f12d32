"""The server's tables (SQLAlchemy 2.0 declarative models): what a user made lives here.

Every row a user makes carries its ``project`` (the tenant its API key belongs to); another
project never sees it. Times are Unix seconds (int, as OpenAI's objects report them). Bytes of
uploaded files and adapter / checkpoint tensors stay on disk under the output directory; the rows
say where.

The schema changes only through an Alembic revision under ``migrations/versions`` (the server
upgrades a database to the newest revision at start-up).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """Declarative base of the server's tables."""


class ApiKey(Base):
    """An API key: only its SHA-256 is stored. ``revoked_at`` set: refused."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    project: Mapped[str] = mapped_column(String(256), index=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    name: Mapped[str | None] = mapped_column(String(256), nullable=True)
    created_at: Mapped[int] = mapped_column(Integer)
    revoked_at: Mapped[int | None] = mapped_column(Integer, nullable=True)


class File(Base):
    """An uploaded file (OpenAI's file object); its bytes are ``<output_dir>/files/<id>``."""

    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(256), index=True)
    filename: Mapped[str] = mapped_column(Text)
    purpose: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32), default="processed")


class Job(Base):
    """A fine-tuning job: OpenAI's job object, the settings it was created with, and its progress."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(256), index=True)
    model: Mapped[str] = mapped_column(Text)
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    fine_tuned_model: Mapped[str] = mapped_column(Text, unique=True)
    status: Mapped[str] = mapped_column(String(32), index=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(Integer)
    suffix: Mapped[str | None] = mapped_column(Text, nullable=True)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    created_at: Mapped[int] = mapped_column(Integer)
    finished_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    adapter_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    trained_tokens: Mapped[int] = mapped_column(Integer, default=0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tokens_per_second: Mapped[float] = mapped_column(Float, default=0.0)
    valid_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    truncated_examples: Mapped[int] = mapped_column(Integer, default=0)
    skipped_examples: Mapped[int] = mapped_column(Integer, default=0)


class JobEvent(Base):
    """One event of a job (``GET /v1/fine_tuning/jobs/{id}/events``), ``seq`` counting from 0."""

    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(Integer)
    level: Mapped[str] = mapped_column(String(16))
    type: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[Any] = mapped_column(JSON, nullable=True)


class Checkpoint(Base):
    """A job's saved checkpoint (orbax, on disk at ``path``) with the metrics of its step."""

    __tablename__ = "checkpoints"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    valid_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    path: Mapped[str] = mapped_column(Text)


class Adapter(Base):
    """An adapter loaded through the API (``POST /v1/load_lora_adapter``), loaded again at start-up."""

    __tablename__ = "adapters"
    name: Mapped[str] = mapped_column(String(512), primary_key=True)
    project: Mapped[str] = mapped_column(String(256), index=True)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(Integer)


class TinkerRun(Base):
    """A Tinker training run (``create_model``): a LoRA trained by its project's calls. Its
    engine state (weights being trained, optimizer state) lives in the engine until the run
    closes; its saved weights are :class:`TinkerCheckpoint` rows."""

    __tablename__ = "tinker_runs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(256), index=True)
    session_id: Mapped[str] = mapped_column(String(64))
    base_model: Mapped[str] = mapped_column(Text)
    rank: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    train_attn: Mapped[bool] = mapped_column(Boolean)
    train_mlp: Mapped[bool] = mapped_column(Boolean)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    created_at: Mapped[int] = mapped_column(Integer)
    last_request_at: Mapped[int] = mapped_column(Integer)
    closed_at: Mapped[int | None] = mapped_column(Integer, nullable=True)


class TinkerCheckpoint(Base):
    """Weights a Tinker run saved (``kind``: ``sampler_weights`` or ``external_weights``), a PEFT
    directory at ``path``; its ``tinker://<run>/<kind>/<name>`` path names it."""

    __tablename__ = "tinker_checkpoints"
    run_id: Mapped[str] = mapped_column(ForeignKey("tinker_runs.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(Integer)
