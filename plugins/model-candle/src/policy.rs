//! [`CandlePolicy`]: a GGUF model served by this crate's engine, as the agent sees a model.

use std::sync::{Arc, Mutex, atomic::Ordering, mpsc};

use async_trait::async_trait;
use candle_core::quantized::gguf_file::Value;
use searchloop_core::{
    ChatMessage, Device, Policy, Sample, SamplingParams, sampling::DrawSettings,
};
use searchloop_llama::{
    GgufFile, KvCache, ServingModel, chat::ChatTemplate, tokenizer::GgufTokenizer,
};
use tokenizers::Tokenizer;
use tokio::sync::oneshot;

use crate::{
    config::CandleConfig,
    engine::{Counters, Engine, Job, Limits},
    error::{CandleError, Result},
};

/// Hex digits of the content hash kept in model ids.
const SHORT_HASH_LEN: usize = 12;

/// What the engine did since the policy was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineStats {
    /// Forward passes.
    pub steps: u64,
    /// Tokens sampled.
    pub generated_tokens: u64,
    /// Prompt tokens computed.
    pub prefilled_tokens: u64,
    /// Prompt tokens whose keys and values were copied from a cached prefix instead.
    pub reused_tokens: u64,
    /// Requests answered.
    pub requests: u64,
    /// Requests dropped because their caller stopped waiting.
    pub abandoned: u64,
    /// Most sequences decoded in one step.
    pub max_batch_sequences: u64,
}

/// A GGUF model served by the candle engine: many sequences per step, shared-prefix reuse,
/// cancellation of abandoned requests.
///
/// `Send + Sync`: share it in an `Arc`; every request goes to the engine's one thread, which
/// batches whatever is waiting.
pub struct CandlePolicy {
    jobs: Mutex<mpsc::Sender<Job>>,
    counters: Arc<Counters>,
    tokenizer: Arc<Tokenizer>,
    chat_template: Option<ChatTemplate>,
    model_id: String,
    adapter_version: Option<u64>,
    context_length: usize,
    vocab_size: usize,
    device: Device,
}

impl std::fmt::Debug for CandlePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CandlePolicy")
            .field("model_id", &self.model_id)
            .field("adapter_version", &self.adapter_version)
            .field("device", &self.device)
            .field("context_length", &self.context_length)
            .finish_non_exhaustive()
    }
}

impl CandlePolicy {
    /// Loads the model `config` names and starts its engine thread.
    pub async fn load(config: &CandleConfig) -> Result<Self> {
        config.validate()?;
        let owned = config.clone();
        // Hashing and loading are seconds of blocking file and CPU work.
        tokio::task::spawn_blocking(move || Self::load_blocking(&owned))
            .await
            .map_err(|e| CandleError::Generation(format!("the loading task failed: {e}")))?
    }

    fn load_blocking(config: &CandleConfig) -> Result<Self> {
        let path = &config.model_path;
        let model_error = |source| CandleError::Model {
            path: path.clone(),
            source,
        };
        let hash = searchloop_llama::gguf::file_sha256(path)
            .map_err(|e| CandleError::io(format!("cannot hash the model {}", path.display()), e))?;
        let file = GgufFile::open(path).map_err(model_error)?;
        let metadata = file.metadata();
        let tokenizer =
            searchloop_llama::tokenizer::from_gguf_metadata(metadata).map_err(model_error)?;
        let chat_template = match config.chat_template.clone().or_else(|| {
            match metadata.get("tokenizer.chat_template") {
                Some(Value::String(t)) => Some(t.clone()),
                _ => None,
            }
        }) {
            Some(source) => Some(
                ChatTemplate::new(
                    source,
                    tokenizer.bos.and_then(|b| tokenizer.token_text(b)),
                    tokenizer.token_text(tokenizer.eos),
                )
                .map_err(model_error)?,
            ),
            None => None,
        };
        let llama = file.config().map_err(model_error)?;
        let model_context = llama_context_length(metadata, llama.architecture.gguf_name());
        let context_length = match (config.context_length, model_context) {
            (Some(wanted), Some(own)) if wanted > own => {
                return Err(CandleError::Config(format!(
                    "context_length {wanted} exceeds the model's own context length {own}"
                )));
            }
            (Some(wanted), _) => wanted,
            (None, Some(own)) => own.min(CandleConfig::DEFAULT_CONTEXT),
            (None, None) => CandleConfig::DEFAULT_CONTEXT,
        };
        drop(file);
        let device = candle_device(config.device)?;
        let model = ServingModel::load(path, &device, config.weights).map_err(model_error)?;
        let (kv, budget) = if device.is_cpu() {
            (KvCache::host(model.config()), Some(config.kv_budget_tokens))
        } else {
            let slots = config.max_sequences + config.prefix_cache_entries;
            let kv = KvCache::device(model.config(), &device, slots, context_length)
                .map_err(model_error)?;
            (kv, None)
        };
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut model_id = format!("{file_name}@{}", &hash[..SHORT_HASH_LEN.min(hash.len())]);
        if config.weights != searchloop_llama::WeightsEncoding::Original {
            // The served numerics differ from the file's, so the id says how.
            model_id.push('+');
            model_id.push_str(config.weights.as_str());
        }
        let GgufTokenizer { tokenizer, eos, .. } = tokenizer;
        let tokenizer = Arc::new(tokenizer);
        let counters = Arc::new(Counters::default());
        let vocab_size = model.config().vocab_size;
        let engine = Engine::new(
            model,
            kv,
            tokenizer.clone(),
            vec![eos],
            Limits {
                max_sequences: config.max_sequences,
                max_step_tokens: config.max_step_tokens,
                prefix_cache_entries: config.prefix_cache_entries,
                kv_budget_tokens: budget,
            },
            counters.clone(),
        );
        let (jobs, receiver) = mpsc::channel();
        // The engine loop runs on a worker of its own thread pool, so the parallel kernels of
        // each step start on the thread that asks for them, with the pool's other workers
        // joining: asked from a thread outside the pool, every kernel first waits for a
        // sleeping worker to wake, which cost a decoding step about a third of its time. The
        // pool ends when the loop does (its job channel closes when the policy is dropped).
        let threads = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("searchloop-candle-engine-{i}"))
            // A panic in the loop ends the engine (requests then get `Stopped`), as it ended
            // the engine's own thread before; rayon's default would abort the process.
            .panic_handler(|_| tracing::error!("the candle engine stopped on a panic"))
            .build()
            .map_err(CandleError::Threads)?;
        threads.spawn(move || engine.run(receiver));
        Ok(Self {
            jobs: Mutex::new(jobs),
            counters,
            tokenizer,
            chat_template,
            model_id,
            adapter_version: config.adapter_version,
            context_length,
            vocab_size,
            device: config.device,
        })
    }

    /// What the engine did since the policy was loaded.
    pub fn stats(&self) -> EngineStats {
        let c = &self.counters;
        let get = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
        EngineStats {
            steps: get(&c.steps),
            generated_tokens: get(&c.generated_tokens),
            prefilled_tokens: get(&c.prefilled_tokens),
            reused_tokens: get(&c.reused_tokens),
            requests: get(&c.requests),
            abandoned: get(&c.abandoned),
            max_batch_sequences: get(&c.max_batch_sequences),
        }
    }

    /// The device serving.
    pub fn device(&self) -> Device {
        self.device
    }

    fn check_prompt(&self, prompt: &[u32]) -> Result<()> {
        if prompt.is_empty() {
            return Err(CandleError::Request("the prompt is empty".into()));
        }
        if let Some(bad) = prompt.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(CandleError::Request(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                self.vocab_size
            )));
        }
        if prompt.len() >= self.context_length {
            return Err(CandleError::Request(format!(
                "the prompt has {} tokens, which leaves no room in the context of {} tokens",
                prompt.len(),
                self.context_length
            )));
        }
        Ok(())
    }

    /// Draws `n` samples of `prompt`, sample `i` from a generator seeded `seed + i` (a random
    /// seed when `params.seed` is `None`). `max_tokens` is cut to the room the context leaves.
    pub async fn sample_tokens(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        n: usize,
    ) -> Result<Vec<Sample>> {
        params
            .validate()
            .map_err(|e| CandleError::Request(e.to_string()))?;
        self.check_prompt(prompt)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let base = params.seed.unwrap_or_else(rand::random);
        let (reply, answer) = oneshot::channel();
        let job = Job {
            prompt: prompt.to_vec(),
            settings: DrawSettings {
                temperature: params.temperature,
                top_p: params.top_p,
                top_k: params.top_k,
            },
            max_tokens: params.max_tokens.min(self.context_length - prompt.len()),
            stop: params.stop.clone(),
            seeds: (0..n as u64).map(|i| base.wrapping_add(i)).collect(),
            reply,
        };
        self.jobs
            .lock()
            .map_err(|_| CandleError::Stopped)?
            .send(job)
            .map_err(|_| CandleError::Stopped)?;
        // Dropping `answer` (a caller that gives up) closes the channel, and the engine drops
        // the request before its next step.
        answer.await.map_err(|_| CandleError::Stopped)?
    }
}

#[async_trait]
impl Policy for CandlePolicy {
    fn model_id(&self) -> &str {
        &self.model_id
    }

    fn adapter_version(&self) -> Option<u64> {
        self.adapter_version
    }

    fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> searchloop_core::Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            CandleError::Config(format!(
                "{} has no chat template in its metadata and none is configured",
                self.model_id
            ))
        })?;
        template
            .render(messages, add_generation_prompt)
            .map_err(|e| searchloop_core::Error::Policy(e.to_string()))
    }

    fn tokenize(&self, text: &str) -> searchloop_core::Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| {
            searchloop_core::Error::Policy(format!("encoding {} bytes: {e}", text.len()))
        })?;
        Ok(encoding.get_ids().to_vec())
    }

    fn detokenize(&self, tokens: &[u32]) -> searchloop_core::Result<String> {
        if let Some(bad) = tokens.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(searchloop_core::Error::Policy(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                self.vocab_size
            )));
        }
        self.tokenizer.decode(tokens, false).map_err(|e| {
            searchloop_core::Error::Policy(format!("decoding {} tokens: {e}", tokens.len()))
        })
    }

    /// Draws `n` samples; see [`CandlePolicy::sample_tokens`]. Temperature 0 is greedy, and
    /// each greedy token's recorded log-probability is 0.
    async fn sample(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        n: usize,
    ) -> searchloop_core::Result<Vec<Sample>> {
        Ok(self.sample_tokens(prompt, params, n).await?)
    }

    fn context_length(&self) -> usize {
        self.context_length
    }
}

/// candle's device for `device`, or an error saying how to get one.
fn candle_device(device: Device) -> Result<candle_core::Device> {
    match device {
        Device::Cpu => Ok(candle_core::Device::Cpu),
        Device::Cuda(ordinal) => candle_core::Device::new_cuda(ordinal).map_err(|e| {
            CandleError::Config(format!(
                "device {device} is unavailable (a build without the `cuda` feature has no \
                 GPU): {e}"
            ))
        }),
    }
}

/// `{architecture}.context_length`, when the file has it.
fn llama_context_length(
    metadata: &std::collections::HashMap<String, Value>,
    architecture: &str,
) -> Option<usize> {
    metadata
        .get(&format!("{architecture}.context_length"))
        .and_then(|v| v.to_u64().ok())
        .and_then(|n| usize::try_from(n).ok())
}
