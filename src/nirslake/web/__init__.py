"""The web front end: a JSON API over one workspace and the dashboard pages that read it.

``create_app(workspace)`` builds the ASGI app (FastAPI); ``serve()`` runs it with uvicorn, as
``nirslake serve`` does. Read-only unless ``allow_delete``; binds to loopback by default.
"""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
