CREATE TABLE adapters_v2 (
    version INTEGER PRIMARY KEY AUTOINCREMENT,
    content_hash TEXT NOT NULL,
    parent_version INTEGER REFERENCES adapters (version),
    path TEXT NOT NULL,
    training_config TEXT NOT NULL,
    metrics_summary TEXT NOT NULL,
    eval_results TEXT,
    status TEXT NOT NULL
        CHECK (status IN ('staging', 'candidate', 'promoted', 'superseded', 'rejected',
                          'rolled_back')),
    status_reason TEXT,
    created_at_ns INTEGER NOT NULL
);
INSERT INTO adapters_v2 (version, content_hash, parent_version, path, training_config,
    metrics_summary, eval_results, status, status_reason, created_at_ns)
SELECT version, content_hash, parent_version, path, training_config, metrics_summary,
    eval_results, status, status_reason, created_at_ns FROM adapters;
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'adapters_v2', 0 WHERE NOT EXISTS
        (SELECT 1 FROM sqlite_sequence WHERE name = 'adapters_v2');
UPDATE sqlite_sequence SET seq = max(seq,
    coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'adapters'), 0))
    WHERE name = 'adapters_v2';
DROP TABLE adapters;
ALTER TABLE adapters_v2 RENAME TO adapters;
CREATE UNIQUE INDEX adapters_one_promoted ON adapters (status) WHERE status = 'promoted';
CREATE TABLE adapter_feedback_state (
    version INTEGER PRIMARY KEY REFERENCES adapters (version) ON DELETE CASCADE,
    feedback_cursor INTEGER NOT NULL
        CHECK (typeof(feedback_cursor) = 'integer' AND feedback_cursor >= 0)
);
CREATE TABLE adapter_feedback_baselines (
    version INTEGER NOT NULL REFERENCES adapters (version) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (typeof(kind) = 'text'),
    mean REAL NOT NULL CHECK (typeof(mean) = 'real'),
    count INTEGER NOT NULL CHECK (typeof(count) = 'integer' AND count >= 0),
    PRIMARY KEY (version, kind)
);
INSERT INTO adapter_feedback_state (version, feedback_cursor)
    SELECT version, json_extract(training_config, '$.feedback_cursor') FROM adapters
    WHERE json_type(training_config, '$.feedback_cursor') IS NOT NULL;
INSERT INTO adapter_feedback_baselines (version, kind, mean, count)
    SELECT a.version, b.key, json_extract(b.value, '$.mean'), json_extract(b.value, '$.count')
    FROM adapters a, json_each(a.training_config, '$.feedback_baselines') b
    WHERE json_type(a.training_config, '$.feedback_baselines') = 'object';
UPDATE adapters SET training_config =
    json_remove(training_config, '$.feedback_cursor', '$.feedback_baselines')
    WHERE json_type(training_config, '$.feedback_cursor') IS NOT NULL
       OR json_type(training_config, '$.feedback_baselines') IS NOT NULL;
