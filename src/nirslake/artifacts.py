"""Content-addressed objects: serialise fitted objects, store them once by sha256, load them verified.

Loading a pickle runs code: objects are checked against their hash before they are deserialised,
and the ``npz`` format holds plain numpy arrays that load without pickle.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from typing import Any

import fsspec
import numpy as np

from .storage import Storage

OBJECTS_DIR = "objects"
FORMATS = ("joblib", "pickle", "cloudpickle", "npz")


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
    if fmt == "npz":
        return _npz_bytes(obj)
    raise ValueError(f"unknown artifact format {fmt!r}: use one of {', '.join(map(repr, FORMATS))}")


def deserialize(data: bytes, fmt: str) -> Any:
    if fmt == "joblib":
        return _require("joblib", fmt).load(io.BytesIO(data))
    if fmt in ("pickle", "cloudpickle"):
        # cloudpickle output is a standard pickle stream; loading needs only pickle.
        return pickle.loads(data)
    if fmt == "npz":
        return _npz_load(data)
    raise ValueError(f"unknown artifact format {fmt!r}: cannot load it (known formats: {', '.join(map(repr, FORMATS))})")


def _npz_bytes(obj: Any) -> bytes:
    """An array as ``.npy`` bytes, a dict of arrays and numbers as a ``.npz`` zip of them.

    Written by hand rather than with ``np.savez``, whose zip entries carry the current time:
    equal content must give equal bytes (one object, one id). Keys are sorted for the same reason.
    """
    if isinstance(obj, np.ndarray):
        return _npy_bytes("the array", obj)
    if not isinstance(obj, dict):
        raise TypeError(f"the 'npz' format stores a numpy array or a dict of str -> arrays/numbers, got {type(obj).__name__}")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(obj, key=str):
            value = obj[key]
            if not isinstance(key, str) or not key:
                raise TypeError(f"the 'npz' format needs non-empty str keys, got {key!r}")
            if isinstance(value, (bool, int, float, complex, np.number, np.bool_)):
                value = np.asarray(value)
            elif not isinstance(value, np.ndarray):
                raise TypeError(f"the 'npz' format stores arrays and numbers only; {key!r} is a {type(value).__name__}")
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), _npy_bytes(repr(key), value))
    return buf.getvalue()


def _npy_bytes(label: str, array: np.ndarray) -> bytes:
    if array.dtype.hasobject:
        raise TypeError(
            f"the 'npz' format refuses object arrays ({label} has dtype {array.dtype}): loading one needs pickle; "
            "convert it to a numeric or string dtype, or use format 'joblib'"
        )
    buf = io.BytesIO()
    # C order always: a Fortran-ordered copy of equal values must give equal bytes.
    np.lib.format.write_array(buf, np.require(array, requirements="C"), allow_pickle=False)
    return buf.getvalue()


def _npz_load(data: bytes) -> Any:
    """The array, or the dict (numbers back as numpy scalars); never unpickles."""
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            arrays = {name: loaded[name] for name in loaded.files}
        return {name: a[()] if a.ndim == 0 else a for name, a in arrays.items()}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise ValueError(f"refused to load an 'npz' artifact holding object arrays (they need pickle): {exc}") from None
        raise


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
    if storage.is_local:
        try:
            storage.touch(rel)
            return digest, rel
        except FileNotFoundError:
            pass  # new, or a concurrent gc removed it this instant: write the bytes (again)
    storage.publish(rel, data, overwrite=not storage.is_local)
    return digest, rel


def is_external(path: str) -> bool:
    """True for a registered artifact's own path (absolute or a URL), not one under the workspace."""
    return os.path.isabs(path) or "://" in path


def _protocols(storage: Storage) -> tuple[str, ...]:
    proto = storage.fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def read_verified(storage: Storage, rel_or_abs: str, content_hash: str) -> bytes:
    """The object's bytes, after checking they still hash to ``content_hash``."""
    if is_external(rel_or_abs):
        # A registered file's own place: a local path, or a URL (the workspace's options apply
        # to URLs of the workspace's own protocol).
        if "://" not in rel_or_abs:
            with open(rel_or_abs, "rb") as fh:
                data = fh.read()
        else:
            same = rel_or_abs.split("://", 1)[0] in (storage.protocol, *_protocols(storage))
            fs = storage.fs if same else fsspec.core.url_to_fs(rel_or_abs)[0]
            with fs.open(rel_or_abs, "rb") as fh:
                data = fh.read()
    else:
        data = storage.read_bytes(rel_or_abs)
    actual = sha256(data)
    if actual != content_hash:
        raise ArtifactIntegrityError(
            f"artifact object {rel_or_abs} is corrupt: sha256 mismatch "
            f"(expected {content_hash}, found {actual}); it was not deserialised"
        )
    return data
