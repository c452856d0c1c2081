//! The tokenizer a GGUF file carries, as a Hugging Face `tokenizers` tokenizer: byte-level BPE
//! (`tokenizer.ggml.model = "gpt2"`, which SmolLM2, Qwen2 and Llama 3 use) from the file's
//! tokens and merges, with the pre-tokenizer its `tokenizer.ggml.pre` names, and every token
//! the file marks as not normal (control tokens such as `<|im_start|>`) recognised as one
//! special token in text.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::{
    AddedToken, DecoderWrapper, PreTokenizerWrapper, Tokenizer,
    decoders::byte_level::ByteLevel as ByteLevelDecoder,
    models::bpe::BPE,
    pre_tokenizers::{
        byte_level::ByteLevel, digits::Digits, sequence::Sequence, split::Split,
        split::SplitPattern,
    },
};

use crate::error::{LlamaError, Result};

/// The GGUF token type of an ordinary vocabulary entry; every other type (control, user
/// defined, unknown, byte) is matched whole in text.
const NORMAL_TOKEN: i32 = 1;

/// Qwen2's split pattern (also Llama 3's, up to the digit grouping): contractions, letters,
/// single digits, punctuation runs, newlines and spaces.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A GGUF file's tokenizer and the ids of its special tokens.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// `tokenizer.ggml.eos_token_id`: generation ends after it.
    pub eos: u32,
    /// `tokenizer.ggml.bos_token_id`, when the file names one.
    pub bos: Option<u32>,
}

impl GgufTokenizer {
    /// The text of token `id`, as the vocabulary spells it.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }
}

/// Builds the tokenizer described by a GGUF file's `metadata`.
pub fn from_gguf_metadata(metadata: &HashMap<String, Value>) -> Result<GgufTokenizer> {
    let bad = |key: &str, reason: &str| LlamaError::BadMetadata {
        key: key.to_string(),
        reason: reason.to_string(),
    };
    let string = |key: &str| -> Result<String> {
        match metadata.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(bad(key, "is not a string")),
            None => Err(bad(key, "is missing")),
        }
    };
    let strings = |key: &str| -> Result<Vec<String>> {
        match metadata.get(key) {
            Some(Value::Array(values)) => values
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(bad(key, "holds a value that is not a string")),
                })
                .collect(),
            Some(_) => Err(bad(key, "is not an array")),
            None => Err(bad(key, "is missing")),
        }
    };
    let id = |key: &str| -> Result<Option<u32>> {
        metadata
            .get(key)
            .map(|v| v.to_u32().map_err(|e| bad(key, &e.to_string())))
            .transpose()
    };
    let model = string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(bad(
            "tokenizer.ggml.model",
            &format!(
                "'{model}' is not supported by the candle engine (byte-level BPE, 'gpt2', is); \
                 serve this model with engine = \"mistralrs\""
            ),
        ));
    }
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let vocab: ahash::AHashMap<String, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut pairs = Vec::with_capacity(merges.len());
    for merge in &merges {
        let (a, b) = merge
            .split_once(' ')
            .ok_or_else(|| bad("tokenizer.ggml.merges", &format!("'{merge}' is not a pair")))?;
        pairs.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .build()
        .map_err(|e| bad("tokenizer.ggml.merges", &e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let pre = match metadata.get("tokenizer.ggml.pre") {
        Some(Value::String(s)) => s.clone(),
        _ => "default".to_string(),
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(&pre)?));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
    if let Some(Value::Array(types)) = metadata.get("tokenizer.ggml.token_type") {
        let special: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter(|(kind, _)| kind.to_i32().is_ok_and(|k| k != NORMAL_TOKEN))
            .map(|(_, token)| AddedToken::from(token.clone(), true))
            .collect();
        tokenizer.add_special_tokens(&special);
    }
    let eos = id("tokenizer.ggml.eos_token_id")?
        .ok_or_else(|| bad("tokenizer.ggml.eos_token_id", "is missing"))?;
    let bos = id("tokenizer.ggml.bos_token_id")?;
    for (key, token) in [("eos", Some(eos)), ("bos", bos)] {
        if let Some(token) = token
            && token as usize >= tokens.len()
        {
            return Err(bad(
                &format!("tokenizer.ggml.{key}_token_id"),
                &format!("{token} is outside the vocabulary of {}", tokens.len()),
            ));
        }
    }
    Ok(GgufTokenizer {
        tokenizer,
        eos,
        bos,
    })
}

/// The pre-tokenizer that llama.cpp's `tokenizer.ggml.pre` names: how text is cut into the
/// pieces BPE merges within.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level =
        |use_regex: bool| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    Ok(match pre {
        // SmolLM's: every digit alone, then GPT-2's pattern.
        "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level(true),
        ])),
        "qwen2" | "llama3" | "llama-bpe" => {
            let split = Split::new(
                SplitPattern::Regex(QWEN2_SPLIT.to_string()),
                tokenizers::SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| LlamaError::BadMetadata {
                key: "tokenizer.ggml.pre".to_string(),
                reason: e.to_string(),
            })?;
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Split(split),
                byte_level(false),
            ]))
        }
        // GPT-2's own pattern.
        _ => byte_level(true),
    })
}
