//! [`MistralRsPolicy`]: a local GGUF model served by mistral.rs, sampling through
//! [`TokenRecorder`] so every sample carries its exact token ids and natural-log probabilities.

use std::{
    num::NonZeroUsize,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
};

use async_trait::async_trait;
use mistralrs::core::{
    AdapterPaths, AutoDeviceMapParams, DefaultSchedulerMethod, DeviceMapSetting, GGUFLoaderBuilder,
    GGUFSpecificConfig, LocalModelPaths, MistralRsBuilder, ModelDType, ModelPaths, SchedulerConfig,
};
use searchloop_core::{ChatMessage, Policy, Sample, SamplingParams};
use searchloop_llama::chat::ChatTemplate;
use tokio::sync::Semaphore;

use searchloop_core::sampling::DrawSettings;

use crate::{
    config::{MistralRsConfig, WeightsEncoding},
    engine::{Engine, SampleRequest},
    error::{ModelError, Result},
    gguf,
    processor::RecorderCounters,
};

/// How the engine drove the sampling processors of one policy since it was loaded.
///
/// With mistral.rs 0.8.1 every generated token costs exactly one processor call, so
/// `processor_calls == tokens_drawn + forced_ends` and `redraws == 0`; the counters exist to
/// check that this stays true.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SamplerStats {
    /// Calls of the sampling processor.
    pub processor_calls: u64,
    /// Tokens drawn and recorded.
    pub tokens_drawn: u64,
    /// Calls at a position that already had a token (the engine re-ran a step).
    pub redraws: u64,
    /// Extra engine steps after a sample was complete (a stop string was completed, or the
    /// caller gave up), each answered by forcing end-of-sequence.
    pub forced_ends: u64,
    /// Samples whose first step saw only the uncached tail of the prompt: the engine reused
    /// the KV cache of an earlier sequence sharing the prompt's beginning.
    pub prefix_cache_hits: u64,
    /// Samples whose recorded ids decode to exactly the text mistral.rs generated itself.
    pub texts_matched: u64,
    /// Samples whose recorded ids decode to a different text than mistral.rs generated (never,
    /// unless the engine's sequence departed from the recorded one).
    pub texts_differing: u64,
}

/// A GGUF model served by mistral.rs.
///
/// `Send + Sync`: share it in an `Arc` and let many episodes sample at once. Requests queue
/// in arrival order; on the CPU the engine decodes one sequence at a time (see
/// [`MistralRsConfig::max_concurrent_sequences`] for why), on a GPU up to that many at once.
pub struct MistralRsPolicy {
    engine: Arc<Engine>,
    chat_template: Option<ChatTemplate>,
    model_id: String,
    adapter_version: Option<u64>,
    context_length: usize,
    weights: WeightsEncoding,
    weights_path: PathBuf,
}

impl std::fmt::Debug for MistralRsPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MistralRsPolicy")
            .field("model_id", &self.model_id)
            .field("adapter_version", &self.adapter_version)
            .field("context_length", &self.context_length)
            .field("weights", &self.weights)
            .finish_non_exhaustive()
    }
}

/// Everything read from disk before the engine starts.
struct LoadedFiles {
    model_id: String,
    weights_path: PathBuf,
    chat_template: Option<ChatTemplate>,
    model_context_length: Option<usize>,
}

impl MistralRsPolicy {
    /// Loads the GGUF file named by `config` and starts a mistral.rs engine for it.
    ///
    /// The path must be an absolute path to an existing GGUF file; anything else is refused
    /// before mistral.rs sees it (it would take a missing path for a Hugging Face repository
    /// id and go to the network). With [`MistralRsConfig::weights`] other than `original`, a
    /// re-encoded copy is written once and loaded instead.
    pub async fn load(config: &MistralRsConfig) -> Result<Self> {
        config.validate()?;
        let owned = config.clone();
        // Hashing, re-encoding and building the pipeline are seconds of blocking file and CPU
        // work, kept off the async workers.
        let (files, pipeline) = tokio::task::spawn_blocking(move || -> Result<_> {
            let files = Self::read_files(&owned)?;
            let device = match owned.cuda_device {
                None => mistralrs::Device::Cpu,
                Some(ordinal) => mistralrs::Device::new_cuda(ordinal).map_err(|e| {
                    ModelError::Config(format!(
                        "cuda_device {ordinal} is unavailable (is the crate built with its `cuda` feature?): {e}"
                    ))
                })?,
            };
            let pipeline = load_pipeline(&files.weights_path, &device)?;
            Ok((files, pipeline))
        })
        .await
        .map_err(|e| ModelError::Config(format!("the model loading task failed: {e}")))??;
        Self::start(config, files, pipeline).await
    }

    fn read_files(config: &MistralRsConfig) -> Result<LoadedFiles> {
        let path = gguf::checked_model_path(&config.model_path)?;
        let hash = gguf::sha256_hex(&path)?;
        let header = gguf::read_header(&path)?;
        let cache_dir = match (&config.reencoded_dir, path.parent()) {
            (Some(dir), _) => dir.clone(),
            (None, Some(parent)) => parent.to_path_buf(),
            (None, None) => {
                return Err(ModelError::ModelPath {
                    path: path.clone(),
                    reason: "has no parent folder to keep a re-encoded copy in".into(),
                });
            }
        };
        let weights_path = gguf::weights_file(&path, &hash, config.weights, &cache_dir)?;
        let file_name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut model_id = format!("{file_name}@{}", gguf::short_hash(&hash));
        if config.weights != WeightsEncoding::Original {
            // The served numerics differ from the original file's, so the id says how.
            model_id.push('+');
            model_id.push_str(config.weights.as_str());
        }
        let template_source = config
            .chat_template
            .clone()
            .or_else(|| header.chat_template.clone());
        let chat_template = template_source
            .map(|source| {
                ChatTemplate::new(source, header.bos_token.clone(), header.eos_token.clone())
            })
            .transpose()?;
        Ok(LoadedFiles {
            model_id,
            weights_path,
            chat_template,
            model_context_length: header.context_length,
        })
    }
}

/// The engine's pipeline type, as its loader returns it.
type Pipeline = Arc<tokio::sync::Mutex<dyn mistralrs::core::Pipeline + Send + Sync>>;

/// Builds mistral.rs's GGUF pipeline from one local file.
///
/// The paths are handed to the loader directly (`load_model_from_path`), which skips the code
/// that resolves model ids against the Hugging Face hub: nothing here can reach the network.
/// The tokenizer and the chat template come from the GGUF metadata.
fn load_pipeline(weights_path: &Path, device: &mistralrs::Device) -> Result<Pipeline> {
    let load_error = |message: String| ModelError::Load {
        path: weights_path.to_path_buf(),
        message,
    };
    let file_name = weights_path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let folder = weights_path
        .parent()
        .map(|parent| parent.to_string_lossy().into_owned())
        .unwrap_or_default();
    let loader = GGUFLoaderBuilder::new(
        None,
        None,
        folder,
        vec![file_name],
        GGUFSpecificConfig { topology: None },
        false,
        None,
    )
    .build();
    let paths: Box<dyn ModelPaths> = Box::new(LocalModelPaths {
        // An empty tokenizer path makes the loader convert the GGUF's own tokenizer.
        tokenizer_filename: PathBuf::new(),
        config_filename: PathBuf::new(),
        template_filename: None,
        filenames: vec![weights_path.to_path_buf()],
        adapter_paths: AdapterPaths::None,
        gen_conf: None,
        preprocessor_config: None,
        processor_config: None,
        chat_template_json_filename: None,
    });
    loader
        .load_model_from_path(
            &paths,
            // mistral.rs's `Auto` picks BF16 activations and KV cache even on the CPU, where
            // decoding against the rounded cache moved log-probabilities by up to 2e-2 from a
            // prefill of the same context; f32 keeps the two within 1e-4.
            &ModelDType::F32,
            device,
            true,
            DeviceMapSetting::Auto(AutoDeviceMapParams::default_text()),
            None,
            None,
        )
        .map_err(|e| load_error(format!("{e:#}")))
}

impl MistralRsPolicy {
    async fn start(
        config: &MistralRsConfig,
        files: LoadedFiles,
        pipeline: Pipeline,
    ) -> Result<Self> {
        let load_error = |message: String| ModelError::Load {
            path: files.weights_path.clone(),
            message,
        };
        let (tokenizer, eos_tokens, engine_max_len) = {
            let pipeline = pipeline.lock().await;
            let tokenizer = pipeline
                .tokenizer()
                .ok_or_else(|| load_error("the pipeline has no tokenizer".into()))?;
            let metadata = pipeline.get_metadata();
            (tokenizer, metadata.eos_tok.clone(), metadata.max_seq_len)
        };
        if eos_tokens.is_empty() {
            return Err(load_error(
                "the model declares no end-of-sequence token".into(),
            ));
        }
        let model_max = files
            .model_context_length
            .map_or(engine_max_len, |n| n.min(engine_max_len));
        let context_length = match config.context_length {
            None => model_max,
            Some(wanted) if wanted <= model_max => wanted,
            Some(wanted) => {
                return Err(ModelError::Config(format!(
                    "context_length {wanted} exceeds the model's own context length {model_max}"
                )));
            }
        };
        // See the engine module: batched decoding is wrong on the CPU in mistral.rs 0.8.1.
        let in_flight = if config.cuda_device.is_some() {
            config.max_concurrent_sequences
        } else {
            1
        };
        let max_sequences = NonZeroUsize::new(in_flight).ok_or_else(|| {
            ModelError::Config("max_concurrent_sequences must be at least 1".into())
        })?;
        let mut builder = MistralRsBuilder::new(
            pipeline,
            SchedulerConfig::DefaultScheduler {
                method: DefaultSchedulerMethod::Fixed(max_sequences),
            },
            false,
            None,
        )
        .with_no_prefix_cache(config.prefix_cache_sequences == 0);
        if config.prefix_cache_sequences > 0 {
            builder = builder.with_prefix_cache_n(config.prefix_cache_sequences);
        }
        let runner = builder.build().await;
        let vocab_size = tokenizer.get_vocab_size(true);
        Ok(Self {
            engine: Arc::new(Engine {
                runner,
                tokenizer,
                vocab_size,
                eos_tokens,
                in_flight: Semaphore::new(in_flight),
                counters: Arc::new(RecorderCounters::default()),
            }),
            chat_template: files.chat_template,
            model_id: files.model_id,
            adapter_version: config.adapter_version,
            context_length,
            weights: config.weights,
            weights_path: files.weights_path,
        })
    }

    /// The file the engine serves: the configured model, or its re-encoded copy.
    pub fn weights_path(&self) -> &Path {
        &self.weights_path
    }

    /// The in-memory encoding of the weights.
    pub fn weights(&self) -> WeightsEncoding {
        self.weights
    }

    /// The ids that end a sample when generated.
    pub fn eos_tokens(&self) -> &[u32] {
        &self.engine.eos_tokens
    }

    /// How the engine drove the sampling processors since this policy was loaded.
    pub fn sampler_stats(&self) -> SamplerStats {
        let counters = &self.engine.counters;
        SamplerStats {
            processor_calls: counters.calls.load(Ordering::Relaxed),
            tokens_drawn: counters.draws.load(Ordering::Relaxed),
            redraws: counters.redraws.load(Ordering::Relaxed),
            forced_ends: counters.forced_ends.load(Ordering::Relaxed),
            prefix_cache_hits: counters.tail_contexts.load(Ordering::Relaxed),
            texts_matched: counters.texts_matched.load(Ordering::Relaxed),
            texts_differing: counters.texts_differing.load(Ordering::Relaxed),
        }
    }

    /// The model's raw next-token logits after `context`, one per vocabulary entry (before any
    /// temperature or truncation), computed by a fresh one-step request.
    ///
    /// A sample's log-probabilities are computed from exactly these logits, so this is the
    /// reference for checking them, and a building block for scoring.
    pub async fn next_token_logits(&self, context: &[u32]) -> Result<Vec<f32>> {
        self.check_prompt(context)?;
        self.engine.next_token_logits(context.to_vec()).await
    }

    fn check_prompt(&self, prompt: &[u32]) -> Result<()> {
        if prompt.is_empty() {
            return Err(ModelError::Request("the prompt is empty".into()));
        }
        let vocab_size = self.engine.vocab_size;
        if let Some(bad) = prompt.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(ModelError::Request(format!(
                "token id {bad} is outside the vocabulary of {vocab_size} tokens"
            )));
        }
        if prompt.len() >= self.context_length {
            return Err(ModelError::Request(format!(
                "the prompt has {} tokens, which leaves no room in the context of {} tokens",
                prompt.len(),
                self.context_length
            )));
        }
        Ok(())
    }

    /// Draws `n` independent samples of `prompt`, sample `i` from a random stream seeded
    /// `seed + i` (a random seed when `params.seed` is `None`).
    ///
    /// Each sample is its own engine request with its own recorder; all are queued at once.
    /// A sample never runs past the context length: `max_tokens` is cut to the room left.
    pub async fn sample_tokens(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        n: usize,
    ) -> Result<Vec<Sample>> {
        params
            .validate()
            .map_err(|e| ModelError::Request(e.to_string()))?;
        self.check_prompt(prompt)?;
        let room = self.context_length - prompt.len();
        let settings = DrawSettings {
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k,
        };
        let base_seed = params.seed.unwrap_or_else(rand::random);
        let prompt: Arc<[u32]> = Arc::from(prompt);
        let stop: Arc<[String]> = Arc::from(params.stop.clone());
        let samples = (0..n).map(|index| {
            self.engine.sample(SampleRequest {
                prompt: prompt.clone(),
                settings,
                max_tokens: params.max_tokens.min(room),
                stop: stop.clone(),
                seed: base_seed.wrapping_add(index as u64),
            })
        });
        futures::future::join_all(samples)
            .await
            .into_iter()
            .collect()
    }
}

#[async_trait]
impl Policy for MistralRsPolicy {
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
            ModelError::ChatTemplate(format!(
                "{} has no chat template in its metadata and none is configured",
                self.model_id
            ))
        })?;
        Ok(template
            .render(messages, add_generation_prompt)
            .map_err(ModelError::from)?)
    }

    fn tokenize(&self, text: &str) -> searchloop_core::Result<Vec<u32>> {
        let encoding =
            self.engine.tokenizer.encode(text, false).map_err(|e| {
                ModelError::Tokenizer(format!("encoding {} bytes: {e}", text.len()))
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    fn detokenize(&self, tokens: &[u32]) -> searchloop_core::Result<String> {
        Ok(self.engine.decode(tokens)?)
    }

    /// Draws `n` samples; see [`MistralRsPolicy::sample_tokens`]. Temperature 0 is greedy, and
    /// each greedy token's recorded log-probability is 0: the distribution it was drawn from
    /// puts all its mass on it.
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
