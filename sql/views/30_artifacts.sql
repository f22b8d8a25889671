-- Artifact metadata; the bytes live at objects/<sha256[:2]>/<sha256> under the workspace.
-- Every save records a row; the latest per artifact_id wins.
CREATE OR REPLACE VIEW artifacts AS
SELECT a.* EXCLUDE (_file, _row) FROM lake_table('artifacts') AS a
LEFT JOIN (SELECT entity_id, deleted_at FROM deleted_entities WHERE kind = 'artifact') AS d
       ON d.entity_id = a.artifact_id
WHERE d.deleted_at IS NULL OR d.deleted_at < a.created_at
QUALIFY row_number() OVER (PARTITION BY a.artifact_id ORDER BY a.created_at DESC, a._file DESC, a._row DESC) = 1;
