//! Logits processors that take the sampling decision away from mistral.rs.
//!
//! mistral.rs reports base-10 log-probabilities without the sampled token's id, and its own
//! random stream is shared by all requests. [`TokenRecorder`] therefore samples by itself: it
//! sees the logits just before mistral.rs would sample, draws a token from its own seeded
//! stream, records the id and natural-log probability, and hands back logits that are `-inf`
//! everywhere but at that token, so mistral.rs's greedy pick must take it. It also sees the
//! context ids at every step, which lets it check that the engine really appended the tokens it
//! chose. [`LogitsCapture`] only copies the logits out, for scoring.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use candle_core::Tensor;
use mistralrs::CustomLogitsProcessor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

use searchloop_core::sampling::{DrawSettings, draw};

/// Counters shared by every recorder of one policy, to check how the engine drives them.
#[derive(Debug, Default)]
pub(crate) struct RecorderCounters {
    /// Calls of [`TokenRecorder`]'s `apply`.
    pub calls: AtomicU64,
    /// Tokens drawn and recorded.
    pub draws: AtomicU64,
    /// Calls at a position that already had a token (the engine re-ran a step).
    pub redraws: AtomicU64,
    /// Calls after the sample was complete, answered by forcing end-of-sequence.
    pub forced_ends: AtomicU64,
    /// First steps whose context was only the uncached tail of the prompt (a prefix-cache
    /// hit).
    pub tail_contexts: AtomicU64,
    /// Samples whose recorded ids decode to the text the engine generated.
    pub texts_matched: AtomicU64,
    /// Samples whose recorded ids decode to anything else.
    pub texts_differing: AtomicU64,
}

/// Why a recorder stopped choosing tokens before the engine stopped calling it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EarlyEnd {
    /// The generated text completed this stop string.
    StopString(String),
    /// The caller gave up on the sample.
    Cancelled,
}

/// What a recorder chose, read out once the request is done.
#[derive(Debug, Clone, Default)]
pub(crate) struct Recording {
    /// Generated token ids, in order.
    pub tokens: Vec<u32>,
    /// Natural-log probability of each token under the distribution it was drawn from.
    pub logprobs: Vec<f32>,
    /// Set once generation should end although the engine would go on.
    pub early_end: Option<EarlyEnd>,
    /// The first inconsistency found, if any; the request fails with it.
    pub error: Option<String>,
}

/// What a [`TokenRecorder`] needs besides its random stream.
pub(crate) struct RecorderSetup {
    /// The prompt ids, exactly as sent.
    pub prompt: Arc<[u32]>,
    /// Temperature and truncation.
    pub settings: DrawSettings,
    /// Seed of this sample's random stream.
    pub seed: u64,
    /// Token forced once the sample is complete, so the engine stops (an end-of-sequence id).
    pub end_token: u32,
    /// Stop strings ending generation right after the token that completes one.
    pub stop: Arc<[String]>,
    /// Ids at or above this are not in the tokenizer's vocabulary (padding rows of the
    /// output matrix) and are never drawn.
    pub vocab_size: usize,
    /// Decodes generated tokens to look for stop strings.
    pub tokenizer: Arc<Tokenizer>,
    /// Set when the caller drops the request, so the engine can be made to stop early.
    pub cancelled: Arc<AtomicBool>,
    /// Counters of the policy this sample belongs to.
    pub counters: Arc<RecorderCounters>,
}

/// The sampling logits processor: chooses each token itself and records it.
pub(crate) struct TokenRecorder {
    setup: RecorderSetup,
    /// Longest stop string in bytes: how far back a newly completed stop string can start.
    longest_stop: usize,
    recording: Mutex<Recording>,
}

impl TokenRecorder {
    /// A recorder for one sample.
    pub(crate) fn new(setup: RecorderSetup) -> Self {
        let longest_stop = setup.stop.iter().map(String::len).max().unwrap_or(0);
        Self {
            setup,
            longest_stop,
            recording: Mutex::new(Recording::default()),
        }
    }

    /// What was chosen so far.
    pub(crate) fn recording(&self) -> Recording {
        lock(&self.recording).clone()
    }

    /// The uniform variate for generated position `position`.
    ///
    /// Each position has its own ChaCha stream of the sample's seed, so a draw depends only on
    /// (seed, position): if the engine ever re-ran a step, the same token would come out again.
    fn uniform(&self, position: usize) -> f64 {
        let mut rng = ChaCha8Rng::seed_from_u64(self.setup.seed);
        rng.set_stream(position as u64);
        rng.random::<f64>()
    }

    /// Where in the sample the engine is, from the context it passed; checks that the context
    /// is the prompt followed by the tokens recorded so far.
    fn position(&self, context: &[u32], recording: &Recording) -> Result<usize, String> {
        let prompt = &self.setup.prompt[..];
        if context.len() < prompt.len() {
            // With a prefix-cache hit the first step's context is only the uncached tail of the
            // prompt; later steps see the whole sequence again.
            if recording.tokens.is_empty() && prompt.ends_with(context) {
                self.setup
                    .counters
                    .tail_contexts
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(0);
            }
            return Err(format!(
                "the engine passed a context of {} tokens that is not the prompt's tail ({} prompt tokens, {} generated)",
                context.len(),
                prompt.len(),
                recording.tokens.len()
            ));
        }
        let (context_prompt, generated) = context.split_at(prompt.len());
        if context_prompt != prompt {
            return Err("the engine's context does not start with the prompt".into());
        }
        if generated.len() > recording.tokens.len()
            || generated != &recording.tokens[..generated.len()]
        {
            return Err(format!(
                "the engine generated {:?} but the sampler chose {:?}",
                generated, recording.tokens
            ));
        }
        Ok(generated.len())
    }

    /// Whether the text generated so far completes a stop string, and which.
    fn completed_stop(&self, tokens: &[u32]) -> Result<Option<String>, String> {
        if self.setup.stop.is_empty() {
            return Ok(None);
        }
        // A newly completed stop string lies within its own length in bytes of the end, and
        // every token decodes to at least one byte, so that many tokens (plus two, for a
        // decoder that trims the window's first token) hold it; the window keeps each step
        // cheap however long the sample grows.
        let window_start = tokens.len().saturating_sub(self.longest_stop + 2);
        let text = self
            .setup
            .tokenizer
            .decode(&tokens[window_start..], false)
            .map_err(|e| format!("decoding generated tokens: {e}"))?;
        Ok(self
            .setup
            .stop
            .iter()
            .find(|stop| text.contains(stop.as_str()))
            .cloned())
    }

    fn choose(&self, logits: &Tensor, context: &[u32]) -> Result<u32, String> {
        let counters = &self.setup.counters;
        counters.calls.fetch_add(1, Ordering::Relaxed);
        let mut recording = lock(&self.recording);
        if let Some(error) = &recording.error {
            return Err(error.clone());
        }
        if self.setup.cancelled.load(Ordering::Relaxed) && recording.early_end.is_none() {
            recording.early_end = Some(EarlyEnd::Cancelled);
        }
        if recording.early_end.is_some() {
            counters.forced_ends.fetch_add(1, Ordering::Relaxed);
            return Ok(self.setup.end_token);
        }
        let position = self.position(context, &recording)?;
        if position < recording.tokens.len() {
            counters.redraws.fetch_add(1, Ordering::Relaxed);
            recording.tokens.truncate(position);
            recording.logprobs.truncate(position);
        }
        let logits: Vec<f32> = logits
            .to_vec1()
            .map_err(|e| format!("reading the logits: {e}"))?;
        let usable = logits.len().min(self.setup.vocab_size);
        let chosen = draw(
            &logits[..usable],
            &self.setup.settings,
            self.uniform(position),
        )?;
        recording.tokens.push(chosen.token);
        recording.logprobs.push(chosen.logprob);
        counters.draws.fetch_add(1, Ordering::Relaxed);
        if let Some(stop) = self.completed_stop(&recording.tokens)? {
            recording.early_end = Some(EarlyEnd::StopString(stop));
        }
        Ok(chosen.token)
    }
}

impl CustomLogitsProcessor for TokenRecorder {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> candle_core::Result<Tensor> {
        match self.choose(logits, context) {
            Ok(token) => only(token, logits),
            Err(message) => {
                let mut recording = lock(&self.recording);
                recording.error.get_or_insert_with(|| message.clone());
                Err(candle_core::Error::Msg(message))
            }
        }
    }
}

/// Logits of the same shape as `logits`: `-inf` everywhere but 0 at `token`, so that any
/// sampler (greedy or not) picks `token`.
fn only(token: u32, logits: &Tensor) -> candle_core::Result<Tensor> {
    let size = logits.dim(0)?;
    let index = token as usize;
    if index >= size {
        return Err(candle_core::Error::Msg(format!(
            "token {token} is outside the vocabulary of {size} logits"
        )));
    }
    let mut masked = vec![f32::NEG_INFINITY; size];
    masked[index] = 0.0;
    Tensor::from_vec(masked, size, logits.device())
}

/// A processor that copies out the logits of the first step and leaves them unchanged.
#[derive(Default)]
pub(crate) struct LogitsCapture {
    captured: Mutex<Option<Vec<f32>>>,
}

impl LogitsCapture {
    /// The captured logits, if the engine ran a step.
    pub(crate) fn take(&self) -> Option<Vec<f32>> {
        lock(&self.captured).take()
    }
}

impl CustomLogitsProcessor for LogitsCapture {
    fn apply(&self, logits: &Tensor, _context: &[u32]) -> candle_core::Result<Tensor> {
        let mut captured = lock(&self.captured);
        if captured.is_none() {
            *captured = Some(logits.to_vec1()?);
        }
        Ok(logits.clone())
    }
}

/// Locks `mutex`, going on after a panic elsewhere: the guarded data are plain records that a
/// panic cannot leave half-updated in a way that matters more than the panic itself.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}
