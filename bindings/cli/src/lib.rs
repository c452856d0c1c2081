//! The searchloop command-line tool.
