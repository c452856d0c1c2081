//! uniffi bindings of searchloop for Python, Kotlin and Swift.
