//! Kept values moved between their elements and consecutive places: merge's placing path
//! writes each kept value over its element ([`place`], expanding by `vpexpandw`/`vpexpandd`),
//! extract gathers the kept elements of a chunk ([`gather`], compressing by
//! `vpcompressw`/`vpcompressd`). Each takes AVX-512 for whole words when given a [`Kept`]
//! handle, and the scalar loop otherwise.

use super::Kept;
use crate::dtype::elem::Elem;

/// Writes a term's kept values into the tile's value bytes `out` at the set bits of `word`,
/// whose bit `k` is element `k0 + k` (see `merge::for_each_kept_word`).
#[inline]
pub fn place<E: Elem>(simd: Option<&Kept>, k0: usize, word: u64, values: &[u8], out: &mut [u8]) {
    if let Some(x) = simd
        && k0.is_multiple_of(64)
        && (k0 + 64) * E::SIZE <= out.len()
    {
        x.place_word(word, values, &mut out[k0 * E::SIZE..(k0 + 64) * E::SIZE]);
        return;
    }
    let mut bits = word;
    for v in values.chunks_exact(E::SIZE) {
        let k = k0 + bits.trailing_zeros() as usize;
        out[k * E::SIZE..(k + 1) * E::SIZE].copy_from_slice(v);
        bits &= bits - 1;
    }
}

/// Writes the elements of `t` kept by `words` (bit `k` of word `w` is element `64·w + k`) to
/// the start of `out`, in order, and returns how many bytes that is. `out` must have room for
/// one word's worth past them: the AVX-512 path (whole words, when `simd` is given) stores
/// whole vectors.
#[inline]
pub fn gather<E: Elem>(simd: Option<&Kept>, words: &[u64], t: &[u8], out: &mut [u8]) -> usize {
    let n = t.len() / E::SIZE;
    let mut j = 0;
    for (w, &word) in words.iter().enumerate() {
        if let Some(x) = simd
            && (w + 1) * 64 <= n
        {
            let src = &t[w * 64 * E::SIZE..(w + 1) * 64 * E::SIZE];
            x.gather_word(word, src, &mut out[j..j + 64 * E::SIZE]);
            j += word.count_ones() as usize * E::SIZE;
            continue;
        }
        let mut bits = word;
        while bits != 0 {
            let k = w * 64 + bits.trailing_zeros() as usize;
            out[j..j + E::SIZE].copy_from_slice(&t[k * E::SIZE..(k + 1) * E::SIZE]);
            j += E::SIZE;
            bits &= bits - 1;
        }
    }
    j
}

impl Kept {
    /// Writes the elements of `src` (64 little-endian elements) at the set bits of `word` to
    /// the start of `dst`, in order: `word.count_ones()` elements. `dst` must have room for 64
    /// (what lies past the kept ones is scratch).
    #[inline]
    pub fn gather_word(&self, word: u64, src: &[u8], dst: &mut [u8]) {
        assert_eq!(src.len(), 64 * self.size());
        assert!(dst.len() >= 64 * self.size());
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU features were detected when `self` was made; `src` holds 64 elements
        // and `dst` room for 64, and each store writes within the first 64.
        unsafe {
            avx512::gather_word(self.float, word, src.as_ptr(), dst.as_mut_ptr())
        }
    }

    /// Writes the next kept value over element `k` of `out` (64 little-endian elements)
    /// for each set bit `k` of `word`; `values` must hold exactly `word.count_ones()` elements.
    #[inline]
    pub fn place_word(&self, word: u64, values: &[u8], out: &mut [u8]) {
        assert_eq!(out.len(), 64 * self.size());
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU features were detected when `self` was made; the asserts above
        // bound every access (the expanding loads read only as many elements as bits set).
        unsafe {
            avx512::place_word(
                self.float,
                word,
                values.as_ptr(),
                values.len(),
                out.as_mut_ptr(),
            )
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::dtype::Float;
    use crate::simd::x86::{load16, load32};

    /// See [`super::Kept::gather_word`]. 64 elements of `src`, room for 64 in `dst`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,popcnt")]
    pub unsafe fn gather_word(float: Float, word: u64, src: *const u8, dst: *mut u8) {
        // SAFETY (whole body): each step reads one 64-byte vector of `src` and stores one
        // 64-byte vector at most `popcount` of the earlier steps' elements into `dst`, which
        // stays within its 64 elements' room (the compressed lanes first, then zeros).
        unsafe {
            let mut d = dst;
            let (steps, lanes) = match float {
                Float::BF16 | Float::F16 => (2, 32),
                Float::F32 => (4, 16),
                Float::F64 => unreachable!("no handle is made for F64"),
            };
            for q in 0..steps {
                let m = (word >> (lanes * q)) & ((1u64 << lanes) - 1);
                if m == 0 {
                    continue;
                }
                let v = _mm512_loadu_si512(src.add(64 * q) as *const __m512i);
                let c = if lanes == 32 {
                    _mm512_maskz_compress_epi16(m as u32, v)
                } else {
                    _mm512_maskz_compress_epi32(m as u16, v)
                };
                _mm512_storeu_si512(d as *mut __m512i, c);
                d = d.add(m.count_ones() as usize * (64 / lanes));
            }
        }
    }

    /// See [`super::Kept::place_word`]. 64 elements of `out`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,popcnt")]
    pub unsafe fn place_word(float: Float, word: u64, values: *const u8, len: usize, out: *mut u8) {
        // Here, not in the caller, for the POPCNT instruction.
        assert_eq!(len, word.count_ones() as usize * float.size());
        // SAFETY (whole body): `values` holds popcount(word) elements and the expanding
        // loads read exactly as many as their mask has bits; `out` holds 64 elements.
        unsafe {
            match float {
                Float::BF16 | Float::F16 => {
                    let mut p = values as *const i16;
                    for half in 0..2 {
                        let m32 = (word >> (32 * half)) as u32;
                        if m32 == 0 {
                            continue;
                        }
                        let o = out.add(64 * half) as *mut __m512i;
                        let v =
                            _mm512_mask_expand_epi16(_mm512_loadu_si512(o), m32, load16(p, m32));
                        _mm512_storeu_si512(o, v);
                        p = p.add(m32.count_ones() as usize);
                    }
                }
                Float::F32 => {
                    let mut p = values as *const i32;
                    for q in 0..4 {
                        let m16 = (word >> (16 * q)) as u16;
                        if m16 == 0 {
                            continue;
                        }
                        let o = out.add(64 * q) as *mut __m512i;
                        let v =
                            _mm512_mask_expand_epi32(_mm512_loadu_si512(o), m16, load32(p, m16));
                        _mm512_storeu_si512(o, v);
                        p = p.add(m16.count_ones() as usize);
                    }
                }
                Float::F64 => unreachable!("no expander is made for F64"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Kept, gather, place};
    use crate::dtype::Float;

    /// Placing and gathering by AVX-512 move the same elements as the scalar loops, for every
    /// dtype handled and masks from empty to full; so do [`place`] and [`gather`] on either
    /// path (on a CPU without AVX-512 VBMI2, the scalar loops alone are checked).
    #[test]
    fn simd_place_and_gather_match_the_scalar_loops() {
        let mut next = crate::xorshift(0x2545_f491_4f6c_dd1du64);
        for float in [Float::BF16, Float::F16, Float::F32] {
            let x = Kept::for_dtype(float);
            if x.is_none() {
                eprintln!(
                    "skipped for {float:?}: this CPU has no AVX-512 VBMI2 (the scalar loops run)"
                );
            }
            let size = float.size();
            for round in 0..2000 {
                let word = match round % 5 {
                    0 => 0,
                    1 => !0,
                    2 => next() | next(),
                    _ => next() & next(),
                };
                let n = word.count_ones() as usize;
                let bytes = |len: usize, next: &mut dyn FnMut() -> u64| -> Vec<u8> {
                    (0..len).map(|_| next() as u8).collect()
                };
                let src = bytes(64 * size, &mut next);
                let mut want = Vec::new();
                for k in (0..64).filter(|k| (word >> k) & 1 != 0) {
                    want.extend_from_slice(&src[k * size..(k + 1) * size]);
                }
                if let Some(x) = &x {
                    let mut dst = bytes(64 * size, &mut next);
                    x.gather_word(word, &src, &mut dst);
                    assert_eq!(&dst[..n * size], &want[..], "{float:?} gather {word:#x}");
                }
                // The callers' function, on either path, a whole word and a tail.
                for simd in [x.as_ref(), None] {
                    let mut dst = bytes(128 * size, &mut next);
                    let j =
                        crate::with_elem!(float, E => gather::<E>(simd, &[word], &src, &mut dst));
                    assert_eq!(&dst[..j], &want[..], "{float:?} gather {word:#x}");
                    let (cut, first) = (&src[..63 * size], word << 1 >> 1);
                    let j =
                        crate::with_elem!(float, E => gather::<E>(simd, &[first], cut, &mut dst));
                    let tail = first.count_ones() as usize;
                    assert_eq!(
                        &dst[..j],
                        &want[..tail * size],
                        "{float:?} gather {word:#x}"
                    );
                }

                let values = bytes(n * size, &mut next);
                let mut want = src.clone();
                for (j, k) in (0..64).filter(|k| (word >> k) & 1 != 0).enumerate() {
                    want[k * size..(k + 1) * size]
                        .copy_from_slice(&values[j * size..(j + 1) * size]);
                }
                if let Some(x) = &x {
                    let mut out = src.clone();
                    x.place_word(word, &values, &mut out);
                    assert_eq!(out, want, "{float:?} place {word:#x}");
                }
                // The callers' function, on either path.
                for simd in [x.as_ref(), None] {
                    let mut out = src.clone();
                    crate::with_elem!(float, E => place::<E>(simd, 0, word, &values, &mut out));
                    assert_eq!(out, want, "{float:?} place {word:#x}");
                }
            }
        }
    }
}
