"""What an artifact format stores comes back the same: the ``npz`` format's keys and arrays."""

from __future__ import annotations

import numpy as np
import pytest

from nirslake import WorkspaceStore
from nirslake.lake import artifacts as art


def test_npz_keys_that_end_in_npy_load_under_their_own_names(local_workspace):
    """Issue 9 scenario 15: an ``npz`` artifact, a dict with keys ``w`` and ``w.npy``, is saved
    (acknowledged); loading it must give each array back under its own key."""
    weights = {"w": np.arange(3.0), "w.npy": np.full(2, 7.0), "w.npy.npy": np.int64(5)}
    with WorkspaceStore(local_workspace) as store:
        artifact_id = store.save_artifact(weights, "Ridge", "weights", "npz")
        loaded = store.load_artifact(artifact_id)
    assert sorted(loaded) == ["w", "w.npy", "w.npy.npy"]
    np.testing.assert_array_equal(loaded["w"], np.arange(3.0))
    np.testing.assert_array_equal(loaded["w.npy"], np.full(2, 7.0))
    assert loaded["w.npy.npy"] == 5 and isinstance(loaded["w.npy.npy"], np.int64)


def test_npz_refuses_keys_a_zip_member_name_cannot_hold():
    """Two keys the zip format would cut to one name (at a NUL) must not be stored as one."""
    with pytest.raises(ValueError, match=r"cannot store the key 'a\\x00b'"):
        art.serialize({"a\x00b": np.zeros(1), "a\x00c": np.ones(1)}, "npz")


def test_npz_still_refuses_object_arrays_on_load():
    """Bytes holding an object array (made by hand: saving refuses them) never unpickle."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="holding object arrays"):
        art.deserialize(buf.getvalue(), "npz")
