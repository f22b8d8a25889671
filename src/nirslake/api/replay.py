"""Replaying a stored chain on new spectra: its shared transformers in step order, then the mean
of its fold models' predictions (what nirs4all's store does with the same records).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def replay_chain(chain: dict, load_artifact: Callable[[str], Any], X: Any) -> np.ndarray:
    """Predict ``X`` with ``chain`` (as ``get_chain`` returns it), loading artifacts by id."""
    chain_id = chain["chain_id"]
    if chain.get("model_step_idx") is None:
        raise RuntimeError(f"chain {chain_id} has no model step to replay")
    fold_ids = [v for _, v in sorted(chain["fold_artifacts"].items()) if v]
    if not fold_ids:
        raise RuntimeError(f"chain {chain_id} has no fold models to replay")
    data = np.asarray(X, dtype=np.float64)
    for step in sorted(chain["shared_artifacts"], key=int):
        if int(step) >= chain["model_step_idx"]:
            continue
        for artifact_id in chain["shared_artifacts"][step]:
            data = load_artifact(artifact_id).transform(data)
    predictions = [np.asarray(load_artifact(a).predict(data), dtype=np.float64).reshape(len(data), -1) for a in fold_ids]
    mean = np.mean(predictions, axis=0)
    return mean.ravel() if mean.shape[1] == 1 else mean
