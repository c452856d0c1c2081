ALTER TABLE adapters DROP CONSTRAINT adapters_status_check;
ALTER TABLE adapters ADD CONSTRAINT adapters_status_check
    CHECK (status IN ('staging', 'candidate', 'promoted', 'superseded', 'rejected',
                      'rolled_back'));
CREATE TABLE adapter_feedback_state (
    version BIGINT PRIMARY KEY REFERENCES adapters (version) ON DELETE CASCADE,
    feedback_cursor BIGINT NOT NULL CHECK (feedback_cursor >= 0)
);
CREATE TABLE adapter_feedback_baselines (
    version BIGINT NOT NULL REFERENCES adapters (version) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    mean DOUBLE PRECISION NOT NULL,
    count BIGINT NOT NULL CHECK (count >= 0),
    PRIMARY KEY (version, kind)
);
INSERT INTO adapter_feedback_state (version, feedback_cursor)
    SELECT version, (training_config::jsonb -> 'feedback_cursor')::bigint FROM adapters
    WHERE training_config::jsonb ? 'feedback_cursor';
INSERT INTO adapter_feedback_baselines (version, kind, mean, count)
    SELECT a.version, b.key, (b.value -> 'mean')::double precision,
        (b.value -> 'count')::bigint
    FROM adapters a, jsonb_each(a.training_config::jsonb -> 'feedback_baselines') b
    WHERE jsonb_typeof(a.training_config::jsonb -> 'feedback_baselines') = 'object';
UPDATE adapters SET training_config =
    (training_config::jsonb - 'feedback_cursor' - 'feedback_baselines')::text
    WHERE training_config::jsonb ?| array['feedback_cursor', 'feedback_baselines'];
