"""Frameworks that write to nirslake: ``nirslake.integrations.nirs4all`` makes nirs4all 1.4.10 keep its workspaces as lakes."""
