-- Derived views: what people ask of a sweep.

-- Each prediction with its run and pipeline names and statuses.
CREATE OR REPLACE VIEW predictions_with_run AS
SELECT p.*, r.name AS run_name, r.status AS run_status,
       pl.name AS pipeline_name, pl.status AS pipeline_status
FROM predictions AS p
LEFT JOIN pipelines AS pl USING (pipeline_id, run_id)
LEFT JOIN runs AS r USING (run_id);

-- Per chain and partition: scores aggregated over folds.
CREATE OR REPLACE VIEW chain_summary AS
SELECT chain_id, any_value(run_id) AS run_id, any_value(pipeline_id) AS pipeline_id,
       dataset_name, model_name, any_value(model_class) AS model_class,
       any_value(preprocessings) AS preprocessings, any_value(metric) AS metric, partition,
       avg(val_score) AS val_score_mean, stddev_samp(val_score) AS val_score_std,
       avg(test_score) AS test_score_mean, stddev_samp(test_score) AS test_score_std,
       avg(train_score) AS train_score_mean, stddev_samp(train_score) AS train_score_std,
       count(*) AS n_folds
FROM predictions
GROUP BY chain_id, dataset_name, model_name, partition;

-- The chains of each dataset ranked by mean validation score over folds; the metric sets
-- the direction (lower is better for error metrics, higher for r2/rpd/accuracy/f1, closest to
-- zero for a bias); {lower_is_better} and {closest_to_zero} are filled from nirslake.query.scores.
CREATE OR REPLACE VIEW leaderboard AS
SELECT row_number() OVER (
           PARTITION BY dataset_name
           ORDER BY CASE WHEN lower(metric) IN ({closest_to_zero}) THEN abs(val_score_mean)
                         WHEN lower(metric) IN ({lower_is_better}) THEN val_score_mean
                         ELSE -val_score_mean END ASC NULLS LAST) AS rank,
       dataset_name, chain_id, model_name, preprocessings, metric,
       val_score_mean, val_score_std, test_score_mean, n_folds, pipeline_id, run_id
FROM chain_summary
WHERE partition = 'val';

-- True when a smaller score is better for the metric (rmse, mae ...), for queries that rank or
-- compare scores themselves (sql/queries/); filled from nirslake.query.LOWER_IS_BETTER.
CREATE OR REPLACE MACRO lower_is_better(metric) AS lower(metric) IN ({lower_is_better});
