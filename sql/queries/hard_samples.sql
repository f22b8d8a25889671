-- Which samples does every model get wrong? Per sample, its out-of-fold (validation) residual
-- under every chain that predicted it. A sample is "missed" by a chain when its absolute
-- residual exceeds twice that chain's RMSE over all its validation samples; samples every chain
-- misses come first (a reference value to check, or a spectrum unlike the rest).
-- Parameter: missed_over (default 2), the multiple of a chain's RMSE: SET VARIABLE missed_over = 3;
WITH residuals AS (
    SELECT p.dataset_name, p.chain_id, p.model_name, p.preprocessings,
           unnest(a.sample_indices) AS sample_index, unnest(a.y_true) AS y_true, unnest(a.y_pred) AS y_pred
    FROM predictions AS p JOIN prediction_arrays AS a USING (dataset_name, prediction_id)
    WHERE p.partition = 'val' AND a.sample_indices IS NOT NULL
),
per_chain AS (
    SELECT *, y_pred - y_true AS residual,
           sqrt(avg((y_pred - y_true) ^ 2) OVER (PARTITION BY dataset_name, chain_id)) AS chain_rmse
    FROM residuals
)
SELECT dataset_name, sample_index, round(any_value(y_true), 4) AS y_true,
       count(DISTINCT chain_id) AS n_chains,
       count(DISTINCT chain_id) FILTER (WHERE abs(residual) > coalesce(CAST(getvariable('missed_over') AS DOUBLE), 2) * chain_rmse) AS missed_by,
       round(avg(residual), 4) AS mean_residual,
       round(min(abs(residual)), 4) AS smallest_abs_residual,
       round(avg(abs(residual) / nullif(chain_rmse, 0)), 3) AS mean_residual_in_rmse
FROM per_chain
GROUP BY dataset_name, sample_index
ORDER BY missed_by * 1.0 / n_chains DESC, mean_residual_in_rmse DESC, dataset_name, sample_index;
