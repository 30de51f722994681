-- 0003: models are run by providers configured as data. embedding_models.provider names the
-- provider module (segue/providers/<provider>.py) and config holds its settings (pooling, dtype,
-- attention, prefix, …), instead of a fixed list of kinds and a column per kind-specific setting.

ALTER TABLE embedding_models ADD COLUMN IF NOT EXISTS provider text,
                             ADD COLUMN IF NOT EXISTS config jsonb NOT NULL DEFAULT '{}';

-- Models registered before this step ran with the providers' defaults.
UPDATE embedding_models
SET provider = kind,
    config = CASE WHEN kind = 'transformer'
                  THEN jsonb_build_object('pooling', pooling, 'normalize', normalize, 'dtype', 'float32',
                                          'attention', 'sdpa', 'prefix', '')
                  ELSE jsonb_build_object('normalize', normalize) END
WHERE provider IS NULL;

ALTER TABLE embedding_models
    ALTER COLUMN provider SET NOT NULL,
    ADD CONSTRAINT embedding_models_provider_check CHECK (provider ~ '^[a-z][a-z0-9_]{0,31}$'),
    DROP COLUMN kind,
    DROP COLUMN pooling,
    DROP COLUMN normalize;
