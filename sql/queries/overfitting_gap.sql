-- Overfitting gap: how much worse each chain scores on its validation folds than on the data it
-- was fitted on (mean over folds). A gap large against the validation score means the model learnt
-- its training samples rather than the signal. Positive gap = validation worse than training,
-- whatever the metric's direction.
SELECT dataset_name, model_name, preprocessings, metric,
       round(train_score_mean, 4) AS train, round(val_score_mean, 4) AS val,
       round(CASE WHEN lower_is_better(metric) THEN val_score_mean - train_score_mean
                  ELSE train_score_mean - val_score_mean END, 4) AS gap,
       round(CASE WHEN lower_is_better(metric) THEN val_score_mean - train_score_mean
                  ELSE train_score_mean - val_score_mean END / nullif(abs(val_score_mean), 0), 3) AS gap_ratio,
       n_folds, chain_id
FROM chain_summary
WHERE partition = 'val' AND train_score_mean IS NOT NULL AND val_score_mean IS NOT NULL
ORDER BY gap_ratio DESC NULLS LAST, dataset_name;
