-- The read rules of docs/lake-spec.md, as DuckDB macros every view builds on.
-- The workspace's absolute path or URL is filled in when the catalog is built (lake spec §9),
-- so the catalog opens from any working directory; it appears only inside string literals.

-- The location lives in these two macros alone: a catalog built for one workspace becomes
-- another's by replacing them (nirslake.query.catalog), without binding every view again.
CREATE OR REPLACE MACRO lake_location() AS '{lake}';
CREATE OR REPLACE MACRO lake_location_glob() AS '{lake_glob}';

-- Every file of one table, with each row's file name and position in its file (the
-- tie-break of latest-wins); globs are evaluated at query time, so files that land after
-- the catalog was built show up without a rebuild. The glob holds the location with its
-- pattern characters escaped; a DuckDB glob cannot match a backslash, so there a `?` stands for
-- it, and the filter on the exact location keeps only the workspace's own files.
CREATE OR REPLACE MACRO lake_files(table_name) AS TABLE
SELECT * EXCLUDE (filename, file_row_number), parse_filename(filename) AS _file, file_row_number AS _row
FROM read_parquet(lake_location_glob() || '/tables/' || table_name || '/**/*.parquet',
                  union_by_name = true, filename = true, file_row_number = true, hive_partitioning = false)
WHERE starts_with(filename, lake_location() || '/tables/');

-- Commits in the order they landed: each claimed the next number in its file name
-- (commit-<n>.parquet) with a put-if-absent; commits from before numbering come first, by
-- commit_id. A commit does not count when an earlier one (counted or not) already removed a
-- file it removes, or already named (added or removed) a file it adds: of two compactions
-- racing over the same files the first to land wins, and compaction output that a purge
-- claimed before its commit landed never shows (lake spec §4).
CREATE OR REPLACE VIEW lake_commits AS
WITH c AS MATERIALIZED (
    SELECT * EXCLUDE (_file, _row),
           coalesce(TRY_CAST(regexp_extract(_file, '^commit-([0-9]+)\.parquet$', 1) AS BIGINT), -1) AS _landed
    FROM lake_files('commits'))
SELECT * EXCLUDE (_landed) FROM c
WHERE NOT EXISTS (
    SELECT 1 FROM c AS earlier
    WHERE (earlier._landed < c._landed OR (earlier._landed = c._landed AND earlier.commit_id < c.commit_id))
      AND (len(list_intersect(earlier.removed, c.removed)) > 0
           OR len(list_intersect(coalesce(earlier.added, []) || coalesce(earlier.removed, []), c.added)) > 0));

-- Per file name of one table: whether a counting commit added it, and whether one removed it.
CREATE OR REPLACE MACRO lake_visibility(tbl) AS TABLE
SELECT e.name, bool_or(e.added) AS added, bool_or(NOT e.added) AS removed
FROM (SELECT unnest(list_transform(coalesce(added, []), lambda x: {'name': x, 'added': true})
                    || list_transform(coalesce(removed, []), lambda x: {'name': x, 'added': false})) AS e
      FROM lake_commits WHERE table_name = tbl)
GROUP BY e.name;

-- A plain data file is visible unless a commit removed it; a compacted file only once a
-- commit added it. The commits are listed before the data files (the left side of the join
-- is bound first): a reader that sees a commit therefore sees the file it adds.
CREATE OR REPLACE MACRO lake_table(tbl) AS TABLE
SELECT f.* FROM lake_visibility(tbl) AS v RIGHT JOIN lake_files(tbl) AS f ON v.name = f._file
WHERE NOT coalesce(v.removed, false)
  AND (f._file LIKE 'part-%' OR (f._file LIKE 'compact-%' AND coalesce(v.added, false)));

CREATE OR REPLACE VIEW deletions AS
SELECT * EXCLUDE (_file, _row) FROM lake_table('deletions');

CREATE OR REPLACE VIEW deleted_runs AS
SELECT DISTINCT entity_id AS run_id FROM deletions WHERE kind = 'run';

-- An entity deleted at time t hides the rows of it written up to t (a later re-save shows again).
CREATE OR REPLACE VIEW deleted_entities AS
SELECT kind, entity_id, max(deleted_at) AS deleted_at FROM deletions GROUP BY ALL;
