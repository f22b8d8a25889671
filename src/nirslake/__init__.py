"""nirslake: the nirs4all workspace store as an open data lake.

Parquet predictions and arrays, content-addressed artifacts through fsspec, a DuckDB catalog of
views and polars helpers. Start with ``WorkspaceStore(path_or_url)``.
"""

__version__ = "0.1.0"

from .lake.artifacts import ArtifactIntegrityError  # noqa: E402
from .api.bundles import BundleError, predict  # noqa: E402
from .predictions import Predictions  # noqa: E402
from .protocol import WorkspaceStoreProtocol  # noqa: E402
from .store import WorkspaceStore  # noqa: E402

__all__ = [
    "ArtifactIntegrityError", "BundleError", "Predictions", "WorkspaceStore", "WorkspaceStoreProtocol", "__version__", "predict",
]
