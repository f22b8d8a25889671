-- Validation against test for each dataset's leader: a large gap hints that choosing the best
-- of many chains on the validation folds overfitted them.
SELECT dataset_name, model_name, preprocessings, metric,
       round(val_score_mean, 4) AS val, round(test_score_mean, 4) AS test,
       round(test_score_mean - val_score_mean, 4) AS gap
FROM leaderboard WHERE rank = 1 ORDER BY dataset_name;
