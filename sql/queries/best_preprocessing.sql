-- The best preprocessing for each model on each dataset, by mean validation score over folds
-- (averaged over the chains, e.g. of several runs, that tried that pair), with the runner-up.
WITH pairs AS (
    SELECT dataset_name, model_name, preprocessings, any_value(metric) AS metric,
           avg(val_score_mean) AS val, count(*) AS chains
    FROM chain_summary
    WHERE partition = 'val'
    GROUP BY dataset_name, model_name, preprocessings
),
ranked AS (
    SELECT *, row_number() OVER (PARTITION BY dataset_name, model_name
                                 ORDER BY CASE WHEN lower_is_better(metric) THEN val ELSE -val END ASC NULLS LAST,
                                          preprocessings) AS place,
              count(*) OVER (PARTITION BY dataset_name, model_name) AS tried
    FROM pairs
)
SELECT best.dataset_name, best.model_name, best.preprocessings AS best_preprocessing, best.metric,
       round(best.val, 4) AS val, second.preprocessings AS runner_up, round(second.val, 4) AS runner_up_val,
       best.tried, best.chains
FROM ranked AS best
LEFT JOIN ranked AS second
       ON second.dataset_name = best.dataset_name AND second.model_name = best.model_name AND second.place = 2
WHERE best.place = 1
ORDER BY best.dataset_name, best.model_name;
