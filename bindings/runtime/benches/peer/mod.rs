//! llama.cpp's `llama-server` as a serving engine for the benchmark: the same agent, protocol,
//! tools, questions and seeds, with every model turn sent as token ids to its `/completion`
//! endpoint (prompt cache on, so a turn evaluates only what the previous turn did not).
//! Rendering and tokenizing stay with the project's own tokenizer of the same GGUF file, so
//! both engines see the same token sequences.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use searchloop_core::{
    ChatMessage, FinishReason, Policy, Sample, SamplingParams, SegmentKind, Trajectory,
};
use searchloop_runtime::{ModelLoader, PolicyLoader, config::ModelSection};
use serde_json::{Value, json};

/// A running `llama-server`, stopped on drop.
pub struct LlamaServer {
    child: Child,
    pub url: String,
    client: reqwest::Client,
}

impl LlamaServer {
    /// Starts `binary` on `model` with `threads` threads and `parallel` slots of 2,048 tokens
    /// each (the context our engines serve), and waits until it answers its health check.
    pub fn start(binary: &Path, model: &Path, threads: usize, parallel: usize) -> Self {
        let port = free_port();
        let context = 2048;
        let child = Command::new(binary)
            .args(["-m", &model.display().to_string()])
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-t", &threads.to_string(), "-tb", &threads.to_string()])
            .args(["--parallel", &parallel.to_string()])
            .args(["-c", &(context * parallel).to_string()])
            .args(["--no-webui", "--log-disable"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let server = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        };
        let started = Instant::now();
        loop {
            if answers_health(port) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "llama-server did not become healthy within 60 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        server
    }
}

impl LlamaServer {
    /// Seconds to replay `trajectory`'s model turns: each turn's prompt is the episode's tokens
    /// before it, and the server generates exactly as many tokens as the turn had (end of
    /// sequence ignored, no stop strings), so it does the token work the episode did. The
    /// tool calls between turns are left out: they took well under a millisecond.
    pub async fn replay(&self, trajectory: &Trajectory, temperature: f32) -> f64 {
        let started = Instant::now();
        for turn in trajectory
            .segments
            .iter()
            .filter(|s| s.kind == SegmentKind::Model)
        {
            let response = complete(
                &self.client,
                &self.url,
                &trajectory.tokens[..turn.start as usize],
                temperature,
                json!({"n_predict": turn.end - turn.start, "ignore_eos": true}),
            )
            .await
            .unwrap();
            assert_eq!(
                response["timings"]["predicted_n"].as_u64(),
                Some(u64::from(turn.end - turn.start)),
                "llama-server generated another number of tokens: {response}"
            );
        }
        started.elapsed().as_secs_f64()
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Whether the server on `port` answers `GET /health` with 200 (it answers 503 while it
/// loads the model). A plain blocking request: the async client is for the episodes.
fn answers_health(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let request = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}

/// The served model: tokenizer and chat template from the project's own engine, sampling
/// through `llama-server`.
pub struct LlamaServerPolicy {
    local: Arc<dyn Policy>,
    client: reqwest::Client,
    url: String,
}

#[async_trait]
impl Policy for LlamaServerPolicy {
    fn model_id(&self) -> &str {
        self.local.model_id()
    }

    fn adapter_version(&self) -> Option<u64> {
        None
    }

    fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> searchloop_core::Result<String> {
        self.local.render_chat(messages, add_generation_prompt)
    }

    fn tokenize(&self, text: &str) -> searchloop_core::Result<Vec<u32>> {
        self.local.tokenize(text)
    }

    fn detokenize(&self, tokens: &[u32]) -> searchloop_core::Result<String> {
        self.local.detokenize(tokens)
    }

    async fn sample(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        n: usize,
    ) -> searchloop_core::Result<Vec<Sample>> {
        let mut samples = Vec::with_capacity(n);
        for i in 0..n {
            samples.push(self.sample_one(prompt, params, i as u64).await?);
        }
        Ok(samples)
    }
}

impl LlamaServerPolicy {
    async fn sample_one(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        offset: u64,
    ) -> searchloop_core::Result<Sample> {
        let policy_error = |what: String| searchloop_core::Error::Policy(what);
        let response = complete(
            &self.client,
            &self.url,
            prompt,
            params.temperature,
            json!({
                "n_predict": params.max_tokens,
                "top_k": params.top_k,
                "top_p": params.top_p,
                "stop": params.stop,
                "seed": params.seed.map_or(u32::MAX as u64, |s| (s + offset) & 0x7fff_ffff),
                "return_tokens": true,
                "n_probs": 1,
                "post_sampling_probs": true,
            }),
        )
        .await
        .map_err(policy_error)?;
        let tokens: Vec<u32> = response["tokens"]
            .as_array()
            .ok_or_else(|| policy_error(format!("llama-server answered {response}")))?
            .iter()
            .filter_map(|t| t.as_u64().map(|t| t as u32))
            .collect();
        let probabilities = response["completion_probabilities"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        // The server reports no probability for the token that completed a stop string; the
        // benchmark reads no log-prob, so that one is recorded as 0.
        let logprobs: Vec<f32> = (0..tokens.len())
            .map(|i| {
                probabilities
                    .get(i)
                    .and_then(|p| p["prob"].as_f64())
                    .map_or(0.0, |p| p.ln() as f32)
            })
            .collect();
        let finish = match response["stop_type"].as_str() {
            Some("word") => FinishReason::Stop(
                response["stopping_word"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            ),
            Some("eos") => FinishReason::Eos,
            _ => FinishReason::Length,
        };
        let text = self.local.detokenize(&tokens)?;
        Ok(Sample {
            tokens,
            logprobs,
            text,
            finish,
        })
    }
}

/// Asks `llama-server` at `url` for a completion of `prompt` with the sampling chain of the
/// project's engines (temperature over the whole vocabulary, after top-k and top-p when `extra`
/// sets them; no min-p, repetition or other penalties; prompt cache on) and the further fields
/// of `extra`.
async fn complete(
    client: &reqwest::Client,
    url: &str,
    prompt: &[u32],
    temperature: f32,
    extra: Value,
) -> Result<Value, String> {
    let mut body = json!({
        "prompt": prompt,
        "temperature": temperature,
        "top_k": 0,
        "min_p": 0.0,
        "samplers": ["top_k", "top_p", "temperature"],
        "cache_prompt": true,
    });
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    client
        .post(format!("{url}/completion"))
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("llama-server: {e}"))?
        .json()
        .await
        .map_err(|e| format!("llama-server's answer: {e}"))
}

/// Loads the base model with `section`'s engine for its tokenizer, and serves through the
/// `llama-server` at `url`.
pub struct LlamaServerLoader {
    pub section: ModelSection,
    pub url: String,
}

#[async_trait]
impl PolicyLoader for LlamaServerLoader {
    async fn load(
        &self,
        merged: Option<&Path>,
        version: Option<u64>,
    ) -> searchloop_loop::Result<Arc<dyn Policy>> {
        assert!(
            merged.is_none() && version.is_none(),
            "the llama-server peer serves the base model only"
        );
        let local = ModelLoader::new(self.section.clone())
            .load(None, None)
            .await?;
        Ok(Arc::new(LlamaServerPolicy {
            local,
            client: reqwest::Client::new(),
            url: self.url.clone(),
        }))
    }
}

/// The `llama-server` binary `scripts/llama-server.sh` builds, or `path`.
pub fn binary(path: &str) -> PathBuf {
    let binary = if path.is_empty() {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../.cache/llama-server/build/bin/llama-server")
    } else {
        PathBuf::from(path)
    };
    assert!(
        binary.is_file(),
        "no llama-server at {}: run scripts/llama-server.sh first",
        binary.display()
    );
    binary
}
