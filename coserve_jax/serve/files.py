"""Uploaded files (``/v1/files``): training data on local disk, OpenAI's file objects.

A file's bytes live as ``<dir>/<file_id>``, its OpenAI file object as a row of the server's
database (:class:`~coserve_jax.serve.db.schema.File`, with the project that uploaded it). The
bytes are written to a temporary name, flushed to disk and renamed into place before the row is
committed, so a crash never leaves a file object whose bytes are missing or half-written; at
start-up, bytes without a row (a crash between the two) and temporary files are removed, and the
``<file_id>.json`` metadata of earlier versions is moved into the database. Files of purpose ``fine-tune`` are checked on upload: UTF-8 JSONL (or a JSON list)
of JSON objects; every bad line is reported with its number. Whether the records hold a known
training format is checked when a job is created (that depends on the job's settings).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid

from sqlalchemy import select

from coserve_jax.finetune.data import DataValidationError, read_records
from coserve_jax.serve.auth import DEFAULT_PROJECT
from coserve_jax.serve.db import Database
from coserve_jax.serve.db.schema import File
from coserve_jax.serve.errors import APIError

log = logging.getLogger("coserve_jax.serve")

PURPOSES = ("fine-tune",)
_ID = re.compile(r"^file-[0-9a-f]{24}$")


def _to_openai(row: File) -> dict:
    return {
        "id": row.id, "object": "file", "bytes": row.bytes, "created_at": row.created_at, "filename": row.filename,
        "purpose": row.purpose, "status": row.status, "status_details": None,
    }


class FileStore:
    """Files under ``directory`` (created if missing), their objects in ``db``. Thread-safe.

    Args:
        directory: where the files' bytes are kept.
        db: the server's :class:`~coserve_jax.serve.db.Database`.
    """

    def __init__(self, directory: str | os.PathLike, db: Database):
        self.directory = os.path.abspath(os.fspath(directory))
        self.db = db
        os.makedirs(self.directory, exist_ok=True)
        self._recover()

    def _recover(self) -> None:
        """Import earlier versions' JSON metadata; drop temporary files and bytes without a row."""
        names = sorted(os.listdir(self.directory))
        with self.db.transaction() as s:
            known = set(s.scalars(select(File.id)))
            for name in names:
                file_id = name.removesuffix(".json")
                if name.endswith(".json") and _ID.match(file_id) and file_id not in known:
                    try:
                        with open(os.path.join(self.directory, name)) as f:
                            obj = json.load(f)
                    except (OSError, json.JSONDecodeError):
                        continue
                    if os.path.isfile(self.path(file_id)):
                        s.add(File(id=file_id, project=DEFAULT_PROJECT, filename=str(obj.get("filename", file_id)),
                                   purpose=str(obj.get("purpose", "fine-tune")), bytes=int(obj.get("bytes", 0)),
                                   created_at=int(obj.get("created_at", 0)), status="processed"))
                        known.add(file_id)
        for name in names:
            path = os.path.join(self.directory, name)
            file_id = name.removesuffix(".json")
            stale = name.startswith(".") and name.endswith(".tmp")
            orphan = _ID.match(name) is not None and name not in known
            imported = name.endswith(".json") and file_id in known
            if stale or orphan or imported:
                try:
                    os.unlink(path)
                    if orphan:
                        log.warning("removed %s: its upload did not complete", path)
                except OSError:
                    pass

    def path(self, file_id: str) -> str:
        """The local path of a file's bytes."""
        return os.path.join(self.directory, file_id)

    def create(self, data, filename: str, purpose: str, project: str = DEFAULT_PROJECT) -> dict:
        """Store an upload and return its file object.

        Args:
            data: the bytes, or a binary file object read in 1 MiB chunks (an upload is copied
                to disk as it is read, never held in memory whole).
        Raises:
            APIError: 400 for an unsupported purpose or (``fine-tune``) a file that is not JSONL
                of objects, with every bad line's number; the temporary copy is removed whatever
                goes wrong.
        """
        if purpose not in PURPOSES:
            raise APIError(400, f"purpose {purpose!r} is not supported; use one of {list(PURPOSES)}", "purpose", "invalid_value")
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        tmp = os.path.join(self.directory, f".{file_id}.tmp")
        try:
            size = 0
            with open(tmp, "wb") as f:
                if isinstance(data, (bytes, bytearray, memoryview)):
                    f.write(data)
                    size = len(data)
                else:
                    while chunk := data.read(1 << 20):
                        f.write(chunk)
                        size += len(chunk)
                f.flush()
                os.fsync(f.fileno())
            self._validate(tmp, filename)
            row = File(id=file_id, project=project, filename=filename, purpose=purpose, bytes=size,
                       created_at=int(time.time()), status="processed")
            os.replace(tmp, self.path(file_id))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        try:
            with self.db.transaction() as s:
                s.add(row)
        except BaseException:
            os.unlink(self.path(file_id))
            raise
        return _to_openai(row)
    @staticmethod
    def _validate(path: str, filename: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                f.read()
        except UnicodeDecodeError as e:
            raise APIError(400, f"{filename}: not UTF-8 text (byte {e.start})", "file", "invalid_file") from None
        try:
            records = read_records(path)
        except DataValidationError as e:
            raise APIError(400, str(DataValidationError(filename, e.errors)), "file", "invalid_file") from None
        except RecursionError:
            raise APIError(400, f"{filename}: a record is nested too deeply", "file", "invalid_file") from None
        errors = []
        for line, rec in records:
            if isinstance(rec, DataValidationError):
                errors.extend(rec.errors)
            elif not isinstance(rec, dict):
                errors.append((line, f"a record must be a JSON object, got {type(rec).__name__}"))
        if not records:
            errors.append((1, "the file holds no records"))
        if errors:
            raise APIError(400, str(DataValidationError(filename, errors)), "file", "invalid_file")

    def get(self, file_id: str, project: str | None = None) -> dict:
        """A file object (``project``: only that project's; ``None``: any).

        Raises:
            APIError: 404 for an unknown id or another project's file.
        """
        with self.db.session() as s:
            row = s.get(File, file_id)
        if row is None or (project is not None and row.project != project):
            raise APIError(404, f"No such File object: {file_id}", "file_id", "file_not_found")
        return _to_openai(row)

    def list(self, project: str | None = None) -> list[dict]:
        """Every file object of ``project`` (``None``: all), newest first."""
        q = select(File).order_by(File.created_at.desc(), File.id.desc())
        if project is not None:
            q = q.where(File.project == project)
        with self.db.session() as s:
            return [_to_openai(r) for r in s.scalars(q)]

    def delete(self, file_id: str, project: str | None = None) -> dict:
        """Remove a file (its row first, then its bytes).

        Raises:
            APIError: 404 for an unknown id or another project's file.
        """
        self.get(file_id, project)
        with self.db.transaction() as s:
            row = s.get(File, file_id)
            if row is not None:
                s.delete(row)
        try:
            os.unlink(self.path(file_id))
        except FileNotFoundError:
            pass
        return {"id": file_id, "object": "file", "deleted": True}
