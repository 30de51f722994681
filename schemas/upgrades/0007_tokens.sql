-- 0007: tokens. An embedded changelog row records the tokens the model was given (tokens_used: what an
-- API bills) and the text's tokens before truncation (tokens_total), so spend and truncation are SQL
-- queries; the activity counters sum the tokens per minute, and the truncation ledger keeps the documents
-- whose current vector was embedded from a truncated text. Workers report the models they stopped writing.

ALTER TABLE migration_changelog ADD COLUMN IF NOT EXISTS tokens_used integer,
                                ADD COLUMN IF NOT EXISTS tokens_total integer;
ALTER TABLE activity_counters ADD COLUMN IF NOT EXISTS tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN IF NOT EXISTS halted jsonb NOT NULL DEFAULT '{}';

CREATE TABLE IF NOT EXISTS truncated_documents (
    model_version  integer NOT NULL,
    doc_id         text NOT NULL,
    tokens_used    integer NOT NULL,
    tokens_total   integer NOT NULL,
    at             timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_version, doc_id)
);

CREATE OR REPLACE FUNCTION segue_count_activity() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO activity_counters AS a (model_version, minute, origin, action, events, tokens)
    SELECT coalesce(model_version, 0), date_trunc('minute', at), origin, action, count(*),
           coalesce(sum(tokens_used), 0)
    FROM changelog_rows
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (model_version, minute, origin, action)
    DO UPDATE SET events = a.events + excluded.events, tokens = a.tokens + excluded.tokens;

    -- The truncation ledger follows each document's latest embedding (and its deletion).
    DELETE FROM truncated_documents t USING changelog_rows r
    WHERE r.model_version = t.model_version AND r.doc_id = t.doc_id
      AND (r.action = 'deleted' OR (r.action = 'embedded' AND r.tokens_total <= r.tokens_used));
    INSERT INTO truncated_documents AS t (model_version, doc_id, tokens_used, tokens_total)
    SELECT DISTINCT ON (model_version, doc_id) model_version, doc_id, tokens_used, tokens_total
    FROM changelog_rows
    WHERE action = 'embedded' AND tokens_total > tokens_used AND model_version IS NOT NULL AND doc_id IS NOT NULL
    ORDER BY model_version, doc_id, id DESC
    ON CONFLICT (model_version, doc_id)
    DO UPDATE SET tokens_used = excluded.tokens_used, tokens_total = excluded.tokens_total, at = now();
    RETURN NULL;
END $$;

-- migration_progress gains, per model, the documents it truncates and the tokens it was given.
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

-- What each model's embeddings cost: the tokens it was given, at its registered price (API models).
CREATE OR REPLACE VIEW model_spend AS
SELECT m.version AS model_version,
       m.name    AS model,
       coalesce(sum(a.tokens), 0)::bigint AS tokens,
       round((coalesce(sum(a.tokens), 0) * (m.config ->> 'price_per_million_tokens')::numeric / 1e6), 6) AS usd
FROM embedding_models m
LEFT JOIN activity_counters a ON a.model_version = m.version AND a.action = 'embedded'
GROUP BY m.version, m.name, m.config;
