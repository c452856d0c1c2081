//! Read-only SQL inventory tool for searchloop (SQLite, PostgreSQL).
