-- Predictions are partitioned by dataset; each row is one model, fold and partition.
-- Saving a prediction id again replaces it: the latest created_at wins.
CREATE OR REPLACE VIEW predictions AS
SELECT p.* EXCLUDE (_file, _row) FROM lake_table('predictions') AS p
LEFT JOIN (SELECT entity_id, deleted_at FROM deleted_entities WHERE kind = 'prediction') AS d
       ON d.entity_id = p.prediction_id
WHERE p.run_id NOT IN (SELECT run_id FROM deleted_runs)
  AND (d.deleted_at IS NULL OR d.deleted_at < p.created_at)
QUALIFY row_number() OVER (PARTITION BY p.prediction_id ORDER BY p.created_at DESC, p._file DESC, p._row DESC) = 1;

-- Arrays are saved once per prediction; a later save of the same id replaces it.
CREATE OR REPLACE VIEW prediction_arrays AS
SELECT a.* EXCLUDE (_version, _file, _row) FROM lake_table('prediction_arrays') AS a
LEFT JOIN (SELECT entity_id, deleted_at FROM deleted_entities WHERE kind = 'prediction') AS d
       ON d.entity_id = a.prediction_id
WHERE a.run_id NOT IN (SELECT run_id FROM deleted_runs)
  AND (d.deleted_at IS NULL OR epoch_us(d.deleted_at) < a._version)
QUALIFY row_number() OVER (PARTITION BY a.prediction_id ORDER BY a._version DESC, a._file DESC, a._row DESC) = 1;
