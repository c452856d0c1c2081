PRAGMA application_id = 1397510996;
CREATE TABLE trajectories (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created_at_ns INTEGER NOT NULL,
    group_key TEXT NOT NULL,
    group_id TEXT,
    adapter_version INTEGER,
    task_id TEXT,
    task_kind TEXT,
    task_split TEXT CHECK (task_split IN ('train', 'heldout')),
    model_id TEXT NOT NULL,
    episode_end TEXT NOT NULL,
    turns INTEGER NOT NULL,
    started_at_ns INTEGER,
    model_ms REAL NOT NULL,
    tool_ms REAL NOT NULL,
    total_ms REAL NOT NULL,
    answer TEXT,
    gold_answers TEXT,
    question TEXT NOT NULL,
    sampling TEXT NOT NULL,
    segments BLOB NOT NULL,
    tool_calls TEXT NOT NULL,
    prompt_text TEXT NOT NULL,
    response_text TEXT NOT NULL,
    tokens BLOB NOT NULL,
    logprobs BLOB NOT NULL
);
CREATE INDEX trajectories_group_key ON trajectories (group_key);
CREATE INDEX trajectories_created ON trajectories (created_at_ns);
CREATE INDEX trajectories_task ON trajectories (task_split, task_id);
CREATE TABLE rewards (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    trajectory_seq INTEGER NOT NULL REFERENCES trajectories (seq) ON DELETE CASCADE,
    source TEXT NOT NULL,
    value REAL NOT NULL,
    weight REAL NOT NULL,
    at_ns INTEGER NOT NULL,
    idempotency_key TEXT,
    origin TEXT NOT NULL CHECK (origin IN ('episode', 'feedback')),
    UNIQUE (trajectory_seq, idempotency_key)
);
CREATE TABLE trajectory_groups (
    group_key TEXT PRIMARY KEY,
    change_seq INTEGER
);
CREATE INDEX trajectory_groups_change ON trajectory_groups (change_seq);
CREATE INDEX trajectory_groups_dirty ON trajectory_groups (group_key) WHERE change_seq IS NULL;
CREATE TABLE store_counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO store_counters (name, value) VALUES ('group_changes', 0);
CREATE TABLE adapters (
    version INTEGER PRIMARY KEY AUTOINCREMENT,
    content_hash TEXT NOT NULL,
    parent_version INTEGER REFERENCES adapters (version),
    path TEXT NOT NULL,
    training_config TEXT NOT NULL,
    metrics_summary TEXT NOT NULL,
    eval_results TEXT,
    status TEXT NOT NULL
        CHECK (status IN ('candidate', 'promoted', 'superseded', 'rejected', 'rolled_back')),
    status_reason TEXT,
    created_at_ns INTEGER NOT NULL
);
CREATE UNIQUE INDEX adapters_one_promoted ON adapters (status) WHERE status = 'promoted';
CREATE TABLE promotions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    version INTEGER REFERENCES adapters (version),
    action TEXT NOT NULL CHECK (action IN ('promote', 'rollback')),
    reason TEXT,
    at_ns INTEGER NOT NULL
);
CREATE TABLE eval_refs (
    adapter_version INTEGER NOT NULL REFERENCES adapters (version) ON DELETE CASCADE,
    trajectory_seq INTEGER NOT NULL REFERENCES trajectories (seq) ON DELETE CASCADE,
    PRIMARY KEY (adapter_version, trajectory_seq)
);
CREATE INDEX eval_refs_trajectory ON eval_refs (trajectory_seq);
