-- 0005: verdicts users run (segue eval) and the evidence around them. A verdict may be
-- inconclusive; shadow comparisons (no labels) are stored as evidence with no verdict; each row
-- names the two models it compared. Readers log a sample of their queries (query_log), and the
-- query_drift view compares each day of them with the first.

ALTER TABLE model_evaluations
    ALTER COLUMN migration_id DROP NOT NULL,
    ALTER COLUMN verdict DROP NOT NULL,
    ALTER COLUMN old_value DROP NOT NULL,
    ALTER COLUMN new_value DROP NOT NULL,
    ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'labelled',
    ADD COLUMN IF NOT EXISTS old_version integer REFERENCES embedding_models (version),
    ADD COLUMN IF NOT EXISTS new_version integer REFERENCES embedding_models (version);
ALTER TABLE model_evaluations DROP CONSTRAINT IF EXISTS model_evaluations_verdict_check;
ALTER TABLE model_evaluations ADD CONSTRAINT model_evaluations_verdict_check CHECK (
    (kind = 'labelled' AND verdict IN ('pass', 'fail', 'inconclusive')) OR (kind = 'shadow' AND verdict IS NULL));
UPDATE model_evaluations e SET old_version = m.from_version, new_version = m.to_version
FROM migrations m WHERE m.id = e.migration_id AND e.old_version IS NULL;
CREATE INDEX IF NOT EXISTS model_evaluations_models_idx ON model_evaluations (old_version, new_version, evaluated_at);

-- A sample of readers' queries (SEGUE_QUERY_LOG_RATE); the text only when SEGUE_QUERY_LOG_TEXT=keep.
CREATE TABLE IF NOT EXISTS query_log (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    model_version  integer NOT NULL,                  -- the read model that embedded it
    query_text     text,                              -- NULL when only the hash is kept
    query_sha256   bytea NOT NULL,
    query_vector   vector NOT NULL,
    top1_score     double precision,                  -- cosine similarity of the best hit
    low_score      boolean NOT NULL,                  -- top-1 below SEGUE_DRIFT_LOW_SCORE when logged
    result_ids     text[] NOT NULL                    -- the top 10, best first
);
CREATE INDEX IF NOT EXISTS query_log_at_idx ON query_log USING brin (at);

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
