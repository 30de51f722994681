-- 0004: workers report themselves (heartbeats), and dead-letter replays are remembered so a
-- dead letter is replayed at most once.

-- One row per worker process, upserted every few seconds; `segue status` calls a worker lost
-- when its last beat is older than SEGUE_WORKER_LOST_AFTER_S, and rows expire after a day.
CREATE TABLE IF NOT EXISTS workers (
    worker_id      text PRIMARY KEY,               -- host:pid:start time
    host           text NOT NULL,
    pid            integer NOT NULL,
    started_at     timestamptz NOT NULL,
    last_beat      timestamptz NOT NULL DEFAULT now(),
    state          text NOT NULL,                  -- loading, waiting, ready, failed
    partitions     jsonb NOT NULL DEFAULT '[]',    -- topic/partition names it holds
    lag            jsonb NOT NULL DEFAULT '{}',    -- records behind, per topic/partition
    models         jsonb NOT NULL DEFAULT '[]',    -- names of the models loaded and warm
    device         text,
    events_per_s   double precision NOT NULL DEFAULT 0,
    metrics_url    text
);

-- Dead letters replayed to their source topic, by their own coordinates on the dead-letter topic.
CREATE TABLE IF NOT EXISTS dead_letter_replays (
    topic        text NOT NULL,
    partition    integer NOT NULL,
    "offset"     bigint NOT NULL,
    reason       text NOT NULL,
    source       text NOT NULL,                   -- topic/partition/offset the original was read from
    replayed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, "offset")
);
