//! How an input file's bytes are reached (`--io`): through a memory map, or by positional
//! reads (`pread`) into the reader's own buffers. The choice is made once, when a checkpoint is
//! opened; everything above asks [`Storage`] for byte ranges and never branches on the mode.
//!
//! Maps are the fast path on local disks: no copy, and the page cache is shared with other
//! processes. On network filesystems (NFS, Lustre) every page fault of a map is a round trip,
//! and large sequential `pread`s are many times faster (safetensors#562, #760). Both give the
//! same bytes.

use std::borrow::Cow;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use memmap2::Mmap;

use super::memory::AlignedBytes;

/// How inputs are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// Memory-map each file (the default): no copy, pages come in as they are touched.
    #[default]
    Mmap,
    /// Positional reads into reused buffers, for filesystems where maps are slow (NFS, Lustre).
    Read,
}

/// Bytes of one piece of a tensor walked in order ([`crate::io::Tensor::for_each_piece`]) and
/// of one unit of a copy: large enough that a read or write costs one system call per few
/// milliseconds, small enough that a buffer per thread stays well inside the memory bound
/// (README, "Bounded memory").
pub const PIECE: usize = 8 << 20;

/// One opened input file, mapped or read by position; or an image built in memory
/// ([`crate::io::Checkpoint::from_image`]), which is read as a map is.
pub enum Storage {
    /// The whole file, mapped read-only.
    Mapped(Mmap),
    /// The file and its length when opened.
    Positional(File, u64),
    /// A safetensors image in memory.
    Memory(AlignedBytes),
}

impl Storage {
    /// `file` (of `len` bytes) reached as `mode` says.
    pub fn open(file: File, len: u64, mode: IoMode) -> std::io::Result<Storage> {
        Ok(match mode {
            // SAFETY: the map is read-only. A file truncated by another process while mapped
            // makes reads fault with SIGBUS, which `process::install_handlers` turns into exit
            // status 1 naming the file (the checkpoint registers the mapping).
            IoMode::Mmap => Storage::Mapped(unsafe { Mmap::map(&file) }?),
            IoMode::Read => Storage::Positional(file, len),
        })
    }

    /// The file's length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Storage::Mapped(m) => m.len() as u64,
            Storage::Positional(_, len) => *len,
            Storage::Memory(b) => b.len() as u64,
        }
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The address range of the map, for the SIGBUS handler; `None` when nothing is mapped.
    pub fn mapping(&self) -> Option<(usize, usize)> {
        match self {
            Storage::Mapped(m) => Some((m.as_ptr() as usize, m.len())),
            Storage::Positional(..) | Storage::Memory(_) => None,
        }
    }

    /// Bytes `range` of the file (within its length): borrowed from the map, or read into
    /// `buf`, which is resized to fit and reused from call to call by the caller.
    pub fn bytes<'b>(
        &'b self,
        range: Range<usize>,
        buf: &'b mut Vec<u8>,
    ) -> std::io::Result<&'b [u8]> {
        match self {
            Storage::Mapped(m) => Ok(&m[range]),
            Storage::Memory(b) => Ok(&b.as_bytes()[range]),
            Storage::Positional(..) => {
                buf.resize(range.len(), 0);
                self.read_into(range.start, buf)?;
                Ok(buf)
            }
        }
    }

    /// The bytes from `range.start` to `range.end`, borrowed from the map or read whole.
    pub fn whole(&self, range: Range<usize>) -> std::io::Result<Cow<'_, [u8]>> {
        match self {
            Storage::Mapped(m) => Ok(Cow::Borrowed(&m[range])),
            Storage::Memory(b) => Ok(Cow::Borrowed(&b.as_bytes()[range])),
            Storage::Positional(..) => {
                let mut v = Vec::new();
                self.bytes(range, &mut v)?;
                Ok(Cow::Owned(v))
            }
        }
    }

    /// Fills `dst` with the file's bytes from `at`. A file that ends before `dst` is full (it
    /// was truncated since it was opened) is an [`std::io::ErrorKind::UnexpectedEof`].
    pub fn read_into(&self, at: usize, dst: &mut [u8]) -> std::io::Result<()> {
        match self {
            Storage::Mapped(m) => {
                dst.copy_from_slice(&m[at..at + dst.len()]);
                Ok(())
            }
            Storage::Memory(b) => {
                dst.copy_from_slice(&b.as_bytes()[at..at + dst.len()]);
                Ok(())
            }
            Storage::Positional(f, _) => f.read_exact_at(dst, at as u64),
        }
    }

    /// Tells the kernel the file is read front to back, so that it reads ahead.
    pub fn advise_sequential(&self) {
        match self {
            Storage::Mapped(m) => {
                let _ = m.advise(memmap2::Advice::Sequential);
            }
            Storage::Positional(f, _) => {
                use std::os::fd::AsRawFd;
                // SAFETY: a valid descriptor; the call only sets a read-ahead hint.
                unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
            }
            Storage::Memory(_) => {}
        }
    }
}

thread_local! {
    /// Each thread's spare piece buffers, kept for the whole run: a buffer of [`PIECE`] bytes
    /// allocated per piece is a fresh mapping each time, and its page faults cost more than the
    /// copy.
    static SPARE: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with one of this thread's reused buffers (contents unspecified). Calls may nest
/// (comparing two tensors takes two): each takes its own buffer.
pub fn with_buffer<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    let mut buf = SPARE.with_borrow_mut(Vec::pop).unwrap_or_default();
    let r = f(&mut buf);
    // Only buffers of piece size are kept: a caller that read something larger gives it back.
    if buf.capacity() <= PIECE {
        SPARE.with_borrow_mut(|s| s.push(buf));
    }
    r
}
