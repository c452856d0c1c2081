//! Durable trajectory store, reward ledger and adapter registry for searchloop (SQLite, PostgreSQL).
//!
//! Serving writes every episode here (the [`Store`] is a [`searchloop_core::TrajectorySink`]);
//! hosts attach rewards later ([`Store::add_feedback`]); the trainer reads rewarded groups while
//! serving keeps writing ([`Store::rewarded_groups`]); the adapter registry records what was
//! trained, evaluated, promoted and rolled back.
//!
//! ```no_run
//! # async fn demo(t: searchloop_core::Trajectory) -> searchloop_store_sql::Result<()> {
//! use futures::StreamExt;
//! use searchloop_store_sql::{Cursor, FeedbackInput, GroupQuery, Store};
//!
//! let store = Store::open("trajectories.db").await?; // or "postgres://user@host/db"
//! store.insert_trajectory(&t).await?;
//! store
//!     .add_feedback(&t.id, FeedbackInput::new("purchase", 1.0).with_key("order-17"))
//!     .await?;
//! let mut groups = store
//!     .rewarded_groups(GroupQuery { since: Cursor::START, min_group_size: 2, ..Default::default() })
//!     .await?;
//! while let Some(group) = groups.next().await {
//!     let group = group?;
//!     println!("{:?}: {} members", group.group_id, group.members.len());
//! }
//! let resume_from = groups.next_cursor(); // persist; pass as `since` next time
//! # let _ = resume_from;
//! # Ok(()) }
//! ```
//!
//! # Backends
//!
//! [`Store::open`] takes a path or `sqlite://path` (SQLite, the embedded default: one file in
//! WAL mode, created when missing) or a `postgres://` URL (several serving replicas sharing one
//! store; `?options[search_path]=<schema>` picks the schema). Both run the same SQL text (with
//! `$n` placeholders) through one query body per operation, expanded once per driver; see
//! `backend.rs` for why this is an enum of pools rather than `sqlx::Any`.
//!
//! Opening never writes to something that is not a searchloop store: a SQLite file is checked
//! (header, size, `application_id`, tables, schema version) over a read-only connection before
//! anything else, and a PostgreSQL schema that holds other tables is refused. A store with a
//! newer schema version than this build knows is refused too.
//!
//! # Schema (version 3; migrations, SQL files under `migrations/`, are versioned in the
//! `searchloop_schema` table)
//!
//! | table | holds |
//! |---|---|
//! | `trajectories` | one row per episode: `seq` (insertion order, never reused), `id`, `replica_id` (the serving replica, if named), texts, task columns (`task_id`, `task_kind`, `task_split`, `gold_answers` and `task_tools` JSON), `tokens` (little-endian u32 blob), `logprobs` (little-endian f32 blob, bit-exact), `segments` (9-byte records: kind code, start u32, end u32), `tool_calls` and `sampling` (JSON), model id, adapter version, group id, timing |
//! | `rewards` | the reward ledger: any number of entries per trajectory (`source`, `value`, `weight`, `at_ns`, `idempotency_key` unique per trajectory, `origin` = episode or feedback); `seq` orders it |
//! | `trajectory_groups` | one row per training group with the cursor position of its latest ledger change |
//! | `adapters`, `promotions`, `eval_refs` | the adapter registry (a row is `staging` while its round writes it), its promotion history, and which trajectories each adapter's eval used |
//! | `adapter_files` | each published adapter's PEFT files (`adapter_config.json` text, weights bytes), which replicas on other machines fetch and check against the adapter's content hash |
//! | `adapter_feedback_state`, `adapter_feedback_baselines` | the learning state a round leaves for the rounds trained from its adapter: its feedback cursor, and the running mean feedback reward per task kind |
//!
//! Times are integer nanoseconds since the Unix epoch (PostgreSQL's timestamps keep only
//! microseconds, and a round trip must be exact). Every row read back is decoded with length
//! checks and [`searchloop_core::Trajectory::validate`]; a damaged row is a
//! [`StoreError::CorruptRecord`], never a panic.
//!
//! # Durability
//!
//! Writes return after their commit is durable. SQLite runs with `synchronous=FULL` by default
//! (the WAL is fsynced at every commit: acknowledged writes survive a process kill and a power
//! loss); [`SqliteSync::Normal`] trades the power-loss guarantee for speed and still keeps
//! acknowledged writes across a process kill (see its docs). PostgreSQL commits with the
//! server's `synchronous_commit` (on by default).
//!
//! # The group cursor
//!
//! A training group changes when a rewarded member is inserted or feedback arrives; the write
//! marks the group "dirty" in the same transaction. [`Store::rewarded_groups`] first runs a
//! short sequencing round that numbers every dirty group with the next positions of one
//! increasing sequence, then streams the groups whose position is after the caller's [`Cursor`]
//! and up to the highest position given. Rounds run one at a time and commit in order, so a
//! position, once seen, is final: nothing can appear behind a cursor, and a group that changes
//! again simply gets a new, higher position.
//!
//! The cursor is not a timestamp: clocks of several replicas disagree, two writes can share a
//! timestamp, and an episode's creation time says nothing about when it was committed. Nor is it
//! a sequence number drawn at insert: concurrent PostgreSQL transactions commit in a different
//! order than they draw numbers, so a reader could pass a number whose transaction commits only
//! later, and skip it forever. Numbering committed changes in rounds avoids both, without
//! serialising the writers (on PostgreSQL a round skips groups a writer holds locked; they stay
//! dirty for the next round).
//!
//! # Feedback and rewards
//!
//! Feedback values must be finite and inside [`StoreOptions::feedback_range`] (default
//! `[-1, 1]`); an unknown trajectory id is [`StoreError::UnknownTrajectory`]; a repeated
//! delivery with the same idempotency key is [`FeedbackOutcome::Duplicate`]. The training
//! reward is [`StoreOptions::reward_policy`] applied to the ledger (by default the weighted sum
//! of the latest value per source).
//!
//! # Export
//!
//! [`Store::export_jsonl`] writes one [`ExportRecord`] per line: `id`, `prompt`, `completion`,
//! `prompt_ids`, `completion_ids`, `completion_mask` (1 = sampled by the trained model, 0 =
//! prefill, observation or correction), `behaviour_logprobs`, `reward`, `rewards`, `group_id`,
//! `adapter_version`, `task`, and a few more; `EXPORT.md` in this crate documents the schema and
//! how TRL and verl read it.
//!
//! # Retention
//!
//! [`Store::delete_older_than`] and [`Store::archive_older_than`] remove trajectories created
//! before a cut-off, except those referenced by the eval ([`Store::set_eval`]) of an adapter that
//! is promoted or superseded (a rollback target). Eval references of candidates, rejected and
//! rolled-back adapters do not keep trajectories.

mod adapters;
mod backend;
mod codec;
mod error;
mod export;
mod lease;
mod listen;
mod open_files;
mod query;
mod schema;
mod store;

pub use adapters::{
    AdapterFiles, AdapterRecord, AdapterStatus, LearningState, NewAdapter, PromotionAction,
    PromotionEvent, RunningMean,
};
pub use error::{Result, StoreError};
pub use export::{ExportRecord, ExportReward, ExportTask};
pub use lease::TrainerLease;
pub use listen::RegistryListener;
pub use query::{
    Cursor, GroupMember, GroupQuery, GroupStream, HeldoutItem, Page, PageToken, Paged, SourceCount,
    SplitCount, StoreStats, TrajectoryFilter, TrajectoryGroup, TrajectorySummary, VersionCount,
};
pub use store::{
    BackendKind, FeedbackInput, FeedbackOutcome, InsertOutcome, SqliteSync, Store, StoreOptions,
};
