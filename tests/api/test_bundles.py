"""Bundles: a chain of real scikit-learn objects (a scaler shared by the folds, a PLS per fold)
goes from a workspace to a .n4a and back: predicted without the workspace, imported into a second
workspace (local and S3), loaded by nirs4all 1.4.10's own predict, always with the numbers of the
original replay_chain; and damaged or foreign files refused, before anything is unpickled."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.cross_decomposition import PLSRegression
from sklearn.preprocessing import StandardScaler

import nirslake
from conftest import run_doc_page
from nirslake import BundleError, WorkspaceStore
from nirslake.api.bundles import FORMAT_VERSION, provenance, read_bundle

RNG = np.random.default_rng(11)
WAVELENGTHS = np.linspace(1100.0, 2500.0, 60)
X_TRAIN = np.cumsum(RNG.normal(size=(48, 60)), axis=1)  # smooth, correlated, like spectra
Y_TRAIN = X_TRAIN[:, 10] - 0.5 * X_TRAIN[:, 40] + RNG.normal(scale=0.2, size=48)
X_NEW = np.cumsum(RNG.normal(size=(9, 60)), axis=1)


def save_pls_chain(store: WorkspaceStore) -> tuple[str, np.ndarray]:
    """A run, a pipeline and a chain: StandardScaler fitted once, shared by 3 folds of PLS(4)."""
    run = store.begin_run("protein", {"cv": 3}, [{"name": "wheat"}])
    pipe = store.begin_pipeline(run, "scaler_pls4", [{"class": "StandardScaler"}, {"model": "PLSRegression", "n_components": 4}],
                                {"n_components": 4}, "wheat", "sha256:1")
    scaler = StandardScaler().fit(X_TRAIN)
    scaled = scaler.transform(X_TRAIN)
    folds = {}
    for k in range(3):
        keep = np.arange(48) % 3 != k
        model = PLSRegression(n_components=4).fit(scaled[keep], Y_TRAIN[keep])
        folds[f"fold_{k}"] = store.save_artifact(model, "PLSRegression", "model", "joblib" if k else "pickle")
    scaler_id = store.save_artifact(scaler, "StandardScaler", "transformer", "joblib")
    steps = [{"step_idx": 0, "operator_class": "StandardScaler", "params": {}, "artifact_id": scaler_id, "stateless": False},
             {"step_idx": 1, "operator_class": "PLSRegression", "params": {"n_components": 4}, "artifact_id": None, "stateless": False}]
    chain = store.save_chain(pipe, steps, 1, "PLSRegression", "StandardScaler", "KFold(3)", folds, {"0": [scaler_id]})
    store.complete_pipeline(pipe, 0.3, 0.4, "rmse", 12)
    return chain, store.replay_chain(chain, X_NEW)


@pytest.fixture
def exported(tmp_path):
    """(bundle path, the original replay on X_NEW, chain id) from a workspace that is then deleted."""
    ws = tmp_path / "source_ws"
    with WorkspaceStore(str(ws)) as store:
        chain_id, replayed = save_pls_chain(store)
        bundle = store.export_chain(chain_id, tmp_path / "wheat_pls")
    shutil.rmtree(ws)
    return bundle, replayed, chain_id


def test_export_writes_the_seed_members_with_a_hash_of_each(exported):
    bundle, _, chain_id = exported
    assert bundle.name == "wheat_pls.n4a"
    with zipfile.ZipFile(bundle) as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read("manifest.json"))
        chain = json.loads(zf.read("chain.json"))
        assert set(manifest["members"]) == set(names) - {"manifest.json"}
        for name, entry in manifest["members"].items():
            assert entry["sha256"] == hashlib.sha256(zf.read(name)).hexdigest()
    assert manifest["format_version"] == FORMAT_VERSION
    assert (manifest["chain_id"], manifest["model_class"], manifest["model_step_index"]) == (chain_id, "PLSRegression", 1)
    assert (manifest["preprocessings"], manifest["fold_strategy"]) == ("StandardScaler", "KFold(3)")
    assert manifest["created_at"] and chain["chain_id"] == chain_id
    assert sorted(n for n in names if n.startswith("artifacts/")) == [
        "artifacts/step_0_sub0.joblib", "artifacts/step_1_fold0.pickle", "artifacts/step_1_fold1.joblib", "artifacts/step_1_fold2.joblib",
    ]


def test_predict_from_the_bundle_alone_gives_the_original_replay(exported):
    bundle, replayed, _ = exported
    assert not (bundle.parent / "source_ws").exists()
    np.testing.assert_array_equal(nirslake.predict(bundle, X_NEW), replayed)
    np.testing.assert_array_equal(nirslake.predict(str(bundle), X_NEW, WAVELENGTHS), replayed)
    np.testing.assert_array_equal(read_bundle(bundle).predict(X_NEW), replayed)


def test_predict_from_a_workspace_and_chain_id(tmp_path):
    ws = str(tmp_path / "ws")
    with WorkspaceStore(ws) as store:
        chain_id, replayed = save_pls_chain(store)
        np.testing.assert_array_equal(nirslake.predict(store, X_NEW, chain_id=chain_id), replayed)
        with pytest.raises(TypeError, match="needs the chain"):
            nirslake.predict(store, X_NEW)
    np.testing.assert_array_equal(nirslake.predict(ws, X_NEW, chain_id=chain_id), replayed)


def objects_of(ws: str) -> dict[str, int]:
    """The workspace's object files and their inodes (a rewrite makes a new inode)."""
    return {p.name: p.stat().st_ino for p in (Path(ws) / "objects").rglob("*") if p.is_file()}


def test_import_into_a_second_local_workspace_replays_the_same(exported, tmp_path):
    bundle, replayed, source_chain = exported
    ws = str(tmp_path / "second")
    with WorkspaceStore(ws) as store:
        chain_id = store.import_bundle(bundle)

        assert chain_id != source_chain
        np.testing.assert_array_equal(store.replay_chain(chain_id, X_NEW), replayed)
        stored = objects_of(ws)
        assert sorted(stored) == sorted({e["artifact_id"] for e in read_bundle(bundle).manifest["artifacts"]})
        origin = provenance(store, chain_id)
        assert origin["bundle_sha256"] == hashlib.sha256(bundle.read_bytes()).hexdigest()
        assert origin["bundle"] == "wheat_pls.n4a" and origin["source_chain_id"] == source_chain
        assert abs(time.time() - _epoch(origin["imported_at"])) < 60
        chain = store.get_chain(chain_id)
        pipeline = store.get_pipeline(chain["pipeline_id"])
        assert (pipeline["name"], pipeline["dataset_name"], pipeline["status"]) == ("scaler_pls4", "wheat", "completed")
        assert store.get_run(chain["run_id"])["status"] == "completed"

        # Importing it again: a second chain on the same four objects, none written again.
        second = store.import_bundle(bundle)
        assert second != chain_id and objects_of(ws) == stored
        assert store.query_predictions().height == 0 and store.list_runs().height == 2
        assert store.check().ok, store.check().summary()
    with WorkspaceStore(ws) as reopened:  # durable, and visible to a fresh store
        np.testing.assert_array_equal(reopened.replay_chain(chain_id, X_NEW), replayed)


def test_import_into_an_s3_workspace_replays_the_same(exported, s3_workspace):
    bundle, replayed, _ = exported
    import fsspec

    with WorkspaceStore(s3_workspace) as store:
        chain_id = store.import_bundle(bundle)
        np.testing.assert_array_equal(store.replay_chain(chain_id, X_NEW), replayed)
        fs, root = fsspec.core.url_to_fs(s3_workspace)
        stamps = {p: fs.info(p)["LastModified"] for p in fs.find(f"{root}/objects")}
        assert len(stamps) == 4
        time.sleep(1.1)  # object stores keep whole seconds: a rewrite would show a later time

        store.import_bundle(bundle)

        assert {p: fs.info(p)["LastModified"] for p in fs.find(f"{root}/objects")} == stamps
        assert provenance(store, chain_id)["bundle_sha256"] == hashlib.sha256(bundle.read_bytes()).hexdigest()
    with WorkspaceStore(s3_workspace) as reopened:
        np.testing.assert_array_equal(reopened.replay_chain(chain_id, X_NEW), replayed)
        np.testing.assert_array_equal(nirslake.predict(reopened, X_NEW, chain_id=chain_id), replayed)


def test_a_bundle_exported_again_from_the_import_predicts_the_same(exported, tmp_path):
    bundle, replayed, _ = exported
    with WorkspaceStore(str(tmp_path / "hop")) as store:
        again = store.export_chain(store.import_bundle(bundle), tmp_path / "again.n4a")
    np.testing.assert_array_equal(nirslake.predict(again, X_NEW), replayed)


def test_nirs4all_predict_loads_the_bundle_with_the_same_numbers(exported, tmp_path, monkeypatch):
    bundle, replayed, _ = exported
    import nirs4all

    monkeypatch.chdir(tmp_path)  # nirs4all's runner makes a ./workspace of its own

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nirs4all warns that engine="legacy" is its rollback lane
        result = nirs4all.predict(model=str(bundle), data={"X": X_NEW}, engine="legacy")
        np.testing.assert_array_equal(np.asarray(result.y_pred).ravel(), replayed)
        # Given a bare array, nirs4all's dataset layer holds it as float32 first: close, not equal.
        plain = nirs4all.predict(model=str(bundle), data=X_NEW, engine="legacy")
    np.testing.assert_allclose(np.asarray(plain.y_pred).ravel(), replayed, rtol=1e-5, atol=1e-5)


def test_a_chain_with_more_than_replay_uses_comes_back_whole(tmp_path):
    """Artifacts replay does not apply (a shared step at the model step, a per-step id) travel
    too, under names nirs4all's loader ignores, so the import holds the same chain."""
    with WorkspaceStore(str(tmp_path / "a")) as store:
        chain_id, replayed = save_pls_chain(store)
        source = store.get_chain(chain_id)
        extra = store.save_artifact({"note": np.arange(3)}, "Notes", "metadata", "npz")
        pipe = source["pipeline_id"]
        steps = source["steps"] + [{"step_idx": 2, "operator_class": "Notes", "params": {}, "artifact_id": extra, "stateless": True}]
        shared = {**source["shared_artifacts"], "1": [extra]}
        richer = store.save_chain(pipe, steps, 1, "PLSRegression", "StandardScaler", "KFold(3)", source["fold_artifacts"], shared)
        np.testing.assert_array_equal(store.replay_chain(richer, X_NEW), replayed)
        bundle = store.export_chain(richer, tmp_path / "richer.n4a")
    with WorkspaceStore(str(tmp_path / "b")) as store:
        imported = store.get_chain(store.import_bundle(bundle))
        assert {k: imported[k] for k in ("steps", "fold_artifacts", "shared_artifacts", "model_step_idx")} == {
            "steps": steps, "fold_artifacts": source["fold_artifacts"], "shared_artifacts": shared, "model_step_idx": 1}
        assert store.load_artifact(extra)["note"].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(nirslake.predict(bundle, X_NEW), replayed)


class WavelengthWeighting:
    """A transformer that needs the wavelengths (as nirs4all's wavelength-aware operators do)."""

    def transform(self, X, wavelengths=None):
        if wavelengths is None:
            raise ValueError("WavelengthWeighting needs the wavelengths")
        return np.asarray(X) * (np.asarray(wavelengths) / 1000.0)


def test_wavelengths_reach_the_transformers_that_take_them(tmp_path):
    from sklearn.linear_model import LinearRegression

    with WorkspaceStore(str(tmp_path / "ws")) as store:
        run = store.begin_run("r", {}, [])
        pipe = store.begin_pipeline(run, "weighted", {}, {}, "wheat", "h")
        weighting = store.save_artifact(WavelengthWeighting(), "WavelengthWeighting", "transformer", "pickle")
        weighted = X_TRAIN * (WAVELENGTHS / 1000.0)
        model = store.save_artifact(LinearRegression().fit(weighted, Y_TRAIN), "LinearRegression", "model", "pickle")
        chain = store.save_chain(pipe, [], 1, "LinearRegression", "WavelengthWeighting", "none", {"fold_0": model}, {"0": [weighting]})
        replayed = store.replay_chain(chain, X_NEW, WAVELENGTHS)
        with pytest.raises(ValueError, match="needs the wavelengths"):
            store.replay_chain(chain, X_NEW)
        bundle = store.export_chain(chain, tmp_path / "weighted.n4a")
    expected = LinearRegression().fit(weighted, Y_TRAIN).predict(X_NEW * (WAVELENGTHS / 1000.0))
    np.testing.assert_allclose(replayed, expected, rtol=1e-10)
    np.testing.assert_array_equal(nirslake.predict(bundle, X_NEW, WAVELENGTHS), replayed)


# --------------------------------------------------------------------------- refused bundles

MARKER_ENV = "NIRSLAKE_TEST_UNPICKLED"


class Trap:
    """Unpickling it writes a file: the proof that a refused bundle was never deserialised."""

    def __reduce__(self):
        return (Path.write_text, (Path(os.environ[MARKER_ENV]), "unpickled"))


def rezip(bundle: Path, target: Path, replace: dict[str, bytes] | None = None, drop: set[str] | None = None,
          keep_seal: bool = True) -> Path:
    """A copy of the bundle's zip made by another zip writer: members replaced or dropped."""
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename in (drop or set()):
                continue
            dst.writestr(info, (replace or {}).get(info.filename, src.read(info)))
        if keep_seal:
            dst.comment = src.comment
    return target


@pytest.fixture
def trap(tmp_path, monkeypatch):
    marker = tmp_path / "unpickled.txt"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    return marker


def refused(path, fragment: str) -> str:
    with pytest.raises(BundleError) as raised:
        nirslake.predict(path, X_NEW)
    assert fragment in str(raised.value), str(raised.value)
    return str(raised.value)


def test_a_changed_member_is_refused_before_anything_is_unpickled(exported, tmp_path, trap):
    bundle, _, _ = exported
    evil = rezip(bundle, tmp_path / "evil.n4a", replace={"artifacts/step_1_fold0.pickle": pickle.dumps(Trap())})
    message = refused(evil, "member artifacts/step_1_fold0.pickle changed after export")
    assert str(evil) in message
    with pytest.raises(BundleError):
        WorkspaceStore(str(tmp_path / "target")).import_bundle(evil)
    assert not trap.exists()
    # Control: the same bytes in a bundle that passes would be unpickled (the trap works).
    pickle.loads(pickle.dumps(Trap()))
    assert trap.exists()


def test_one_flipped_byte_anywhere_is_refused(exported, tmp_path, trap):
    bundle, _, _ = exported
    data = bundle.read_bytes()
    with zipfile.ZipFile(bundle) as zf:
        member = zf.getinfo("artifacts/step_0_sub0.joblib")
        manifest = zf.getinfo("manifest.json")
    name_len = len(member.filename.encode())
    # Inside an artifact's compressed bytes, inside manifest.json's, and in a local header's time field.
    places = {
        "artifact data": member.header_offset + 30 + name_len + len(member.extra) + 5,
        "manifest data": manifest.header_offset + 30 + len("manifest.json") + 3,
        "header time": member.header_offset + 10,
    }
    messages = {}
    for what, at in places.items():
        flipped = bytearray(data)
        flipped[at] ^= 0x01
        path = tmp_path / f"flipped_{what.replace(' ', '_')}.n4a"
        path.write_bytes(bytes(flipped))
        with pytest.raises(BundleError) as raised:
            nirslake.predict(path, X_NEW)
        messages[what] = str(raised.value)
    assert "artifacts/step_0_sub0.joblib" in messages["artifact data"]
    assert "manifest.json" in messages["manifest data"]
    assert "zip structure changed" in messages["header time"]
    assert not trap.exists()


def test_an_edited_manifest_is_refused(exported, tmp_path):
    bundle, _, _ = exported
    with zipfile.ZipFile(bundle) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    manifest["model_class"] = "Ridge"
    edited = rezip(bundle, tmp_path / "edited.n4a", replace={"manifest.json": json.dumps(manifest).encode()})
    refused(edited, "manifest.json changed after export")


def test_a_truncated_bundle_is_refused(exported, tmp_path):
    bundle, _, _ = exported
    data = bundle.read_bytes()
    for cut in (len(data) // 2, len(data) - 10):
        short = tmp_path / f"short_{cut}.n4a"
        short.write_bytes(data[:cut])
        refused(short, "truncated")


def test_a_missing_member_is_refused(exported, tmp_path):
    bundle, _, _ = exported
    lacking = rezip(bundle, tmp_path / "lacking.n4a", drop={"artifacts/step_1_fold2.joblib"})
    refused(lacking, "is missing member artifacts/step_1_fold2.joblib")
    no_chain = rezip(bundle, tmp_path / "no_chain.n4a", drop={"chain.json"})
    refused(no_chain, "is missing member chain.json")


def test_an_added_member_is_refused(exported, tmp_path):
    bundle, _, _ = exported
    padded = tmp_path / "padded.n4a"
    shutil.copy(bundle, padded)
    with zipfile.ZipFile(padded, "a") as zf:
        comment = zf.comment
        zf.writestr("artifacts/step_0_sub1.pickle", pickle.dumps(StandardScaler()))
        zf.comment = comment
    refused(padded, "holds member artifacts/step_0_sub1.pickle, which its manifest does not list")


def test_an_unknown_format_version_is_refused(exported, tmp_path):
    bundle, _, _ = exported
    with zipfile.ZipFile(bundle) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    manifest["format_version"] = 99
    future = rezip(bundle, tmp_path / "future.n4a", replace={"manifest.json": json.dumps(manifest).encode()})
    refused(future, "unknown bundle format version 99")


def test_a_bundle_rewritten_without_its_seal_is_refused(exported, tmp_path):
    bundle, _, _ = exported
    plain = rezip(bundle, tmp_path / "rezipped.n4a", keep_seal=False)
    refused(plain, "has no nirslake seal")


def test_foreign_files_are_refused(tmp_path):
    text = tmp_path / "notes.n4a"
    text.write_text("not a zip at all")
    refused(text, "not a zip archive")
    other = tmp_path / "photos.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("cat.jpg", b"\xff\xd8")
    refused(other, "has no manifest.json")
    # nirs4all's own export_chain layout: a manifest without nirslake's format
    seed_style = tmp_path / "seed.n4a"
    with zipfile.ZipFile(seed_style, "w") as zf:
        zf.writestr("manifest.json", json.dumps({"chain_id": "c1", "model_class": "PLSRegression", "model_step_index": 1}))
        zf.writestr("chain.json", "{}")
    refused(seed_style, "is not a nirslake bundle: its manifest.json has format None")
    not_json = tmp_path / "broken.n4a"
    with zipfile.ZipFile(not_json, "w") as zf:
        zf.writestr("manifest.json", "{oops")
    refused(not_json, "manifest.json is not valid JSON")
    with pytest.raises(FileNotFoundError, match="no bundle at"):
        nirslake.predict(tmp_path / "absent.n4a", X_NEW)


def test_a_refused_import_leaves_the_workspace_as_it_was(exported, tmp_path):
    bundle, _, _ = exported
    short = tmp_path / "short.n4a"
    short.write_bytes(bundle.read_bytes()[:-200])
    with WorkspaceStore(str(tmp_path / "ws")) as store:
        with pytest.raises(BundleError):
            store.import_bundle(short)
        assert store.list_runs().height == 0
    assert not [p for p in (tmp_path / "ws").rglob("objects/**/*") if p.is_file()]


def test_exports_of_one_chain_differ_only_in_their_manifest(tmp_path):
    with WorkspaceStore(str(tmp_path / "ws")) as store:
        chain_id, _ = save_pls_chain(store)
        first = store.export_chain(chain_id, tmp_path / "one.n4a")
        second = store.export_chain(chain_id, tmp_path / "two.n4a")
    with zipfile.ZipFile(first) as a, zipfile.ZipFile(second) as b:
        differ = [n for n in a.namelist() if a.read(n) != b.read(n)]
    assert differ in ([], ["manifest.json"])


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def test_bundle_bytes_can_be_read_from_memory(exported):
    bundle, replayed, _ = exported
    np.testing.assert_array_equal(read_bundle(io.BytesIO(bundle.read_bytes()).getvalue()).predict(X_NEW), replayed)


def test_the_bundles_page_runs_as_written(tmp_path):
    run_doc_page("bundles.md", tmp_path)
