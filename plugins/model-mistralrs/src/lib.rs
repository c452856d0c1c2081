//! Serving policy for searchloop on mistral.rs, with token-exact sampling.
