//! The fuzz input is the bytes of a delta file. It is opened with the validating reader
//! (`Delta::open`); when that accepts it, everything a reader of an opened delta may do is done:
//! every chunk of every masked and float `whole` tensor is decoded, every stats and base-hash row,
//! grown tensor's new rows and own file is read, the fingerprint is taken and `inspect`
//! summarizes it. An `Err` anywhere is a correct
//! answer; a panic, abort, out-of-memory or timeout is a finding.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use sotu_delta::dtype::Float;
use sotu_delta::format::{Delta, Kind};
use sotu_delta::inspect::{decode_chunk, inspect};

/// Tensors with more elements than this are not decoded (docs/FUZZING.md, "Guards"): a header
/// may declare a masked tensor of 10^18 elements with nothing kept, which is valid, and decoding
/// it would take years. The reader's checks of such an entry still run.
const MAX_DECODE_NUMEL: u64 = 10_000_000;
/// At most this many elements are decoded per input, over all tensors, so that one input costs
/// at most a few tens of milliseconds.
const MAX_DECODE_TOTAL: u64 = 16_000_000;

fuzz_target!(|data: &[u8]| {
    let file = common::input_file(data);
    let Ok(delta) = Delta::open(file.path()) else {
        return;
    };

    let _ = delta.fingerprint();
    let _ = (delta.params(), delta.tool(), delta.file_len(), delta.path());
    let _ = delta.own_files().values().map(Vec::len).sum::<usize>();
    let mut budget = MAX_DECODE_TOTAL;
    let chunk = delta.params().chunk;
    for (name, e) in delta.entries() {
        let _ = delta.stats(e.row);
        let _ = delta.base_hash(e.row);
        let _ = delta.mask(name);
        let _ = (delta.grown_rows(name), e.tuned_shape(), e.new_rows_shape());
        match e.kind {
            Kind::Masked => {
                let _ = delta.offsets(name);
            }
            // decode_chunk is documented for tensors that have deltas, i.e. float ones; a
            // non-float whole tensor is a caller error (it expects a float dtype), not a finding.
            Kind::Whole if Float::of(e.dtype).is_some() => {}
            _ => continue,
        }
        let _ = delta.stored(name).whole();
        let n = e.numel();
        if n > MAX_DECODE_NUMEL || n > budget {
            continue;
        }
        budget -= n;
        let mut base = Vec::new();
        for c in 0..n.div_ceil(chunk) {
            let len = chunk.min(n - c * chunk) as usize;
            base.clear();
            base.resize(len, 0.0);
            if decode_chunk(&delta, name, c, &base).is_err() {
                break;
            }
        }
    }
    if let Ok(report) = inspect(std::slice::from_ref(&delta), None, false) {
        let _ = report.render(true);
    }
});
