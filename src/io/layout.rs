//! The bytes of a safetensors output before its data: which tensors share a shard (`pack`)
//! and each file's header (`header`), written for [`super::output::Output`] and
//! [`super::memory::MemoryOutput`] alike.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use safetensors::Dtype;

/// A tensor to be written: name, dtype, shape and byte length.
#[derive(Clone, Debug)]
pub struct OutTensor {
    /// Tensor key.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Data length in bytes.
    pub len: u64,
}

/// Splits `tensors` (in order) into shards of at most `limit` data bytes; a tensor larger than
/// the limit gets a shard of its own.
pub(super) fn pack(tensors: &[OutTensor], limit: u64) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, t) in tensors.iter().enumerate() {
        if i > start && bytes + t.len > limit {
            shards.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += t.len;
    }
    shards.push(start..tensors.len());
    shards
}

/// The largest header that safetensors readers accept, this tool's among them (the
/// `MAX_HEADER_SIZE` of the safetensors crate): a larger one would be written and then refused.
pub const MAX_HEADER_BYTES: usize = 100_000_000;

/// The safetensors header of `tensors` laid out without gaps, padded with spaces so the data
/// starts 8-byte aligned (as the safetensors writer does); with each tensor's data offset, and
/// the length of the `__metadata__` JSON in it.
///
/// Written as it goes, with no JSON tree of the whole header: for hundreds of thousands of
/// tensors that tree took several times the memory of the header itself. The bytes are those
/// of serde_json's map, which wrote it before: keys in byte order, `__metadata__` among them.
pub(super) fn header(
    tensors: &[OutTensor],
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Vec<u64>, usize)> {
    const METADATA: &str = "__metadata__";
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut pos = 0u64;
    for t in tensors {
        offsets.push(pos);
        pos += t.len;
    }
    let key = |k: &Option<usize>| k.map_or(METADATA, |i| tensors[i].name.as_str());
    let mut keys: Vec<Option<usize>> = (0..tensors.len()).map(Some).chain([None]).collect();
    keys.sort_unstable_by(|a, b| key(a).cmp(key(b)));
    if let Some(w) = keys.windows(2).find(|w| key(&w[0]) == key(&w[1])) {
        bail!("tensor {} appears twice in the output", key(&w[0]));
    }
    let mut bytes = vec![0u8; 8];
    let mut metadata_len = 0;
    bytes.push(b'{');
    for (n, k) in keys.iter().enumerate() {
        if n > 0 {
            bytes.push(b',');
        }
        serde_json::to_writer(&mut bytes, key(k))?;
        bytes.push(b':');
        match *k {
            None => {
                let at = bytes.len();
                serde_json::to_writer(&mut bytes, metadata)?;
                metadata_len = bytes.len() - at;
            }
            Some(i) => {
                let t = &tensors[i];
                bytes.extend_from_slice(b"{\"data_offsets\":");
                serde_json::to_writer(&mut bytes, &[offsets[i], offsets[i] + t.len])?;
                bytes.extend_from_slice(b",\"dtype\":");
                serde_json::to_writer(&mut bytes, &t.dtype)?;
                bytes.extend_from_slice(b",\"shape\":");
                serde_json::to_writer(&mut bytes, &t.shape)?;
                bytes.push(b'}');
            }
        }
    }
    bytes.push(b'}');
    while !bytes.len().is_multiple_of(8) {
        bytes.push(b' ');
    }
    let n = bytes.len() as u64 - 8;
    bytes[..8].copy_from_slice(&n.to_le_bytes());
    let start = bytes.len() as u64;
    Ok((
        bytes,
        offsets.into_iter().map(|o| o + start).collect(),
        metadata_len,
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The header as serde_json's map wrote it before [`header`] wrote it as it goes.
    fn header_by_map(tensors: &[OutTensor], metadata: &BTreeMap<String, String>) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!(metadata));
        let mut pos = 0u64;
        for t in tensors {
            header.insert(
                t.name.clone(),
                json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [pos, pos + t.len]}),
            );
            pos += t.len;
        }
        let mut bytes = serde_json::to_vec(&header).unwrap();
        while !(bytes.len() + 8).is_multiple_of(8) {
            bytes.push(b' ');
        }
        let mut out = (bytes.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&bytes);
        out
    }

    #[test]
    fn headers_are_the_bytes_serde_json_map_wrote() {
        let t = |name: &str, dtype, shape: Vec<usize>, len| OutTensor {
            name: name.into(),
            dtype,
            shape,
            len,
        };
        let names = [
            "model.embed_tokens.weight",
            "A.upper",
            "_under",
            "__metadata_",
            "__metadata__x",
            "Zeta",
            "é\u{1F600}",
            "quote\"back\\slash\ttab\u{1}",
            "",
        ];
        let dtypes = [Dtype::BF16, Dtype::F32, Dtype::U64, Dtype::I64, Dtype::F16];
        let tensors: Vec<OutTensor> = names
            .iter()
            .enumerate()
            .map(|(i, n)| t(n, dtypes[i % dtypes.len()], vec![i, 3], (7 * i) as u64))
            .collect();
        let mut md = BTreeMap::new();
        md.insert("format".to_string(), "pt".to_string());
        md.insert("tensors".to_string(), "{\"a\":[1,2]}\n\u{e9}".to_string());
        for n in [0, 1, 4, tensors.len()] {
            for md in [BTreeMap::new(), md.clone()] {
                let (got, offsets, _) = header(&tensors[..n], &md).unwrap();
                assert_eq!(got, header_by_map(&tensors[..n], &md), "{n} tensors");
                assert_eq!(got.len() % 8, 0);
                let mut at = got.len() as u64;
                for (o, t) in offsets.iter().zip(&tensors) {
                    assert_eq!(*o, at);
                    at += t.len;
                }
            }
        }
        let twice = [
            t("x", Dtype::F32, vec![1], 4),
            t("x", Dtype::F32, vec![1], 4),
        ];
        assert!(header(&twice, &md).is_err());
    }

    #[test]
    fn packing_is_greedy_and_gives_a_big_tensor_its_own_shard() {
        let t = |len| OutTensor {
            name: String::new(),
            dtype: Dtype::U8,
            shape: vec![len as usize],
            len,
        };
        let ts = [t(4), t(4), t(3), t(20), t(1), t(10)];
        assert_eq!(pack(&ts, 10), vec![0..2, 2..3, 3..4, 4..5, 5..6]);
        assert_eq!(pack(&ts, 100), vec![0..6]);
        assert_eq!(pack(&[], 10), vec![0..0]);
    }
}
