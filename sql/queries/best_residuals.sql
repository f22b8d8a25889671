-- The best validation prediction of each dataset, its RMSE recomputed from its stored arrays.
WITH best AS (
    SELECT * FROM predictions WHERE partition = 'val'
    QUALIFY row_number() OVER (PARTITION BY dataset_name
                               ORDER BY CASE WHEN lower_is_better(metric) THEN val_score ELSE -val_score END
                               ASC NULLS LAST) = 1
)
SELECT b.dataset_name, b.model_name, b.preprocessings, b.fold_id, len(a.y_true) AS n,
       round(b.val_score, 4) AS val_score,
       round(sqrt(list_avg(list_transform(list_zip(a.y_true, a.y_pred), lambda x: (x[1] - x[2]) ^ 2))), 4) AS rmse_from_arrays
FROM best AS b JOIN prediction_arrays AS a USING (dataset_name, prediction_id)
ORDER BY b.dataset_name;
