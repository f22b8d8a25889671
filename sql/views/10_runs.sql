-- Runs and pipelines change status by appending a new version: per key the highest _version
-- wins; ties go to the later file name, then the later row (as in nirslake.lake.rules.resolve).
CREATE OR REPLACE VIEW runs AS
SELECT * EXCLUDE (_version, _file, _row) FROM lake_table('runs')
WHERE run_id NOT IN (SELECT run_id FROM deleted_runs)
QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY _version DESC, _file DESC, _row DESC) = 1;

CREATE OR REPLACE VIEW pipelines AS
SELECT * EXCLUDE (_version, _file, _row) FROM lake_table('pipelines')
WHERE run_id NOT IN (SELECT run_id FROM deleted_runs)
QUALIFY row_number() OVER (PARTITION BY pipeline_id ORDER BY _version DESC, _file DESC, _row DESC) = 1;

CREATE OR REPLACE VIEW chains AS
SELECT * EXCLUDE (_file, _row) FROM lake_table('chains')
WHERE run_id NOT IN (SELECT run_id FROM deleted_runs);

CREATE OR REPLACE VIEW logs AS
SELECT * EXCLUDE (_version, _file, _row) FROM lake_table('logs')
WHERE run_id NOT IN (SELECT run_id FROM deleted_runs);
