//! Shared pieces of the round tests: a tiny random llama written as a GGUF, a policy that
//! serves it through the trainer's own sampler with an eight-symbol vocabulary, a trivial tool,
//! and agents wired to a store.

#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use async_trait::async_trait;
use candle_core::{
    DType, Device,
    quantized::{GgmlDType, QTensor, gguf_file},
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use searchloop_core::{
    Agent, AgentConfig, ChatMessage, FinishReason, Policy, PolicySlot, ProtocolConfig, Sample,
    SamplingParams, Tool, ToolError, ToolRegistry, TrajectorySink,
};
use searchloop_llama::sample::{SampleParams, sample};
use searchloop_llama::{Architecture, Llama, LlamaConfig};
use searchloop_store_sql::Store;
use serde::Deserialize;

/// The symbols of the tiny model's vocabulary; id = position. Any other character is read as
/// `?`. Id 0, written `#` (the store refuses NUL characters in text), ends a sample.
pub const VOCAB: [char; 8] = ['#', '\n', 'a', 'b', 'c', 'd', ' ', '?'];

/// The tiny model's end-of-sequence id.
pub const EOS: u32 = 0;

/// A two-layer llama over [`VOCAB`].
pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        architecture: Architecture::Llama,
        n_layer: 2,
        hidden_size: 32,
        n_head: 4,
        n_kv_head: 2,
        head_dim: 8,
        ffn_hidden: 64,
        vocab_size: VOCAB.len(),
        rms_eps: f64::from(1e-5f32),
        rope_theta: 10_000.0,
    }
}

/// Writes a seeded random tiny llama as an all-F32 GGUF at `path`.
pub fn write_tiny_gguf(path: &Path, seed: u64) {
    let model = Llama::random(tiny_config(), seed, &Device::Cpu, DType::F32).unwrap();
    let c = model.config();
    let w = model.weights();
    let q = |t: &candle_core::Tensor| QTensor::quantize(t, GgmlDType::F32).unwrap();
    let mut tensors: Vec<(String, QTensor)> = vec![("token_embd.weight".into(), q(&w.token_embd))];
    for (i, l) in w.layers.iter().enumerate() {
        tensors.push((format!("blk.{i}.attn_norm.weight"), q(&l.attn_norm)));
        tensors.push((format!("blk.{i}.ffn_norm.weight"), q(&l.ffn_norm)));
        for (stem, lin) in [
            ("attn_q", &l.q),
            ("attn_k", &l.k),
            ("attn_v", &l.v),
            ("attn_output", &l.o),
            ("ffn_gate", &l.gate),
            ("ffn_up", &l.up),
            ("ffn_down", &l.down),
        ] {
            tensors.push((format!("blk.{i}.{stem}.weight"), q(&lin.weight)));
        }
    }
    tensors.push(("output_norm.weight".into(), q(&w.output_norm)));
    use gguf_file::Value;
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.block_count".into(), Value::U32(c.n_layer as u32)),
        (
            "llama.embedding_length".into(),
            Value::U32(c.hidden_size as u32),
        ),
        (
            "llama.feed_forward_length".into(),
            Value::U32(c.ffn_hidden as u32),
        ),
        (
            "llama.attention.head_count".into(),
            Value::U32(c.n_head as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(c.n_kv_head as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(c.rms_eps as f32),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(c.rope_theta as f32),
        ),
    ];
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta, &tensor_refs).unwrap();
}

/// Serves a (merged) tiny GGUF by sampling with the trainer's forward pass, so its recorded
/// log-probs are exactly the trainer's numerics.
pub struct TinyPolicy {
    model: Llama,
    version: Option<u64>,
    model_id: String,
}

impl TinyPolicy {
    /// Loads `path`, reporting adapter `version`.
    pub fn load(path: &Path, version: Option<u64>) -> Self {
        Self {
            model: Llama::load(path, &Device::Cpu, DType::F32).unwrap(),
            version,
            model_id: format!("tiny@{}", path.display()),
        }
    }
}

fn symbol_id(c: char) -> u32 {
    VOCAB
        .iter()
        .position(|&v| v == c)
        .unwrap_or(VOCAB.len() - 1) as u32
}

#[async_trait]
impl Policy for TinyPolicy {
    fn model_id(&self) -> &str {
        &self.model_id
    }

    fn adapter_version(&self) -> Option<u64> {
        self.version
    }

    fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> searchloop_core::Result<String> {
        let mut out: String = messages
            .iter()
            .map(|m| format!("{}\n", m.content))
            .collect();
        if add_generation_prompt {
            out.push(' ');
        }
        Ok(out)
    }

    fn tokenize(&self, text: &str) -> searchloop_core::Result<Vec<u32>> {
        Ok(text.chars().map(symbol_id).collect())
    }

    fn detokenize(&self, tokens: &[u32]) -> searchloop_core::Result<String> {
        Ok(tokens
            .iter()
            .map(|&t| VOCAB.get(t as usize).copied().unwrap_or('?'))
            .collect())
    }

    async fn sample(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        n: usize,
    ) -> searchloop_core::Result<Vec<Sample>> {
        let base = params.seed.unwrap_or(7);
        // Greedy requests are approximated by a very low temperature and, as serving does,
        // recorded with log-prob 0 (all mass on the chosen token).
        let greedy = params.temperature == 0.0;
        let temperature = if greedy {
            1e-3
        } else {
            f64::from(params.temperature)
        };
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let mut rng = ChaCha8Rng::seed_from_u64(base.wrapping_add(i as u64));
            let drawn = sample(
                &self.model,
                None,
                prompt,
                &SampleParams {
                    n: 1,
                    max_new_tokens: params.max_tokens,
                    temperature,
                    stop: Some(EOS),
                },
                &mut rng,
            )
            .map_err(|e| searchloop_core::Error::Policy(e.to_string()))?
            .remove(0);
            let new_tokens = &drawn.tokens[prompt.len()..];
            let new_logprobs = &drawn.logprobs[prompt.len()..];
            // Cut right after the first token that completes a stop string, as serving does.
            let mut end = new_tokens.len();
            let mut finish = if new_tokens.last() == Some(&EOS) {
                FinishReason::Eos
            } else {
                FinishReason::Length
            };
            for k in 1..=new_tokens.len() {
                let text = self.detokenize(&new_tokens[..k])?;
                if let Some(stop) = params.stop.iter().find(|s| text.ends_with(s.as_str())) {
                    end = k;
                    finish = FinishReason::Stop(stop.clone());
                    break;
                }
            }
            let logprobs = if greedy {
                vec![0.0; end]
            } else {
                new_logprobs[..end].to_vec()
            };
            out.push(Sample {
                tokens: new_tokens[..end].to_vec(),
                logprobs,
                text: self.detokenize(&new_tokens[..end])?,
                finish,
            });
        }
        Ok(out)
    }

    fn context_length(&self) -> usize {
        512
    }
}

/// A tool the toy protocol never needs; the agent requires one.
pub struct EchoTool;

/// Echo's arguments.
#[derive(Deserialize)]
pub struct EchoArgs {
    query: String,
}

impl Tool for EchoTool {
    type Args = EchoArgs;

    fn name(&self) -> &str {
        "echo"
    }

    fn description(&self) -> &str {
        "Repeats the query."
    }

    fn parameters(&self) -> serde_json::Value {
        serde_json::json!({"type": "object", "properties": {"query": {"type": "string"}}})
    }

    async fn call(&self, args: EchoArgs) -> Result<String, ToolError> {
        Ok(args.query)
    }
}

/// The toy task's protocol: one turn that may only answer (prefilled `<answer>`), ended by a
/// newline or the end-of-sequence token, at most four tokens.
pub fn toy_agent_config(temperature: f32) -> AgentConfig {
    AgentConfig {
        protocol: ProtocolConfig {
            system_prompt: "answer b or c".into(),
            max_turns: 0,
            max_turn_tokens: 4,
            max_episode_tokens: 8,
            ..ProtocolConfig::default()
        },
        sampling: SamplingParams {
            temperature,
            ..SamplingParams::default()
        },
        ..AgentConfig::default()
    }
}

/// An agent serving `policy` with the toy protocol, recording into `store`.
pub fn toy_agent(policy: Arc<dyn Policy>, store: &Arc<Store>, temperature: f32) -> Agent {
    let mut tools = ToolRegistry::new();
    tools.register(Arc::new(EchoTool)).unwrap();
    Agent::new(
        Arc::new(PolicySlot::new(policy)),
        Arc::new(tools),
        toy_agent_config(temperature),
    )
    .unwrap()
    .with_sink(Arc::clone(store) as Arc<dyn TrajectorySink>)
}

/// A question file of `n` train and `heldout` held-out questions whose gold answers are `b`
/// and `c` (not `a`, which Search-R1's normalisation drops as an article).
pub fn write_questions(dir: &Path, n: usize, heldout: usize) -> PathBuf {
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            "{{\"id\":\"t{i}\",\"question\":\"q {i}\",\"answers\":[\"b\",\"c\"],\"kind\":\"toy\",\"split\":\"train\"}}\n"
        ));
    }
    for i in 0..heldout {
        text.push_str(&format!(
            "{{\"id\":\"h{i}\",\"question\":\"h {i}\",\"answers\":[\"b\",\"c\"],\"kind\":\"toy\",\"split\":\"heldout\"}}\n"
        ));
    }
    let path = dir.join("questions.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

/// The entries of `dir`, by name.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}
