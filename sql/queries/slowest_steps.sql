-- Slowest steps: total logged duration per operator.
SELECT operator_class, count(*) AS events, round(sum(duration_ms), 1) AS total_ms
FROM logs WHERE event = 'end'
GROUP BY ALL ORDER BY total_ms DESC LIMIT 10;
