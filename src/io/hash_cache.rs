//! A cache of base tensor hashes, keyed as git's index keys files, so that a base already hashed
//! is not read and hashed again by every extract, merge, apply and verify that names it.
//!
//! An entry belongs to one safetensors file and is valid while the file's device, inode, size,
//! modification time and change time (in nanoseconds) are all unchanged. The threat model, the
//! racy-file rule and `--rehash` are in docs/RELIABILITY.md ("The hash cache").

use std::collections::HashMap;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The environment variable that names the cache folder; empty or `off` turns the cache off.
pub const CACHE_ENV: &str = "SOTU_DELTA_CACHE";
/// A file changed this recently may still change without its times moving (they have a coarse
/// clock, one second on some filesystems, two on FAT): its hashes are used but not stored.
const RACY: Duration = Duration::from_secs(2);
/// The largest cache entry read: an entry holds a name and a hash per tensor.
const MAX_ENTRY_BYTES: u64 = 64 << 20;
/// Bumped when an entry's meaning changes; entries of other versions are ignored.
const VERSION: u32 = 1;

/// Where cached hashes are looked up and stored, and whether lookups are skipped.
#[derive(Clone, Debug)]
pub struct HashCache {
    dir: PathBuf,
    /// Hash every file again (`--rehash`); what is hashed is still stored.
    rehash: bool,
}

/// What identifies a file's contents to the cache: git's index key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileKey {
    /// The key of a file from its metadata.
    pub fn of(meta: &Metadata) -> Self {
        let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
        FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether the file changed less than [`RACY`] before `now`, or claims to have changed
    /// after it.
    fn is_racy(&self, now: SystemTime) -> bool {
        let now_ns = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        self.mtime_ns.max(self.ctime_ns) > now_ns - RACY.as_nanos() as i128
    }
}

/// One cache file: the hashes of one safetensors file's tensors.
#[derive(serde::Serialize, serde::Deserialize)]
struct Entry {
    version: u32,
    key: FileKey,
    /// Tensor name → BLAKE3 of its bytes, in hex.
    tensors: HashMap<String, String>,
}

impl HashCache {
    /// The cache in `$SOTU_DELTA_CACHE`, else `$XDG_CACHE_HOME/sotu-delta`, else
    /// `$HOME/.cache/sotu-delta`; `None` where `SOTU_DELTA_CACHE` is empty or `off`, or no
    /// folder can be named.
    pub fn from_env(rehash: bool) -> Option<Self> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let dir = match std::env::var_os(CACHE_ENV) {
            Some(v) if v.is_empty() || v == "off" => return None,
            Some(v) => PathBuf::from(v),
            None => var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache")))?
                .join("sotu-delta"),
        };
        Some(HashCache { dir, rehash })
    }

    /// A cache in `dir`.
    pub fn in_dir(dir: PathBuf, rehash: bool) -> Self {
        HashCache { dir, rehash }
    }

    fn entry_path(&self, key: &FileKey) -> PathBuf {
        self.dir
            .join(format!("blake3-{:x}-{:x}.json", key.dev, key.ino))
    }

    /// The cached hashes of the file with `key`, if an entry matches it exactly and lists
    /// exactly `names`. Any unreadable or foreign entry counts as absent.
    pub fn lookup(&self, key: &FileKey, names: &[&str]) -> Option<HashMap<String, [u8; 32]>> {
        if self.rehash {
            return None;
        }
        use std::io::Read;
        let mut text = Vec::new();
        std::fs::File::open(self.entry_path(key))
            .ok()?
            .take(MAX_ENTRY_BYTES)
            .read_to_end(&mut text)
            .ok()?;
        let entry: Entry = serde_json::from_slice(&text).ok()?;
        if entry.version != VERSION || entry.key != *key || entry.tensors.len() != names.len() {
            return None;
        }
        names
            .iter()
            .map(|&n| {
                let hex = entry.tensors.get(n)?;
                let mut h = [0u8; 32];
                (hex.len() == 64).then_some(())?;
                for (b, pair) in h.iter_mut().zip(hex.as_bytes().chunks(2)) {
                    *b = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
                }
                Some((n.to_string(), h))
            })
            .collect()
    }

    /// Stores the hashes of every tensor of the file with `key`, unless the file is racy at
    /// `hashed_at` (when its hashing began). Failing to store is not an error: the cache only
    /// saves time.
    pub fn store(&self, key: &FileKey, hashed_at: SystemTime, hashes: &HashMap<String, [u8; 32]>) {
        if key.is_racy(hashed_at) {
            return;
        }
        let entry = Entry {
            version: VERSION,
            key: *key,
            tensors: hashes
                .iter()
                .map(|(n, h)| (n.clone(), h.iter().map(|b| format!("{b:02x}")).collect()))
                .collect(),
        };
        let Ok(text) = serde_json::to_vec(&entry) else {
            return;
        };
        // Written aside and renamed: a reader sees the old entry or the new one, never a part.
        let path = self.entry_path(key);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = std::fs::create_dir_all(&self.dir)
            .and_then(|()| std::fs::write(&tmp, &text))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(mtime_s: i64) -> FileKey {
        FileKey {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns: mtime_s as i128 * 1_000_000_000,
            ctime_ns: mtime_s as i128 * 1_000_000_000,
        }
    }

    #[test]
    fn entries_round_trip_and_any_change_of_the_key_misses() {
        let dir = std::env::temp_dir().join(format!("sotu-hash-cache-{}", std::process::id()));
        let cache = HashCache::in_dir(dir.clone(), false);
        let hashes: HashMap<String, [u8; 32]> =
            [("a".to_string(), [7u8; 32]), ("b".to_string(), [200u8; 32])].into();
        let k = key(1000);
        cache.store(&k, SystemTime::now(), &hashes);
        assert_eq!(cache.lookup(&k, &["a", "b"]), Some(hashes.clone()));
        // Another tensor list, another key, or --rehash: no hashes.
        assert_eq!(cache.lookup(&k, &["a"]), None);
        assert_eq!(cache.lookup(&k, &["a", "c"]), None);
        let changed = [
            FileKey { size: 4, ..k },
            FileKey {
                mtime_ns: k.mtime_ns + 1,
                ..k
            },
            FileKey {
                ctime_ns: k.ctime_ns + 1,
                ..k
            },
        ];
        for other in changed {
            assert_eq!(cache.lookup(&other, &["a", "b"]), None, "{other:?}");
        }
        assert_eq!(
            HashCache::in_dir(dir.clone(), true).lookup(&k, &["a", "b"]),
            None
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_changed_within_the_racy_window_is_not_stored() {
        let dir = std::env::temp_dir().join(format!("sotu-hash-racy-{}", std::process::id()));
        let cache = HashCache::in_dir(dir.clone(), false);
        let hashes: HashMap<String, [u8; 32]> = [("a".to_string(), [1u8; 32])].into();
        let at = UNIX_EPOCH + Duration::from_secs(1001);
        cache.store(&key(1000), at, &hashes);
        assert_eq!(cache.lookup(&key(1000), &["a"]), None);
        cache.store(&key(998), at, &hashes);
        assert_eq!(cache.lookup(&key(998), &["a"]), Some(hashes));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
