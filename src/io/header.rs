//! Safetensors headers: parsed from the header bytes alone (a reader that does not map the file
//! has no whole-file buffer to give the safetensors crate), what the crate refuses without
//! naming the tensor or key at fault, named, and duplicate keys, which serde_json would silently
//! merge.

use std::collections::HashMap;

use safetensors::SafeTensorError;
use safetensors::tensor::{Metadata, TensorInfo};

/// The largest header the safetensors crate reads (its `MAX_HEADER_SIZE`).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// The header length that the 8-byte `prefix` of a file of `file_len` bytes declares, checked
/// as `SafeTensors::read_metadata` checks it.
pub fn header_len(prefix: &[u8], file_len: u64) -> Result<usize, SafeTensorError> {
    let Some(prefix) = prefix.get(..8).filter(|_| file_len >= 8) else {
        return Err(SafeTensorError::HeaderTooSmall);
    };
    let n = u64::from_le_bytes(prefix.try_into().expect("8 bytes"));
    if n > MAX_HEADER_LEN {
        return Err(SafeTensorError::HeaderTooLarge);
    }
    if n + 8 > file_len {
        return Err(SafeTensorError::InvalidHeaderLength);
    }
    Ok(n as usize)
}

/// The header of a safetensors file as the crate deserializes it.
#[derive(serde::Deserialize)]
struct HashMetadata {
    #[serde(rename = "__metadata__")]
    metadata: Option<HashMap<String, String>>,
    #[serde(flatten)]
    tensors: HashMap<String, TensorInfo>,
}

/// Parses and validates the header `json` of a file of `file_len` bytes exactly as
/// `SafeTensors::read_metadata` does given the whole file, with the same errors: the header
/// must be UTF-8 JSON, its tensors' offsets contiguous and consistent with their shapes, and
/// the data must end where the file does.
pub fn parse_header(json: &[u8], file_len: u64) -> Result<Metadata, SafeTensorError> {
    let text = std::str::from_utf8(json).map_err(SafeTensorError::InvalidHeader)?;
    let parsed: HashMetadata =
        serde_json::from_str(text).map_err(SafeTensorError::InvalidHeaderDeserialization)?;
    let mut tensors: Vec<(String, TensorInfo)> = parsed.tensors.into_iter().collect();
    tensors.sort_by_key(|(_, t)| t.data_offsets);
    let metadata = Metadata::new(parsed.metadata, tensors)?;
    if metadata.data_len() as u64 + 8 + json.len() as u64 != file_len {
        return Err(SafeTensorError::MetadataIncompleteBuffer);
    }
    Ok(metadata)
}

/// The first key that appears twice in the JSON object `json`, or inside its `__metadata__`
/// object (reported as `__metadata__.KEY`), if any. serde_json keeps the last of duplicate keys
/// without a word, which would hide a tensor or a setting; readers must refuse them.
pub fn duplicate_key(json: &[u8]) -> Option<String> {
    struct Dup(Option<String>);
    impl<'de> serde::Deserialize<'de> for Dup {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Dup;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut m: A,
                ) -> Result<Dup, A::Error> {
                    let mut seen = std::collections::HashSet::new();
                    let mut dup = None;
                    while let Some(k) = m.next_key::<String>()? {
                        if k == "__metadata__" {
                            // A non-object is left to the real parser's error.
                            if let Ok(Dup(Some(inner))) = m.next_value::<Dup>() {
                                dup = dup.or(Some(format!("__metadata__.{inner}")));
                            }
                        } else {
                            m.next_value::<serde::de::IgnoredAny>()?;
                        }
                        if !seen.insert(k.clone()) {
                            dup = dup.or(Some(k));
                        }
                    }
                    Ok(Dup(dup))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_slice::<Dup>(json).ok().and_then(|d| d.0)
}

/// Why the safetensors header `json` (followed by `data_len` bytes) is invalid, naming the
/// tensor or metadata key at fault: the safetensors crate's own errors do not name them.
pub fn diagnose_header(json: &[u8], data_len: u64) -> Option<String> {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(json) else {
        return None;
    };
    let mut spans = Vec::new();
    for (name, v) in &map {
        if name == "__metadata__" {
            if let Some((k, _)) = v
                .as_object()
                .and_then(|o| o.iter().find(|(_, v)| !v.is_string()))
            {
                return Some(format!("__metadata__.{k} is not a string"));
            }
            continue;
        }
        let info: TensorInfo = match serde_json::from_value(v.clone()) {
            Ok(i) => i,
            Err(e) => return Some(format!("tensor {name}: {e}")),
        };
        let bits = info
            .shape
            .iter()
            .try_fold(info.dtype.bitsize() as u64, |a, &d| a.checked_mul(d as u64));
        let Some(bits) = bits else {
            return Some(format!("tensor {name}: shape {:?} overflows", info.shape));
        };
        let (s, e) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
        if e < s || e > data_len {
            return Some(format!(
                "tensor {name}: data offsets [{s}, {e}) are outside the {data_len} data bytes"
            ));
        }
        if bits.div_ceil(8) != e - s {
            return Some(format!(
                "tensor {name}: {:?} {:?} needs {} bytes, its offsets span {}",
                info.dtype,
                info.shape,
                bits.div_ceil(8),
                e - s
            ));
        }
        spans.push((s, e, name));
    }
    spans.sort();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Some(format!("tensors {} and {} overlap", w[0].2, w[1].2));
        }
    }
    None
}
