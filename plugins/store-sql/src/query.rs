//! Reading the store: filters, pages of summaries, the trainer's stream of rewarded groups with
//! its cursor, held-out items, reward counts and statistics. Nothing here loads more than one
//! page of trajectories into memory.

use std::{
    collections::VecDeque,
    fmt,
    pin::Pin,
    str::FromStr,
    task::{Context, Poll},
    time::Duration,
};

use chrono::{DateTime, Utc};
use futures::{Stream, stream::BoxStream};
use searchloop_core::{EpisodeEnd, RewardEntry, Split, Trajectory};
use serde::{Deserialize, Serialize};

use crate::{
    backend::{Backend, col, on_read, on_write},
    codec,
    error::{DbContext, Result, StoreError},
    store::{
        BackendKind, REWARD_COLUMNS, Store, TRAJECTORY_COLUMNS, assemble, ledgers, raw_reward,
        raw_trajectory,
    },
};

/// Which trajectories a listing, an export or a group stream covers. Every field narrows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrajectoryFilter {
    /// `Some(None)`: served by the base model; `Some(Some(v))`: by adapter version `v`.
    pub adapter_version: Option<Option<u64>>,
    /// The task split.
    pub split: Option<Split>,
    /// The task kind label (single_hop, inventory, ...).
    pub task_kind: Option<String>,
    /// Created at or after this time.
    pub created_after: Option<DateTime<Utc>>,
    /// Created strictly before this time.
    pub created_before: Option<DateTime<Utc>>,
    /// Only trajectories with at least one reward ledger entry.
    pub rewarded_only: bool,
}

/// A filter as bound parameters: the eight values of the clause of [`filter_sql`].
#[derive(Debug, Clone, Default)]
pub(crate) struct FilterParams {
    /// 0: any version; 1: the base model; 2: `version`.
    version_mode: i64,
    version: Option<i64>,
    split: Option<&'static str>,
    kind: Option<String>,
    after_ns: Option<i64>,
    pub(crate) before_ns: Option<i64>,
    rewarded_only: i64,
    /// 1: leave out trajectories referenced by the eval of a promoted (or formerly promoted)
    /// adapter, which retention keeps.
    pub(crate) unpinned_only: i64,
}

/// The condition that a trajectory (`{col}` is its `seq` column) is referenced by the eval of
/// an adapter that is promoted, or was and may be rolled back to.
pub(crate) fn pinned_sql(col: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM eval_refs e JOIN adapters a ON a.version = e.adapter_version \
         WHERE e.trajectory_seq = {col} AND a.status IN ('promoted', 'superseded'))"
    )
}

/// The filter clause over alias `t`, using placeholders `$first` to `$first + 7`.
pub(crate) fn filter_sql(first: usize) -> String {
    let p = |i: usize| format!("${}", first + i);
    format!(
        "({m} = 0 OR ({m} = 1 AND t.adapter_version IS NULL) OR ({m} = 2 AND t.adapter_version = {v})) \
         AND ({s} IS NULL OR t.task_split = {s}) \
         AND ({k} IS NULL OR t.task_kind = {k}) \
         AND ({a} IS NULL OR t.created_at_ns >= {a}) \
         AND ({b} IS NULL OR t.created_at_ns < {b}) \
         AND ({r} = 0 OR EXISTS (SELECT 1 FROM rewards r2 WHERE r2.trajectory_seq = t.seq)) \
         AND ({u} = 0 OR NOT {pinned})",
        m = p(0),
        v = p(1),
        s = p(2),
        k = p(3),
        a = p(4),
        b = p(5),
        r = p(6),
        u = p(7),
        pinned = pinned_sql("t.seq"),
    )
}

/// Binds [`FilterParams`] in the order [`filter_sql`] numbers them.
macro_rules! bind_filter {
    ($query:expr, $p:expr) => {{
        let p = $p;
        $query
            .bind(p.version_mode)
            .bind(p.version)
            .bind(p.split)
            .bind(p.kind.as_deref())
            .bind(p.after_ns)
            .bind(p.before_ns)
            .bind(p.rewarded_only)
            .bind(p.unpinned_only)
    }};
}

/// The ledgers of the trajectories with sequence numbers in `[$low, $high]` that match
/// `$params`, in the order recorded, read inside transaction `$tx`.
macro_rules! ledgers_between {
    ($tx:expr, $low:expr, $high:expr, $params:expr) => {{
        let sql = format!(
            "SELECT {REWARD_COLUMNS} FROM rewards r JOIN trajectories t ON t.seq = r.trajectory_seq \
             WHERE t.seq >= $1 AND t.seq <= $2 AND {} ORDER BY r.seq",
            filter_sql(3)
        );
        let query = sqlx::query(&sql).bind($low).bind($high);
        let mut rewards = Vec::new();
        for row in bind_filter!(query, $params)
            .fetch_all(&mut *$tx)
            .await
            .ctx("read reward ledgers")?
        {
            rewards.push(raw_reward!(&row));
        }
        rewards
    }};
}

impl TrajectoryFilter {
    pub(crate) fn params(&self) -> Result<FilterParams> {
        let (version_mode, version) = match self.adapter_version {
            None => (0, None),
            Some(None) => (1, None),
            Some(Some(v)) => (2, Some(codec::to_i64("adapter version", v)?)),
        };
        Ok(FilterParams {
            version_mode,
            version,
            split: self.split.map(codec::split_name),
            kind: self.task_kind.clone(),
            after_ns: self
                .created_after
                .map(|t| codec::to_nanos("created_after", t))
                .transpose()?,
            before_ns: self
                .created_before
                .map(|t| codec::to_nanos("created_before", t))
                .transpose()?,
            rewarded_only: i64::from(self.rewarded_only),
            unpinned_only: 0,
        })
    }
}

/// An opaque position in a listing; pass it back in [`Page::after`] for the next page.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PageToken(String);

impl fmt::Display for PageToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for PageToken {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

/// Which page of a listing to return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Start after this position (`None`: the first page).
    pub after: Option<PageToken>,
    /// Most items (1 to [`Page::MAX_LIMIT`]).
    pub limit: usize,
}

impl Default for Page {
    fn default() -> Self {
        Self {
            after: None,
            limit: 50,
        }
    }
}

impl Page {
    /// The largest page.
    pub const MAX_LIMIT: usize = 10_000;

    /// The first page of `limit` items.
    pub fn first(limit: usize) -> Self {
        Self { after: None, limit }
    }

    fn limit(&self) -> Result<i64> {
        if (1..=Self::MAX_LIMIT).contains(&self.limit) {
            Ok(self.limit as i64)
        } else {
            Err(StoreError::InvalidArgument(format!(
                "page limit {} must be between 1 and {}",
                self.limit,
                Self::MAX_LIMIT
            )))
        }
    }
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Paged<T> {
    /// The items.
    pub items: Vec<T>,
    /// The token of the next page, or `None` after the last.
    pub next: Option<PageToken>,
}

/// A trajectory without its token sequence, for listings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrajectorySummary {
    /// The trajectory id.
    pub id: String,
    /// When the episode was created.
    pub created_at: DateTime<Utc>,
    /// The question asked.
    pub question: String,
    /// The final answer, if any.
    pub answer: Option<String>,
    /// How the episode ended.
    pub end: EpisodeEnd,
    /// Turns the model took.
    pub turns: u32,
    /// The base model.
    pub model_id: String,
    /// The adapter version that served it (`None` = base model).
    pub adapter_version: Option<u64>,
    /// The group id.
    pub group_id: Option<String>,
    /// The task item id, when it came from a task set.
    pub task_id: Option<String>,
    /// The task kind.
    pub task_kind: Option<String>,
    /// The task split.
    pub split: Option<Split>,
    /// Length of the token sequence.
    pub tokens: usize,
    /// The training reward under the store's [`searchloop_core::RewardPolicy`].
    pub reward: Option<f64>,
    /// The reward ledger, in the order recorded.
    pub rewards: Vec<RewardEntry>,
}

/// A held-out task item seen in served episodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldoutItem {
    /// The task item id.
    pub task_id: String,
    /// The task kind.
    pub kind: String,
    /// The question (from the first episode of the item).
    pub question: String,
    /// Its gold answers.
    pub gold_answers: Vec<String>,
    /// How many stored episodes asked it.
    pub trajectories: u64,
}

/// Ledger entries of one reward source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceCount {
    /// The source (`exact_match`, `f1`, `format`, or a host feedback kind).
    pub source: String,
    /// Ledger entries.
    pub entries: u64,
    /// Of which delivered as feedback through [`Store::add_feedback`].
    pub feedback_entries: u64,
    /// Distinct trajectories with an entry of this source.
    pub trajectories: u64,
    /// Mean value.
    pub mean_value: f64,
}

/// Trajectories per adapter version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionCount {
    /// The adapter version (`None` = base model).
    pub adapter_version: Option<u64>,
    /// Trajectories it served.
    pub trajectories: u64,
}

/// Trajectories per task split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitCount {
    /// The split (`None` = not from a task set).
    pub split: Option<Split>,
    /// Trajectories.
    pub trajectories: u64,
}

/// What the store holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreStats {
    /// The backend.
    pub backend: BackendKind,
    /// Trajectories stored.
    pub trajectories: u64,
    /// Trajectories with at least one reward.
    pub rewarded_trajectories: u64,
    /// Training groups (a trajectory without a group id is its own group).
    pub groups: u64,
    /// Reward ledger entries.
    pub reward_entries: u64,
    /// Of which host feedback.
    pub feedback_entries: u64,
    /// Trajectories per adapter version, base model first.
    pub by_adapter_version: Vec<VersionCount>,
    /// Trajectories per split, no split first.
    pub by_split: Vec<SplitCount>,
    /// Registered adapters.
    pub adapters: u64,
    /// The promoted adapter version.
    pub promoted_adapter: Option<u64>,
    /// Bytes the store occupies: the SQLite file and its WAL, or PostgreSQL's
    /// `pg_total_relation_size` of every table (with indexes and TOAST).
    pub size_bytes: u64,
}

/// A position in the stream of group changes. Store the cursor a stream ends with and pass it
/// as [`GroupQuery::since`] next time to get only the groups that changed in between. Printed
/// and parsed as a plain number.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Cursor(i64);

impl Cursor {
    /// Before every change.
    pub const START: Cursor = Cursor(0);

    /// The value stored in a database column.
    pub(crate) fn to_stored(self) -> i64 {
        self.0
    }

    /// A cursor read back from a column of record `id`; a negative value is corrupt.
    pub(crate) fn from_stored(id: &str, value: i64) -> Result<Self> {
        if value < 0 {
            return Err(StoreError::CorruptRecord {
                id: id.to_string(),
                detail: format!("the feedback cursor is {value}"),
            });
        }
        Ok(Self(value))
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for Cursor {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self> {
        match s.parse::<i64>() {
            Ok(n) if n >= 0 => Ok(Self(n)),
            _ => Err(StoreError::InvalidArgument(format!(
                "'{s}' is not a group cursor (a number from an earlier stream)"
            ))),
        }
    }
}

/// What the trainer asks for: groups whose ledgers changed after `since`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupQuery {
    /// Only groups changed after this cursor.
    pub since: Cursor,
    /// Which members count (only rewarded members ever do).
    pub filter: TrajectoryFilter,
    /// Only members created within this age.
    pub max_age: Option<Duration>,
    /// Leave out groups with fewer matching rewarded members.
    pub min_group_size: usize,
    /// Most groups to return; the stream's [`GroupStream::next_cursor`] then resumes after the
    /// last one returned.
    pub limit: Option<usize>,
}

/// One rewarded trajectory of a group, with its training reward.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupMember {
    /// The trajectory, with its whole ledger.
    pub trajectory: Trajectory,
    /// The training reward under the store's reward policy.
    pub reward: f64,
}

/// The rewarded samples of one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct TrajectoryGroup {
    /// The group id (`None`: a trajectory recorded without one, alone in its group).
    pub group_id: Option<String>,
    /// The position of the group's latest change; resuming from it skips this group.
    pub cursor: Cursor,
    /// The members matching the query, in insertion order.
    pub members: Vec<GroupMember>,
}

/// Groups per page: with up to a few dozen members of 2k tokens each, a page stays a few
/// megabytes however many trajectories the store holds.
const GROUP_PAGE: i64 = 64;

/// Rows per page of listings, exports and retention passes.
pub(crate) const TRAJECTORY_PAGE: i64 = 256;

/// A stream of [`TrajectoryGroup`]s, read page by page, that knows where to resume.
pub struct GroupStream {
    inner: BoxStream<'static, Result<TrajectoryGroup>>,
    last: Cursor,
    high_water: Cursor,
    remaining: Option<usize>,
    exhausted: bool,
    failed: bool,
}

impl fmt::Debug for GroupStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupStream")
            .field("last", &self.last)
            .field("high_water", &self.high_water)
            .field("remaining", &self.remaining)
            .field("exhausted", &self.exhausted)
            .finish_non_exhaustive()
    }
}

impl GroupStream {
    /// Where the next query should start: after the last group yielded, or, once the stream has
    /// ended without error, after every change it covered (including groups it left out as
    /// filtered).
    pub fn next_cursor(&self) -> Cursor {
        if self.exhausted && !self.failed {
            self.high_water.max(self.last)
        } else {
            self.last
        }
    }
}

impl Stream for GroupStream {
    type Item = Result<TrajectoryGroup>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.remaining == Some(0) {
            return Poll::Ready(None);
        }
        let next = this.inner.as_mut().poll_next(cx);
        match &next {
            Poll::Ready(Some(Ok(group))) => {
                this.last = group.cursor;
                if let Some(n) = &mut this.remaining {
                    *n -= 1;
                }
            }
            Poll::Ready(Some(Err(_))) => this.failed = true,
            Poll::Ready(None) => this.exhausted = true,
            Poll::Pending => {}
        }
        next
    }
}

/// The state of a group stream between pages.
struct GroupPager {
    store: Store,
    params: FilterParams,
    min_group_size: usize,
    from: Cursor,
    high_water: Cursor,
    buffer: VecDeque<TrajectoryGroup>,
    done: bool,
}

impl Store {
    /// The trainer's query: every group with a reward ledger change after `query.since`, with
    /// its rewarded members that match the filter, each with its training reward. A group whose
    /// ledger changes again (late feedback, a new member) comes again in a later stream.
    ///
    /// Creating the stream numbers the changes committed so far (a short write transaction, see
    /// the crate docs on the group cursor); the stream covers those and reads them page by page.
    /// Its [`GroupStream::next_cursor`] is where the next query starts.
    pub async fn rewarded_groups(&self, query: GroupQuery) -> Result<GroupStream> {
        let mut filter = query.filter.clone();
        filter.rewarded_only = true;
        if let Some(age) = query.max_age {
            let age = chrono::Duration::from_std(age).map_err(|_| {
                StoreError::InvalidArgument(format!("max_age {age:?} is too large"))
            })?;
            let oldest = Utc::now() - age;
            filter.created_after = Some(filter.created_after.map_or(oldest, |t| t.max(oldest)));
        }
        let params = filter.params()?;
        let high_water = self.sequence_group_changes().await?;
        let pager = GroupPager {
            store: self.clone(),
            params,
            min_group_size: query.min_group_size,
            from: query.since,
            high_water,
            buffer: VecDeque::new(),
            done: false,
        };
        let inner = futures::stream::try_unfold(pager, |mut pager| async move {
            loop {
                if let Some(group) = pager.buffer.pop_front() {
                    return Ok(Some((group, pager)));
                }
                if pager.done {
                    return Ok(None);
                }
                let (groups, page_end) = pager
                    .store
                    .group_page(
                        pager.from,
                        pager.high_water,
                        &pager.params,
                        pager.min_group_size,
                    )
                    .await?;
                match page_end {
                    Some(end) => pager.from = end,
                    None => pager.done = true,
                }
                pager.buffer.extend(groups);
            }
        });
        Ok(GroupStream {
            inner: Box::pin(inner),
            last: query.since,
            high_water,
            remaining: query.limit,
            exhausted: false,
            failed: false,
        })
    }

    /// Runs a sequencing round (see [`crate::backend::Dialect::sequence_groups`]) and returns
    /// the highest position given so far: every position up to it is final.
    async fn sequence_group_changes(&self) -> Result<Cursor> {
        on_write!(self, |pool, d| {
            let mut tx = pool
                .begin_with(d.begin_write)
                .await
                .ctx("begin a group sequencing round")?;
            for statement in d.sequence_groups {
                sqlx::query(statement)
                    .execute(&mut *tx)
                    .await
                    .ctx("number changed groups")?;
            }
            let high: i64 =
                sqlx::query_scalar("SELECT COALESCE(MAX(change_seq), 0) FROM trajectory_groups")
                    .fetch_one(&mut *tx)
                    .await
                    .ctx("read the last group position")?;
            tx.commit().await.ctx("commit a group sequencing round")?;
            Ok(Cursor(high))
        })
    }

    /// Up to [`GROUP_PAGE`] groups changed in `(from, to]`, and the position of the last group
    /// of the page (`None`: no group left). One snapshot covers the page, so members and
    /// ledgers agree.
    async fn group_page(
        &self,
        from: Cursor,
        to: Cursor,
        params: &FilterParams,
        min_group_size: usize,
    ) -> Result<(Vec<TrajectoryGroup>, Option<Cursor>)> {
        const RANGE: &str = "g.change_seq > $1 AND g.change_seq <= $2";
        // `CROSS JOIN` fixes SQLite's join order (it has no statistics on a fresh store and
        // would otherwise scan every ledger entry in `seq` order to save a small sort);
        // PostgreSQL plans it like an inner join.
        let (rows, rewards, end) = on_read!(self, |pool, d| {
            let mut tx = pool
                .begin_with(d.begin_snapshot)
                .await
                .ctx("begin a group page")?;
            let last: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT MAX(change_seq) FROM (SELECT g.change_seq FROM trajectory_groups g \
                 WHERE {RANGE} ORDER BY g.change_seq LIMIT $3) page"
            ))
            .bind(from.0)
            .bind(to.0)
            .bind(GROUP_PAGE)
            .fetch_one(&mut *tx)
            .await
            .ctx("read a page of changed groups")?;
            let Some(end) = last else {
                tx.commit().await.ctx("end a group page")?;
                return Ok((Vec::new(), None));
            };
            let members_sql = format!(
                "SELECT {TRAJECTORY_COLUMNS}, g.change_seq \
                 FROM trajectory_groups g CROSS JOIN trajectories t \
                 WHERE t.group_key = g.group_key AND {RANGE} AND {} \
                 ORDER BY g.change_seq, t.seq",
                filter_sql(3)
            );
            let query = sqlx::query(&members_sql).bind(from.0).bind(end);
            let mut rows = Vec::new();
            for row in bind_filter!(query, params)
                .fetch_all(&mut *tx)
                .await
                .ctx("read the members of a group page")?
            {
                let position = Cursor(col!(&row, "change_seq"));
                rows.push((position, raw_trajectory!(&row)));
            }
            let rewards_sql = format!(
                "SELECT {REWARD_COLUMNS} \
                 FROM trajectory_groups g CROSS JOIN trajectories t CROSS JOIN rewards r \
                 WHERE t.group_key = g.group_key AND r.trajectory_seq = t.seq \
                 AND {RANGE} AND {} ORDER BY r.seq",
                filter_sql(3)
            );
            let query = sqlx::query(&rewards_sql).bind(from.0).bind(end);
            let mut rewards = Vec::new();
            for row in bind_filter!(query, params)
                .fetch_all(&mut *tx)
                .await
                .ctx("read the ledgers of a group page")?
            {
                rewards.push(raw_reward!(&row));
            }
            tx.commit().await.ctx("end a group page")?;
            (rows, rewards, Cursor(end))
        });
        let (positions, raws): (Vec<Cursor>, Vec<_>) = rows.into_iter().unzip();
        let policy = &self.options.reward_policy;
        let mut groups: Vec<TrajectoryGroup> = Vec::new();
        for (position, (_, trajectory)) in positions.into_iter().zip(assemble(raws, rewards)?) {
            let Some(reward) = policy.combine(&trajectory.rewards) else {
                continue;
            };
            let member = GroupMember { trajectory, reward };
            match groups.last_mut() {
                Some(group) if group.cursor == position => group.members.push(member),
                _ => groups.push(TrajectoryGroup {
                    group_id: member.trajectory.group_id.clone(),
                    cursor: position,
                    members: vec![member],
                }),
            }
        }
        groups.retain(|g| g.members.len() >= min_group_size.max(1));
        Ok((groups, Some(end)))
    }

    /// The next page of full trajectories (with ledgers) matching `params` after sequence
    /// number `*after_seq`, in insertion order, moving `*after_seq` past it; `None` after the
    /// last. The page reader behind exports and retention.
    pub(crate) async fn next_trajectory_page(
        &self,
        after_seq: &mut i64,
        params: &FilterParams,
    ) -> Result<Option<Vec<(i64, Trajectory)>>> {
        let (rows, rewards) = on_read!(self, |pool, d| {
            let mut tx = pool
                .begin_with(d.begin_snapshot)
                .await
                .ctx("begin a page read")?;
            let sql = format!(
                "SELECT {TRAJECTORY_COLUMNS} FROM trajectories t WHERE t.seq > $1 AND {} \
                 ORDER BY t.seq LIMIT $10",
                filter_sql(2)
            );
            let query = sqlx::query(&sql).bind(*after_seq);
            let mut rows = Vec::new();
            for row in bind_filter!(query, params)
                .bind(TRAJECTORY_PAGE)
                .fetch_all(&mut *tx)
                .await
                .ctx("read a page of trajectories")?
            {
                rows.push(raw_trajectory!(&row));
            }
            let rewards = match (rows.first(), rows.last()) {
                (Some(first), Some(last)) => {
                    ledgers_between!(tx, first.seq, last.seq, params)
                }
                _ => Vec::new(),
            };
            tx.commit().await.ctx("end a page read")?;
            (rows, rewards)
        });
        let page = assemble(rows, rewards)?;
        Ok(page.last().map(|(last, _)| *last).map(|last| {
            *after_seq = last;
            page
        }))
    }

    /// A page of trajectory summaries, newest first.
    pub async fn list_trajectories(
        &self,
        filter: &TrajectoryFilter,
        page: &Page,
    ) -> Result<Paged<TrajectorySummary>> {
        let limit = page.limit()?;
        let before_seq = match &page.after {
            None => i64::MAX,
            Some(token) => token.0.parse::<i64>().map_err(|_| {
                StoreError::InvalidArgument(format!("'{token}' is not a trajectory page token"))
            })?,
        };
        let params = filter.params()?;
        let (summaries, rewards) = on_read!(self, |pool, d| {
            let mut tx = pool
                .begin_with(d.begin_snapshot)
                .await
                .ctx("begin a listing")?;
            let sql = format!(
                "SELECT t.seq, t.id, t.created_at_ns, t.question, t.answer, t.episode_end, \
                 t.turns, t.model_id, t.adapter_version, t.group_id, t.task_id, t.task_kind, \
                 t.task_split, CAST(length(t.tokens) AS BIGINT) AS token_bytes \
                 FROM trajectories t WHERE t.seq < $1 AND {} ORDER BY t.seq DESC LIMIT $10",
                filter_sql(2)
            );
            let query = sqlx::query(&sql).bind(before_seq);
            let mut summaries = Vec::new();
            for row in bind_filter!(query, &params)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await
                .ctx("list trajectories")?
            {
                summaries.push(RawSummary {
                    seq: col!(&row, "seq"),
                    id: col!(&row, "id"),
                    created_at_ns: col!(&row, "created_at_ns"),
                    question: col!(&row, "question"),
                    answer: col!(&row, "answer"),
                    episode_end: col!(&row, "episode_end"),
                    turns: col!(&row, "turns"),
                    model_id: col!(&row, "model_id"),
                    adapter_version: col!(&row, "adapter_version"),
                    group_id: col!(&row, "group_id"),
                    task_id: col!(&row, "task_id"),
                    task_kind: col!(&row, "task_kind"),
                    task_split: col!(&row, "task_split"),
                    token_bytes: col!(&row, "token_bytes"),
                });
            }
            let rewards = match (summaries.last(), summaries.first()) {
                (Some(oldest), Some(newest)) => {
                    ledgers_between!(tx, oldest.seq, newest.seq, &params)
                }
                _ => Vec::new(),
            };
            tx.commit().await.ctx("end a listing")?;
            (summaries, rewards)
        });
        let next = (summaries.len() as i64 == limit)
            .then(|| summaries.last().map(|s| PageToken(s.seq.to_string())))
            .flatten();
        let mut ledgers = ledgers(rewards);
        let items = summaries
            .into_iter()
            .map(|s| {
                let ledger = ledgers.remove(&s.seq).unwrap_or_default();
                s.decode(ledger, &self.options.reward_policy)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Paged { items, next })
    }

    /// A page of the distinct held-out task items seen in stored episodes, by task id, with
    /// their questions and gold answers: the trainer's evaluation set.
    pub async fn heldout_items(&self, page: &Page) -> Result<Paged<HeldoutItem>> {
        let limit = page.limit()?;
        let after = page.after.as_ref().map_or("", |t| t.0.as_str());
        let items = on_read!(self, |pool, _d| {
            let rows = sqlx::query(
                "SELECT c.task_id, t.task_kind, t.question, t.gold_answers, c.n \
                 FROM (SELECT task_id, MIN(seq) AS first_seq, COUNT(*) AS n FROM trajectories \
                       WHERE task_split = 'heldout' AND task_id > $1 \
                       GROUP BY task_id ORDER BY task_id LIMIT $2) c \
                 JOIN trajectories t ON t.seq = c.first_seq ORDER BY c.task_id",
            )
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await
            .ctx("list held-out items")?;
            let mut items = Vec::with_capacity(rows.len());
            for row in &rows {
                let task_id: String = col!(row, "task_id");
                let gold: Option<String> = col!(row, "gold_answers");
                let n: i64 = col!(row, "n");
                items.push(HeldoutItem {
                    gold_answers: serde_json::from_str(gold.as_deref().unwrap_or("[]")).map_err(
                        |e| StoreError::CorruptRecord {
                            id: task_id.clone(),
                            detail: format!("gold answers are not a JSON list of strings: {e}"),
                        },
                    )?,
                    trajectories: codec::to_u64(&task_id, "count", n)?,
                    kind: col!(row, "task_kind"),
                    question: col!(row, "question"),
                    task_id,
                });
            }
            items
        });
        let next = (items.len() as i64 == limit)
            .then(|| items.last().map(|i| PageToken(i.task_id.clone())))
            .flatten();
        Ok(Paged { items, next })
    }

    /// Ledger entries per reward source, by source name.
    pub async fn reward_counts_by_source(&self) -> Result<Vec<SourceCount>> {
        on_read!(self, |pool, _d| {
            let rows = sqlx::query(
                "SELECT source, COUNT(*) AS entries, COUNT(DISTINCT trajectory_seq) AS trajectories, \
                 SUM(CASE WHEN origin = 'feedback' THEN 1 ELSE 0 END) AS feedback, \
                 AVG(value) AS mean FROM rewards GROUP BY source ORDER BY source",
            )
            .fetch_all(pool)
            .await
            .ctx("count rewards by source")?;
            let mut counts = Vec::with_capacity(rows.len());
            for row in &rows {
                let source: String = col!(row, "source");
                let (entries, trajectories, feedback): (i64, i64, i64) = (
                    col!(row, "entries"),
                    col!(row, "trajectories"),
                    col!(row, "feedback"),
                );
                counts.push(SourceCount {
                    entries: codec::to_u64(&source, "entries", entries)?,
                    feedback_entries: codec::to_u64(&source, "feedback", feedback)?,
                    trajectories: codec::to_u64(&source, "trajectories", trajectories)?,
                    mean_value: col!(row, "mean"),
                    source,
                });
            }
            Ok(counts)
        })
    }

    /// Counts and size of the store, from one snapshot.
    pub async fn stats(&self) -> Result<StoreStats> {
        let count = |what: &str, n: i64| codec::to_u64("stats", what, n);
        let (scalars, versions, splits) = on_read!(self, |pool, d| {
            let mut tx = pool
                .begin_with(d.begin_snapshot)
                .await
                .ctx("begin reading statistics")?;
            let scalars: (i64, i64, i64, i64, i64, i64, Option<i64>) = sqlx::query_as(
                "SELECT (SELECT COUNT(*) FROM trajectories), \
                        (SELECT COUNT(DISTINCT trajectory_seq) FROM rewards), \
                        (SELECT COUNT(*) FROM trajectory_groups), \
                        (SELECT COUNT(*) FROM rewards), \
                        (SELECT COUNT(*) FROM rewards WHERE origin = 'feedback'), \
                        (SELECT COUNT(*) FROM adapters), \
                        (SELECT version FROM adapters WHERE status = 'promoted')",
            )
            .fetch_one(&mut *tx)
            .await
            .ctx("count trajectories, rewards and adapters")?;
            let versions: Vec<(Option<i64>, i64)> = sqlx::query_as(
                "SELECT adapter_version, COUNT(*) FROM trajectories GROUP BY adapter_version",
            )
            .fetch_all(&mut *tx)
            .await
            .ctx("count trajectories per adapter version")?;
            let splits: Vec<(Option<String>, i64)> =
                sqlx::query_as("SELECT task_split, COUNT(*) FROM trajectories GROUP BY task_split")
                    .fetch_all(&mut *tx)
                    .await
                    .ctx("count trajectories per split")?;
            tx.commit().await.ctx("end reading statistics")?;
            (scalars, versions, splits)
        });
        let mut by_adapter_version = versions
            .into_iter()
            .map(|(v, n)| {
                Ok(VersionCount {
                    adapter_version: v.map(|v| count("adapter_version", v)).transpose()?,
                    trajectories: count("trajectories", n)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        by_adapter_version.sort_by_key(|c| c.adapter_version);
        let mut by_split = splits
            .into_iter()
            .map(|(s, n)| {
                Ok(SplitCount {
                    split: s.map(|s| codec::parse_split("stats", &s)).transpose()?,
                    trajectories: count("trajectories", n)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        by_split.sort_by_key(|c| c.split.map(codec::split_name));
        let (trajectories, rewarded, groups, entries, feedback, adapters, promoted) = scalars;
        Ok(StoreStats {
            backend: self.backend_kind(),
            trajectories: count("trajectories", trajectories)?,
            rewarded_trajectories: count("rewarded", rewarded)?,
            groups: count("groups", groups)?,
            reward_entries: count("reward entries", entries)?,
            feedback_entries: count("feedback entries", feedback)?,
            by_adapter_version,
            by_split,
            adapters: count("adapters", adapters)?,
            promoted_adapter: promoted.map(|v| count("promoted", v)).transpose()?,
            size_bytes: self.size_bytes().await?,
        })
    }

    /// Bytes the store occupies on disk.
    async fn size_bytes(&self) -> Result<u64> {
        match &*self.backend {
            Backend::Sqlite { path, .. } => {
                let mut total = 0;
                for suffix in ["", "-wal"] {
                    let file = format!("{}{suffix}", path.display());
                    match std::fs::metadata(&file) {
                        Ok(meta) => total += meta.len(),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(source) => {
                            return Err(StoreError::Io {
                                context: format!("cannot read the size of {file}"),
                                source,
                            });
                        }
                    }
                }
                Ok(total)
            }
            Backend::Postgres { pool, .. } => {
                let bytes: i64 = sqlx::query_scalar(
                    "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::bigint \
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = current_schema() AND c.relkind = 'r'",
                )
                .fetch_one(pool)
                .await
                .ctx("measure the schema's tables")?;
                codec::to_u64("stats", "size", bytes)
            }
        }
    }
}

/// A summary row as stored.
struct RawSummary {
    seq: i64,
    id: String,
    created_at_ns: i64,
    question: String,
    answer: Option<String>,
    episode_end: String,
    turns: i64,
    model_id: String,
    adapter_version: Option<i64>,
    group_id: Option<String>,
    task_id: Option<String>,
    task_kind: Option<String>,
    task_split: Option<String>,
    token_bytes: i64,
}

impl RawSummary {
    fn decode(
        self,
        rewards: Vec<RewardEntry>,
        policy: &searchloop_core::RewardPolicy,
    ) -> Result<TrajectorySummary> {
        let id = self.id;
        Ok(TrajectorySummary {
            created_at: codec::from_nanos(self.created_at_ns),
            question: self.question,
            answer: self.answer,
            end: codec::parse_end(&id, &self.episode_end)?,
            turns: codec::to_u32(&id, "turns", self.turns)?,
            model_id: self.model_id,
            adapter_version: self
                .adapter_version
                .map(|v| codec::to_u64(&id, "adapter_version", v))
                .transpose()?,
            group_id: self.group_id,
            task_id: self.task_id,
            task_kind: self.task_kind,
            split: self
                .task_split
                .map(|s| codec::parse_split(&id, &s))
                .transpose()?,
            tokens: (codec::to_u64(&id, "token bytes", self.token_bytes)? / 4) as usize,
            reward: policy.combine(&rewards),
            rewards,
            id,
        })
    }
}
