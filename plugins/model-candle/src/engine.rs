//! The engine: one thread that owns the model and the key/value cache and serves every request
//! in steps.
//!
//! A step is one forward pass over a [`TokenBatch`]: the next token of every running sequence,
//! then chunks of waiting prompts, up to `max_step_tokens`. A request for `n` samples of one
//! prompt prefills the prompt once; when its last token is in, the `n` samples draw their first
//! tokens from its logits and the prompt's keys and values are copied into the slots of
//! samples 2 to `n`. Each sample then decodes in its own slot, drawing every token with its own
//! seeded generator ([`searchloop_core::sampling::draw`]), so ids are exact and log-probs are
//! those of the distribution each token was drawn from.
//!
//! A finished sequence's slot is kept as a cached prefix (least recently used first out): a
//! later prompt starting with the same tokens (the system prompt; an episode's next turn, which
//! extends the previous turn's prompt and completion) copies those keys and values instead of
//! computing them. The copy continues exactly as a recomputation would (the model crate's
//! tests check it). A prompt that shares a longer prefix with one admitted before it and still
//! being prefilled waits for those tokens and copies them, instead of computing them beside it.
//!
//! A request whose caller stopped waiting (its reply channel closed: a client hung up, a
//! timeout fired) is dropped before the next step, so it costs at most one more step.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use searchloop_core::{
    FinishReason, Sample,
    sampling::{DrawSettings, draw},
};
use searchloop_llama::{KvCache, ServingModel, SlotId, TokenBatch, pack::common_prefix};
use tokenizers::Tokenizer;
use tokio::sync::oneshot;

use crate::error::{CandleError, Result};

/// Fewest prompt tokens an earlier group must share beyond the cached ones for a group to wait
/// for it: waiting delays the group by at least a step, which a few tokens do not repay.
const MIN_WAITED_PREFIX: usize = 16;

/// One request: `seeds.len()` samples of `prompt`.
pub(crate) struct Job {
    pub prompt: Vec<u32>,
    pub settings: DrawSettings,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub seeds: Vec<u64>,
    pub reply: oneshot::Sender<Result<Vec<Sample>>>,
}

/// What the engine did since it started, for benchmarks and metrics endpoints.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub steps: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub prefilled_tokens: AtomicU64,
    pub reused_tokens: AtomicU64,
    pub requests: AtomicU64,
    pub abandoned: AtomicU64,
    pub max_batch_sequences: AtomicU64,
}

/// The engine's limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_sequences: usize,
    pub max_step_tokens: usize,
    pub prefix_cache_entries: usize,
    /// Token budget of the host cache (`None`: a device cache, bounded by its slots).
    pub kv_budget_tokens: Option<usize>,
}

/// The engine's state, owned by its thread.
pub(crate) struct Engine {
    model: ServingModel,
    kv: KvCache,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    limits: Limits,
    counters: Arc<Counters>,
    waiting: VecDeque<Job>,
    groups: Vec<Group>,
    cached: Vec<CachedPrefix>,
    clock: u64,
}

/// An admitted request.
struct Group {
    job: Job,
    /// When the group was admitted (the engine's clock): a group only waits for prefixes of
    /// groups admitted before it, so waiting never goes round in a circle.
    admitted: u64,
    /// Whether the group's first slot has taken the computed prefix of its prompt it will use
    /// (from a cached sequence or an earlier group), so that prefilling the rest may start.
    joined: bool,
    /// Tokens of the prompt in the first slot's cache so far.
    prefilled: usize,
    /// The request's slots: the first prefills the prompt; the others receive a copy of it.
    slots: Vec<SlotId>,
    /// The samples, once the prompt is in.
    samples: Vec<SampleRun>,
}

struct SampleRun {
    slot: SlotId,
    rng: ChaCha8Rng,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    finish: Option<FinishReason>,
}

/// A finished sequence kept for its keys and values.
struct CachedPrefix {
    slot: SlotId,
    tokens: Vec<u32>,
    last_used: u64,
}

/// Whose logits a row of a step's output is.
#[derive(Debug, Clone, Copy)]
enum Reader {
    /// The last prompt token of group `g`: every sample's first token.
    Prompt(usize),
    /// Sample `s` of group `g`.
    Sample(usize, usize),
}

impl Engine {
    pub(crate) fn new(
        model: ServingModel,
        kv: KvCache,
        tokenizer: Arc<Tokenizer>,
        eos: Vec<u32>,
        limits: Limits,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            model,
            kv,
            tokenizer,
            eos,
            limits,
            counters,
            waiting: VecDeque::new(),
            groups: Vec::new(),
            cached: Vec::new(),
            clock: 0,
        }
    }

    /// Serves jobs from `jobs` until every sender is gone and no work is left.
    pub(crate) fn run(mut self, jobs: mpsc::Receiver<Job>) {
        loop {
            if self.groups.is_empty() && self.waiting.is_empty() {
                match jobs.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = jobs.try_recv() {
                self.waiting.push_back(job);
            }
            self.drop_abandoned();
            self.admit();
            if self.groups.is_empty() {
                continue;
            }
            if let Err(e) = self.step() {
                self.fail_all(&e);
            }
        }
    }

    /// Drops requests whose caller stopped waiting, freeing their slots.
    fn drop_abandoned(&mut self) {
        let before = self.waiting.len() + self.groups.len();
        self.waiting.retain(|job| !job.reply.is_closed());
        let mut kept = Vec::with_capacity(self.groups.len());
        for group in std::mem::take(&mut self.groups) {
            if group.job.reply.is_closed() {
                for slot in group.slots {
                    self.kv.release(slot);
                }
            } else {
                kept.push(group);
            }
        }
        self.groups = kept;
        let dropped = before - self.waiting.len() - self.groups.len();
        self.counters
            .abandoned
            .fetch_add(dropped as u64, Ordering::Relaxed);
    }

    /// Sequences the running groups decode.
    fn running_sequences(&self) -> usize {
        self.groups.iter().map(|g| g.job.seeds.len()).sum()
    }

    /// Tokens the running groups may fill, and those the cached prefixes hold.
    fn reserved_tokens(&self) -> usize {
        let running: usize = self
            .groups
            .iter()
            .map(|g| g.job.seeds.len() * (g.job.prompt.len() + g.job.max_tokens))
            .sum();
        running + self.cached.iter().map(|c| c.tokens.len()).sum::<usize>()
    }

    /// Admits waiting jobs while they fit, dropping cached prefixes to make room; a job that
    /// can never fit is answered with an error.
    ///
    /// Jobs whose prompt continues a cached sequence further go first (arrival order among
    /// equals). Every fresh question shares only the system prompt with the cache, while the
    /// next turn of a running episode extends its previous turn: putting it first finishes
    /// episodes already under way before starting new ones, so that under an overload the
    /// first askers are answered within their timeouts, where plain arrival order would move
    /// every episode forward one turn at a time and let them all time out together.
    fn admit(&mut self) {
        if self.waiting.len() > 1
            && !self.cached.is_empty()
            && self.running_sequences() < self.limits.max_sequences
        {
            let waiting = std::mem::take(&mut self.waiting);
            let mut ordered: Vec<(usize, Job)> = waiting
                .into_iter()
                .map(|job| {
                    (
                        self.cached_prefix(&job.prompt).map_or(0, |(len, _)| len),
                        job,
                    )
                })
                .collect();
            // A stable sort keeps arrival order among jobs with equal cached prefixes.
            ordered.sort_by_key(|(cached, _)| std::cmp::Reverse(*cached));
            self.waiting = ordered.into_iter().map(|(_, job)| job).collect();
        }
        while let Some(job) = self.waiting.front() {
            let n = job.seeds.len();
            let need = n * (job.prompt.len() + job.max_tokens);
            if n > self.limits.max_sequences {
                self.refuse_front(format!(
                    "{n} samples at once exceed max_sequences ({})",
                    self.limits.max_sequences
                ));
                continue;
            }
            if let Some(budget) = self.limits.kv_budget_tokens
                && need > budget
            {
                self.refuse_front(format!(
                    "the request needs {need} tokens of key/value cache, more than \
                     kv_budget_tokens ({budget})"
                ));
                continue;
            }
            if self.running_sequences() + n > self.limits.max_sequences {
                return;
            }
            let Some(slots) = self.reserve_slots(n, job.prompt.len() + job.max_tokens, need) else {
                if self.groups.is_empty() {
                    self.refuse_front("the key/value cache cannot hold the request".into());
                    continue;
                }
                return;
            };
            let Some(job) = self.waiting.pop_front() else {
                return;
            };
            self.clock += 1;
            self.groups.push(Group {
                job,
                admitted: self.clock,
                joined: false,
                prefilled: 0,
                slots,
                samples: Vec::new(),
            });
        }
    }

    fn refuse_front(&mut self, reason: String) {
        if let Some(job) = self.waiting.pop_front() {
            // The caller may have gone; then nobody is told, which is fine.
            let _ = job.reply.send(Err(CandleError::Request(reason)));
        }
    }

    /// `n` empty slots for sequences of up to `tokens` tokens (`need` in all), evicting cached
    /// prefixes as needed; `None` when they do not fit yet.
    fn reserve_slots(&mut self, n: usize, tokens: usize, need: usize) -> Option<Vec<SlotId>> {
        if let Some(budget) = self.limits.kv_budget_tokens {
            while self.reserved_tokens() + need > budget {
                if !self.evict_oldest() {
                    return None;
                }
            }
        }
        let mut slots = Vec::with_capacity(n);
        while slots.len() < n {
            match self.kv.allocate(tokens) {
                Some(slot) => slots.push(slot),
                None => {
                    if !self.evict_oldest() {
                        for slot in slots {
                            self.kv.release(slot);
                        }
                        return None;
                    }
                }
            }
        }
        Some(slots)
    }

    /// Drops the least recently used cached prefix; `false` when there is none.
    fn evict_oldest(&mut self) -> bool {
        let Some(oldest) = self
            .cached
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| c.last_used)
            .map(|(i, _)| i)
        else {
            return false;
        };
        let entry = self.cached.swap_remove(oldest);
        self.kv.release(entry.slot);
        true
    }

    /// Gives each admitted group that has not joined yet the longest computed prefix of its
    /// prompt: a cached sequence's, or that of a group admitted before it whose prompt shares
    /// at least [`MIN_WAITED_PREFIX`] more tokens. When that earlier group has not computed them
    /// yet, the group waits for it rather than computing the same tokens in the same steps:
    /// the episodes of a replay group that issued the same query send the same next turn at
    /// the same time, and only one of them needs to prefill its observation.
    fn join_prefixes(&mut self) {
        for g in 0..self.groups.len() {
            let group = &self.groups[g];
            if group.joined {
                continue;
            }
            let prompt = &group.job.prompt;
            let limit = prompt.len().saturating_sub(1);
            let cached = self.cached_prefix(prompt);
            let cached_len = cached.map_or(0, |(shared, _)| shared);
            let earlier = self
                .groups
                .iter()
                .filter(|other| other.admitted < group.admitted)
                .map(|other| {
                    (
                        common_prefix(&other.job.prompt, prompt).min(limit),
                        other.slots[0],
                    )
                })
                .max_by_key(|(shared, _)| *shared)
                .filter(|(shared, _)| *shared >= cached_len + MIN_WAITED_PREFIX);
            let slot = group.slots[0];
            let prefilled = match (earlier, cached) {
                (Some((shared, from)), _) => {
                    if self.kv.len(from) < shared {
                        continue;
                    }
                    self.reuse_prefix(from, slot, shared)
                }
                (None, Some((shared, index))) => {
                    self.clock += 1;
                    let entry = &mut self.cached[index];
                    entry.last_used = self.clock;
                    let from = entry.slot;
                    self.reuse_prefix(from, slot, shared)
                }
                (None, None) => 0,
            };
            let group = &mut self.groups[g];
            group.prefilled = prefilled;
            group.joined = true;
        }
    }

    /// Copies the first `shared` computed tokens of slot `from` into the empty `slot`; returns
    /// how many it copied.
    fn reuse_prefix(&mut self, from: SlotId, slot: SlotId, shared: usize) -> usize {
        match self.kv.copy_prefix(from, slot, shared) {
            Ok(()) => {
                self.counters
                    .reused_tokens
                    .fetch_add(shared as u64, Ordering::Relaxed);
                shared
            }
            Err(e) => {
                // The slot is empty and the prompt is computed in full instead.
                tracing::warn!(error = %e, "cannot reuse a computed prefix");
                0
            }
        }
    }

    /// The longest prefix of `prompt` a cached sequence holds (all but the prompt's last token
    /// at most, whose logits a step must compute), and that entry's index; `None` when no
    /// entry shares a token.
    fn cached_prefix(&self, prompt: &[u32]) -> Option<(usize, usize)> {
        let limit = prompt.len().saturating_sub(1);
        self.cached
            .iter()
            .enumerate()
            .map(|(i, c)| (common_prefix(&c.tokens, prompt).min(limit), i))
            .max_by_key(|(shared, _)| *shared)
            .filter(|(shared, _)| *shared > 0)
    }

    /// One forward pass: every running sample's next token, then prompt chunks.
    fn step(&mut self) -> Result<()> {
        self.join_prefixes();
        let mut batch = TokenBatch::default();
        let mut readers: Vec<(usize, Reader)> = Vec::new();
        for (g, group) in self.groups.iter().enumerate() {
            for (s, sample) in group.samples.iter().enumerate() {
                if sample.finish.is_some() {
                    continue;
                }
                let Some(&last) = sample.tokens.last() else {
                    continue;
                };
                let position = group.job.prompt.len() + sample.tokens.len() - 1;
                batch.push_run(sample.slot, position, &[last]);
                readers.push((batch.len() - 1, Reader::Sample(g, s)));
            }
        }
        let decoding = batch.len();
        let mut room = self.limits.max_step_tokens.saturating_sub(decoding);
        for (g, group) in self.groups.iter().enumerate() {
            let prompt = &group.job.prompt;
            if !group.samples.is_empty() || !group.joined || room == 0 {
                continue;
            }
            let take = (prompt.len() - group.prefilled).min(room);
            batch.push_run(
                group.slots[0],
                group.prefilled,
                &prompt[group.prefilled..group.prefilled + take],
            );
            room -= take;
            if group.prefilled + take == prompt.len() {
                readers.push((batch.len() - 1, Reader::Prompt(g)));
            }
        }
        let rows: Vec<usize> = readers.iter().map(|(row, _)| *row).collect();
        let logits = self
            .model
            .forward(&batch, &mut self.kv, &rows)
            .map_err(|e| CandleError::Generation(format!("a forward pass failed: {e}")))?;
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        self.counters
            .prefilled_tokens
            .fetch_add((batch.len() - decoding) as u64, Ordering::Relaxed);
        self.counters
            .max_batch_sequences
            .fetch_max(decoding as u64, Ordering::Relaxed);
        for group in &mut self.groups {
            if group.samples.is_empty() {
                let fed = batch.slots.iter().filter(|&&s| s == group.slots[0]).count();
                group.prefilled += fed;
            }
        }
        for ((_, reader), row) in readers.iter().zip(&logits) {
            match *reader {
                Reader::Prompt(g) => self.start_samples(g, row)?,
                Reader::Sample(g, s) => {
                    let group = &mut self.groups[g];
                    let settings = group.job.settings;
                    let sample = &mut group.samples[s];
                    let uniform = sample.rng.random::<f64>();
                    let drawn = draw(row, &settings, uniform).map_err(CandleError::Generation)?;
                    sample.tokens.push(drawn.token);
                    sample.logprobs.push(drawn.logprob);
                    self.counters
                        .generated_tokens
                        .fetch_add(1, Ordering::Relaxed);
                    self.check_finish(g, s)?;
                }
            }
        }
        self.finish_groups()
    }

    /// The prompt of group `g` is in: copies it into the other samples' slots and draws every
    /// sample's first token from `logits`.
    fn start_samples(&mut self, g: usize, logits: &[f32]) -> Result<()> {
        let prompt_len = self.groups[g].job.prompt.len();
        let slots = self.groups[g].slots.clone();
        for &slot in &slots[1..] {
            self.kv
                .copy_prefix(slots[0], slot, prompt_len)
                .map_err(|e| CandleError::Generation(format!("cannot fork a prompt: {e}")))?;
        }
        let group = &mut self.groups[g];
        let settings = group.job.settings;
        for (&slot, &seed) in slots.iter().zip(&group.job.seeds) {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let drawn =
                draw(logits, &settings, rng.random::<f64>()).map_err(CandleError::Generation)?;
            group.samples.push(SampleRun {
                slot,
                rng,
                tokens: vec![drawn.token],
                logprobs: vec![drawn.logprob],
                finish: None,
            });
        }
        let n = group.samples.len();
        self.counters
            .generated_tokens
            .fetch_add(n as u64, Ordering::Relaxed);
        for s in 0..n {
            self.check_finish(g, s)?;
        }
        Ok(())
    }

    /// Ends sample `s` of group `g` if its last token is an end of sequence, completes a stop
    /// string, or reaches the length limit.
    fn check_finish(&mut self, g: usize, s: usize) -> Result<()> {
        let group = &mut self.groups[g];
        let sample = &mut group.samples[s];
        let Some(&last) = sample.tokens.last() else {
            return Ok(());
        };
        if self.eos.contains(&last) {
            sample.finish = Some(FinishReason::Eos);
            return Ok(());
        }
        if !group.job.stop.is_empty() {
            let text = self
                .tokenizer
                .decode(&sample.tokens, false)
                .map_err(|e| CandleError::Generation(format!("decoding a sample: {e}")))?;
            // Checked after every token, so the first string found is the one just completed.
            if let Some(stop) = group
                .job
                .stop
                .iter()
                .find(|stop| text.contains(stop.as_str()))
            {
                sample.finish = Some(FinishReason::Stop(stop.clone()));
                return Ok(());
            }
        }
        if sample.tokens.len() >= group.job.max_tokens {
            sample.finish = Some(FinishReason::Length);
        }
        Ok(())
    }

    /// Answers every group whose samples have all finished, and keeps their slots as cached
    /// prefixes.
    fn finish_groups(&mut self) -> Result<()> {
        let mut index = 0;
        while index < self.groups.len() {
            let done = {
                let group = &self.groups[index];
                !group.samples.is_empty() && group.samples.iter().all(|s| s.finish.is_some())
            };
            if !done {
                index += 1;
                continue;
            }
            let group = self.groups.swap_remove(index);
            let mut samples = Vec::with_capacity(group.samples.len());
            for run in group.samples {
                let text = self
                    .tokenizer
                    .decode(&run.tokens, false)
                    .map_err(|e| CandleError::Generation(format!("decoding a sample: {e}")))?;
                let cached_len = self.kv.len(run.slot);
                let mut tokens = group.job.prompt.clone();
                tokens.extend_from_slice(&run.tokens);
                tokens.truncate(cached_len);
                self.keep_prefix(run.slot, tokens);
                samples.push(Sample {
                    tokens: run.tokens,
                    logprobs: run.logprobs,
                    text,
                    finish: run.finish.unwrap_or(FinishReason::Length),
                });
            }
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            // The caller may have gone meanwhile; nobody is left to tell.
            let _ = group.job.reply.send(Ok(samples));
        }
        Ok(())
    }

    /// Keeps `slot`, holding `tokens`, as a cached prefix, dropping the oldest entries beyond
    /// the configured number.
    fn keep_prefix(&mut self, slot: SlotId, tokens: Vec<u32>) {
        if self.limits.prefix_cache_entries == 0 || tokens.is_empty() {
            self.kv.release(slot);
            return;
        }
        self.clock += 1;
        self.cached.push(CachedPrefix {
            slot,
            tokens,
            last_used: self.clock,
        });
        while self.cached.len() > self.limits.prefix_cache_entries {
            self.evict_oldest();
        }
    }

    /// Answers every admitted request with `error` and frees their slots.
    fn fail_all(&mut self, error: &CandleError) {
        tracing::error!(%error, "a serving step failed; its requests are answered with the error");
        for group in std::mem::take(&mut self.groups) {
            for slot in group.slots {
                self.kv.release(slot);
            }
            let _ = group
                .job
                .reply
                .send(Err(CandleError::Generation(error.to_string())));
        }
    }
}
