-- 0006: imports of existing pgvector tables (segue import): where each stands, and an 'imported'
-- control row in the changelog for each run.

-- One row per source (host/database/table#id[@vector column]): the last id imported, so a killed
-- import resumes after it, and the (version, id) --follow has published up to.
CREATE TABLE IF NOT EXISTS import_progress (
    source          text PRIMARY KEY,
    watermark       text,
    rows_read       bigint NOT NULL DEFAULT 0,
    follow_version  bigint,
    follow_key      text,
    started_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);

ALTER TABLE migration_changelog DROP CONSTRAINT IF EXISTS migration_changelog_action_check;
ALTER TABLE migration_changelog ADD CONSTRAINT migration_changelog_action_check CHECK (action IN
    ('embedded', 'unchanged', 'superseded', 'deleted', 'failed', 'dead_lettered',
     'migration_started', 'migration_paused', 'migration_resumed', 'migration_ready',
     'migration_cut_over', 'migration_rolled_back', 'migration_finished', 'index_built', 'index_failed',
     'imported'))
    NOT VALID;
