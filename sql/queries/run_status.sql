-- Runs and their pipelines by status.
SELECT r.name AS run, r.run_id, r.status AS run_status, p.status AS pipeline_status, count(*) AS pipelines
FROM pipelines AS p JOIN runs AS r USING (run_id)
GROUP BY ALL ORDER BY run, r.run_id, pipeline_status;
