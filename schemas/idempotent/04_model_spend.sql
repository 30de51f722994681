-- What each model's embeddings cost: its billed tokens where it has any, else the tokens of its embedded
-- rows, at its registered price (API models).

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
