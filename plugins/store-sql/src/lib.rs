//! Durable trajectory store, reward ledger and adapter registry for searchloop (SQLite, PostgreSQL).
