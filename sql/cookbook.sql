-- nirslake query cookbook: questions people ask of a sweep, for the DuckDB shell.
-- Open the catalog from any folder:   duckdb -readonly <workspace>/catalog.duckdb
-- Every query below is run by tests/query/test_cookbook.py against a demo workspace.

-- Best 3 chains per dataset by mean validation score over folds.
SELECT dataset_name, rank, model_name, preprocessings, round(val_score_mean, 4) AS val, round(val_score_std, 4) AS sd, n_folds
FROM leaderboard WHERE rank <= 3 ORDER BY dataset_name, rank;

-- Which preprocessing helps most, per dataset (mean validation score over chains and folds).
SELECT dataset_name, preprocessings, round(avg(val_score_mean), 4) AS mean_val, count(*) AS chains
FROM chain_summary WHERE partition = 'val'
GROUP BY ALL ORDER BY dataset_name, mean_val;

-- Gap between validation and test for the leaders: a large gap hints at overfitting the folds.
SELECT dataset_name, model_name, preprocessings,
       round(val_score_mean, 4) AS val, round(test_score_mean, 4) AS test,
       round(test_score_mean - val_score_mean, 4) AS gap
FROM leaderboard WHERE rank = 1 ORDER BY dataset_name;

-- Runs and their pipelines by status.
SELECT r.name AS run, r.status AS run_status, p.status AS pipeline_status, count(*) AS pipelines
FROM pipelines AS p JOIN runs AS r USING (run_id)
GROUP BY ALL ORDER BY run, pipeline_status;

-- Slowest steps: total logged duration per operator.
SELECT operator_class, count(*) AS events, round(sum(duration_ms), 1) AS total_ms
FROM logs WHERE event = 'end'
GROUP BY ALL ORDER BY total_ms DESC LIMIT 10;

-- Residuals of the best validation prediction per dataset, from its arrays.
WITH best AS (
    SELECT * FROM predictions WHERE partition = 'val'
    QUALIFY row_number() OVER (PARTITION BY dataset_name ORDER BY val_score) = 1
)
SELECT b.dataset_name, b.model_name, len(a.y_true) AS n,
       round(sqrt(list_avg(list_transform(list_zip(a.y_true, a.y_pred), lambda x: (x[1] - x[2]) ^ 2))), 4) AS rmse_from_arrays
FROM best AS b JOIN prediction_arrays AS a USING (prediction_id)
ORDER BY b.dataset_name;

-- Storage used by fitted artifacts, by type.
SELECT artifact_type, count(*) AS objects, round(sum(size_bytes) / 1e6, 2) AS mb
FROM artifacts GROUP BY ALL ORDER BY mb DESC;
