#![no_main]

// Not in lade_fuzz (src/lib.rs): see src/apply_entries.rs.
#[path = "../src/apply_entries.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::apply_entries(data));
