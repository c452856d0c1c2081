//! The `uniffi-bindgen` command of this workspace: generates the Python, Kotlin and Swift
//! bindings from the built `searchloop-ffi` library (`scripts/bindings.sh` runs it), so the
//! generator always matches the uniffi version the library was built with.

fn main() {
    uniffi::uniffi_bindgen_main()
}
