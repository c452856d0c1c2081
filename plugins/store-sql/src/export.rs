//! Getting trajectories out: the JSONL export a Python RL stack trains on (schema in EXPORT.md),
//! and retention, which deletes or archives old trajectories while keeping those an adapter
//! that serves (or may serve again) was evaluated on.

use std::{collections::BTreeSet, io::Write, time::Duration};

use chrono::{DateTime, Utc};
use searchloop_core::{RewardPolicy, Split, Trajectory};
use serde::{Deserialize, Serialize};

use crate::{
    backend::on_write,
    error::{DbContext, Result, StoreError},
    query::{FilterParams, TrajectoryFilter, pinned_sql},
    store::{Store, group_key},
};

/// One line of the training export: TRL-style `prompt` / `completion` text, and the token-level
/// fields a verl-style trainer needs. See `EXPORT.md` for the schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportRecord {
    /// The trajectory id.
    pub id: String,
    /// When the episode was created (RFC 3339).
    pub created_at: DateTime<Utc>,
    /// The base model.
    pub model_id: String,
    /// The adapter version that served it (`null` = base model).
    pub adapter_version: Option<u64>,
    /// The serving replica that ran it (`null`: the host named none).
    pub replica_id: Option<String>,
    /// Samples of one prompt share a group id (`null`: sampled alone).
    pub group_id: Option<String>,
    /// The question asked.
    pub question: String,
    /// The rendered chat prompt.
    pub prompt: String,
    /// Everything after the prompt as text: prefills, model turns, observations, corrections.
    pub completion: String,
    /// Token ids of the prompt.
    pub prompt_ids: Vec<u32>,
    /// Token ids after the prompt.
    pub completion_ids: Vec<u32>,
    /// Per completion token: 1 for tokens the model sampled (trained), 0 for runtime prefills,
    /// tool observations and corrections (masked from the loss).
    pub completion_mask: Vec<u8>,
    /// Per completion token: the sampler's natural-log probability (0 where the mask is 0).
    pub behaviour_logprobs: Vec<f32>,
    /// The training reward under the store's reward policy (`null`: no reward yet).
    pub reward: Option<f64>,
    /// The reward ledger, in the order recorded.
    pub rewards: Vec<ExportReward>,
    /// The final answer, if any.
    pub answer: Option<String>,
    /// Task metadata, when the question came from a task set.
    pub task: Option<ExportTask>,
}

/// A ledger entry in the export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportReward {
    /// The source (`exact_match`, `f1`, `format`, or a host feedback kind).
    pub source: String,
    /// The value.
    pub value: f64,
    /// Its weight.
    pub weight: f64,
    /// When it was recorded.
    pub at: DateTime<Utc>,
}

/// Task metadata in the export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportTask {
    /// The task item id.
    pub task_id: String,
    /// The task kind.
    pub kind: String,
    /// `train` or `heldout`.
    pub split: Split,
    /// Acceptable answers.
    pub gold_answers: Vec<String>,
}

impl ExportRecord {
    /// The export line of `t`, with its reward under `policy`.
    pub fn from_trajectory(t: &Trajectory, policy: &RewardPolicy) -> Self {
        let prompt_len = t.prompt_len();
        let completion_mask = t.loss_mask()[prompt_len..]
            .iter()
            .map(|&trained| u8::from(trained))
            .collect();
        Self {
            id: t.id.clone(),
            created_at: t.created_at,
            model_id: t.model_id.clone(),
            adapter_version: t.adapter_version,
            replica_id: t.replica_id.clone(),
            group_id: t.group_id.clone(),
            question: t.question.clone(),
            prompt: t.prompt_text.clone(),
            completion: t.response_text.clone(),
            prompt_ids: t.tokens[..prompt_len].to_vec(),
            completion_ids: t.tokens[prompt_len..].to_vec(),
            completion_mask,
            behaviour_logprobs: t.logprobs[prompt_len..].to_vec(),
            reward: policy.combine(&t.rewards),
            rewards: t
                .rewards
                .iter()
                .map(|r| ExportReward {
                    source: r.source.clone(),
                    value: r.value,
                    weight: r.weight,
                    at: r.at,
                })
                .collect(),
            answer: t.answer.clone(),
            task: t.task.as_ref().map(|task| ExportTask {
                task_id: task.task_id.clone(),
                kind: task.kind.clone(),
                split: task.split,
                gold_answers: task.gold_answers.clone(),
            }),
        }
    }
}

/// Writes one JSON line.
fn write_line<W: Write, T: Serialize>(writer: &mut W, value: &T, id: &str) -> Result<()> {
    serde_json::to_writer(&mut *writer, value).map_err(|source| StoreError::Json {
        context: format!("write trajectory {id}"),
        source,
    })?;
    writer.write_all(b"\n").map_err(|source| StoreError::Io {
        context: format!("write trajectory {id}"),
        source,
    })
}

fn flush<W: Write>(writer: &mut W) -> Result<()> {
    writer.flush().map_err(|source| StoreError::Io {
        context: "flush the output".into(),
        source,
    })
}

impl Store {
    /// Writes every trajectory matching `filter`, oldest first, as one [`ExportRecord`] JSON
    /// object per line, reading page by page. Returns how many were written.
    pub async fn export_jsonl<W: Write + Send>(
        &self,
        writer: &mut W,
        filter: &TrajectoryFilter,
    ) -> Result<u64> {
        let params = filter.params()?;
        let mut after = 0;
        let mut written = 0;
        while let Some(page) = self.next_trajectory_page(&mut after, &params).await? {
            for (_, t) in &page {
                write_line(
                    writer,
                    &ExportRecord::from_trajectory(t, &self.options.reward_policy),
                    &t.id,
                )?;
                written += 1;
            }
        }
        flush(writer)?;
        Ok(written)
    }

    /// Deletes trajectories created more than `age` ago, with their ledgers, except those the
    /// eval of a promoted or superseded adapter references. Returns how many were deleted.
    pub async fn delete_older_than(&self, age: Duration) -> Result<u64> {
        let params = retention_params(age)?;
        let mut after = 0;
        let mut deleted = 0;
        while let Some(page) = self.next_trajectory_page(&mut after, &params).await? {
            deleted += self.delete_page(&page).await?;
        }
        Ok(deleted)
    }

    /// Like [`Store::delete_older_than`], but first writes each trajectory to `writer` as one
    /// JSON line in the core `Trajectory` format (the one `searchloop_core::JsonlSink` writes,
    /// lossless, ledger included). A page is deleted only after it was written and flushed.
    /// Returns how many were deleted.
    pub async fn archive_older_than<W: Write + Send>(
        &self,
        age: Duration,
        writer: &mut W,
    ) -> Result<u64> {
        let params = retention_params(age)?;
        let mut after = 0;
        let mut deleted = 0;
        while let Some(page) = self.next_trajectory_page(&mut after, &params).await? {
            for (_, t) in &page {
                write_line(writer, t, &t.id)?;
            }
            flush(writer)?;
            deleted += self.delete_page(&page).await?;
        }
        Ok(deleted)
    }

    /// Deletes one page of trajectories in one transaction, re-checking under the write lock
    /// that no promoted adapter's eval references them by now, and drops groups left empty.
    async fn delete_page(&self, page: &[(i64, Trajectory)]) -> Result<u64> {
        let delete = format!(
            "DELETE FROM trajectories WHERE seq = $1 AND NOT {}",
            pinned_sql("trajectories.seq")
        );
        let keys: BTreeSet<String> = page.iter().map(|(_, t)| group_key(t)).collect();
        on_write!(self, |pool, d| {
            let mut tx = pool
                .begin_with(d.begin_write)
                .await
                .ctx("begin a retention pass")?;
            let mut deleted = 0;
            for (seq, _) in page {
                deleted += sqlx::query(&delete)
                    .bind(*seq)
                    .execute(&mut *tx)
                    .await
                    .ctx("delete an old trajectory")?
                    .rows_affected();
            }
            for key in &keys {
                sqlx::query(
                    "DELETE FROM trajectory_groups WHERE group_key = $1 \
                     AND NOT EXISTS (SELECT 1 FROM trajectories WHERE group_key = $1)",
                )
                .bind(key)
                .execute(&mut *tx)
                .await
                .ctx("delete an emptied group")?;
            }
            tx.commit().await.ctx("commit a retention pass")?;
            Ok(deleted)
        })
    }
}

/// The filter of retention: created before now minus `age`, and not pinned by an eval.
fn retention_params(age: Duration) -> Result<FilterParams> {
    let age = chrono::Duration::from_std(age)
        .map_err(|_| StoreError::InvalidArgument(format!("age {age:?} is too large")))?;
    let mut params = TrajectoryFilter {
        created_before: Some(Utc::now() - age),
        ..TrajectoryFilter::default()
    }
    .params()?;
    params.unpinned_only = 1;
    Ok(params)
}
