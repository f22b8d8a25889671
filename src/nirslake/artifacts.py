"""Content-addressed objects: serialise fitted objects, store them once by sha256, load them verified.

Loading a pickle runs code: objects are checked against their hash before they are unpickled.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from typing import Any

from .storage import Storage

OBJECTS_DIR = "objects"


class ArtifactIntegrityError(ValueError):
    """An object's bytes do not match the sha256 it was stored under."""


def object_path(content_hash: str) -> str:
    """``objects/ab/abcdef…``: fan out by the first byte so no folder grows huge."""
    return f"{OBJECTS_DIR}/{content_hash[:2]}/{content_hash}"


def _require(module: str, fmt: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise ValueError(f"artifact format {fmt!r} needs the {module!r} package: pip install {module}") from exc


def serialize(obj: Any, fmt: str) -> bytes:
    if fmt == "pickle":
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    if fmt == "joblib":
        joblib = _require("joblib", fmt)
        buf = io.BytesIO()
        joblib.dump(obj, buf)
        return buf.getvalue()
    if fmt == "cloudpickle":
        return _require("cloudpickle", fmt).dumps(obj)
    raise ValueError(f"unknown artifact format {fmt!r}: use 'joblib', 'pickle' or 'cloudpickle'")


def deserialize(data: bytes, fmt: str) -> Any:
    if fmt == "joblib":
        return _require("joblib", fmt).load(io.BytesIO(data))
    if fmt in ("pickle", "cloudpickle"):
        # cloudpickle output is a standard pickle stream; loading needs only pickle.
        return pickle.loads(data)
    raise ValueError(f"unknown artifact format {fmt!r}: cannot load it")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_object(storage: Storage, data: bytes) -> tuple[str, str]:
    """Store ``data`` under its hash, once; returns (hash, relative path).

    An existing object gets a fresh modification time (lake spec §7): ``gc_artifacts`` keeps
    objects touched within its grace period, so a writer that saves an object another process
    is about to collect keeps it. On object stores the PUT itself refreshes it.
    """
    digest = sha256(data)
    rel = object_path(digest)
    if storage.is_local and storage.exists(rel):
        storage.touch(rel)
    else:
        storage.publish(rel, data, overwrite=not storage.is_local)
    return digest, rel


def is_external(path: str) -> bool:
    """True for a registered artifact's own path (absolute or a URL), not one under the workspace."""
    return os.path.isabs(path) or "://" in path


def read_verified(storage: Storage, rel_or_abs: str, content_hash: str) -> bytes:
    """The object's bytes, after checking they still hash to ``content_hash``."""
    if is_external(rel_or_abs):
        with storage.fs.open(rel_or_abs, "rb") as fh:
            data = fh.read()
    else:
        data = storage.read_bytes(rel_or_abs)
    actual = sha256(data)
    if actual != content_hash:
        raise ArtifactIntegrityError(
            f"artifact object {rel_or_abs} is corrupt: sha256 mismatch "
            f"(expected {content_hash}, found {actual}); it was not unpickled"
        )
    return data
