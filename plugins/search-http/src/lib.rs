//! HTTP JSON search API tool for searchloop.
