-- 0002: the sweeper scans the corpus incrementally from a cursor per model; failed HNSW
-- builds are recorded in the changelog (action 'index_failed') so workers stop retrying; each
-- document remembers the record that wrote it, so a replayed tombstone cannot delete a later write.

-- Nullable, no default: adding them rewrites nothing.
ALTER TABLE documents ADD COLUMN IF NOT EXISTS source_topic text,
                      ADD COLUMN IF NOT EXISTS source_partition integer,
                      ADD COLUMN IF NOT EXISTS source_offset bigint;

-- Where each model's sweeper pass stands: it scans documents in doc_id order after the cursor.
CREATE TABLE IF NOT EXISTS sweeper_progress (
    model_version    integer PRIMARY KEY REFERENCES embedding_models (version) ON DELETE CASCADE,
    cursor           text,                               -- last doc_id scanned; NULL between passes
    passes           bigint NOT NULL DEFAULT 0,          -- complete passes over the corpus
    pass_started_at  timestamptz NOT NULL DEFAULT now(),
    enqueued         bigint NOT NULL DEFAULT 0,          -- documents re-enqueued, all passes
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- A wider CHECK; NOT VALID because every existing row already satisfies it, so the changelog
-- (possibly huge) is not scanned under the ALTER's lock. New rows are checked all the same.
ALTER TABLE migration_changelog DROP CONSTRAINT IF EXISTS migration_changelog_action_check;
ALTER TABLE migration_changelog ADD CONSTRAINT migration_changelog_action_check CHECK (action IN
    ('embedded', 'unchanged', 'superseded', 'deleted', 'failed', 'dead_lettered',
     'migration_started', 'migration_paused', 'migration_resumed', 'migration_ready',
     'migration_cut_over', 'migration_rolled_back', 'migration_finished', 'index_built', 'index_failed'))
    NOT VALID;
