//! Packing of sequences that share prefixes into one row, each shared token computed once.
//!
//! A GRPO batch is full of repeated prefixes: every episode starts with the same system prompt,
//! and the episodes of a group also share their question. Packed into one row as a prefix tree,
//! each shared token is embedded, projected and differentiated once, and a token attends to its
//! own ancestors only, at its depth in its sequence as its rope position. Under causal attention
//! a token's hidden state depends on its prefix alone, so every sequence's log-probs equal the
//! ones of a forward pass over that sequence by itself, and the gradient of a loss over the
//! sequences equals the sum of their separate gradients: the backward pass through a shared token
//! adds up what each sequence above it sends down.

use crate::error::{LlamaError, Result};
use crate::fused::KeyPattern;

/// Sequences packed along their common prefixes.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedSequences {
    /// Token ids of the packed row.
    ids: Vec<u32>,
    /// Rope position (depth in its sequences) of each packed token.
    positions: Vec<f32>,
    /// For each sequence, the packed index of each of its tokens.
    chains: Vec<Vec<usize>>,
}

impl PackedSequences {
    /// Packs `sequences`: each one reuses the longest prefix it shares with a sequence packed
    /// before it and appends the rest.
    pub fn new(sequences: &[&[u32]]) -> Result<Self> {
        if let Some(i) = sequences.iter().position(|s| s.is_empty()) {
            return Err(LlamaError::InvalidInput(format!("sequence {i} is empty")));
        }
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut chains: Vec<Vec<usize>> = Vec::with_capacity(sequences.len());
        for (i, seq) in sequences.iter().enumerate() {
            // The earlier sequence sharing the longest prefix with this one; the chain of that
            // prefix is reused as is, so shared tokens keep a single set of ancestors.
            let (shared, donor) = (0..i)
                .map(|j| (common_prefix(seq, sequences[j]), j))
                .max_by_key(|&(len, j)| (len, std::cmp::Reverse(j)))
                .unwrap_or((0, 0));
            let mut chain = Vec::with_capacity(seq.len());
            chain.extend_from_slice(chains.get(donor).map_or(&[][..], |c| &c[..shared]));
            for (depth, &token) in seq.iter().enumerate().skip(shared) {
                chain.push(ids.len());
                ids.push(token);
                positions.push(depth as f32);
            }
            chains.push(chain);
        }
        Ok(Self {
            ids,
            positions,
            chains,
        })
    }

    /// Token ids of the packed row.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Rope position of each packed token.
    pub fn positions(&self) -> &[f32] {
        &self.positions
    }

    /// Number of packed tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether nothing was packed.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Number of sequences.
    pub fn sequences(&self) -> usize {
        self.chains.len()
    }

    /// The packed index of each token of sequence `i`.
    pub fn chain(&self, i: usize) -> &[usize] {
        &self.chains[i]
    }

    /// The attention pattern of the packed row: a token attends to itself and its ancestors.
    pub(crate) fn key_pattern(&self) -> Result<KeyPattern> {
        let mut rows: Vec<&[usize]> = vec![&[]; self.len()];
        // A shared token's ancestors are the same in every chain that holds it.
        for chain in &self.chains {
            for (depth, &token) in chain.iter().enumerate() {
                rows[token] = &chain[..=depth];
            }
        }
        let rows: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| r.iter().map(|&k| k as u32).collect())
            .collect();
        KeyPattern::from_rows(1, self.len(), rows.iter().map(Vec::as_slice))
    }
}

/// The number of leading tokens `a` and `b` share.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefixes_are_packed_once_and_each_token_sees_its_ancestors() {
        let a = [1, 2, 3, 4];
        let b = [1, 2, 5];
        let c = [1, 2, 3, 6, 7];
        let d = [9];
        let pack = PackedSequences::new(&[&a, &b, &c, &d, &a]).unwrap();
        // a: 0..4; b shares [1, 2] and adds 5; c shares [1, 2, 3] with a and adds 6, 7; d shares
        // nothing; the second a is packed entirely onto the first.
        assert_eq!(pack.ids(), &[1, 2, 3, 4, 5, 6, 7, 9]);
        assert_eq!(pack.positions(), &[0., 1., 2., 3., 2., 3., 4., 0.]);
        assert_eq!(pack.chain(1), &[0, 1, 4]);
        assert_eq!(pack.chain(2), &[0, 1, 2, 5, 6]);
        assert_eq!(pack.chain(3), &[7]);
        assert_eq!(pack.chain(4), pack.chain(0));
        for (chain, seq) in (0..5).map(|i| pack.chain(i)).zip([&a[..], &b, &c, &d, &a]) {
            let tokens: Vec<u32> = chain.iter().map(|&k| pack.ids()[k]).collect();
            assert_eq!(tokens, seq);
        }
        let pattern = pack.key_pattern().unwrap();
        assert_eq!(pattern.keys(0, 0), &[0]);
        assert_eq!(pattern.keys(0, 3), &[0, 1, 2, 3]);
        assert_eq!(pattern.keys(0, 4), &[0, 1, 4]);
        assert_eq!(pattern.keys(0, 6), &[0, 1, 2, 5, 6]);
        assert_eq!(pattern.keys(0, 7), &[7]);
    }

    #[test]
    fn empty_sequences_are_refused() {
        assert!(PackedSequences::new(&[&[1, 2], &[]]).is_err());
        assert!(PackedSequences::new(&[]).unwrap().is_empty());
    }
}
