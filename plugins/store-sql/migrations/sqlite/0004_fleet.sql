ALTER TABLE trajectories ADD COLUMN replica_id TEXT;
CREATE TABLE adapter_files (
    version INTEGER PRIMARY KEY REFERENCES adapters (version) ON DELETE CASCADE,
    peft_config TEXT NOT NULL,
    weights BLOB NOT NULL
);
