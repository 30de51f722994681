-- 0011: adapters between the two models of a migration (segue adapter fit). Each row maps queries embedded
-- by new_version into old_version's space, fitted on the documents current in both; readers in bridged mode
-- use the latest row that passed for their pair, and segue eval --bridged records which one it judged.
CREATE TABLE IF NOT EXISTS model_adapters (
    id                     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    new_version            integer NOT NULL REFERENCES embedding_models (version) ON DELETE CASCADE,
    old_version            integer NOT NULL REFERENCES embedding_models (version) ON DELETE CASCADE,
    new_fingerprint        text NOT NULL,
    old_fingerprint        text NOT NULL,
    kind                   text NOT NULL CHECK (kind IN ('procrustes', 'affine')),
    pairs                  integer NOT NULL CHECK (pairs > 0),
    retention              double precision NOT NULL,   -- held-out neighbour retention of the kind, chance-corrected
    min_retention          double precision NOT NULL,   -- the bar it was held to
    passed                 boolean NOT NULL,
    held_out               jsonb NOT NULL,              -- every kind's held-out figures
    weights                bytea NOT NULL,              -- the map as an .npz archive (matrix, bias)
    fitted_at              timestamptz NOT NULL DEFAULT now(),
    CHECK (new_version <> old_version)
);
CREATE INDEX IF NOT EXISTS model_adapters_pair_idx ON model_adapters (new_version, old_version, id);
