-- Which preprocessing helps most, per dataset: mean validation score over every chain and fold
-- that used it.
SELECT dataset_name, preprocessings, any_value(metric) AS metric,
       round(avg(val_score_mean), 4) AS mean_val, count(*) AS chains
FROM chain_summary WHERE partition = 'val'
GROUP BY dataset_name, preprocessings
ORDER BY dataset_name, CASE WHEN lower_is_better(any_value(metric)) THEN avg(val_score_mean) ELSE -avg(val_score_mean) END;
