-- The activity counters and the truncation ledger, kept by the changelog's statement trigger
-- (migration_changelog_activity, upgrade 0001) in the transaction that appends the rows.

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
