-- Artifact metadata; the bytes live at objects/<sha256[:2]>/<sha256> under the workspace.
CREATE OR REPLACE VIEW artifacts AS
SELECT a.* FROM lake_table('artifacts') AS a
LEFT JOIN (SELECT entity_id, deleted_at FROM deleted_entities WHERE kind = 'artifact') AS d
       ON d.entity_id = a.artifact_id
WHERE d.deleted_at IS NULL OR d.deleted_at < a.created_at
QUALIFY row_number() OVER (PARTITION BY a.artifact_id ORDER BY a.created_at DESC) = 1;
