"""What the ``WorkspaceStore`` facade hands its work to: argument checks, records, reads,
exports, replay, gc, and push/pull between workspaces."""
