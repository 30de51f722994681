-- Per live model: documents, current, stale and missing vectors, coverage, the rate over the last
-- 5 minutes and the ETA it gives, failures in the last 24 hours, and the documents it truncates.
-- It reads only the counters, never the big tables.

CREATE OR REPLACE VIEW migration_progress AS
WITH window_start AS (SELECT date_trunc('minute', now() - interval '5 minutes') AS at)
SELECT m.version                                            AS model_version,
       m.name                                               AS model,
       m.dim,
       s.read_model_version = m.version                     AS serving_reads,
       c.documents                                          AS total_documents,
       v.current                                            AS current_vectors,
       v.stale                                              AS stale_vectors,
       c.documents - v.current - v.stale                    AS missing_vectors,
       round(100.0 * v.current / nullif(c.documents, 0), 2) AS coverage_pct,
       recent.vectors                                       AS vectors_last_5m,
       round(recent.vectors / recent.seconds, 2)            AS rate_per_s,
       CASE WHEN v.current >= c.documents THEN interval '0'
            WHEN recent.vectors > 0
            THEN make_interval(secs => (c.documents - v.current) * recent.seconds / recent.vectors)
       END                                                  AS eta,
       failures.events                                      AS failures_24h,
       (SELECT count(*) FROM truncated_documents t WHERE t.model_version = m.version) AS truncated_documents
FROM embedding_models m
CROSS JOIN corpus_counters c
CROSS JOIN window_start w
JOIN vector_counters v ON v.model_version = m.version
LEFT JOIN serving s ON true
CROSS JOIN LATERAL (
    -- the rate is taken over the part of the window with activity, not over idle minutes before it
    SELECT coalesce(sum(a.events), 0)::bigint AS vectors,
           greatest(extract(epoch FROM now() - greatest(w.at, min(a.minute))), 1) AS seconds
    FROM activity_counters a
    WHERE a.model_version = m.version AND a.action = 'embedded' AND a.minute >= w.at) recent
CROSS JOIN LATERAL (
    SELECT coalesce(sum(a.events), 0)::bigint AS events FROM activity_counters a
    WHERE a.model_version = m.version AND a.action IN ('failed', 'dead_lettered')
      AND a.minute >= now() - interval '24 hours') failures
WHERE m.state = 'live';
