//! Compact encodings of a trajectory's columns: token ids, log-probs and segments as
//! little-endian blobs, times as integer nanoseconds, enums as short text. Decoders check every
//! length and code, because stored bytes are untrusted.

use chrono::{DateTime, Utc};
use searchloop_core::{EpisodeEnd, Segment, SegmentKind, Split};

use crate::error::{Result, StoreError};

/// Bytes of one encoded segment: the kind code, then start and end as little-endian u32.
const SEGMENT_BYTES: usize = 9;

/// Token ids as little-endian u32.
pub(crate) fn encode_tokens(tokens: &[u32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

/// Log-probs as little-endian f32 bit patterns, so a round trip is bit-exact.
pub(crate) fn encode_logprobs(logprobs: &[f32]) -> Vec<u8> {
    logprobs
        .iter()
        .flat_map(|l| l.to_bits().to_le_bytes())
        .collect()
}

/// Segments as (kind code, start, end) records.
pub(crate) fn encode_segments(segments: &[Segment]) -> Vec<u8> {
    let mut out = Vec::with_capacity(segments.len() * SEGMENT_BYTES);
    for s in segments {
        out.push(s.kind.code());
        out.extend_from_slice(&s.start.to_le_bytes());
        out.extend_from_slice(&s.end.to_le_bytes());
    }
    out
}

fn corrupt(id: &str, detail: String) -> StoreError {
    StoreError::CorruptRecord {
        id: id.to_string(),
        detail,
    }
}

/// Splits `blob` into 4-byte little-endian words, refusing a length that is not a multiple of 4.
fn words(id: &str, what: &str, blob: &[u8]) -> Result<Vec<[u8; 4]>> {
    let chunks = blob.chunks_exact(4);
    if !chunks.remainder().is_empty() {
        return Err(corrupt(
            id,
            format!("{what} blob has {} bytes, not a multiple of 4", blob.len()),
        ));
    }
    Ok(chunks.map(|c| [c[0], c[1], c[2], c[3]]).collect())
}

/// Decodes token ids written by [`encode_tokens`].
pub(crate) fn decode_tokens(id: &str, blob: &[u8]) -> Result<Vec<u32>> {
    Ok(words(id, "token", blob)?
        .into_iter()
        .map(u32::from_le_bytes)
        .collect())
}

/// Decodes log-probs written by [`encode_logprobs`].
pub(crate) fn decode_logprobs(id: &str, blob: &[u8]) -> Result<Vec<f32>> {
    Ok(words(id, "log-prob", blob)?
        .into_iter()
        .map(|w| f32::from_bits(u32::from_le_bytes(w)))
        .collect())
}

/// Decodes segments written by [`encode_segments`].
pub(crate) fn decode_segments(id: &str, blob: &[u8]) -> Result<Vec<Segment>> {
    let chunks = blob.chunks_exact(SEGMENT_BYTES);
    if !chunks.remainder().is_empty() {
        return Err(corrupt(
            id,
            format!(
                "segment blob has {} bytes, not a multiple of {SEGMENT_BYTES}",
                blob.len()
            ),
        ));
    }
    chunks
        .map(|c| {
            let kind = SegmentKind::from_code(c[0])
                .ok_or_else(|| corrupt(id, format!("unknown segment kind code {}", c[0])))?;
            Ok(Segment {
                kind,
                start: u32::from_le_bytes([c[1], c[2], c[3], c[4]]),
                end: u32::from_le_bytes([c[5], c[6], c[7], c[8]]),
            })
        })
        .collect()
}

/// A time as nanoseconds since the Unix epoch: exact (PostgreSQL timestamps keep only
/// microseconds) and ordered the same way on both backends.
pub(crate) fn to_nanos(what: &str, at: DateTime<Utc>) -> Result<i64> {
    at.timestamp_nanos_opt().ok_or_else(|| {
        StoreError::InvalidArgument(format!(
            "{what} {at} is outside the storable range (years 1678 to 2261)"
        ))
    })
}

/// The time `nanos` nanoseconds after the Unix epoch.
pub(crate) fn from_nanos(nanos: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(nanos)
}

/// The stored name of a split.
pub(crate) fn split_name(split: Split) -> &'static str {
    match split {
        Split::Train => "train",
        Split::Heldout => "heldout",
    }
}

/// The split named `name`.
pub(crate) fn parse_split(id: &str, name: &str) -> Result<Split> {
    match name {
        "train" => Ok(Split::Train),
        "heldout" => Ok(Split::Heldout),
        other => Err(corrupt(id, format!("unknown split '{other}'"))),
    }
}

/// The stored name of an episode ending.
pub(crate) fn end_name(end: EpisodeEnd) -> &'static str {
    match end {
        EpisodeEnd::Answered => "answered",
        EpisodeEnd::NoAnswer => "no_answer",
        EpisodeEnd::TokenLimit => "token_limit",
    }
}

/// The episode ending named `name`.
pub(crate) fn parse_end(id: &str, name: &str) -> Result<EpisodeEnd> {
    match name {
        "answered" => Ok(EpisodeEnd::Answered),
        "no_answer" => Ok(EpisodeEnd::NoAnswer),
        "token_limit" => Ok(EpisodeEnd::TokenLimit),
        other => Err(corrupt(id, format!("unknown episode end '{other}'"))),
    }
}

/// A non-negative stored integer as `u64`, or a corruption error naming the column.
pub(crate) fn to_u64(id: &str, column: &str, value: i64) -> Result<u64> {
    u64::try_from(value).map_err(|_| corrupt(id, format!("{column} is negative ({value})")))
}

/// A stored integer as `u32`, or a corruption error naming the column.
pub(crate) fn to_u32(id: &str, column: &str, value: i64) -> Result<u32> {
    u32::try_from(value)
        .map_err(|_| corrupt(id, format!("{column} {value} is outside 0..={}", u32::MAX)))
}

/// A `u64` as the signed 64-bit integer both backends store, refusing values above `i64::MAX`.
pub(crate) fn to_i64(what: &str, value: u64) -> Result<i64> {
    i64::try_from(value)
        .map_err(|_| StoreError::InvalidArgument(format!("{what} {value} exceeds {}", i64::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_round_trip_bit_exactly() {
        let tokens = vec![0, 1, 49151, u32::MAX];
        assert_eq!(decode_tokens("t", &encode_tokens(&tokens)).unwrap(), tokens);
        let logprobs = [0.0f32, -0.0, -1e-45, f32::MIN, -0.123_456_79];
        let back = decode_logprobs("t", &encode_logprobs(&logprobs)).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&logprobs));
        let segments = vec![
            Segment {
                kind: SegmentKind::Prompt,
                start: 0,
                end: 3,
            },
            Segment {
                kind: SegmentKind::Correction,
                start: 3,
                end: u32::MAX,
            },
        ];
        assert_eq!(
            decode_segments("t", &encode_segments(&segments)).unwrap(),
            segments
        );
    }

    #[test]
    fn corrupt_blobs_are_errors_not_panics() {
        let err = decode_tokens("abc", &[1, 2, 3]).unwrap_err().to_string();
        assert!(err.contains("abc") && err.contains("3 bytes"), "{err}");
        assert!(decode_logprobs("abc", &[0; 5]).is_err());
        assert!(decode_segments("abc", &[0; 10]).is_err());
        let err = decode_segments("abc", &[9, 0, 0, 0, 0, 1, 0, 0, 0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown segment kind code 9"), "{err}");
        assert!(parse_split("abc", "dev").is_err());
        assert!(parse_end("abc", "exploded").is_err());
        assert!(to_u64("abc", "turns", -1).is_err());
        assert!(to_u32("abc", "turns", i64::from(u32::MAX) + 1).is_err());
        assert!(to_i64("version", u64::MAX).is_err());
    }

    #[test]
    fn times_round_trip_to_the_nanosecond() {
        let at = DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap();
        assert_eq!(from_nanos(to_nanos("t", at).unwrap()), at);
        let far = DateTime::from_timestamp(10_000_000_000_i64 * 100, 0).unwrap();
        assert!(to_nanos("created_at", far).is_err());
    }
}
