"""Content-addressed objects: serialise fitted objects, store them once by sha256, load them verified.

Loading a pickle runs code: objects are checked against their hash before they are deserialised,
and the ``npz`` format holds plain numpy arrays that load without pickle.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import uuid
import zipfile
from typing import Any, Iterable

import fsspec
import numpy as np

from .journal import unpublished_frames
from .storage import STAGING_DIR, Storage

OBJECTS_DIR = "objects"
FORMATS = ("joblib", "pickle", "cloudpickle", "npz")
_SHA256 = re.compile(r"[0-9a-f]{64}")  # the id of a saved artifact: its hash, its object's name
_NPY_MAGIC = b"\x93NUMPY"  # an array saved alone is .npy bytes; a dict is a zip of them


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
            member = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            if member.filename != f"{key}.npy":
                # The zip format cuts a name at a NUL character: two such keys would load as one.
                raise ValueError(f"the 'npz' format cannot store the key {key!r} as given (a zip member name cannot hold it); rename it")
            zf.writestr(member, _npy_bytes(repr(key), value))
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
    """The array, or the dict (numbers back as numpy scalars); never unpickles.

    The zip members are read here rather than through ``np.load``, whose lookup by name lets
    the member of key ``w`` answer for key ``w.npy``: each member is key + ``.npy``, exactly one
    suffix is stripped.
    """
    try:
        if data.startswith(_NPY_MAGIC):
            return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
        loaded = {}
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for member in zf.namelist():
                if not member.endswith(".npy"):
                    raise ValueError(f"'npz' artifact member {member!r} is not a .npy array; it was not loaded")
                with zf.open(member) as fh:
                    array = np.lib.format.read_array(fh, allow_pickle=False)
                loaded[member[: -len(".npy")]] = array[()] if array.ndim == 0 else array
        return loaded
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise ValueError(f"refused to load an 'npz' artifact holding object arrays (they need pickle): {exc}") from None
        raise


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bare_hash(content_hash: str) -> str:
    """A sha256 hex digest, also when written as nirs4all writes it (``sha256:<hex>``)."""
    return content_hash[7:] if isinstance(content_hash, str) and content_hash.startswith("sha256:") else content_hash


def is_hash(content_hash: object) -> bool:
    """Whether ``content_hash`` is a sha256 digest: 64 lowercase hex, with or without ``sha256:``."""
    return isinstance(content_hash, str) and _SHA256.fullmatch(bare_hash(content_hash)) is not None


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


def refresh_objects(storage: Storage, artifact_ids: Iterable[str]) -> None:
    """Give the local objects of ``artifact_ids`` a fresh modification time (lake spec §7).

    A chain is buffered in memory until its durability point; until then no other process can
    see that it holds these artifacts, and gc's grace period is what protects their objects.
    Ids that name no local object (registered artifacts, an object already gone) are skipped.
    """
    for artifact_id in artifact_ids:
        if _SHA256.fullmatch(artifact_id):
            try:
                storage.touch(object_path(artifact_id))
            except FileNotFoundError:
                pass


def remove_object(storage: Storage, rel: str, cutoff_us: int) -> bool:
    """Remove the object at ``rel`` unless it was saved again at or after ``cutoff_us``; False
    when it is kept for that reason (True also when it was gone already).

    On a local workspace the object is first moved aside, where nothing reads it, and its
    modification time is checked there: a writer's refresh before the move shows in it (the
    object is moved back), and one after the move finds no object and writes the bytes anew
    (:func:`put_object`). No moment remains in which a writer's refresh could be lost. Object
    stores have no atomic move: there a PUT between the check and the DELETE is lost (§7).
    """
    if not storage.is_local:
        if (storage.modified_us(rel) or 0) >= cutoff_us:
            return False
        storage.delete(rel)
        return True
    aside = f"{STAGING_DIR}/gc-{uuid.uuid4().hex}.tmp"  # a crash leaves a staging leftover
    try:
        storage.move(rel, aside)
    except FileNotFoundError:
        return True  # another gc removed it; a writer that needs it writes it anew
    if (storage.modified_us(aside) or 0) < cutoff_us:
        storage.delete(aside)
        return True
    try:
        storage.move(aside, rel, replace=False)
    except FileExistsError:
        storage.delete(aside)  # a writer wrote the same bytes anew meanwhile: keep those
    return False


def unpublished_references(storage: Storage) -> tuple[set[str], set[str]]:
    """What writers made durable but have not published yet: the artifact ids their chains hold
    and the paths their artifact records name. gc and ``check --repair`` keep both."""
    held: set[str] = set()
    paths: set[str] = set()
    for table, records in unpublished_frames(storage, frozenset({"chains", "artifacts"})):
        if table == "chains":
            for ids in records["artifact_ids"]:
                held.update(ids or ())
        elif table == "artifacts":
            paths.update(records["path"])
    return held, paths


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
    if actual != bare_hash(content_hash):
        raise ArtifactIntegrityError(
            f"artifact object {rel_or_abs} is corrupt: sha256 mismatch "
            f"(expected {content_hash}, found {actual}); it was not deserialised"
        )
    return data
