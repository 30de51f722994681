-- 0009: billing. A worker records what an API model's endpoint billed it for (every request answered:
-- canaries, retries, split requests and discarded answers included) as 'billed' changelog rows, a few
-- seconds' worth each. model_spend counts a model's billed tokens where it has any, else the tokens of its
-- embedded rows (local models, and spend recorded before this step).

ALTER TABLE migration_changelog DROP CONSTRAINT IF EXISTS migration_changelog_action_check;
ALTER TABLE migration_changelog ADD CONSTRAINT migration_changelog_action_check CHECK (action IN
    ('embedded', 'unchanged', 'superseded', 'deleted', 'failed', 'dead_lettered',
     'migration_started', 'migration_paused', 'migration_resumed', 'migration_ready',
     'migration_cut_over', 'migration_rolled_back', 'migration_finished', 'index_built', 'index_failed',
     'imported', 'billed'))
    NOT VALID;

CREATE OR REPLACE VIEW model_spend AS
SELECT m.version AS model_version,
       m.name    AS model,
       t.tokens,
       round((t.tokens * (m.config ->> 'price_per_million_tokens')::numeric / 1e6), 6) AS usd,
       t.embedded_tokens,
       t.billed_tokens
FROM embedding_models m
CROSS JOIN LATERAL (
    SELECT coalesce(nullif(sum(a.tokens) FILTER (WHERE a.action = 'billed'), 0),
                    sum(a.tokens) FILTER (WHERE a.action = 'embedded'), 0)::bigint AS tokens,
           coalesce(sum(a.tokens) FILTER (WHERE a.action = 'embedded'), 0)::bigint AS embedded_tokens,
           coalesce(sum(a.tokens) FILTER (WHERE a.action = 'billed'), 0)::bigint AS billed_tokens
    FROM activity_counters a
    WHERE a.model_version = m.version) t;
