-- 0009: billing. A worker records what an API model's endpoint billed it for (every request answered:
-- canaries, retries, split requests and discarded answers included) as 'billed' changelog rows, a few
-- seconds' worth each; the model_spend view (schemas/idempotent/04_model_spend.sql) counts them.

ALTER TABLE migration_changelog DROP CONSTRAINT IF EXISTS migration_changelog_action_check;
ALTER TABLE migration_changelog ADD CONSTRAINT migration_changelog_action_check CHECK (action IN
    ('embedded', 'unchanged', 'superseded', 'deleted', 'failed', 'dead_lettered',
     'migration_started', 'migration_paused', 'migration_resumed', 'migration_ready',
     'migration_cut_over', 'migration_rolled_back', 'migration_finished', 'index_built', 'index_failed',
     'imported', 'billed'))
    NOT VALID;
