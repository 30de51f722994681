-- Each day of logged queries against the first day (the baseline), per read model: how far the
-- queries' centroid moved (cosine distance), and how the best hits' similarity changed.

CREATE OR REPLACE VIEW query_drift AS
WITH days AS (
    SELECT model_version, date_trunc('day', at) AS day, count(*) AS queries, avg(query_vector) AS centroid,
           avg(top1_score) AS mean_top1, avg(low_score::int) AS low_share
    FROM query_log GROUP BY model_version, date_trunc('day', at)),
baseline AS (
    SELECT DISTINCT ON (model_version) * FROM days ORDER BY model_version, day)
SELECT d.model_version, m.name AS model, d.day, d.queries, b.day AS baseline_day,
       d.centroid <=> b.centroid AS centroid_shift,
       d.mean_top1, d.mean_top1 - b.mean_top1 AS mean_top1_change,
       d.low_share, d.low_share - b.low_share AS low_share_change
FROM days d
JOIN baseline b USING (model_version)
JOIN embedding_models m ON m.version = d.model_version;
