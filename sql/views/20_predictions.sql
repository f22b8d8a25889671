-- Predictions are partitioned by dataset; each row is one model, fold and partition.
-- A prediction is identified by (dataset_name, prediction_id) (lake spec §5.1): saving it again
-- replaces it, the latest created_at wins, then the deletion rules apply to that latest row (as
-- in nirslake.lake.rules.resolve): a later save in a deleted run hides the id, it does not bring an
-- older save back. The deletions are read once per view (d), after the data files, so one
-- listing decides what a query sees.
CREATE OR REPLACE VIEW predictions AS
WITH latest AS (
    SELECT * FROM lake_table('predictions')
    QUALIFY row_number() OVER (PARTITION BY dataset_name, prediction_id ORDER BY created_at DESC, _file DESC, _row DESC) = 1),
d AS MATERIALIZED (SELECT * FROM deleted_entities)
SELECT p.* EXCLUDE (_file, _row) FROM latest AS p
LEFT JOIN d ON d.kind = 'prediction' AND d.entity_id = p.prediction_id
WHERE p.run_id NOT IN (SELECT entity_id FROM d WHERE kind = 'run')
  AND (d.deleted_at IS NULL OR d.deleted_at < p.created_at);

-- Arrays are saved once per prediction; a later save of the same id replaces it. They are
-- visible only while their prediction is (lake spec §5.4): arrays saved by a writer that had not
-- yet seen the prediction's deletion stay hidden. The predictions are listed after the arrays,
-- and a writer publishes a prediction before its arrays, so no arrays are dropped for a
-- prediction that was merely listed too early.
CREATE OR REPLACE VIEW prediction_arrays AS
WITH latest AS (
    SELECT * FROM lake_table('prediction_arrays')
    QUALIFY row_number() OVER (PARTITION BY dataset_name, prediction_id ORDER BY _version DESC, _file DESC, _row DESC) = 1),
d AS MATERIALIZED (SELECT * FROM deleted_entities)
SELECT a.* EXCLUDE (_version, _file, _row) FROM latest AS a
LEFT JOIN d ON d.kind = 'prediction' AND d.entity_id = a.prediction_id
WHERE a.run_id NOT IN (SELECT entity_id FROM d WHERE kind = 'run')
  AND (d.deleted_at IS NULL OR epoch_us(d.deleted_at) < a._version)
  AND (a.dataset_name, a.prediction_id) IN (SELECT dataset_name, prediction_id FROM predictions);
