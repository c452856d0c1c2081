//! Shared helpers for the end-to-end tests across searchloop crates.
