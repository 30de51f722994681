-- Segue's tables. Run with search_path set to the target schema (then public, for pgvector).
-- Idempotent: every statement may run again on an existing database.

CREATE TABLE IF NOT EXISTS embedding_models (
    version      integer PRIMARY KEY,
    name         text NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
    source       text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('transformer', 'static')),
    dim          integer NOT NULL CHECK (dim BETWEEN 1 AND 16000),
    pooling      text NOT NULL,
    normalize    boolean NOT NULL,
    max_tokens   integer NOT NULL,
    fingerprint  text NOT NULL,
    state        text NOT NULL DEFAULT 'live' CHECK (state IN ('live', 'retired')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    retired_at   timestamptz
);

-- Which model readers query. One row; the first registered model until a cutover.
CREATE TABLE IF NOT EXISTS serving (
    singleton           boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    read_model_version  integer NOT NULL REFERENCES embedding_models (version),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- One row per document; registering model N adds embedding_vN vector(dim) and
-- embedding_vN_sha256 (the content_sha256 that vector was computed from).
CREATE TABLE IF NOT EXISTS documents (
    doc_id          text PRIMARY KEY CHECK (length(doc_id) BETWEEN 1 AND 512),
    body            text NOT NULL,
    version         bigint NOT NULL,
    content_sha256  bytea NOT NULL,
    metadata        jsonb NOT NULL DEFAULT '{}',
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- The version at which a document was deleted, so a late, older upsert cannot resurrect it.
CREATE TABLE IF NOT EXISTS document_tombstones (
    doc_id      text PRIMARY KEY,
    version     bigint NOT NULL,
    deleted_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS migration_changelog (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT clock_timestamp(),
    doc_id         text,
    model_version  integer,
    action         text NOT NULL CHECK (action IN
                     ('embedded', 'unchanged', 'superseded', 'deleted', 'failed', 'dead_lettered',
                      'migration_started', 'migration_paused', 'migration_resumed', 'migration_ready',
                      'migration_cut_over', 'migration_rolled_back', 'migration_finished', 'index_built')),
    origin         text NOT NULL CHECK (origin IN ('change', 'read_miss', 'backfill', 'control')),
    doc_version    bigint,
    event_id       text,
    latency_ms     double precision,
    error          text,
    detail         jsonb
);
CREATE INDEX IF NOT EXISTS migration_changelog_doc_idx ON migration_changelog (doc_id, id);
CREATE INDEX IF NOT EXISTS migration_changelog_at_idx ON migration_changelog USING brin (at);

-- A migration from one model to another; at most one is not finished.
CREATE TABLE IF NOT EXISTS migrations (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    from_version  integer NOT NULL REFERENCES embedding_models (version),
    to_version    integer NOT NULL REFERENCES embedding_models (version),
    state         text NOT NULL CHECK (state IN
                    ('running', 'paused', 'ready', 'cut_over', 'rolled_back', 'finished')),
    settings      jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    cut_over_at   timestamptz,
    finished_at   timestamptz,
    CHECK (from_version <> to_version)
);
CREATE UNIQUE INDEX IF NOT EXISTS migrations_one_active ON migrations ((true)) WHERE state <> 'finished';

-- Quality verdicts of a migration's new model against its old one; the cutover gate reads the latest.
CREATE TABLE IF NOT EXISTS model_evaluations (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    migration_id  bigint NOT NULL REFERENCES migrations (id),
    metric        text NOT NULL,
    old_value     double precision NOT NULL,
    new_value     double precision NOT NULL,
    delta         double precision GENERATED ALWAYS AS (new_value - old_value) STORED,
    verdict       text NOT NULL CHECK (verdict IN ('pass', 'fail')),
    evaluated_at  timestamptz NOT NULL DEFAULT now(),
    detail        jsonb NOT NULL DEFAULT '{}'
);

-- Where each model's backfill stands: it publishes documents in doc_id order after the watermark.
CREATE TABLE IF NOT EXISTS backfill_progress (
    model_version  integer PRIMARY KEY REFERENCES embedding_models (version) ON DELETE CASCADE,
    watermark      text,
    published      bigint NOT NULL DEFAULT 0,
    started_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);

-- Counters kept exact by triggers in the same transactions that write documents and
-- the changelog, so migration_progress never has to count the big tables.
CREATE TABLE IF NOT EXISTS corpus_counters (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    documents  bigint NOT NULL
);
INSERT INTO corpus_counters (documents) SELECT count(*) FROM documents ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS vector_counters (
    model_version  integer PRIMARY KEY REFERENCES embedding_models (version),
    current        bigint NOT NULL DEFAULT 0,
    stale          bigint NOT NULL DEFAULT 0
);

-- Changelog outcomes per model, minute, origin and action (model_version 0 = no model).
CREATE TABLE IF NOT EXISTS activity_counters (
    model_version  integer NOT NULL,
    minute         timestamptz NOT NULL,
    origin         text NOT NULL,
    action         text NOT NULL,
    events         bigint NOT NULL,
    PRIMARY KEY (model_version, minute, origin, action)
);

CREATE OR REPLACE FUNCTION segue_count_activity() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO activity_counters AS a (model_version, minute, origin, action, events)
    SELECT coalesce(model_version, 0), date_trunc('minute', at), origin, action, count(*)
    FROM changelog_rows
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (model_version, minute, origin, action) DO UPDATE SET events = a.events + excluded.events;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER migration_changelog_activity
    AFTER INSERT ON migration_changelog REFERENCING NEW TABLE AS changelog_rows
    FOR EACH STATEMENT EXECUTE FUNCTION segue_count_activity();

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
       failures.events                                      AS failures_24h
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
