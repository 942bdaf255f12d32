"""The server's database (SQLAlchemy, Alembic) and the state kept in it, without a server: the
schema migrates to the newest revision, files and jobs round-trip through their rows, and a
crash between writing a file's bytes and its row leaves nothing half-made."""

from __future__ import annotations

import json
import os

import pytest

from coserve_jax.serve.db import Database, schema, sqlite_url
from coserve_jax.serve.errors import APIError
from coserve_jax.serve.files import FileStore
from tests.pg_util import fresh_database, postgres_server

RECORD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n"


@pytest.fixture(scope="module")
def postgres():
    with postgres_server() as (url, why):
        yield url, why


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "coserve.db")
    url, why = request.getfixturevalue("postgres")
    if url is None:
        pytest.skip(why)
    return fresh_database(url)


@pytest.fixture
def db(db_url):
    d = Database(db_url)
    yield d
    d.close()


def test_a_new_database_gets_every_table_at_the_newest_revision(db, db_url):
    assert db.revision() == "0002"
    assert set(db.tables()) == {"alembic_version", *schema.Base.metadata.tables}
    again = Database(db_url)  # opening it again is a no-op
    assert again.revision() == "0002"
    again.close()


def test_the_migrations_build_exactly_the_models_schema(db, db_url):
    """Alembic's autogenerate comparison of the migrated database against the models finds nothing."""
    import sqlalchemy as sa
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), schema.Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_a_failed_transaction_leaves_the_old_state(db):
    with db.transaction() as s:
        s.add(schema.File(id="file-a", project="p", filename="a", purpose="fine-tune", bytes=1, created_at=1))
    with pytest.raises(RuntimeError):
        with db.transaction() as s:
            s.get(schema.File, "file-a").filename = "changed"
            s.add(schema.File(id="file-b", project="p", filename="b", purpose="fine-tune", bytes=1, created_at=2))
            raise RuntimeError("crash in the middle")
    with db.session() as s:
        assert s.get(schema.File, "file-a").filename == "a" and s.get(schema.File, "file-b") is None


def test_files_survive_a_restart_and_belong_to_their_project(db, tmp_path):
    store = FileStore(tmp_path / "files", db)
    a = store.create(RECORD.encode(), "a.jsonl", "fine-tune", project="alpha")
    b = store.create(RECORD.encode(), "b.jsonl", "fine-tune", project="beta")
    again = FileStore(tmp_path / "files", db)
    assert [f["id"] for f in again.list()] == [f["id"] for f in store.list()] and {a["id"], b["id"]} == {f["id"] for f in again.list()}
    assert [f["id"] for f in again.list("alpha")] == [a["id"]]
    assert again.get(a["id"], "alpha") == a
    with pytest.raises(APIError) as e:
        again.get(a["id"], "beta")
    assert e.value.status == 404
    with pytest.raises(APIError):
        again.delete(a["id"], "beta")
    assert again.delete(a["id"], "alpha")["deleted"] and not os.path.exists(again.path(a["id"]))


def test_a_bad_upload_leaves_no_file_and_no_row(db, tmp_path):
    store = FileStore(tmp_path / "files", db)
    with pytest.raises(APIError):
        store.create(b"not json\n", "bad.jsonl", "fine-tune")
    with pytest.raises(APIError) as e:
        store.create(b"[" * 100_000 + b"]" * 100_000 + b"\n", "deep.jsonl", "fine-tune")
    assert e.value.status == 400 and "nested too deeply" in e.value.message
    assert os.listdir(tmp_path / "files") == [] and store.list() == []


def test_crash_between_bytes_and_row_is_cleaned_at_start_up_and_old_metadata_imported(db, tmp_path):
    d = tmp_path / "files"
    d.mkdir()
    (d / ".file-000000000000000000000001.tmp").write_text("half")  # a crash while writing
    (d / "file-000000000000000000000002").write_text(RECORD)  # bytes whose row was never committed
    (d / "file-000000000000000000000003").write_text(RECORD)  # an earlier version's file and metadata
    (d / "file-000000000000000000000003.json").write_text(json.dumps(
        {"id": "file-000000000000000000000003", "object": "file", "bytes": len(RECORD), "created_at": 5,
         "filename": "old.jsonl", "purpose": "fine-tune"}))
    store = FileStore(d, db)
    assert sorted(os.listdir(d)) == ["file-000000000000000000000003"]
    assert [(f["id"], f["filename"], f["created_at"]) for f in store.list()] == [("file-000000000000000000000003", "old.jsonl", 5)]


def test_a_job_record_round_trips_through_its_row(db):
    from coserve_jax.finetune.config import FinetuneConfig, LoRAConfig
    from coserve_jax.serve.jobs import JobManager, JobRecord
    from coserve_jax.serve.config import FinetuneDefaults

    cfg = FinetuneConfig(lora=LoRAConfig(r=4, target_modules=("q_proj", "v_proj")), learning_rate=3e-4, max_steps=7,
                         columns={"prompt": "q", "completion": "a"}, checkpoint_dir="/x/ckpt", seed=9)
    rec = JobRecord(id="ftjob-1", model="m", training_file="file-1", fine_tuned_model="ft:m:ftjob-1", config=cfg,
                    hyperparameters={"n_epochs": 1}, seed=9, suffix=None, metadata={"k": "v"}, created_at=3, examples=None,
                    project="alpha", status="succeeded", finished_at=4, adapter_path="/x/adapter", trained_tokens=100, step=7)
    rec.event("one")
    rec.event("two", level="warn", data={"a": [1, 2]})
    JobManager("m", "/x", FinetuneDefaults(), None, 0, db=db)._save(rec)
    with db.session() as s:
        row = s.get(schema.Job, "ftjob-1")
        events = list(s.query(schema.JobEvent).filter_by(job_id="ftjob-1").order_by(schema.JobEvent.seq))
    back = JobRecord.from_row(row, events)
    assert back.config == cfg and back.events == rec.events
    assert back.to_openai() == rec.to_openai()
