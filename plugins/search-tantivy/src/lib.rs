//! Full-text product catalog search tool for searchloop, on tantivy.
