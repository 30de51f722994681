-- Vectors written per live model and origin (change, read_miss, backfill): last 5 minutes and last 24 hours.

CREATE OR REPLACE VIEW migration_progress_by_origin AS
SELECT m.version AS model_version,
       m.name    AS model,
       a.origin,
       coalesce(sum(a.events) FILTER (WHERE a.minute >= date_trunc('minute', now() - interval '5 minutes')), 0)::bigint
                 AS vectors_last_5m,
       coalesce(sum(a.events), 0)::bigint AS vectors_last_24h
FROM embedding_models m
JOIN activity_counters a ON a.model_version = m.version
WHERE m.state = 'live' AND a.action = 'embedded' AND a.minute >= now() - interval '24 hours'
GROUP BY m.version, m.name, a.origin;
