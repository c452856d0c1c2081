CREATE TABLE trajectories (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    created_at_ns BIGINT NOT NULL,
    group_key TEXT NOT NULL,
    group_id TEXT,
    adapter_version BIGINT,
    task_id TEXT,
    task_kind TEXT,
    task_split TEXT CHECK (task_split IN ('train', 'heldout')),
    model_id TEXT NOT NULL,
    episode_end TEXT NOT NULL,
    turns BIGINT NOT NULL,
    started_at_ns BIGINT,
    model_ms DOUBLE PRECISION NOT NULL,
    tool_ms DOUBLE PRECISION NOT NULL,
    total_ms DOUBLE PRECISION NOT NULL,
    answer TEXT,
    gold_answers TEXT,
    question TEXT NOT NULL,
    sampling TEXT NOT NULL,
    segments BYTEA NOT NULL,
    tool_calls TEXT NOT NULL,
    prompt_text TEXT NOT NULL,
    response_text TEXT NOT NULL,
    tokens BYTEA NOT NULL,
    logprobs BYTEA NOT NULL
);
CREATE INDEX trajectories_group_key ON trajectories (group_key);
CREATE INDEX trajectories_created ON trajectories (created_at_ns);
CREATE INDEX trajectories_task ON trajectories (task_split, task_id);
CREATE TABLE rewards (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    trajectory_seq BIGINT NOT NULL REFERENCES trajectories (seq) ON DELETE CASCADE,
    source TEXT NOT NULL,
    value DOUBLE PRECISION NOT NULL,
    weight DOUBLE PRECISION NOT NULL,
    at_ns BIGINT NOT NULL,
    idempotency_key TEXT,
    origin TEXT NOT NULL CHECK (origin IN ('episode', 'feedback')),
    UNIQUE (trajectory_seq, idempotency_key)
);
CREATE TABLE trajectory_groups (
    group_key TEXT PRIMARY KEY,
    change_seq BIGINT
);
CREATE INDEX trajectory_groups_change ON trajectory_groups (change_seq);
CREATE INDEX trajectory_groups_dirty ON trajectory_groups (group_key) WHERE change_seq IS NULL;
CREATE SEQUENCE trajectory_group_changes;
CREATE TABLE adapters (
    version BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    content_hash TEXT NOT NULL,
    parent_version BIGINT REFERENCES adapters (version),
    path TEXT NOT NULL,
    training_config TEXT NOT NULL,
    metrics_summary TEXT NOT NULL,
    eval_results TEXT,
    status TEXT NOT NULL
        CHECK (status IN ('candidate', 'promoted', 'superseded', 'rejected', 'rolled_back')),
    status_reason TEXT,
    created_at_ns BIGINT NOT NULL
);
CREATE UNIQUE INDEX adapters_one_promoted ON adapters (status) WHERE status = 'promoted';
CREATE TABLE promotions (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    version BIGINT REFERENCES adapters (version),
    action TEXT NOT NULL CHECK (action IN ('promote', 'rollback')),
    reason TEXT,
    at_ns BIGINT NOT NULL
);
CREATE TABLE eval_refs (
    adapter_version BIGINT NOT NULL REFERENCES adapters (version) ON DELETE CASCADE,
    trajectory_seq BIGINT NOT NULL REFERENCES trajectories (seq) ON DELETE CASCADE,
    PRIMARY KEY (adapter_version, trajectory_seq)
);
CREATE INDEX eval_refs_trajectory ON eval_refs (trajectory_seq);
