//! The mask's keep bits (docs/FORMAT.md section 4), its one vector kernel beside its portable
//! twin and their test (the other kernels are in [`crate::simd`]): bit `k` of a word is whether the `k`-th of
//! 64 mask values lies in the keep interval. By AVX-512 F where the CPU has it (`mix32` on 16
//! lanes, and the interval test as a compare into a mask register, which is the keep bits
//! themselves), else by the portable loops, which leave the packing of flags into bits to a
//! multiply that AMD Zen 4 runs slowly (70% of their time).

use super::SPAN;
use crate::simd::isa;

/// Keep bits of consecutive 32-bit counters from `first` under block constant `c`, against
/// `[lo, lo + width)`, 64 per word; every word is filled whole.
#[inline]
pub fn fill_keep_words(first: u32, c: u32, lo: u32, width: u64, words: &mut [u64]) {
    if width < SPAN && isa::avx512() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 F (checked at run time).
        unsafe {
            avx512::fill_keep_words(first, c, lo, width as u32, words)
        };
    } else {
        portable::fill_keep_words(first, c, lo, width, words);
    }
}

/// Keep bits of the mask values `us` against `[lo, lo + width)`, 64 per word (`words` holds
/// `us.len().div_ceil(64)`); bits past the end of `us` are clear.
#[inline]
pub fn pack_keep_words(us: &[u32], lo: u32, width: u64, words: &mut [u64]) {
    if width < SPAN && isa::avx512() {
        let whole = us.len() / 64;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 F (checked at run time).
        unsafe {
            avx512::pack_keep_words(&us[..whole * 64], lo, width as u32, &mut words[..whole])
        };
        portable::pack_keep_words(&us[whole * 64..], lo, width, &mut words[whole..]);
    } else {
        portable::pack_keep_words(us, lo, width, words);
    }
}

mod portable {
    use crate::mask::{SPAN, mix32};

    crate::simd::multiversioned! {
        /// Keep bits of consecutive 32-bit counters from `first`, 64 per word. One portable
        /// loop, compiled for AVX-512, AVX2 and the baseline and chosen at run time: it hashes
        /// 8 or 16 lanes at a time.
        pub fn fill_keep_words(first: u32, c: u32, lo: u32, width: u64, words: &mut [u64]) {
            if width >= SPAN {
                words.fill(!0);
                return;
            }
            let width = width as u32;
            for (w, word) in words.iter_mut().enumerate() {
                let base = first.wrapping_add((w as u32) << 6);
                let mut flags = [0u8; 64];
                for (k, flag) in flags.iter_mut().enumerate() {
                    let u = mix32(base.wrapping_add(k as u32) ^ c);
                    *flag = (u.wrapping_sub(lo) < width) as u8;
                }
                *word = pack_flags(&flags);
            }
        }
    }

    crate::simd::multiversioned! {
        /// Keep bits of `us` against `[lo, lo + width)`, 64 per word.
        pub fn pack_keep_words(us: &[u32], lo: u32, width: u64, words: &mut [u64]) {
            if width >= SPAN {
                words.fill(!0);
                let tail = us.len() % 64;
                if tail != 0 {
                    *words.last_mut().unwrap() = (1u64 << tail) - 1;
                }
                return;
            }
            let width = width as u32;
            let flag = |u: u32| (u.wrapping_sub(lo) < width) as u8;
            // Whole words with a fixed trip count (which vectorizes), then the tail.
            let full = us.chunks_exact(64);
            let tail = full.remainder();
            for (word, us) in words.iter_mut().zip(full) {
                let us: &[u32; 64] = us.try_into().unwrap();
                *word = pack_flags(&us.map(flag));
            }
            if !tail.is_empty() {
                let mut flags = [0u8; 64];
                for (f, &u) in flags.iter_mut().zip(tail) {
                    *f = flag(u);
                }
                *words.last_mut().unwrap() = pack_flags(&flags);
            }
        }
    }

    /// 64 flags of 0 or 1 as the bits of a word (flag `k` is bit `k`): eight bytes at a time,
    /// the multiply gathers byte `i`'s low bit into bit `56 + i` without carries.
    #[inline(always)]
    fn pack_flags(flags: &[u8; 64]) -> u64 {
        let mut word = 0u64;
        for (g, bytes) in flags.chunks_exact(8).enumerate() {
            let x = u64::from_le_bytes(bytes.try_into().unwrap());
            word |= (x.wrapping_mul(0x0102_0408_1020_4080) >> 56) << (8 * g);
        }
        word
    }
}

/// The keep bits with AVX-512 F, for `width < 2^32`.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `mix32` (docs/FORMAT.md section 4) on 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn mix32(mut x: __m512i) -> __m512i {
        x = _mm512_xor_si512(x, _mm512_srli_epi32::<16>(x));
        x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x21f0aaad));
        x = _mm512_xor_si512(x, _mm512_srli_epi32::<15>(x));
        x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x735a2d97));
        _mm512_xor_si512(x, _mm512_srli_epi32::<15>(x))
    }

    /// Bits `k` of a 16-lane group: `u − lo < width`, as unsigned 32-bit integers.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn kept(u: __m512i, lo: u32, width: u32) -> u64 {
        let d = _mm512_sub_epi32(u, _mm512_set1_epi32(lo as i32));
        _mm512_cmplt_epu32_mask(d, _mm512_set1_epi32(width as i32)) as u64
    }

    /// As the portable `fill_keep_words`, for `width < 2^32`; every word is filled whole.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fill_keep_words(first: u32, c: u32, lo: u32, width: u32, words: &mut [u64]) {
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let c = _mm512_set1_epi32(c as i32);
        for (w, word) in words.iter_mut().enumerate() {
            let base = first.wrapping_add((w as u32) << 6);
            let mut bits = 0u64;
            for q in 0..4 {
                let i =
                    _mm512_add_epi32(_mm512_set1_epi32(base.wrapping_add(16 * q) as i32), lanes);
                bits |= kept(mix32(_mm512_xor_si512(i, c)), lo, width) << (16 * q);
            }
            *word = bits;
        }
    }

    /// As the portable `pack_keep_words`, for `width < 2^32` and whole words: `us` holds
    /// 64 values per word of `words`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack_keep_words(us: &[u32], lo: u32, width: u32, words: &mut [u64]) {
        assert_eq!(us.len(), 64 * words.len());
        for (word, us) in words.iter_mut().zip(us.chunks_exact(64)) {
            let mut bits = 0u64;
            for q in 0..4 {
                // SAFETY: `us` holds 64 values, 16 read at a time.
                let u = unsafe { _mm512_loadu_si512(us.as_ptr().add(16 * q) as *const __m512i) };
                bits |= kept(u, lo, width) << (16 * q);
            }
            *word = bits;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 keep bits equal the portable loops' on random keys, offsets and intervals,
    /// including empty, one-wide and nearly full ones and intervals that end at 2^32.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_keep_words_match_the_portable_loops() {
        if !isa::avx512() {
            eprintln!("skipped: this CPU has no AVX-512 (the portable loops run)");
            return;
        }
        let mut next = crate::xorshift(0x9e37_79b9_7f4a_7c15u64);
        for round in 0..400 {
            let (first, c) = (next() as u32, next() as u32);
            let lo = [0, 1, u32::MAX, next() as u32][round % 4];
            let width = match round % 5 {
                0 => 0,
                1 => 1,
                2 => SPAN - 1 - lo as u64,
                3 => (SPAN - lo as u64).min(next() % SPAN),
                _ => (SPAN - 1 - lo as u64) / 3,
            } as u32;
            let (mut want, mut got) = (vec![0u64; 17], vec![0u64; 17]);
            portable::fill_keep_words(first, c, lo, width as u64, &mut want);
            unsafe { avx512::fill_keep_words(first, c, lo, width, &mut got) };
            assert_eq!(got, want, "fill: first {first} c {c} lo {lo} width {width}");
            let us: Vec<u32> = (0..17 * 64).map(|_| next() as u32).collect();
            portable::pack_keep_words(&us, lo, width as u64, &mut want);
            unsafe { avx512::pack_keep_words(&us, lo, width, &mut got) };
            assert_eq!(got, want, "pack: lo {lo} width {width}");
        }
    }
}
