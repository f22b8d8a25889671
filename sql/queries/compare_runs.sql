-- Two runs compared, chain by chain: the mean validation score of each (dataset, model,
-- preprocessing) in run a and run b, and b's change over a (positive change = b better,
-- whatever the metric's direction).
-- Parameters: run_a, run_b (run ids); by default the two newest runs, a the older:
--   SET VARIABLE run_a = '<run id>'; SET VARIABLE run_b = '<run id>';
WITH chosen AS (
    SELECT coalesce(getvariable('run_a'),
                    (SELECT run_id FROM runs ORDER BY created_at DESC, run_id DESC LIMIT 1 OFFSET 1)) AS run_a,
           coalesce(getvariable('run_b'),
                    (SELECT run_id FROM runs ORDER BY created_at DESC, run_id DESC LIMIT 1)) AS run_b
),
a AS (SELECT s.* FROM chain_summary AS s, chosen WHERE s.partition = 'val' AND s.run_id = chosen.run_a),
b AS (SELECT s.* FROM chain_summary AS s, chosen WHERE s.partition = 'val' AND s.run_id = chosen.run_b)
SELECT coalesce(a.dataset_name, b.dataset_name) AS dataset_name,
       coalesce(a.model_name, b.model_name) AS model_name,
       coalesce(a.preprocessings, b.preprocessings) AS preprocessings,
       coalesce(a.metric, b.metric) AS metric,
       round(a.val_score_mean, 4) AS val_a, round(b.val_score_mean, 4) AS val_b,
       round(CASE WHEN lower_is_better(coalesce(a.metric, b.metric)) THEN a.val_score_mean - b.val_score_mean
                  ELSE b.val_score_mean - a.val_score_mean END, 4) AS change,
       (SELECT run_a FROM chosen) AS run_a, (SELECT run_b FROM chosen) AS run_b
FROM a FULL OUTER JOIN b USING (dataset_name, model_name, preprocessings)
ORDER BY dataset_name, change DESC NULLS LAST, model_name, preprocessings;
