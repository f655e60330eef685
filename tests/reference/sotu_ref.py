"""Independent numpy reference of the sotu-delta file format (docs/FORMAT.md, version 1.1) and
of the merge methods (docs/METHODS.md).

Written from docs/FORMAT.md and docs/METHODS.md alone, without looking at the Rust code, so that
the tests can check the binary against a second reading of the spec. Section numbers (§) refer to
FORMAT.md.
Clarity beats speed here: everything is whole-tensor numpy, which is plenty for test fixtures.

Only numpy and blake3 are used.
"""

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field

import blake3
import numpy as np

TWO32 = 1 << 32
FORMAT = "sotu-delta"
FORMAT_MAJOR = 1
FORMAT_VERSION = "1.2"
MASK_NAME = "sotu-mix32-v1"
DEFAULT_SEED = 2411
DEFAULT_CHUNK = 65536
KEY_DOMAIN = b"sotu-delta/mask/v1"
RESERVED_PREFIX = "sotu/"
GROWN_PREFIX = "sotu/grown/"   # §12: the new rows of a grown tensor
FILES_PREFIX = "sotu/files/"   # §13: the fine-tune's own files in a single-file delta
SUB_PREFIX = "sotu/sub/"       # §15: the tensors of weight files in subfolders, sotu/sub/<P>/...
MAX_FILES_BYTES = 64 * 1024 * 1024
# §13: the files extract stores when the fine-tune changes or adds them.
OWN_FILE_NAMES = (
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.json", "chat_template.jinja",
)
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class FormatError(ValueError):
    """A file that a reader must refuse, or an operation the spec refuses."""


# --------------------------------------------------------------------------------------------
# safetensors container (§1)
# --------------------------------------------------------------------------------------------

# Element size and the numpy dtype used to hold the raw elements. BF16 has no numpy dtype, so its
# elements are kept as their uint16 bit patterns; 8-bit floats likewise as uint8.
DTYPES = {
    "F64": (8, "<f8"), "F32": (4, "<f4"), "F16": (2, "<f2"), "BF16": (2, "<u2"),
    "I64": (8, "<i8"), "I32": (4, "<i4"), "I16": (2, "<i2"), "I8": (1, "i1"),
    "U64": (8, "<u8"), "U32": (4, "<u4"), "U16": (2, "<u2"), "U8": (1, "u1"),
    "BOOL": (1, "u1"), "F8_E4M3": (1, "u1"), "F8_E5M2": (1, "u1"),
}
# The dtypes that may be `masked` (§3) and that merge does arithmetic on (§8).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass
class Tensor:
    dtype: str
    shape: tuple
    data: bytes  # raw little-endian element bytes, row-major

    @property
    def numel(self):
        return numel(self.shape)

    def array(self):
        """The elements as a flat numpy array (BF16 as uint16 bit patterns)."""
        return np.frombuffer(self.data, dtype=DTYPES[self.dtype][1])


def numel(shape):
    return math.prod(shape)  # a 0-d tensor (shape ()) has one element


def _reject_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(f"duplicate JSON key {k!r}")
        out[k] = v
    return out


def _is_uint(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_safetensors(path):
    """Parse and validate a safetensors file. Returns (metadata or None, {name: Tensor}).

    Validation is what safetensors itself guarantees: a JSON object header, known dtypes,
    data_offsets whose length matches dtype and shape, and byte ranges that tile the data
    section exactly (no gap, no overlap, nothing left over). Padding and key order are not relied
    on (§1).
    """
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise FormatError(f"{path}: shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise FormatError(f"{path}: header length {n} exceeds the file")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: header is not UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    data = blob[8 + n:]

    metadata = header.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise FormatError(f"{path}: __metadata__ must map strings to strings")

    tensors, spans = {}, []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"{path}: bad entry for {name!r}")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise FormatError(f"{path}: {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise FormatError(f"{path}: {name!r} has a bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_uint(o) for o in offs)
                and offs[0] <= offs[1]):
            raise FormatError(f"{path}: {name!r} has bad data_offsets {offs!r}")
        if offs[1] - offs[0] != numel(shape) * DTYPES[dtype][0]:
            raise FormatError(f"{path}: {name!r}: data_offsets do not match dtype and shape")
        spans.append((offs[0], offs[1], name))
        tensors[name] = Tensor(dtype, tuple(shape), data[offs[0]:offs[1]])
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise FormatError(f"{path}: {name!r} does not start where the previous tensor ends")
        end = stop
    if end != len(data):
        raise FormatError(f"{path}: data section has {len(data)} bytes, tensors cover {end}")
    return metadata, tensors


def read_checkpoint(path):
    """(metadata, {name: Tensor}, files) of a safetensors file or a model folder (§10): the
    index's shards, or model.safetensors, read as the union of their tensors, with the metadata
    of the first shard (a delta's shards must all carry the same). files: {name: bytes} of the
    regular files at the folder's top level, None for a single file."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        meta, tensors = read_safetensors(path)
        return meta, tensors, None
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
        for s in shards:
            if os.path.isabs(s) or ".." in s.split("/"):
                raise FormatError(f"{path}: shard {s!r} leaves the folder")
    else:
        weight_map, shards = None, [SINGLE]
    metas, tensors = [], {}
    for s in shards:
        meta, part = read_safetensors(os.path.join(path, s))
        metas.append(meta)
        for k, t in part.items():
            if k in tensors or (weight_map is not None and weight_map.get(k) != s):
                raise FormatError(f"{path}: tensor {k!r} is not stored once, where the index says")
            tensors[k] = t
    if weight_map is not None and sorted(weight_map) != sorted(tensors):
        raise FormatError(f"{path}: the index and the shards list other tensors")
    if any(m != metas[0] for m in metas):
        raise FormatError(f"{path}: the shards carry different __metadata__")
    files = {}
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                files[name] = f.read()
    return metas[0], tensors, files


def write_safetensors(path, tensors, metadata=None):
    """Write {name: Tensor} in ascending name order, header padded with spaces to 8 bytes."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        assert len(t.data) == t.numel * DTYPES[t.dtype][0], name
        header[name] = {"dtype": t.dtype, "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(t.data)]}
        offset += len(t.data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in sorted(tensors):
            f.write(tensors[name].data)


# --------------------------------------------------------------------------------------------
# The mask function (§4)
# --------------------------------------------------------------------------------------------

def mix32(x):
    """The 32-bit bijection of §4, elementwise on a uint32 array (or a scalar)."""
    scalar = np.ndim(x) == 0
    # Always work on arrays: numpy array multiplication wraps modulo 2^32 silently, which is
    # exactly the u32 arithmetic the spec asks for (scalar arithmetic may warn instead).
    x = np.array(x, dtype=np.uint64).astype(np.uint32, copy=True).reshape(-1)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x21F0AAAD)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x735A2D97)
    x ^= x >> np.uint32(15)
    return int(x[0]) if scalar else x


def key(seed, name):
    """(k0, k1) of §4: the first two little-endian u32 words of a BLAKE3 digest."""
    if not (0 <= seed < 1 << 64):
        raise ValueError("seed must be a u64")
    msg = KEY_DOMAIN + b"\x00" + struct.pack("<Q", seed) + name.encode("utf-8")
    d = blake3.blake3(msg).digest()
    k0, k1 = struct.unpack("<II", d[:8])
    return k0, k1


def u(seed, name, indices):
    """u(s, name, i) of §4 for an array of u64 indices (any values, including >= 2^32).

    Returns a uint32 array (or an int for a scalar index)."""
    scalar = np.ndim(indices) == 0
    i = np.array(indices, dtype=np.uint64).reshape(-1)
    k0, k1 = key(seed, name)
    high = (i >> np.uint64(32)).astype(np.uint32)  # i >> 32: fits in 32 bits
    low = (i & np.uint64(0xFFFFFFFF)).astype(np.uint32)  # i mod 2^32
    c = mix32(np.uint32(k1) ^ high) ^ np.uint32(k0)  # constant over each 2^32 block
    out = mix32(low ^ c)
    return int(out[0]) if scalar else out


def kept_mask(seed, name, n, lo, hi, start=0):
    """Boolean mask of lo <= u < hi for indices start .. start+n-1 (compared as integers)."""
    v = u(seed, name, np.arange(start, start + n, dtype=np.uint64)).astype(np.uint64)
    return (v >= np.uint64(lo)) & (v < np.uint64(hi))  # hi may be 2^32: fine in uint64


# --------------------------------------------------------------------------------------------
# The keep interval (§5)
# --------------------------------------------------------------------------------------------

def round_half_away(x):
    """Round a non-negative float to the nearest integer, halves away from zero.

    Python's round() is half-to-even and must not be used. floor() and x - floor(x) are exact
    for a float64 (the fractional part of a double is representable), so this is exact."""
    if not (x >= 0) or math.isinf(x):
        raise ValueError(x)
    f = math.floor(x)
    return f + 1 if x - f >= 0.5 else f


def density_count(density):
    """round(D * 2^32), D in [0, 1]: the multiplication by 2^32 is exact in f64."""
    d = float(density)
    if not (0.0 <= d <= 1.0):
        raise ValueError(f"density {density!r} is not in [0, 1]")
    return round_half_away(d * 4294967296.0)


def parse_slot(slot):
    if isinstance(slot, str):
        k, n = (int(p) for p in slot.split("/"))
    else:
        k, n = slot
    if not (n >= 1 and 0 <= k < n):
        raise ValueError(f"bad slot {slot!r}: need 0 <= K < N")
    return k, n


def slot_span(k, n):
    """[floor(K 2^32 / N), floor((K+1) 2^32 / N)) in exact integer arithmetic."""
    return (k * TWO32) // n, ((k + 1) * TWO32) // n


def interval(density=None, slot=None):
    """(lo, hi) from --density, --slot K/N, or both (§5). Neither: density 1 (keep everything)."""
    if slot is None:
        return 0, density_count(1.0 if density is None else density)
    lo, end = slot_span(*parse_slot(slot))
    if density is None:
        return lo, end
    hi = lo + density_count(density)
    if hi > end:
        raise ValueError(f"density {density} does not fit in slot {slot}")
    return lo, hi


# --------------------------------------------------------------------------------------------
# Float conversions and the single rounding of §8
# --------------------------------------------------------------------------------------------

# (mantissa bits p, minimum normal exponent, maximum exponent) of the binary formats.
FLOAT_FORMATS = {"F32": (23, -126, 127), "F16": (10, -14, 15), "BF16": (7, -126, 127)}
CANONICAL_NAN = {"F64": 0x7FF8000000000000, "F32": 0x7FC00000, "F16": 0x7E00, "BF16": 0x7FC0}
_BITS = {"F64": "<u8", "F32": "<u4", "F16": "<u2", "BF16": "<u2"}


def to_f64(dtype, raw):
    """Exact conversion of float elements to float64. raw: a Tensor, bytes, or a numpy array in
    the DTYPES representation (BF16 as uint16 bits)."""
    if isinstance(raw, Tensor):
        raw = raw.data
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(raw, dtype=DTYPES[dtype][1])
    with np.errstate(invalid="ignore"):  # NaN inputs are fine: they stay NaN
        if dtype == "BF16":
            # A bfloat16 is the top half of a float32: shift the bits up, then widen.
            f32 = (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
            return f32.astype(np.float64)
        if dtype in ("F16", "F32", "F64"):
            raw = np.asarray(raw)
            if raw.dtype.kind != "f":
                raise TypeError("F16/F32/F64 elements must be given as a float array, not bits")
            return raw.astype(np.float64)  # widening float conversions are exact
    raise ValueError(f"{dtype} is not a float dtype")


def round_from_f64(x, dtype):
    """Round float64 values once, directly, to `dtype` (§8 round_to_output_dtype).

    Round to nearest, ties to even; overflow to +-infinity; subnormals kept; any NaN becomes the
    canonical quiet NaN. Returns a numpy array in the DTYPES representation (BF16 as uint16).

    Method: find the exponent e of each value (clamped at the format's minimum normal exponent,
    which gives subnormals their fixed spacing), scale by the exact power of two 2^-(e-p) so that
    the target's ulp becomes 1, round to an integer with np.rint (half to even), scale back. All
    scalings by powers of two are exact here, so the only rounding is the rint. The result is then
    exactly representable in the target format, so the final numpy cast is exact.
    """
    x = np.asarray(x, dtype=np.float64)
    nan = np.isnan(x)
    if dtype == "F64":
        bits = x.view(np.uint64).copy()
    else:
        p, emin, emax = FLOAT_FORMATS[dtype]
        with np.errstate(invalid="ignore", over="ignore"):
            _, e2 = np.frexp(x)  # x = m 2^e2 with 0.5 <= |m| < 1, so floor(log2|x|) = e2 - 1
            shift = np.maximum(e2 - 1, emin) - p  # log2 of the target ulp at x
            r = np.ldexp(np.rint(np.ldexp(x, -shift)), shift)
            max_finite = math.ldexp(2.0 - 2.0 ** -p, emax)
            # Anything that rounded past the largest finite value overflows. With ties to even,
            # that is exactly every |x| >= max_finite + ulp/2 (the rint above rounds those up to
            # 2^(emax+1)); infinities pass through the same way.
            r = np.where(np.abs(r) > max_finite, np.copysign(np.inf, x), r)
        if dtype == "F32":
            bits = r.astype("<f4").view(np.uint32)
        elif dtype == "F16":
            bits = r.astype("<f2").view(np.uint16)
        else:  # BF16: r is a bfloat16 value, hence exactly a float32 whose low 16 bits are zero
            f32bits = r.astype("<f4").view(np.uint32)
            assert not np.any(f32bits[~nan] & 0xFFFF)
            bits = (f32bits >> np.uint32(16)).astype(np.uint16)
    bits = np.where(nan, bits.dtype.type(CANONICAL_NAN[dtype]), bits).astype(_BITS[dtype])
    return bits.view(DTYPES[dtype][1])


def round_to_bytes(x, dtype):
    return np.ascontiguousarray(round_from_f64(x, dtype)).tobytes()


# --------------------------------------------------------------------------------------------
# The logical content of a delta (§3, §6, §7)
# --------------------------------------------------------------------------------------------

@dataclass
class Entry:
    """One tensor of a delta, decoded."""
    kind: str                      # "masked", "whole" or "same"
    dtype: str
    shape: tuple
    row: int
    in_base: bool
    kept: int = None               # masked only
    indices: np.ndarray = None     # masked: kept flat indices (uint64, ascending)
    values: np.ndarray = None      # masked: kept fine-tuned values (DTYPES representation)
    offsets: np.ndarray = None     # masked: chunk offsets (uint64)
    whole: Tensor = None           # whole: the stored tensor
    grown_shape: tuple = None      # §12: a grown tensor's shape in the fine-tune (shape: the base's)
    grown: Tensor = None           # §12: its new rows


@dataclass
class Delta:
    seed: int
    lo: int
    hi: int
    chunk: int
    entries: dict                  # name -> Entry
    base_hashes: np.ndarray        # [rows, 32] uint8
    stats: np.ndarray              # [rows, 3] float64
    metadata: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # §13: the fine-tune's own files, name -> bytes
    subfolders: dict = field(default_factory=dict)  # §15: path -> Delta of that file alone

    def rows(self):
        """Names in row order."""
        return sorted(self.entries, key=lambda n: self.entries[n].row)


def _offsets(mask, n, chunk):
    """Entry j: kept elements in chunks 0..j-1 (§6). Length ceil(n / chunk) + 1."""
    nchunks = -(-n // chunk)
    counts = [int(np.count_nonzero(mask[j * chunk:(j + 1) * chunk])) for j in range(nchunks)]
    return np.concatenate([[0], np.cumsum(counts, dtype=np.uint64)]).astype(np.uint64)


def _seq_sum(x):
    """Sequential left-to-right float64 sum (np.sum is pairwise, which is a different order)."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.cumsum(x)[-1]) if x.size else 0.0


def _chunked_sum(x, chunk):
    """§7: per chunk, 8 lane sums (lane p: the chunk's elements at in-chunk index = p mod 8, in
    index order, from 0.0), the chunk's sum = 0.0 + lane 0 + ... + lane 7; then the chunk sums
    in chunk order from 0.0."""
    x = np.asarray(x, dtype=np.float64)
    chunks = []
    for j in range(0, x.size, chunk):
        xc = x[j:j + chunk]
        chunks.append(_seq_sum([_seq_sum(xc[p::8]) for p in range(8)]))
    return _seq_sum(chunks)


def grows(b, t):
    """§12: whether tensor t is tensor b with rows added along dimension 0 (same dtype, same
    dimensions after the first, more rows)."""
    return (b.dtype == t.dtype and len(b.shape) >= 1 and len(t.shape) == len(b.shape)
            and tuple(t.shape[1:]) == tuple(b.shape[1:]) and t.shape[0] > b.shape[0])


def split_rows(t, base_shape):
    """§12: (the part that a base of base_shape has, the new rows) of grown tensor t: its first
    numel(base_shape) elements in row-major order, and the rest."""
    cut = numel(base_shape) * DTYPES[t.dtype][0]
    rows = (t.shape[0] - base_shape[0],) + tuple(t.shape[1:])
    return Tensor(t.dtype, tuple(base_shape), t.data[:cut]), Tensor(t.dtype, rows, t.data[cut:])


def own_files(base_files, tuned_files):
    """§13: the fine-tune's own files a delta carries: those of OWN_FILE_NAMES in the fine-tune
    folder whose bytes differ from the base folder's file of that name, or that the base lacks.
    base_files / tuned_files: {name: bytes} of the folders' top-level files, None for a single
    file (a base given as a file lacks every one; a fine-tune given as a file has none)."""
    if tuned_files is None:
        return {}
    base_files = base_files or {}
    out = {n: tuned_files[n] for n in OWN_FILE_NAMES
           if n in tuned_files and base_files.get(n) != tuned_files[n]}
    total = sum(len(v) for v in out.values())
    if total > MAX_FILES_BYTES:
        raise FormatError(f"the own files come to {total} bytes, over {MAX_FILES_BYTES}")
    return out


def extract(base, tuned, seed=DEFAULT_SEED, lo=0, hi=TWO32, chunk=DEFAULT_CHUNK, files=True):
    """The logical delta that `extract` must write for these checkpoints (§3, §6, §7, §12, §13).

    base, tuned: paths (files or model folders) or {name: Tensor}. No --include/--exclude: every
    maskable tensor is selected. files=False is `--no-files`. Returns a Delta.
    """
    base_files = tuned_files = None
    if isinstance(base, (str, bytes)) or hasattr(base, "__fspath__"):
        _, base, base_files = read_checkpoint(base)
    if isinstance(tuned, (str, bytes)) or hasattr(tuned, "__fspath__"):
        _, tuned, tuned_files = read_checkpoint(tuned)
    if not (0 <= lo <= hi <= TWO32) or chunk < 1:
        raise ValueError("bad interval or chunk")
    for name in list(base) + list(tuned):
        if name.startswith(RESERVED_PREFIX):
            raise FormatError(f"tensor name {name!r} uses the reserved prefix sotu/")
    grown = {}
    for name, b in base.items():
        t = tuned.get(name)
        if t is None:
            raise FormatError(f"{name!r} is in the base but not in the fine-tune")
        if (t.dtype, t.shape) != (b.dtype, b.shape):
            if not grows(b, t):
                raise FormatError(f"{name!r} changes dtype or shape")
            # §12: the entry describes the part the base has; the new rows are stored whole.
            tuned = dict(tuned)
            tuned[name], rows = split_rows(t, b.shape)
            grown[name] = (tuple(t.shape), rows)

    names = sorted(set(base) | set(tuned))
    entries = {}
    hashes = np.zeros((len(names), 32), dtype=np.uint8)
    stats = np.zeros((len(names), 3), dtype=np.float64)
    for row, name in enumerate(names):
        t = tuned[name]
        b = base.get(name)
        in_base = b is not None
        if in_base:
            hashes[row] = np.frombuffer(blake3.blake3(b.data).digest(), dtype=np.uint8)
        if in_base and b.data == t.data:
            entries[name] = Entry("same", t.dtype, t.shape, row, True)
            continue
        if not in_base or t.dtype not in FLOAT_DTYPES:
            entries[name] = Entry("whole", t.dtype, t.shape, row, in_base, whole=t)
            continue
        n = t.numel
        mask = kept_mask(seed, name, n, lo, hi)
        idx = np.flatnonzero(mask).astype(np.uint64)
        values = t.array()[mask]
        entries[name] = Entry("masked", t.dtype, t.shape, row, True, kept=int(idx.size),
                              indices=idx, values=values, offsets=_offsets(mask, n, chunk))
        # §7 statistics, delta = tuned - base in f64.
        bv, tv = to_f64(b.dtype, b.data), to_f64(t.dtype, t.data)
        d2 = (tv - bv) * (tv - bv)
        kept_d2 = np.where(mask, d2, 0.0)  # adding +0.0 for dropped elements changes no sum
        # Kept elements that one delta with weight 1 cannot reproduce: round(b + (v - b)) != v.
        back = round_from_f64(bv[mask] + (tv[mask] - bv[mask]), t.dtype)
        bad = np.count_nonzero(back.view(_BITS[t.dtype]) != values.view(_BITS[t.dtype]))
        stats[row] = (_chunked_sum(d2, chunk), _chunked_sum(kept_d2, chunk), float(bad))
    for name, (shape, rows) in grown.items():
        entries[name].grown_shape, entries[name].grown = shape, rows
    return Delta(seed, lo, hi, chunk, entries, hashes, stats,
                 files=own_files(base_files, tuned_files) if files else {})


def write_delta(path, delta, slot=None, tool="sotu_ref (python reference)"):
    """Serialize a Delta as §1-§7 describe (used to test decode_delta on our own files)."""
    table, tensors = {}, {}
    for name, e in delta.entries.items():
        entry = {"kind": e.kind, "dtype": e.dtype, "shape": list(e.shape), "row": e.row}
        if e.kind == "masked":
            entry["kept"] = e.kept
            tensors[name] = Tensor(e.dtype, (e.kept,), np.ascontiguousarray(e.values).tobytes())
            tensors["sotu/offsets/" + name] = Tensor("U64", (e.offsets.size,), e.offsets.astype("<u8").tobytes())
        elif e.kind == "whole":
            tensors[name] = e.whole
        entry["in_base"] = e.in_base
        if e.grown_shape is not None:
            entry["grown_shape"] = list(e.grown_shape)
            tensors[GROWN_PREFIX + name] = e.grown
        table[name] = entry
    tensors["sotu/base_hashes"] = Tensor("U8", delta.base_hashes.shape, delta.base_hashes.astype(np.uint8).tobytes())
    # FORMAT.md section 7: a NaN sum is stored as the canonical quiet NaN.
    stats = np.where(np.isnan(delta.stats), np.float64(np.nan), delta.stats).astype("<f8")
    assert all(x == 0x7FF8000000000000 for x in stats.view("<u8")[np.isnan(stats)])
    tensors["sotu/stats"] = Tensor("F64", delta.stats.shape, stats.tobytes())
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "mask": MASK_NAME,
        "seed": str(delta.seed), "lo": str(delta.lo), "hi": str(delta.hi),
        "density": repr((delta.hi - delta.lo) / TWO32), "chunk": str(delta.chunk), "tool": tool,
        "tensors": json.dumps(table, separators=(",", ":"), sort_keys=True),
    }
    if slot is not None:
        meta["slot"] = slot
    if delta.files:  # §13: a single file carries them as U8 tensors
        meta["files"] = json.dumps({n: {"len": len(b), "blake3": blake3.blake3(b).hexdigest()}
                                    for n, b in sorted(delta.files.items())}, separators=(",", ":"))
        for n, b in delta.files.items():
            tensors[FILES_PREFIX + n] = Tensor("U8", (len(b),), bytes(b))
    write_safetensors(path, tensors, meta)


def _decimal(meta, k, path):
    s = meta.get(k)
    if s is None:
        raise FormatError(f"{path}: metadata key {k!r} is missing")
    if not (isinstance(s, str) and s.isascii() and s.isdigit()):
        raise FormatError(f"{path}: metadata {k}={s!r} is not a decimal integer")
    return int(s)


_OWN_FILE_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}")
SUBFOLDER_PATH = re.compile(r"[A-Za-z0-9._-]{1,255}(/[A-Za-z0-9._-]{1,255})+\.safetensors")  # §15


def _own_files(path, meta, tensors, folder_files):
    """§13: {name: bytes} of the own files a delta records, each checked against its record;
    from the sotu/files/ tensors of a single file, or from the files of a folder
    (folder_files, None for a single file)."""
    text = meta.get("files")
    records = {}
    if text is not None:
        try:
            records = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}: metadata 'files' is not JSON: {e}") from None
        if not isinstance(records, dict):
            raise FormatError(f"{path}: metadata 'files' is not a JSON object")
    total, out = 0, {}
    for name, rec in records.items():
        if (not _OWN_FILE_NAME.fullmatch(name) or len(name.encode()) > 255 or name.startswith(".")
                or name.endswith(".safetensors") or name.endswith(".index.json")):
            raise FormatError(f"{path}: own file {name!r}: not a valid name")
        if not (isinstance(rec, dict) and _is_uint(rec.get("len")) and isinstance(rec.get("blake3"), str)
                and re.fullmatch(r"[0-9a-f]{64}", rec["blake3"])):
            raise FormatError(f"{path}: own file {name!r}: bad record {rec!r}")
        total += rec["len"]
        if total > MAX_FILES_BYTES:
            raise FormatError(f"{path}: the own files recorded come to more than {MAX_FILES_BYTES} bytes")
        if folder_files is None:
            t = tensors.get(FILES_PREFIX + name)
            if t is None or t.dtype != "U8" or t.shape != (rec["len"],):
                raise FormatError(f"{path}: {FILES_PREFIX + name} must be a U8 tensor of shape [{rec['len']}]")
            data = t.data
        else:
            if name not in folder_files:
                raise FormatError(f"{path}: own file {name!r} is missing from the folder")
            data = folder_files[name]
        if len(data) != rec["len"] or blake3.blake3(data).hexdigest() != rec["blake3"]:
            raise FormatError(f"{path}: own file {name!r} differs from its record")
        out[name] = data
    for k in tensors:
        if k.startswith(FILES_PREFIX) and (folder_files is not None or k[len(FILES_PREFIX):] not in records):
            raise FormatError(f"{path}: tensor {k!r} is not an own file the metadata records")
    return out


def _decode_table(path, table, tensors, seed, lo, hi, chunk, prefix=""):
    """The entries of one `tensors` table (§3-§7, §12) whose stored keys take `prefix` (§15:
    `sotu/sub/<P>/` for a subfolder file, "" at the top level): (entries, base_hashes, stats)."""
    # Rows are 0, 1, ... in ascending name order.
    names = sorted(table)
    rows = len(names)
    for name, want in zip(names, range(rows)):
        if not isinstance(table[name], dict) or table[name].get("row") != want:
            raise FormatError(f"{path}: {name!r} should have row {want}")

    def fixed(k, dtype, shape):
        t = tensors.get(prefix + k)
        if t is None or t.dtype != dtype or t.shape != shape:
            raise FormatError(f"{path}: {k} must be a {dtype} tensor of shape {list(shape)}")
        return t

    hashes = fixed("sotu/base_hashes", "U8", (rows, 32)).array().reshape(rows, 32)
    stats = fixed("sotu/stats", "F64", (rows, 3)).array().reshape(rows, 3)

    entries = {}
    for name in names:
        info = table[name]
        kind, dtype, shape, in_base = info.get("kind"), info.get("dtype"), info.get("shape"), info.get("in_base")
        if kind not in ("masked", "whole", "same"):
            raise FormatError(f"{path}: {name!r} has unknown kind {kind!r}")
        if dtype not in DTYPES:
            raise FormatError(f"{path}: {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise FormatError(f"{path}: {name!r} has a bad shape")
        if not isinstance(in_base, bool):
            raise FormatError(f"{path}: {name!r}: in_base must be a boolean")
        if name.startswith(RESERVED_PREFIX):
            raise FormatError(f"{path}: {name!r} uses the reserved prefix")
        shape = tuple(shape)
        e = Entry(kind, dtype, shape, info["row"], in_base)
        if not in_base and (kind != "whole" or np.any(hashes[e.row])):
            raise FormatError(f"{path}: {name!r} is not in the base, so it must be whole with a zero hash")
        grown_shape = info.get("grown_shape")
        if grown_shape is not None:  # §12
            if not isinstance(grown_shape, list) or not all(_is_uint(d) for d in grown_shape):
                raise FormatError(f"{path}: {name!r} has a bad grown_shape")
            grown_shape = tuple(grown_shape)
            if not (in_base and len(shape) >= 1 and len(grown_shape) == len(shape)
                    and grown_shape[1:] == shape[1:] and grown_shape[0] > shape[0]):
                raise FormatError(f"{path}: {name!r}: grown_shape {list(grown_shape)} does not extend "
                                  f"{list(shape)} along dimension 0, or the tensor is not in the base")
            e.grown_shape = grown_shape
            e.grown = fixed(GROWN_PREFIX + name, dtype, (grown_shape[0] - shape[0],) + shape[1:])
        if kind == "whole":
            e.whole = fixed(name, dtype, shape)
        elif kind == "masked":
            if dtype not in FLOAT_DTYPES:
                raise FormatError(f"{path}: {name!r} is masked but {dtype} is not a float dtype")
            kept = info.get("kept")
            if not _is_uint(kept):
                raise FormatError(f"{path}: {name!r}: bad kept count {kept!r}")
            n = numel(shape)
            nchunks = -(-n // chunk)
            values = fixed(name, dtype, (kept,)).array()
            offsets = fixed("sotu/offsets/" + name, "U64", (nchunks + 1,)).array()
            if offsets[0] != 0 or offsets[-1] != kept:
                raise FormatError(f"{path}: {name!r}: offsets must start at 0 and end at kept")
            if np.any(np.diff(offsets.astype(np.int64)) < 0):
                raise FormatError(f"{path}: {name!r}: offsets decrease")
            # Walk each chunk and check it consumes exactly offsets[j+1] - offsets[j] values.
            mask = kept_mask(seed, prefix + name, n, lo, hi)  # §15: keyed by the stored key
            walked = _offsets(mask, n, chunk)
            bad = np.flatnonzero(walked != offsets)
            if bad.size:
                j = int(bad[0]) - 1
                raise FormatError(f"{path}: {name!r}: chunk {j} walk ends at {walked[j + 1]}, offsets say {offsets[j + 1]}")
            e.kept, e.values, e.offsets = kept, values, offsets
            e.indices = np.flatnonzero(mask).astype(np.uint64)
        entries[name] = e
    for k in tensors:
        if k.startswith(prefix + GROWN_PREFIX):
            grown = k[len(prefix + GROWN_PREFIX):]
            e = entries.get(grown)
            if e is None or e.grown_shape is None:
                raise FormatError(f"{path}: tensor {k!r}: no entry grows {grown!r}")
    return entries, hashes, stats


def decode_delta(path):
    """Parse and validate a delta, a file or a folder (§1-§7, §10, §12, §13). Returns a Delta;
    raises FormatError on any violation a reader must refuse."""
    meta, tensors, folder_files = read_checkpoint(path)
    if meta is None:
        raise FormatError(f"{path}: no __metadata__")
    if meta.get("format") != FORMAT:
        raise FormatError(f"{path}: format is {meta.get('format')!r}, not {FORMAT!r}")
    version = meta.get("format_version", "")
    parts = version.split(".")
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
        raise FormatError(f"{path}: bad format_version {version!r}")
    if int(parts[0]) != FORMAT_MAJOR:  # a larger minor only adds keys: still readable
        raise FormatError(f"{path}: format_version {version} has an unknown major version")
    if meta.get("mask") != MASK_NAME:
        raise FormatError(f"{path}: unknown mask function {meta.get('mask')!r}")
    seed = _decimal(meta, "seed", path)
    lo, hi, chunk = (_decimal(meta, k, path) for k in ("lo", "hi", "chunk"))
    if seed >= 1 << 64:
        raise FormatError(f"{path}: seed does not fit in u64")
    if not (0 <= lo <= hi <= TWO32):
        raise FormatError(f"{path}: need 0 <= lo <= hi <= 2^32, got lo={lo} hi={hi}")
    if chunk < 1:
        raise FormatError(f"{path}: chunk must be >= 1")
    try:
        table = json.loads(meta.get("tensors", ""), object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: metadata 'tensors' is not JSON: {e}") from None
    if not isinstance(table, dict):
        raise FormatError(f"{path}: metadata 'tensors' is not a JSON object")

    entries, hashes, stats = _decode_table(path, table, tensors, seed, lo, hi, chunk)
    subfolders = {}
    if "subfolders" in meta:  # §15
        try:
            subs = json.loads(meta["subfolders"], object_pairs_hook=_reject_duplicate_keys)
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}: metadata 'subfolders' is not JSON: {e}") from None
        if not isinstance(subs, dict):
            raise FormatError(f"{path}: metadata 'subfolders' is not a JSON object")
        for p, rec in subs.items():
            if not SUBFOLDER_PATH.fullmatch(p) or not 2 <= len(p.split("/")) <= 9 \
                    or any(c.startswith(".") for c in p.split("/")):
                raise FormatError(f"{path}: subfolder file {p!r}: not a valid path")
            if any(o.startswith(p + "/") for o in subs):
                raise FormatError(f"{path}: subfolder file {p!r} is also a folder")
            if not isinstance(rec, dict) or set(rec) != {"tensors"} or not isinstance(rec["tensors"], dict):
                raise FormatError(f"{path}: subfolder file {p!r}: not {{\"tensors\": {{...}}}}")
            sub = _decode_table(f"{path}: {p}", rec["tensors"], tensors, seed, lo, hi, chunk,
                                prefix=SUB_PREFIX + p + "/")
            subfolders[p] = Delta(seed, lo, hi, chunk, *sub)
    for k in tensors:
        if k.startswith(SUB_PREFIX) and not any(k.startswith(SUB_PREFIX + p + "/") for p in subfolders):
            raise FormatError(f"{path}: tensor {k!r}: no subfolder file accounts for it")
    files = _own_files(path, meta, tensors, folder_files)
    return Delta(seed, lo, hi, chunk, entries, hashes, stats, meta, files, subfolders)


# --------------------------------------------------------------------------------------------
# Merge (§8, §9)
# --------------------------------------------------------------------------------------------

def merge(base_path, delta_paths, weights=None, rescale=False, out_dtype=None, force=False):
    """The tensors `merge` must write (§8): {name: (dtype, shape, raw bytes)}.

    delta_paths: paths or decoded Delta objects, in command-line order. out_dtype: None or
    "F32"/"F16"/"BF16"/"F64" (lower case accepted too). force: accept base hash mismatches.
    Output metadata (§9) is not produced here.
    """
    base = base_path if isinstance(base_path, dict) else read_checkpoint(base_path)[1]
    deltas = [d if isinstance(d, Delta) else decode_delta(d) for d in delta_paths]
    if weights is None:
        weights = [1.0] * len(deltas)
    weights = [float(w) for w in weights]
    if len(weights) != len(deltas):
        raise ValueError("one weight per delta")
    if out_dtype is not None:
        out_dtype = out_dtype.upper()
        if out_dtype not in FLOAT_DTYPES:
            raise ValueError(f"--dtype {out_dtype} is not one of F32, F16, BF16, F64")

    # c_t = w_t * s_t, one f64 rounding each; s_t = 2^32 / (hi - lo) is itself one division.
    coeffs = []
    for d, w in zip(deltas, weights):
        s = 4294967296.0 / float(d.hi - d.lo) if rescale and d.hi != d.lo else 1.0
        coeffs.append(w * s)

    # Every delta must have been extracted from this base (§7).
    for t, d in enumerate(deltas):
        for name in base:
            if name not in d.entries or not d.entries[name].in_base:
                raise FormatError(f"delta {t}: base tensor {name!r} is not recorded as in the base")
        for name, e in d.entries.items():
            if e.in_base and name not in base:
                raise FormatError(f"delta {t}: {name!r} is missing from the base")
            if e.in_base and (base[name].dtype, base[name].shape) != (e.dtype, e.shape):
                raise FormatError(f"delta {t}: {name!r} has another dtype or shape than the base")
            if e.in_base:
                h = np.frombuffer(blake3.blake3(base[name].data).digest(), dtype=np.uint8)
                if not np.array_equal(h, d.base_hashes[e.row]) and not force:
                    raise FormatError(f"delta {t}: base tensor {name!r} does not match the delta's base hash")

    def output_dtype(dtype):
        return out_dtype if (out_dtype is not None and dtype in FLOAT_DTYPES) else dtype

    out = {}
    for name, b in base.items():
        if b.dtype not in FLOAT_DTYPES:
            # A `whole` entry replaces a non-float tensor outright; weights do not apply.
            reps = [d.entries[name].whole for d in deltas if d.entries[name].kind == "whole"]
            t = _single_replacement(name, reps) if reps else b
            out[name] = (t.dtype, t.shape, t.data)
            continue
        # Float: every element a delta keeps goes through acc and the single final rounding;
        # an element no delta keeps stays the base's bits when the dtype is unchanged (§8).
        bv = to_f64(b.dtype, b.data)
        touched = np.zeros(bv.size, dtype=bool)
        # acc starts at -0.0, the additive identity (-0.0 + x == x for every x), so an element
        # no delta keeps comes out as round(b): b itself when the dtype is unchanged, -0.0 too.
        acc = np.full(bv.size, -0.0, dtype=np.float64)
        for d, w, c in zip(deltas, weights, coeffs):
            e = d.entries[name]
            if e.kind == "same":
                continue
            if e.kind == "masked":
                idx, vals = e.indices.astype(np.intp), e.values
            else:  # whole, in the base, float: every element kept, never rescaled (s_t = 1)
                idx, vals, c = np.arange(bv.size), e.whole.array(), w
            # Three separate numpy operations = three IEEE roundings, no FMA, in spec order.
            diff = to_f64(e.dtype, vals) - bv[idx]
            term = c * diff
            acc[idx] = acc[idx] + term
            touched[idx] = True
        dt = output_dtype(b.dtype)
        rounded = round_to_bytes(bv + acc, dt)
        if dt == b.dtype:
            size = DTYPES[dt][0]  # an explicit row width: an empty tensor has no -1 to infer
            raw = np.frombuffer(b.data, dtype=np.uint8).reshape(bv.size, size).copy()
            new_raw = np.frombuffer(rounded, dtype=np.uint8).reshape(bv.size, size)
            raw[touched] = new_raw[touched]
            rounded = raw.tobytes()
        out[name] = (dt, b.shape, rounded)

    # §12: the new rows of grown tensors, after the part the base has.
    for name in base:
        out[name] = with_grown_rows(name, deltas, out[name])

    # Tensors new in the fine-tunes: not in the base, stored whole.
    new = {}
    for d in deltas:
        for name, e in d.entries.items():
            if not e.in_base:
                new.setdefault(name, []).append(e.whole)
    for name, reps in new.items():
        t = _single_replacement(name, reps)
        dt = output_dtype(t.dtype)
        if dt != t.dtype:
            # Interpretation: --dtype applies to every float tensor of the output, new ones too;
            # the conversion is the same single rounding through f64.
            out[name] = (dt, t.shape, round_to_bytes(to_f64(t.dtype, t.data), dt))
        else:
            out[name] = (t.dtype, t.shape, t.data)
    return out


def subfolder_view(delta, path, base):
    """§15: delta `delta` (decoded) of subfolder weight file `path`, whose base checkpoint's
    tensors are `base` ({name: Tensor}): its record of the file, or, when it records none, a
    delta that leaves every tensor as the base (every entry `same`), which contributes nothing."""
    if path in delta.subfolders:
        return delta.subfolders[path]
    names = sorted(base)
    entries = {n: Entry("same", base[n].dtype, base[n].shape, row, True) for row, n in enumerate(names)}
    hashes = np.array([np.frombuffer(blake3.blake3(base[n].data).digest(), dtype=np.uint8)
                       for n in names], dtype=np.uint8).reshape(len(names), 32)
    return Delta(delta.seed, delta.lo, delta.hi, delta.chunk, entries, hashes,
                 np.zeros((len(names), 3)))


def merge_subfolder(base_folder, delta_paths, path, **kw):
    """§15: the tensors `merge` must write into subfolder weight file `path` of a folder output
    from base folder `base_folder`: the merge (§8, or `method` through merge_method) of the
    base's file with each delta's record of it. kw: as merge's, or method=... for
    merge_method."""
    base = read_checkpoint(os.path.join(base_folder, path))[1]
    deltas = [d if isinstance(d, Delta) else decode_delta(d) for d in delta_paths]
    views = [subfolder_view(d, path, base) for d in deltas]
    method = kw.pop("method", "sum")
    if method == "sum":
        return merge(base, views, **kw)
    return merge_method(base, views, method=method, **kw)


def with_grown_rows(name, deltas, part):
    """§12: the output tensor `name` from `part` = (dtype, base shape, bytes), the part the base
    has as §8 (or a method) made it, followed by the new rows of the deltas that grow it: the
    stored rows as they are (weights and rescale do not apply), rounded once to the output dtype
    when it differs. Several growing deltas must record the same grown_shape and the same rows."""
    growing = [(t, d.entries[name]) for t, d in enumerate(deltas) if d.entries[name].grown_shape is not None]
    if not growing:
        return part
    t0, first = growing[0]
    for t, e in growing[1:]:
        if e.grown_shape != first.grown_shape or e.grown.data != first.grown.data:
            raise FormatError(f"deltas {t0} and {t} grow {name!r} differently")
    dt, _, data = part
    rows = first.grown
    if dt != rows.dtype:  # --dtype: the single rounding of the value as f64
        extra = round_to_bytes(to_f64(rows.dtype, rows.data), dt)
    else:
        extra = rows.data
    return (dt, first.grown_shape, data + extra)


def _single_replacement(name, tensors):
    first = tensors[0]
    for t in tensors[1:]:
        if (t.dtype, t.shape, t.data) != (first.dtype, first.shape, first.data):
            raise FormatError(f"deltas disagree on the replacement of {name!r}")
    return first


def apply(base_path, delta_path, out_dtype=None, force=False, rescale=True):
    """`apply`: the merge of one delta with weight 1 (§8). By default it rescales kept differences
    by 1/density, i.e. it is `merge --rescale` of that one delta; rescale=False is
    `apply --no-rescale` (the fine-tuned value at every kept element, the base elsewhere)."""
    return merge(base_path, [delta_path], rescale=rescale, out_dtype=out_dtype, force=force)


def read_tensors(path):
    """{name: (dtype, shape, raw bytes)} of a checkpoint, the shape merge() returns."""
    return {k: (t.dtype, t.shape, t.data) for k, t in read_checkpoint(path)[1].items()}


# --------------------------------------------------------------------------------------------
# Merge methods: ties, iso, tsv (docs/METHODS.md)
# --------------------------------------------------------------------------------------------
#
# Written from docs/METHODS.md alone. `ties` is elementwise f64 arithmetic plus a per-task order
# statistic, computed here in exactly the documented order (one numpy operation per IEEE
# operation), so it is a bit-for-bit target. `iso` and `tsv` use numpy.linalg.svd (LAPACK) in
# f64; the binary is held to them within the tolerance of METHODS.md, not bit for bit.

METHODS = ("sum", "ties", "iso", "tsv")
DEFAULT_ALPHA = 1.0
DEFAULT_TRIM = 0.2


class UsageError(ValueError):
    """What the command line refuses with exit status 2."""


class NonFiniteError(FormatError):
    """A τ that is NaN or infinite: the merge fails (exit 1), naming the delta and the tensor."""


def _as_delta(d):
    return d if isinstance(d, Delta) else decode_delta(d)


def method_tensors(base, deltas):
    """{name: [indices of the contributing deltas]} for the output tensors a method other than
    `sum` applies to (METHODS.md "Which tensors a method applies to"): float tensors of the base
    (the computed ones of FORMAT.md §8) to which at least one delta contributes, and to which
    every contributing delta brings a `masked` term. A `same` entry contributes nothing (§8).
    Empty tensors are left out: they are written empty whatever the method."""
    base = base if isinstance(base, dict) else read_checkpoint(base)[1]
    deltas = [_as_delta(d) for d in deltas]
    out = {}
    for name, b in base.items():
        if b.dtype not in FLOAT_DTYPES or b.numel == 0:
            continue
        kinds = [d.entries[name].kind for d in deltas]
        contributing = [t for t, k in enumerate(kinds) if k != "same"]
        if contributing and all(kinds[t] == "masked" for t in contributing):
            out[name] = contributing
    return out


def estimate(delta, name, bv, what="delta", unbiased=True):
    """The unbiased estimate τ of METHODS.md for one tensor of one delta, as a flat f64 array:
    s · (v − b) at the kept elements (one rounding each, no FMA), +0.0 elsewhere, with
    s = 2^32 / (hi − lo). Raises NonFiniteError if any τ is NaN or infinite.
    unbiased=False (tests only): s = 1, the plain kept difference."""
    e = delta.entries[name]
    assert e.kind == "masked", (name, e.kind)
    tau = np.zeros(bv.size, dtype=np.float64)  # +0.0 where the delta does not keep the element
    if delta.hi == delta.lo:
        return tau  # keeps nothing
    s = 4294967296.0 / float(delta.hi - delta.lo) if unbiased else 1.0
    idx = e.indices.astype(np.intp)
    with np.errstate(all="ignore"):
        diff = to_f64(e.dtype, e.values) - bv[idx]
        tau[idx] = s * diff
    bad = np.flatnonzero(~np.isfinite(tau))
    if bad.size:
        raise NonFiniteError(f"{what}: {name!r}: the estimate is not finite at element {int(bad[0])}")
    return tau


def round_half_even(x):
    """Round half to even (np.rint), for k = round_half_even(K · n) of ties."""
    return int(np.rint(np.float64(x)))


def ties_delta(taus, weights, alpha=DEFAULT_ALPHA, trim=DEFAULT_TRIM, normalize=True):
    """METHODS.md `ties` steps 1-3 on one tensor, in f64, in the documented order; without
    `normalize` (METHODS.md "Without normalization"), m = N.

    taus: list of T flat f64 arrays (one per task, task order); weights: T floats.
    Returns (am, qualifies): am = α · m per element (one rounding), and the boolean mask of the
    elements where at least one task qualifies (elsewhere the output is the base element)."""
    taus = [np.asarray(t, dtype=np.float64) for t in taus]
    n = taus[0].size
    if not (0.0 < float(trim) <= 1.0):
        raise UsageError(f"--trim {trim} is not in (0, 1]")
    # 1. Trim, per task: keep the elements whose magnitude is at least the k-th largest.
    k = max(1, round_half_even(float(trim) * float(n)))  # the product in f64
    trimmed = []
    for tau in taus:
        mag = np.abs(tau)
        theta = np.sort(mag)[::-1][k - 1]  # k-th largest, counting repeats
        trimmed.append(np.where(mag >= theta, tau, 0.0))  # 0.0 is +0.0
    # 2. Elect: S = Σ w_t · τ̃_t from +0.0 in task order (each product rounded, then each sum).
    S = np.zeros(n, dtype=np.float64)
    for tt, w in zip(trimmed, weights):
        S = S + np.float64(w) * tt
    positive = S >= 0.0  # the elected sign: +1 where S >= 0 (a zero sum elects +1), else -1
    # 3. Merge over the tasks that qualify: τ̃_t ≠ 0 with the elected sign.
    N = np.zeros(n, dtype=np.float64)
    D = np.zeros(n, dtype=np.float64)
    any_q = np.zeros(n, dtype=bool)
    for tt, w in zip(trimmed, weights):
        q = (tt != 0.0) & np.where(positive, tt > 0.0, tt < 0.0)
        N = np.where(q, N + np.float64(w) * tt, N)
        D = np.where(q, D + np.float64(w), D)
        any_q |= q
    with np.errstate(divide="ignore", invalid="ignore"):
        m = np.where(D == 0.0, 0.0, N / np.where(D == 0.0, 1.0, D)) if normalize else N
    return np.float64(alpha) * m, any_q


def _svd(x):
    """Thin SVD in f64 (LAPACK through numpy)."""
    return np.linalg.svd(np.asarray(x, dtype=np.float64), full_matrices=False)


def polar(x, svd=_svd):
    """polar(X) = P Qᵀ where X = P Σ Qᵀ is the thin SVD."""
    p, _, qt = svd(x)
    return p @ qt


def _weighted_sum(taus, weights):
    """Σ_t w_t · τ_t, elementwise in f64 from +0.0 in task order (product rounded, then sum)."""
    acc = np.zeros_like(np.asarray(taus[0], dtype=np.float64))
    for tau, w in zip(taus, weights):
        acc = acc + np.float64(w) * np.asarray(tau, dtype=np.float64)
    return acc


def _mean_path(taus, weights, alpha):
    """R = α · (Σ_t w_t · τ_t) / T: the path of iso and tsv for a float tensor that is not 2-D."""
    return (np.float64(alpha) * _weighted_sum(taus, weights)) / np.float64(len(taus))


def iso_delta(taus, weights, shape, alpha=DEFAULT_ALPHA, svd=_svd):
    """METHODS.md `iso` (Iso-C): R for one tensor, flat f64. taus: flat f64 arrays."""
    if len(shape) != 2:
        return _mean_path(taus, weights, alpha)
    M = _weighted_sum(taus, weights).reshape(shape)
    u_, sigma, vt = svd(M)
    R = (np.float64(alpha) * np.mean(sigma)) * (u_ @ vt)
    return R.reshape(-1)


def tsv_delta(taus, weights, shape, alpha=DEFAULT_ALPHA, svd=_svd):
    """METHODS.md `tsv` (TSV-M): R for one tensor, flat f64. taus: flat f64 arrays, one per delta.

    T is the number of deltas, zero ones included (k = max(1, ⌊r/T⌋)). A task whose w·τ is zero
    everywhere (a `same` delta; a zero weight) brings no triplets to the stack: its singular
    vectors are arbitrary, and METHODS.md leaves this case open (this reading is the one that
    makes the result well defined)."""
    if len(shape) != 2:
        return _mean_path(taus, weights, alpha)
    m, n = shape
    T = len(taus)
    r = min(m, n)
    k = max(1, r // T)
    us, ss, vs = [], [], []
    for tau, w in zip(taus, weights):
        wt = np.float64(w) * np.asarray(tau, dtype=np.float64)
        if not np.any(wt):
            continue
        u_, s, vt = svd(wt.reshape(shape))
        us.append(u_[:, :k])
        ss.append(s[:k])
        vs.append(vt[:k].T)
    if not us:
        return np.zeros(m * n, dtype=np.float64)
    U_hat, s_hat, V_hat = np.hstack(us), np.concatenate(ss), np.hstack(vs)
    R = np.float64(alpha) * ((polar(U_hat, svd) * s_hat) @ polar(V_hat, svd).T)
    return R.reshape(-1)


def merge_method(base_path, delta_paths, method="sum", weights=None, alpha=None, trim=None,
                 out_dtype=None, force=False, rescale=False, unbiased=True, delta_names=None,
                 residuals=None, normalize=True):
    """The tensors `merge --method METHOD` must write: {name: (dtype, shape, raw bytes)}, like
    merge().

    alpha, trim: None means "not given" (defaults 1 and 0.2); giving one to a method that does
    not take it is a UsageError, as are --rescale with a method other than sum and a method other
    than sum with fewer than two deltas (METHODS.md "Options").

    Tensors the method does not apply to (method_tensors) are merged exactly as `sum` merges them
    (weights apply, no rescale). For the others, every delta is one of the T tasks (T = the
    number of deltas, as in FORMAT.md §8): a `masked` one enters as its unbiased estimate τ, a
    `same` one (its fine-tune equals the base) as τ = +0.0 everywhere. This matters for the mean
    path of iso/tsv ((Σ w τ)/T) and tsv's k; see tsv_delta for a zero task's triplets.

    unbiased=False (tests only) drops the 1/density factor of τ, to show that it matters.
    delta_names: labels for error messages (default: the paths).
    residuals: a dict to receive {name: R (flat f64)} for the tensors the method applies to: what
    it adds to the base (for ties α·m where a task qualifies, else 0)."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}")
    deltas = [_as_delta(d) for d in delta_paths]
    if delta_names is None:
        delta_names = [str(d) if not isinstance(d, Delta) else f"delta {t}" for t, d in enumerate(delta_paths)]
    if method == "sum":
        if alpha is not None or trim is not None:
            raise UsageError("--alpha and --trim do not apply to --method sum")
        return merge(base_path, deltas, weights=weights, rescale=rescale, out_dtype=out_dtype, force=force)
    if rescale:
        raise UsageError(f"--rescale applies to --method sum only, not {method}")
    if trim is not None and method != "ties":
        raise UsageError(f"--trim applies to --method ties only, not {method}")
    if len(deltas) < 2:
        raise UsageError(f"--method {method} needs at least two deltas")
    alpha = DEFAULT_ALPHA if alpha is None else float(alpha)
    trim = DEFAULT_TRIM if trim is None else float(trim)
    if method == "ties" and not (0.0 < trim <= 1.0):
        raise UsageError(f"--trim {trim} is not in (0, 1]")
    weights = [1.0] * len(deltas) if weights is None else [float(w) for w in weights]

    # Everything sum does (checks, non-float, new and non-applicable tensors) first; the tensors
    # the method applies to are then replaced.
    out = merge(base_path, deltas, weights=weights, rescale=False, out_dtype=out_dtype, force=force)
    base = base_path if isinstance(base_path, dict) else read_checkpoint(base_path)[1]
    for name, contributing in method_tensors(base, deltas).items():
        b = base[name]
        dt = out[name][0]
        bv = to_f64(b.dtype, b.data)
        taus = [estimate(deltas[t], name, bv, what=delta_names[t], unbiased=unbiased) if t in contributing
                else np.zeros(bv.size, dtype=np.float64) for t in range(len(deltas))]
        ws = weights
        if method == "ties":
            am, q = ties_delta(taus, ws, alpha, trim, normalize)
            # Where a task qualifies: round(b + α·m); elsewhere the base element as sum leaves it
            # (its own bits when the dtype is unchanged, else round(b)).
            val = np.where(q, bv + am, bv)
            size = DTYPES[dt][0]
            rounded = np.frombuffer(round_to_bytes(val, dt), dtype=np.uint8).reshape(bv.size, size).copy()
            if dt == b.dtype:
                raw = np.frombuffer(b.data, dtype=np.uint8).reshape(bv.size, size)
                rounded[~q] = raw[~q]
            data = rounded.tobytes()
            R = np.where(q, am, 0.0)
        else:
            f = iso_delta if method == "iso" else tsv_delta
            R = f(taus, ws, b.shape, alpha)
            data = round_to_bytes(bv + R, dt)  # every element
        out[name] = with_grown_rows(name, deltas, (dt, b.shape, data))
        if residuals is not None:
            residuals[name] = R
    return out


def method_residual(base_path, delta_paths, method, weights=None, alpha=None, trim=None):
    """{name: R as a flat f64 array} for the tensors a method applies to: what it adds to the
    base (for ties, α·m where a task qualifies, else 0). Used for the F64 tolerance of iso and
    tsv: 1e-9 of the tensor's max |R|."""
    residuals = {}
    merge_method(base_path, delta_paths, method, weights=weights, alpha=alpha, trim=trim, residuals=residuals)
    return residuals
