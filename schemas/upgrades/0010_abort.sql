-- 0010: a migration can be abandoned before its cutover (segue migrate abort): it ends in state 'aborted',
-- logged as a 'migration_aborted' control row, and an aborted migration, like a finished one, leaves room
-- for the next. Views and functions are no longer declared in upgrade steps: they are the files of
-- schemas/idempotent/, applied again whenever one changes.

ALTER TABLE migration_changelog DROP CONSTRAINT IF EXISTS migration_changelog_action_check;
ALTER TABLE migration_changelog ADD CONSTRAINT migration_changelog_action_check CHECK (action IN
    ('embedded', 'unchanged', 'superseded', 'deleted', 'failed', 'dead_lettered',
     'migration_started', 'migration_paused', 'migration_resumed', 'migration_ready',
     'migration_cut_over', 'migration_rolled_back', 'migration_finished', 'migration_aborted',
     'index_built', 'index_failed', 'imported', 'billed'))
    NOT VALID;

ALTER TABLE migrations DROP CONSTRAINT IF EXISTS migrations_state_check;
ALTER TABLE migrations ADD CONSTRAINT migrations_state_check CHECK (state IN
    ('running', 'paused', 'ready', 'cut_over', 'rolled_back', 'finished', 'aborted'));

DROP INDEX IF EXISTS migrations_one_active;
CREATE UNIQUE INDEX migrations_one_active ON migrations ((true)) WHERE state NOT IN ('finished', 'aborted');
