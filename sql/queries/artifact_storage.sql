-- Storage used by fitted artifacts, by type.
SELECT artifact_type, count(*) AS objects, round(sum(size_bytes) / 1e6, 2) AS mb
FROM artifacts GROUP BY ALL ORDER BY mb DESC;
