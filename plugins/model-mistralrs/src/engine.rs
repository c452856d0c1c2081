//! One running mistral.rs engine and the two kinds of request this crate sends it: a sample,
//! whose tokens a [`TokenRecorder`] chooses, and a next-token-logits query.
//!
//! Requests are limited to a fixed number in flight. On the CPU that number is 1: mistral.rs
//! 0.8.1's CPU decode attention (`flash_attn_cpu_single_q`) keeps its per-tile scratch per head
//! but not per sequence, so in a batched decoding step every sequence but one attends with
//! another sequence's keys and values (measured: log-probabilities off by several nats). The
//! engine batches every waiting sequence of equal length whatever its own sequence limit says,
//! so the limit is enforced here, before requests reach it.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use mistralrs::core::{
    Constraint, CustomLogitsProcessor, MistralRs, NormalRequest, Request, RequestMessage, Response,
    SamplingParams as EngineSamplingParams,
};
use searchloop_core::{FinishReason, Sample};
use tokenizers::Tokenizer;
use tokio::sync::{Semaphore, mpsc};

use searchloop_core::sampling::DrawSettings;

use crate::{
    error::{ModelError, Result},
    processor::{EarlyEnd, LogitsCapture, RecorderCounters, RecorderSetup, TokenRecorder},
};

/// A started engine with what is needed to talk to it.
pub(crate) struct Engine {
    pub runner: Arc<MistralRs>,
    pub tokenizer: Arc<Tokenizer>,
    /// Ids below this are in the tokenizer's vocabulary.
    pub vocab_size: usize,
    /// End-of-sequence ids; the first is the one forced to end a sample early.
    pub eos_tokens: Vec<u32>,
    /// One permit per request allowed in flight.
    pub in_flight: Semaphore,
    pub counters: Arc<RecorderCounters>,
}

/// One sample to draw.
pub(crate) struct SampleRequest {
    pub prompt: Arc<[u32]>,
    pub settings: DrawSettings,
    pub max_tokens: usize,
    pub stop: Arc<[String]>,
    pub seed: u64,
}

/// Sets its flag when dropped: the caller no longer waits for the request.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Engine {
    /// Draws one sample.
    ///
    /// The request runs on its own task, which holds its in-flight permit until the engine
    /// has answered: a caller that gives up cannot free the slot while the engine still
    /// decodes the sequence. Giving up makes the recorder force end-of-sequence at the next
    /// step, so an abandoned sample costs at most one more decoding step.
    pub(crate) async fn sample(self: &Arc<Self>, request: SampleRequest) -> Result<Sample> {
        let cancelled = Arc::new(AtomicBool::new(false));
        let _cancel_on_drop = CancelOnDrop(cancelled.clone());
        let engine = Arc::clone(self);
        tokio::spawn(async move { engine.run_sample(request, cancelled).await })
            .await
            .map_err(|e| ModelError::Generation(format!("the sampling task failed: {e}")))?
    }

    async fn run_sample(
        &self,
        request: SampleRequest,
        cancelled: Arc<AtomicBool>,
    ) -> Result<Sample> {
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|_| ModelError::Generation("the engine is shutting down".into()))?;
        if cancelled.load(Ordering::Relaxed) {
            return Err(ModelError::Generation("the sample was cancelled".into()));
        }
        let recorder = Arc::new(TokenRecorder::new(RecorderSetup {
            prompt: request.prompt.clone(),
            settings: request.settings,
            seed: request.seed,
            end_token: self.eos_tokens[0],
            stop: request.stop,
            vocab_size: self.vocab_size,
            tokenizer: self.tokenizer.clone(),
            cancelled,
            counters: self.counters.clone(),
        }));
        let receiver = self
            .send(&request.prompt, request.max_tokens, recorder.clone())
            .await?;
        let engine_answer = self.finish(receiver).await;
        let recording = recorder.recording();
        // The recorder's own diagnosis is more precise than the engine's report of it.
        if let Some(error) = recording.error {
            return Err(ModelError::Generation(error));
        }
        let (engine_finish, engine_text) = engine_answer?;
        let finish = match recording.early_end {
            Some(EarlyEnd::StopString(stop)) => FinishReason::Stop(stop),
            Some(EarlyEnd::Cancelled) => {
                return Err(ModelError::Generation("the sample was cancelled".into()));
            }
            None if recording
                .tokens
                .last()
                .is_some_and(|token| self.eos_tokens.contains(token)) =>
            {
                FinishReason::Eos
            }
            None if engine_finish == "length" => FinishReason::Length,
            None => {
                return Err(ModelError::Generation(format!(
                    "the engine stopped ({engine_finish}) after {} tokens without an end-of-sequence token, stop string or length limit",
                    recording.tokens.len()
                )));
            }
        };
        let text = self.decode(&recording.tokens)?;
        self.check_engine_text(&recording.tokens, &text, &engine_text)?;
        Ok(Sample {
            tokens: recording.tokens,
            logprobs: recording.logprobs,
            text,
            finish,
        })
    }

    /// The raw next-token logits after `context`, from a one-step request.
    pub(crate) async fn next_token_logits(self: &Arc<Self>, context: Vec<u32>) -> Result<Vec<f32>> {
        let engine = Arc::clone(self);
        tokio::spawn(async move {
            let _permit = engine
                .in_flight
                .acquire()
                .await
                .map_err(|_| ModelError::Generation("the engine is shutting down".into()))?;
            let capture = Arc::new(LogitsCapture::default());
            let receiver = engine.send(&context, 1, capture.clone()).await?;
            engine.finish(receiver).await?;
            capture
                .take()
                .ok_or_else(|| ModelError::Generation("the engine ran no decoding step".into()))
        })
        .await
        .map_err(|e| ModelError::Generation(format!("the scoring task failed: {e}")))?
    }

    /// The text of `tokens`, special tokens included.
    pub(crate) fn decode(&self, tokens: &[u32]) -> Result<String> {
        if let Some(bad) = tokens.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(ModelError::Tokenizer(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                self.vocab_size
            )));
        }
        self.tokenizer
            .decode(tokens, false)
            .map_err(|e| ModelError::Tokenizer(format!("decoding {} tokens: {e}", tokens.len())))
    }

    /// Sends one completion request for `prompt` whose sampling is done by `processor`.
    async fn send(
        &self,
        prompt: &[u32],
        max_tokens: usize,
        processor: Arc<dyn CustomLogitsProcessor>,
    ) -> Result<mpsc::Receiver<Response>> {
        let (sender, receiver) = mpsc::channel(1);
        let mut sampling_params = EngineSamplingParams::deterministic();
        // Temperature 0 makes mistral.rs take the argmax of the processor's logits, which the
        // recorder masks to its own choice; it is also the cheapest path through its sampler.
        sampling_params.temperature = Some(0.0);
        sampling_params.max_len = Some(max_tokens);
        let request = Request::Normal(Box::new(NormalRequest {
            messages: RequestMessage::CompletionTokens(prompt.to_vec()),
            sampling_params,
            response: sender,
            return_logprobs: false,
            is_streaming: false,
            id: self.runner.next_request_id(),
            constraint: Constraint::None,
            suffix: None,
            tools: None,
            tool_choice: None,
            logits_processors: Some(vec![processor]),
            return_raw_logits: false,
            web_search_options: None,
            model_id: None,
            truncate_sequence: false,
        }));
        let engine = self
            .runner
            .get_sender(None)
            .map_err(|e| ModelError::Generation(format!("the engine is unavailable: {e}")))?;
        engine
            .send(request)
            .await
            .map_err(|_| ModelError::Generation("the engine has stopped".into()))?;
        Ok(receiver)
    }

    /// Compares the text mistral.rs generated (decoded incrementally from its own sequence)
    /// with the text of the recorded ids, and counts the outcome: the two agree exactly when
    /// the engine's sequence is the recorded one. The engine's text drops leading whitespace
    /// and may omit the end-of-sequence marker, so both sides are compared without them.
    /// `text` is the decoded `tokens`; it is decoded again without a final end-of-sequence
    /// token only when there is one.
    fn check_engine_text(&self, tokens: &[u32], text: &str, engine_text: &str) -> Result<()> {
        let ours = match tokens.split_last() {
            Some((last, body)) if self.eos_tokens.contains(last) => self.decode(body)?,
            _ => text.to_string(),
        };
        let mut theirs = engine_text;
        for eos in &self.eos_tokens {
            let marker = self.decode(&[*eos])?;
            if !marker.is_empty() {
                theirs = theirs.strip_suffix(marker.as_str()).unwrap_or(theirs);
            }
        }
        if ours.trim_start() == theirs.trim_start() {
            self.counters.texts_matched.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters
                .texts_differing
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                recorded = %ours,
                engine = %engine_text,
                "the engine's text differs from the text of the recorded token ids"
            );
        }
        Ok(())
    }

    /// Waits for the engine's answer: its finish reason and the text it generated.
    async fn finish(&self, mut receiver: mpsc::Receiver<Response>) -> Result<(String, String)> {
        let response = receiver
            .recv()
            .await
            .ok_or_else(|| ModelError::Generation("the engine dropped the request".into()))?;
        match response {
            Response::CompletionDone(done) => {
                let choice = done.choices.into_iter().next().ok_or_else(|| {
                    ModelError::Generation("the engine returned no choice".into())
                })?;
                if choice.finish_reason == "canceled" {
                    return Err(ModelError::Generation(
                        "the engine canceled the request".into(),
                    ));
                }
                Ok((choice.finish_reason, choice.text))
            }
            Response::CompletionModelError(message, _) => Err(ModelError::Generation(message)),
            Response::InternalError(error) | Response::ValidationError(error) => {
                Err(ModelError::Generation(error.to_string()))
            }
            _ => Err(ModelError::Generation(
                "the engine answered a completion request with another kind of response".into(),
            )),
        }
    }
}
