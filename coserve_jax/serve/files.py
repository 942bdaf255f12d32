"""Uploaded files (``/v1/files``): training data on local disk, OpenAI's file objects.

A file lives as ``<dir>/<file_id>`` (the bytes) beside ``<dir>/<file_id>.json`` (its OpenAI file
object); both are written to a temporary name and renamed into place, so a crash never leaves a
half-written file that a job could train on. Files survive a restart (the directory is read at
start-up). Files of purpose ``fine-tune`` are checked on upload: UTF-8 JSONL (or a JSON list)
of JSON objects; every bad line is reported with its number. Whether the records hold a known
training format is checked when a job is created (that depends on the job's settings).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid

from coserve_jax.finetune.data import DataValidationError, read_records
from coserve_jax.serve.errors import APIError

PURPOSES = ("fine-tune",)
_ID = re.compile(r"^file-[0-9a-f]{24}$")


class FileStore:
    """Files under ``directory`` (created if missing). Thread-safe.

    Args:
        directory: where files and their metadata are kept.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.path.abspath(os.fspath(directory))
        os.makedirs(self.directory, exist_ok=True)
        self._lock = threading.Lock()
        self._files: dict[str, dict] = {}
        for name in sorted(os.listdir(self.directory)):
            if _ID.match(name.removesuffix(".json")) and name.endswith(".json"):
                try:
                    with open(os.path.join(self.directory, name)) as f:
                        obj = json.load(f)
                except (OSError, json.JSONDecodeError):
                    continue
                if os.path.isfile(self.path(obj["id"])):
                    self._files[obj["id"]] = obj

    def path(self, file_id: str) -> str:
        """The local path of a file's bytes."""
        return os.path.join(self.directory, file_id)

    def create(self, data: bytes, filename: str, purpose: str) -> dict:
        """Store an upload and return its file object.

        Raises:
            APIError: 400 for an unsupported purpose or (``fine-tune``) a file that is not JSONL
                of objects, with every bad line's number.
        """
        if purpose not in PURPOSES:
            raise APIError(400, f"purpose {purpose!r} is not supported; use one of {list(PURPOSES)}", "purpose", "invalid_value")
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        tmp = os.path.join(self.directory, f".{file_id}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            self._validate(tmp, filename)
        except APIError:
            os.unlink(tmp)
            raise
        obj = {
            "id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
            "filename": filename, "purpose": purpose, "status": "processed", "status_details": None,
        }
        os.replace(tmp, self.path(file_id))
        meta_tmp = os.path.join(self.directory, f".{file_id}.json.tmp")
        with open(meta_tmp, "w") as f:
            json.dump(obj, f)
        os.replace(meta_tmp, self.path(file_id) + ".json")
        with self._lock:
            self._files[file_id] = obj
        return obj

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

    def get(self, file_id: str) -> dict:
        """Raises: APIError 404 for an unknown id."""
        with self._lock:
            obj = self._files.get(file_id)
        if obj is None:
            raise APIError(404, f"No such File object: {file_id}", "file_id", "file_not_found")
        return obj

    def list(self) -> list[dict]:
        """Every file object, newest first."""
        with self._lock:
            return sorted(self._files.values(), key=lambda o: (o["created_at"], o["id"]), reverse=True)

    def delete(self, file_id: str) -> dict:
        """Remove a file. Raises: APIError 404 for an unknown id."""
        self.get(file_id)
        with self._lock:
            self._files.pop(file_id, None)
        for p in (self.path(file_id) + ".json", self.path(file_id)):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        return {"id": file_id, "object": "file", "deleted": True}

