"""Model bundles (``.n4a``): a chain and its fitted artifacts in one zip that predicts anywhere.

Owns the bundle format (docs/bundles.md): export, verification (every byte, before anything is
unpickled), prediction without a workspace, import into a workspace, and chain replay itself.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np

from .. import __version__
from ..lake import artifacts as art
from .jsonable import plain

if TYPE_CHECKING:
    from ..store import WorkspaceStore

FORMAT = "nirslake.bundle"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
# nirs4all's BundleLoader refuses a ``bundle_format_version`` above its own (1.0 in 1.4.10).
NIRS4ALL_BUNDLE_FORMAT = "1.0"
MANIFEST = "manifest.json"
CHAIN = "chain.json"
ARTIFACTS_DIR = "artifacts/"
MAX_MANIFEST_BYTES = 32 * 1024 * 1024  # read before anything is verified: bounded
# Fixed member times: two exports of one chain differ only in the manifest's created_at.
_MEMBER_TIME = (1980, 1, 1, 0, 0, 0)
# The seal is the zip comment, the archive's last bytes: the sha256 of manifest.json and of every
# byte of the archive before the comment. A changed byte anywhere changes one of them.
_SEAL = re.compile(rb"nirslake-bundle v(\d+) manifest-sha256=([0-9a-f]{64}) archive-sha256=([0-9a-f]{64})")
_SEAL_PLACEHOLDER = b"nirslake-bundle v1 manifest-sha256=" + b"0" * 64 + b" archive-sha256=" + b"0" * 64


class BundleError(ValueError):
    """A bundle that cannot be trusted or read: the message names the bundle and what is wrong."""


# --------------------------------------------------------------------------- replay


def apply_chain(chain: dict, load: Callable[[str], Any], X: Any, wavelengths: Any = None) -> np.ndarray:
    """Predict with a chain: its shared transformers of the steps before the model step, in step
    order (each step's list in order), then the mean of ``predict`` over the fold models.

    ``load`` turns an artifact id into the fitted object. ``wavelengths`` goes to transformers
    whose ``transform`` takes a ``wavelengths`` argument. This is ``WorkspaceStore.replay_chain``,
    so a bundle and its workspace give the same numbers.
    """
    chain_id = chain.get("chain_id")
    if chain.get("model_step_idx") is None:
        raise RuntimeError(f"chain {chain_id} has no model step to replay")
    fold_ids = [v for _, v in sorted((chain.get("fold_artifacts") or {}).items()) if v]
    if not fold_ids:
        raise RuntimeError(f"chain {chain_id} has no fold models to replay")
    data = np.asarray(X, dtype=np.float64)
    shared = chain.get("shared_artifacts") or {}
    for step in sorted(shared, key=int):
        if int(step) >= chain["model_step_idx"]:
            continue
        for artifact_id in shared[step]:
            data = _transform(load(artifact_id), data, wavelengths)
    predictions = [np.asarray(load(a).predict(data), dtype=np.float64).reshape(len(data), -1) for a in fold_ids]
    mean = np.mean(predictions, axis=0)
    return mean.ravel() if mean.shape[1] == 1 else mean


def _transform(transformer: Any, data: np.ndarray, wavelengths: Any) -> np.ndarray:
    if wavelengths is not None:
        try:
            params = inspect.signature(transformer.transform).parameters
        except (TypeError, ValueError):
            params = {}
        if "wavelengths" in params:
            return transformer.transform(data, wavelengths=np.asarray(wavelengths))
    return transformer.transform(data)


# --------------------------------------------------------------------------- layout


def _member_layout(chain: dict, records: dict[str, dict]) -> list[dict]:
    """Where each of the chain's artifacts goes in the zip, named the way nirs4all's loader
    reads fitted state: ``step_<s>_sub<i>`` for the i-th shared transformer of step s (only the
    steps before the model step, which replay applies), ``step_<m>_fold<k>`` for the k-th fold
    model in replay order. Artifacts replay does not use (later shared steps, per-step ids) go
    under names that loader ignores, so the chain comes back whole on import."""
    model_step = chain.get("model_step_idx")
    layout: list[dict] = []
    named: set[str] = set()

    def add(stem: str, artifact_id: str, role: str, **where: Any) -> None:
        record = records[artifact_id]
        layout.append({"file": f"{ARTIFACTS_DIR}{stem}.{record['format']}", "artifact_id": artifact_id, "role": role, **where})
        named.add(artifact_id)

    shared = chain.get("shared_artifacts") or {}
    for step in sorted(shared, key=lambda s: (not _is_int(s), int(s) if _is_int(s) else 0, str(s))):
        for i, artifact_id in enumerate(shared[step]):
            if _is_int(step) and model_step is not None and int(step) < model_step:
                add(f"step_{int(step)}_sub{i}", artifact_id, "shared", step=str(step), position=i)
            else:
                add(f"unused_shared_{len(layout)}", artifact_id, "shared", step=str(step), position=i)
    folds = [(k, v) for k, v in sorted((chain.get("fold_artifacts") or {}).items()) if v]
    for position, (fold, artifact_id) in enumerate(folds):
        stem = f"step_{model_step}_fold{position}" if model_step is not None else f"fold_{position}"
        add(stem, artifact_id, "fold", fold=fold)
    for artifact_id in sorted(set(records) - named):
        add(f"extra_{len(layout)}", artifact_id, "step")
    return layout


def _is_int(value: Any) -> bool:
    try:
        int(value)
        return True
    except (TypeError, ValueError):
        return False


def _held_ids(chain: dict) -> list[str]:
    """Every artifact id the chain holds: fold models, shared transformers, per-step ids."""
    held = {v for v in (chain.get("fold_artifacts") or {}).values() if v}
    for ids in (chain.get("shared_artifacts") or {}).values():
        held.update(ids)
    for step in chain.get("steps") or []:
        if isinstance(step, dict) and step.get("artifact_id") is not None:
            held.add(str(step["artifact_id"]))
    return sorted(held)


# --------------------------------------------------------------------------- export


def export_chain(store: WorkspaceStore, chain_id: str, output_path: str | os.PathLike, format: str = "n4a") -> Path:
    """Write ``chain_id`` and its artifacts as a sealed bundle; see ``WorkspaceStore.export_chain``."""
    if format != "n4a":
        raise ValueError(f"unknown export format {format!r}: only 'n4a' is supported")
    chain = store.get_chain(chain_id)
    if chain is None:
        raise KeyError(f"unknown chain_id {chain_id!r}")
    pipeline = store.get_pipeline(chain["pipeline_id"]) or {}
    records = {}
    for artifact_id in _held_ids(chain):
        # The store's own record lookup: the bytes are read and checked against their hash
        # (never unpickled), as load_artifact does before deserialising.
        try:
            with store._lock:
                store._check_open()
                records[artifact_id] = store._artifact(artifact_id)
        except KeyError:
            raise KeyError(f"chain {chain_id} holds artifact {artifact_id}, which this workspace has no record of") from None
    payload = {
        artifact_id: art.read_verified(store.storage, record["path"], record["content_hash"])
        for artifact_id, record in records.items()
    }
    chain_doc = plain(chain)
    members: dict[str, bytes] = {CHAIN: _json_bytes(chain_doc)}
    layout = _member_layout(chain, records)
    for entry in layout:
        members[entry["file"]] = payload[entry["artifact_id"]]
    has_refit = any(str(k) in ("final", "fold_final") for k in (chain.get("fold_artifacts") or {}))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bundle_format_version": NIRS4ALL_BUNDLE_FORMAT,
        "producer": f"nirslake {__version__}",
        "created_at": datetime.now(timezone.utc).isoformat(),
        "chain_id": chain_id,
        "pipeline_id": chain["pipeline_id"],
        "run_id": chain.get("run_id"),
        "model_class": chain.get("model_class"),
        "model_step_index": chain.get("model_step_idx"),
        "preprocessings": chain.get("preprocessings"),
        "fold_strategy": chain.get("fold_strategy"),
        "has_refit": has_refit,
        "source": plain(
            {
                "pipeline_name": pipeline.get("name"),
                "dataset_name": pipeline.get("dataset_name"),
                "dataset_hash": pipeline.get("dataset_hash"),
                "expanded_config": pipeline.get("expanded_config"),
                "generator_choices": pipeline.get("generator_choices"),
            }
        ),
        "artifacts": [
            {**entry, **{k: records[entry["artifact_id"]][k] for k in ("operator_class", "artifact_type", "format")},
             "size_bytes": len(payload[entry["artifact_id"]])}
            for entry in layout
        ],
        "members": {name: {"sha256": art.sha256(data), "size": len(data)} for name, data in members.items()},
    }
    data = _sealed_zip(_json_bytes(manifest), members)
    target = Path(output_path)
    if not target.suffix:
        target = target.with_suffix(".n4a")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)  # never a half-written bundle under the final name
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _sealed_zip(manifest: bytes, members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in [(MANIFEST, manifest), *members.items()]:
            info = zipfile.ZipInfo(name, date_time=_MEMBER_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
        zf.comment = _SEAL_PLACEHOLDER
    body = buf.getvalue()[: -len(_SEAL_PLACEHOLDER)]
    seal = b"nirslake-bundle v%d manifest-sha256=%s archive-sha256=%s" % (
        FORMAT_VERSION, art.sha256(manifest).encode(), art.sha256(body).encode(),
    )
    assert len(seal) == len(_SEAL_PLACEHOLDER)
    return body + seal


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")


# --------------------------------------------------------------------------- reading and verification


@dataclass
class Bundle:
    """A verified bundle held in memory: its manifest, chain and member bytes.

    Only :func:`read_bundle` makes one, and only after every check passed; nothing in it has
    been unpickled. ``sha256`` is the hash of the whole file, as received.
    """

    source: str
    sha256: str
    manifest: dict
    chain: dict
    members: dict[str, bytes] = field(repr=False)
    _loaded: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def chain_id(self) -> str:
        return self.manifest["chain_id"]

    def artifact_bytes(self, artifact_id: str) -> bytes:
        for entry in self.manifest["artifacts"]:
            if entry["artifact_id"] == artifact_id:
                return self.members[entry["file"]]
        raise KeyError(f"{self.source}: the bundle holds no artifact {artifact_id!r}")

    def artifact_format(self, artifact_id: str) -> str:
        return next(e["format"] for e in self.manifest["artifacts"] if e["artifact_id"] == artifact_id)

    def load_artifact(self, artifact_id: str) -> Any:
        """The fitted object (unpickling runs code: load bundles only from producers you trust)."""
        if artifact_id not in self._loaded:
            self._loaded[artifact_id] = art.deserialize(self.artifact_bytes(artifact_id), self.artifact_format(artifact_id))
        return self._loaded[artifact_id]

    def predict(self, X: Any, wavelengths: Any = None) -> np.ndarray:
        """The chain's predictions for ``X``: the numbers ``replay_chain`` gives in its workspace."""
        return apply_chain(self.chain, self.load_artifact, X, wavelengths)


def read_bundle(source: str | os.PathLike | bytes) -> Bundle:
    """Read and verify a bundle; raises :class:`BundleError` naming what is wrong.

    Checked, in order, before anything is deserialised: it is a whole zip; it holds a nirslake
    ``manifest.json`` of a known format version; the seal (the zip comment) holds the sha256 of
    the manifest and of the whole archive, and both match; every member the manifest lists is
    there, none is unlisted, and each matches its sha256; ``chain.json`` names only artifacts the
    bundle holds, each stored under its own hash.
    """
    if isinstance(source, (bytes, bytearray)):
        name, data = "<bytes>", bytes(source)
    else:
        name = os.fspath(source)
        try:
            with fsspec.open(name, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"no bundle at {name}") from None
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise BundleError(f"{name} is not a bundle: not a zip archive, or truncated ({exc})") from None
    with zf:
        names = zf.namelist()
        if len(names) != len(set(names)):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise BundleError(f"{name} holds duplicate members {dupes}: refused")
        manifest_raw = _read_member(zf, name, MANIFEST, limit=MAX_MANIFEST_BYTES)
        manifest = _parse_manifest(name, manifest_raw)
        seal = _SEAL.fullmatch(zf.comment) if data.endswith(zf.comment) else None
        if seal is None and zf.comment.startswith(b"nirslake-bundle v") and len(zf.comment) < len(_SEAL_PLACEHOLDER):
            raise BundleError(f"{name} is truncated: its last {len(_SEAL_PLACEHOLDER) - len(zf.comment)} bytes (of the seal) are missing")
        if seal is None:
            raise BundleError(
                f"{name} has no nirslake seal (the zip comment): it was rewritten by another tool "
                "after export, or cut short; export it again"
            )
        if art.sha256(manifest_raw) != seal.group(2).decode():
            raise BundleError(f"{name}: manifest.json changed after export (its sha256 does not match the seal)")
        listed = manifest.get("members")
        if not isinstance(listed, dict):
            raise BundleError(f"{name}: manifest.json lists no members")
        present = {n for n in names if n != MANIFEST and not n.endswith("/")}
        missing = sorted(set(listed) - present)
        if missing:
            raise BundleError(f"{name} is missing member {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        unlisted = sorted(present - set(listed))
        if unlisted:
            raise BundleError(f"{name} holds member {unlisted[0]}, which its manifest does not list: refused")
        members = {}
        for member, expected in sorted(listed.items()):
            content = _read_member(zf, name, member)
            actual = art.sha256(content)
            if not isinstance(expected, dict) or actual != expected.get("sha256"):
                raise BundleError(
                    f"{name}: member {member} changed after export "
                    f"(sha256 {actual}, the manifest says {expected.get('sha256') if isinstance(expected, dict) else expected})"
                )
            members[member] = content
        if art.sha256(data[: len(data) - len(zf.comment)]) != seal.group(3).decode():
            raise BundleError(f"{name}: the zip structure changed after export (the archive's sha256 does not match the seal)")
    chain = _parse_json(name, CHAIN, members.get(CHAIN))
    _check_artifacts(name, manifest, chain, members)
    return Bundle(name, art.sha256(data), manifest, chain, members)


def verify_bundle(source: str | os.PathLike | bytes) -> dict:
    """Verify a bundle without loading anything from it; returns its manifest."""
    return read_bundle(source).manifest


def _read_member(zf: zipfile.ZipFile, name: str, member: str, limit: int | None = None) -> bytes:
    try:
        info = zf.getinfo(member)
    except KeyError:
        if member == MANIFEST:
            shown = ", ".join(zf.namelist()[:5]) or "nothing"
            raise BundleError(f"{name} is not a nirslake bundle: it has no manifest.json (it holds {shown})") from None
        raise BundleError(f"{name} is missing member {member}") from None
    if limit is not None and info.file_size > limit:
        raise BundleError(f"{name}: {member} is {info.file_size} bytes, more than the {limit} a manifest may hold")
    try:
        return zf.read(info)
    except Exception as exc:  # noqa: BLE001 - a CRC mismatch, a zlib error, a short read: damaged bytes
        raise BundleError(f"{name}: member {member} is damaged ({exc})") from None


def _parse_json(name: str, member: str, raw: bytes | None) -> Any:
    if raw is None:
        raise BundleError(f"{name} is missing member {member}")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{name}: {member} is not valid JSON ({exc})") from None


def _parse_manifest(name: str, raw: bytes) -> dict:
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{name} is not a nirslake bundle: manifest.json is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(
            f"{name} is not a nirslake bundle: its manifest.json has format {found!r}, not {FORMAT!r} "
            "(a bundle written by another tool, or by nirs4all's own export)"
        )
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS or isinstance(version, bool):
        raise BundleError(
            f"{name}: unknown bundle format version {version!r} (this nirslake {__version__} reads "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); upgrade nirslake to read it"
        )
    return manifest


def _check_artifacts(name: str, manifest: dict, chain: Any, members: dict[str, bytes]) -> None:
    if not isinstance(chain, dict):
        raise BundleError(f"{name}: chain.json holds no chain")
    if chain.get("chain_id") != manifest.get("chain_id"):
        raise BundleError(f"{name}: chain.json is chain {chain.get('chain_id')!r}, the manifest says {manifest.get('chain_id')!r}")
    entries = manifest.get("artifacts")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BundleError(f"{name}: manifest.json lists no artifacts")
    held = set()
    for entry in entries:
        file, artifact_id = entry.get("file"), entry.get("artifact_id")
        if file not in members or not isinstance(artifact_id, str):
            raise BundleError(f"{name}: the manifest's artifact {artifact_id!r} names member {file!r}, which it does not hold")
        if art.sha256(members[file]) != artifact_id:
            raise BundleError(f"{name}: member {file} is not artifact {artifact_id} (its bytes hash to another id)")
        if entry.get("format") not in art.FORMATS:
            raise BundleError(f"{name}: artifact {artifact_id} has format {entry.get('format')!r}, which nirslake cannot load")
        held.add(artifact_id)
    try:
        needed = set(_held_ids(chain))
    except (AttributeError, TypeError) as exc:
        raise BundleError(f"{name}: chain.json is not a chain ({exc})") from None
    absent = sorted(needed - held)
    if absent:
        raise BundleError(f"{name}: the chain needs artifact {absent[0]}, which the bundle does not hold")


# --------------------------------------------------------------------------- predict and import


def predict(source: Any, X: Any, wavelengths: Any = None, *, chain_id: str | None = None) -> np.ndarray:
    """Predict ``X`` with a bundle, or with a workspace's chain.

    ``source``: a bundle path or URL (or a :class:`Bundle`), which needs no workspace; or a
    ``WorkspaceStore`` / workspace path with ``chain_id``. Either way the numbers are those of
    ``replay_chain``. A bundle is verified whole before anything in it is unpickled.
    """
    from ..store import WorkspaceStore

    if chain_id is not None:
        if isinstance(source, WorkspaceStore):
            return source.replay_chain(chain_id, X, wavelengths)
        with WorkspaceStore(source) as store:
            return store.replay_chain(chain_id, X, wavelengths)
    if isinstance(source, WorkspaceStore):
        raise TypeError("predicting from a workspace needs the chain: nirslake.predict(store, X, chain_id=...)")
    bundle = source if isinstance(source, Bundle) else read_bundle(source)
    return bundle.predict(X, wavelengths)


def import_bundle(store: WorkspaceStore, path: str | os.PathLike) -> str:
    """Add a bundle's chain to ``store``; returns the new chain id (see ``WorkspaceStore.import_bundle``)."""
    bundle = read_bundle(path)
    manifest, chain = bundle.manifest, bundle.chain
    source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    storage = store.storage
    for entry in {e["artifact_id"]: e for e in manifest["artifacts"]}.values():
        data, rel = bundle.members[entry["file"]], art.object_path(entry["artifact_id"])
        if storage.is_local:
            art.put_object(storage, data)  # an object already there keeps its bytes (it is refreshed)
        elif not storage.exists(rel):
            storage.publish(rel, data, exists_ok=True)  # put-if-absent: never replaces one that landed meanwhile
        store.register_existing_artifact(
            entry["artifact_id"], rel, entry["artifact_id"], entry.get("operator_class"),
            entry.get("artifact_type"), entry["format"], len(data),
        )
    provenance = {
        "bundle": os.path.basename(bundle.source),
        "bundle_sha256": bundle.sha256,
        "imported_at": datetime.now(timezone.utc).isoformat(),
        "exported_at": manifest.get("created_at"),
        "producer": manifest.get("producer"),
        "source_chain_id": manifest.get("chain_id"),
        "source_pipeline_id": manifest.get("pipeline_id"),
        "source_run_id": manifest.get("run_id"),
    }
    dataset = source.get("dataset_name") or ""
    run_id = store.begin_run(
        f"import of {provenance['bundle']}", {"imported_from": provenance}, [{"name": dataset}] if dataset else []
    )
    pipeline_id = store.begin_pipeline(
        run_id,
        source.get("pipeline_name") or f"imported chain {manifest.get('chain_id')}",
        source.get("expanded_config") if source.get("expanded_config") is not None else {},
        source.get("generator_choices") if source.get("generator_choices") is not None else {},
        dataset,
        source.get("dataset_hash") or "",
    )
    chain_id = store.save_chain(
        pipeline_id,
        chain.get("steps") or [],
        chain.get("model_step_idx"),
        chain.get("model_class"),
        chain.get("preprocessings"),
        chain.get("fold_strategy"),
        chain.get("fold_artifacts") or {},
        chain.get("shared_artifacts") or {},
        chain.get("branch_path"),
        chain.get("source_index"),
    )
    store.complete_pipeline(pipeline_id, None, None, None, 0)
    store.complete_run(run_id, {"imported_chain_id": chain_id})  # a durability point: the import is kept
    return chain_id


def provenance(store: WorkspaceStore, chain_id: str) -> dict | None:
    """Where an imported chain came from (bundle, its sha256, when), or None for a chain not imported."""
    chain = store.get_chain(chain_id)
    if chain is None:
        raise KeyError(f"unknown chain_id {chain_id!r}")
    run = store.get_run(chain["run_id"])
    config = run.get("config") if run else None
    return config.get("imported_from") if isinstance(config, dict) else None
