-- Fold stability: how much each chain's validation score moves between folds, least stable first.
-- cv is the standard deviation over folds relative to the mean; a chain that wins on one lucky
-- fold shows a wide range here.
SELECT dataset_name, model_name, preprocessings, metric, count(*) AS n_folds,
       round(avg(val_score), 4) AS val_mean, round(stddev_samp(val_score), 4) AS val_sd,
       round(stddev_samp(val_score) / nullif(abs(avg(val_score)), 0), 3) AS cv,
       round(min(val_score), 4) AS best_fold, round(max(val_score), 4) AS worst_fold,
       chain_id
FROM predictions
WHERE partition = 'val'
GROUP BY chain_id, dataset_name, model_name, preprocessings, metric
HAVING count(*) > 1
ORDER BY cv DESC NULLS LAST, dataset_name, model_name;
