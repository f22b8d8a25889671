-- Best chains per dataset by mean validation score over folds (the metric sets the direction).
-- Parameter: top (default 3), how many chains per dataset: SET VARIABLE top = 5;
SELECT dataset_name, rank, model_name, preprocessings, metric,
       round(val_score_mean, 4) AS val, round(val_score_std, 4) AS sd,
       round(test_score_mean, 4) AS test, n_folds, chain_id
FROM leaderboard
WHERE rank <= coalesce(CAST(getvariable('top') AS INTEGER), 3)
ORDER BY dataset_name, rank;
