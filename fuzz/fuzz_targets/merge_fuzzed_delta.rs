//! A fixed base (fixtures/tiny/base-bf16.safetensors, mapped once per process) and the fuzz input
//! as a delta file: if the delta opens, it is merged onto the base, once with the default
//! options and once with `force: true` (which carries on past base-hash mismatches and so
//! reaches the merge arithmetic with fuzzed hashes). An `Err` is a correct answer; a panic,
//! abort, out-of-memory or timeout is a finding.
#![no_main]

mod common;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sotu_delta::io::Checkpoint;
use sotu_delta::format::Delta;
use sotu_delta::merge::{Input, MergeOptions, merge};
use sotu_delta::io::Target;

/// The committed fixture, opened in place: merge checks before it commits an output that its
/// inputs did not change while it read them, so the base must stay at its path for the whole run
/// (a copy in a temporary file would leak at every crash or timeout).
const BASE_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../fixtures/tiny/base-bf16.safetensors"
);

/// The base, mapped once per process.
fn base() -> &'static Checkpoint {
    static BASE: OnceLock<Checkpoint> = OnceLock::new();
    BASE.get_or_init(|| {
        Checkpoint::open(std::path::Path::new(BASE_PATH)).expect("the base fixture must open")
    })
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    let file = common::input_file(data);
    let Ok(delta) = Delta::open(file.path()) else {
        return;
    };
    let deltas: [Input; 1] = [delta.into()];
    let out_dir = common::out_dir();
    let out = Target::new(&out_dir.path().join("merged.safetensors"));
    let _ = merge(base, &deltas, &out, &MergeOptions::default());
    let forced = MergeOptions {
        force: true,
        ..MergeOptions::default()
    };
    let _ = merge(base, &deltas, &out, &forced);
});
