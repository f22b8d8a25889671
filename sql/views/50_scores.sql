-- Scores as columns, and scores recomputed from the arrays, per row or per sample.
-- The definitions are those of docs/scores.md (nirslake.query.scores computes the same numbers).

-- A JSON path naming one key exactly, whatever characters it holds.
CREATE OR REPLACE MACRO json_key_path(k) AS '$."' || replace(replace(k, '\', '\\'), '"', '\"') || '"';

-- scores[part][metric] as a number, or NULL when absent (or not a number).
CREATE OR REPLACE MACRO score_of(scores, part, metric) AS
    TRY_CAST(json_extract_string(json_extract(scores, json_key_path(part)), json_key_path(metric)) AS DOUBLE);

-- Each prediction with one column per metric of the chemometrics set, read from its scores for
-- its own partition: ORDER BY r2 DESC ranks by R². Other metrics: prediction_scores_long.
CREATE OR REPLACE VIEW prediction_scores AS
SELECT p.*,
       score_of(p.scores, p.partition, 'rmse') AS rmse,
       score_of(p.scores, p.partition, 'mse') AS mse,
       score_of(p.scores, p.partition, 'mae') AS mae,
       score_of(p.scores, p.partition, 'r2') AS r2,
       score_of(p.scores, p.partition, 'bias') AS bias,
       score_of(p.scores, p.partition, 'sep') AS sep,
       score_of(p.scores, p.partition, 'rpd') AS rpd,
       score_of(p.scores, p.partition, 'rpiq') AS rpiq,
       score_of(p.scores, p.partition, 'accuracy') AS accuracy,
       score_of(p.scores, p.partition, 'balanced_accuracy') AS balanced_accuracy,
       score_of(p.scores, p.partition, 'f1') AS f1
FROM predictions AS p;

-- Every metric of every prediction's scores for its partition, one row each.
CREATE OR REPLACE VIEW prediction_scores_long AS
SELECT p.prediction_id, p.dataset_name, p.run_id, p.pipeline_id, p.chain_id, p.model_name, p.fold_id,
       p.partition, k.metric, score_of(p.scores, p.partition, k.metric) AS value
FROM predictions AS p, unnest(json_keys(json_extract(p.scores, json_key_path(p.partition)))) AS k(metric);

-- The points every score below is computed from: level 'row' is each stored row; with sample ids,
-- 'mean' and 'median' fold a regression's repeated measurements into one point per sample
-- (y_true: the mean of the sample's rows), 'vote' a classification's (the most frequent label,
-- ties to the smallest).
CREATE OR REPLACE VIEW score_points AS
WITH arrays AS (
    SELECT a.prediction_id, a.y_true, a.y_pred, a.sample_ids,
           coalesce(lower(p.task_type) LIKE '%classif%', false) AS is_classification
    FROM prediction_arrays AS a JOIN predictions AS p USING (dataset_name, prediction_id)
    WHERE a.y_true IS NOT NULL AND a.y_pred IS NOT NULL),
measured AS (
    SELECT prediction_id, is_classification, unnest(y_true) AS t, unnest(y_pred) AS p FROM arrays),
samples AS (
    SELECT prediction_id, is_classification, unnest(y_true) AS t, unnest(y_pred) AS p, unnest(sample_ids) AS sample_id
    FROM arrays WHERE sample_ids IS NOT NULL),
votes AS (
    SELECT prediction_id, sample_id, label, kind, row_number() OVER (
               PARTITION BY prediction_id, sample_id, kind ORDER BY count(*) DESC, label) AS place
    FROM (SELECT prediction_id, sample_id, t AS label, 't' AS kind FROM samples WHERE is_classification
          UNION ALL
          SELECT prediction_id, sample_id, p, 'p' FROM samples WHERE is_classification)
    GROUP BY prediction_id, sample_id, label, kind)
SELECT prediction_id, 'row' AS level, is_classification, NULL::VARCHAR AS sample_id, t, p FROM measured
UNION ALL
SELECT prediction_id, 'mean', false, sample_id, avg(t), avg(p) FROM samples WHERE NOT is_classification GROUP BY prediction_id, sample_id
UNION ALL
SELECT prediction_id, 'median', false, sample_id, avg(t), median(p) FROM samples WHERE NOT is_classification GROUP BY prediction_id, sample_id
UNION ALL
SELECT prediction_id, 'vote', true, sample_id,
       max(label) FILTER (WHERE kind = 't'), max(label) FILTER (WHERE kind = 'p')
FROM votes WHERE place = 1 GROUP BY prediction_id, sample_id;

-- The metric set of each prediction at each level: regression (rmse ... rpiq) or classification
-- (accuracy, balanced_accuracy, f1); n_scored counts the points (rows or samples).
CREATE OR REPLACE VIEW level_scores AS
WITH regression AS (
    SELECT prediction_id, level,
           sqrt(avg((p - t) ^ 2)) AS rmse,
           avg((p - t) ^ 2) AS mse,
           avg(abs(p - t)) AS mae,
           CASE WHEN var_pop(t) > 0 THEN 1 - sum((p - t) ^ 2) / (var_pop(t) * count(*)) END AS r2,
           avg(p - t) AS bias,
           stddev_samp(p - t) AS sep,
           stddev_samp(t) / stddev_samp(p - t) AS rpd,
           (quantile_cont(t, 0.75) - quantile_cont(t, 0.25)) / stddev_samp(p - t) AS rpiq,
           count(*) AS n_scored
    FROM score_points WHERE NOT is_classification
    GROUP BY prediction_id, level),
classes AS (
    SELECT prediction_id, level, t AS label, count(*) AS support, count(*) FILTER (WHERE p = t) AS tp
    FROM score_points WHERE is_classification GROUP BY prediction_id, level, t),
predicted AS (
    SELECT prediction_id, level, p AS label, count(*) AS n_predicted
    FROM score_points WHERE is_classification GROUP BY prediction_id, level, p),
classification AS (
    SELECT c.prediction_id, c.level,
           sum(c.tp) / sum(c.support) AS accuracy,
           avg(c.tp / c.support) AS balanced_accuracy,
           sum(2 * c.tp / (coalesce(d.n_predicted, 0) + c.support) * c.support) / sum(c.support) AS f1,
           CAST(sum(c.support) AS BIGINT) AS n_scored
    FROM classes AS c LEFT JOIN predicted AS d USING (prediction_id, level, label)
    GROUP BY c.prediction_id, c.level)
SELECT prediction_id, level, rmse, mse, mae, r2, bias, sep, rpd, rpiq,
       NULL::DOUBLE AS accuracy, NULL::DOUBLE AS balanced_accuracy, NULL::DOUBLE AS f1, n_scored
FROM regression
UNION ALL
SELECT prediction_id, level, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, accuracy, balanced_accuracy, f1, n_scored
FROM classification;

-- Scores recomputed from each prediction's arrays, one column per metric.
CREATE OR REPLACE VIEW array_scores AS
SELECT p.prediction_id, p.dataset_name, p.run_id, p.pipeline_id, p.chain_id, p.model_name, p.model_class,
       p.preprocessings, p.fold_id, p.partition, p.task_type, s.* EXCLUDE (prediction_id, level)
FROM predictions AS p JOIN level_scores AS s ON s.prediction_id = p.prediction_id AND s.level = 'row';

-- Repetitions: scores after folding each sample's repeated measurements (method 'mean' or
-- 'median' for regression, 'vote' for classification), for predictions saved with sample_ids.
-- Rank on them: ... WHERE method = 'mean' AND partition = 'val' ORDER BY rmse.
CREATE OR REPLACE VIEW sample_scores AS
SELECT p.prediction_id, p.dataset_name, p.run_id, p.pipeline_id, p.chain_id, p.model_name, p.model_class,
       p.preprocessings, p.fold_id, p.partition, p.task_type, s.level AS method, s.* EXCLUDE (prediction_id, level)
FROM predictions AS p JOIN level_scores AS s ON s.prediction_id = p.prediction_id AND s.level <> 'row';
