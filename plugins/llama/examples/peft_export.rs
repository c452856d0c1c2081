//! Writes a PEFT adapter trained nowhere but with every factor non-zero, and the per-token
//! log-probs the trainer computes with it, so that `peft_check.py` can load the same adapter
//! with Hugging Face peft on the same GGUF and compare (`scripts/check-peft.sh` runs both).
//!
//! ```text
//! cargo run --release -p searchloop-llama --example peft_export -- MODEL.gguf OUT_DIR
//! ```
//!
//! `OUT_DIR` receives the adapter (`adapter_config.json`, `adapter_model.safetensors`) and
//! `logprobs.json`: the token ids, and the log-probs of tokens 1.. with and without the adapter.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use searchloop_llama::{Llama, LoraAdapter, LoraConfig, TargetModule};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let model_path = args
        .next()
        .context("usage: peft_export MODEL.gguf OUT_DIR")?;
    let out = std::path::PathBuf::from(
        args.next()
            .context("usage: peft_export MODEL.gguf OUT_DIR")?,
    );
    let device = Device::Cpu;
    let model = Llama::load(&model_path, &device, DType::F32)?;
    // Every projection, so the q/k row order and the MLP orientation are both exercised.
    let config = LoraConfig {
        targets: TargetModule::ALL.to_vec(),
        ..LoraConfig::default()
    };
    let adapter = LoraAdapter::new(config, model.config(), &device, DType::F32)?;
    // B starts at zero (PEFT's initialisation), which would hide any orientation mistake: give
    // it seeded noise large enough to move the log-probs visibly.
    for (_, pair) in adapter.pairs() {
        let noise = Tensor::randn(0f32, 0.02, pair.b.as_tensor().shape(), &device)?;
        pair.b.set(&noise)?;
    }
    adapter.save_peft(&out, "HuggingFaceTB/SmolLM2-135M-Instruct")?;

    // Fixed ids inside the vocabulary; what they spell does not matter to the comparison.
    let ids: Vec<u32> = vec![
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 2, 198, 1, 4093, 198, 6121, 3627,
        314, 260, 16391, 7553, 282, 47, 2, 198, 1, 520, 9531, 198,
    ];
    let input = Tensor::new(ids.as_slice(), &device)?.unsqueeze(0)?;
    let adapted = model.token_logprobs(&input, None, Some(&adapter))?;
    let base = model.token_logprobs(&input, None, None)?;
    let to_vec = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.squeeze(0)?.to_vec1::<f32>()?) };
    let report = serde_json::json!({
        "tokens": ids,
        "adapted": to_vec(&adapted.logprobs)?,
        "base": to_vec(&base.logprobs)?,
    });
    std::fs::write(out.join("logprobs.json"), serde_json::to_string(&report)?)?;
    println!("{}", out.display());
    Ok(())
}
