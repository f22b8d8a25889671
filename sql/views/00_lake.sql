-- The read rules of docs/lake-spec.md, as DuckDB macros every view builds on.
-- '{lake}' is replaced by the workspace's absolute path or URL when the catalog is built,
-- so the catalog opens from any working directory.

-- Every file of one table, with its file name; globs are evaluated at query time, so
-- files that land after the catalog was built show up without a rebuild.
CREATE OR REPLACE MACRO lake_files(table_name) AS TABLE
SELECT * EXCLUDE (filename), parse_filename(filename) AS _file
FROM read_parquet('{lake}/tables/' || table_name || '/**/*.parquet',
                  union_by_name = true, filename = true, hive_partitioning = false);

CREATE OR REPLACE VIEW lake_commits AS
SELECT * EXCLUDE (_file) FROM lake_files('commits');

-- A plain data file is visible unless a commit removed it; a compacted file only once a
-- commit added it. One commit file flips both at once, so readers never see a row twice.
CREATE OR REPLACE MACRO lake_table(table_name) AS TABLE
SELECT * EXCLUDE (_file) FROM lake_files(table_name)
WHERE (_file LIKE 'part-%'
       OR (_file LIKE 'compact-%' AND _file IN (SELECT unnest(added) FROM lake_commits)))
  AND _file NOT IN (SELECT unnest(removed) FROM lake_commits WHERE removed IS NOT NULL);

CREATE OR REPLACE VIEW deletions AS
SELECT * FROM lake_table('deletions');

CREATE OR REPLACE VIEW deleted_runs AS
SELECT DISTINCT entity_id AS run_id FROM deletions WHERE kind = 'run';

-- An entity deleted at time t hides the rows of it written up to t (a later re-save shows again).
CREATE OR REPLACE VIEW deleted_entities AS
SELECT kind, entity_id, max(deleted_at) AS deleted_at FROM deletions GROUP BY ALL;
