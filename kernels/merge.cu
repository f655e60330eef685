// sotu-delta CUDA kernels: the mask function (docs/FORMAT.md section 4), chunk decoding
// (section 6), the merge arithmetic (section 8) and the elementwise half of `ties`
// (docs/METHODS.md), bit for bit as the CPU path in src/merge/cpu.rs and src/merge/methods.rs.
//
// This one file is compiled two ways:
// - at run time by NVRTC (src/merge/cuda/compile.rs), for the GPU;
// - by the host C++ compiler in tests/cuda_host.rs, through tests/cuda_host/shim.h, which defines
//   SOTU_HOST and emulates threads, __syncthreads and warp shuffles, so that the kernel itself is
//   checked against the CPU path on a machine without a GPU.
// So it sticks to a small vocabulary: the SOTU_* macros below, __syncthreads, __shfl_up_sync,
// __shfl_sync, and no library headers.

#ifdef SOTU_HOST
#include "shim.h"
#else
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
#define SOTU_DEV __device__ __forceinline__
#define SOTU_F64_FROM_BITS(x) __longlong_as_double((long long)(x))
#define SOTU_F64_BITS(x) ((u64)__double_as_longlong(x))
#define SOTU_F32_FROM_BITS(x) __int_as_float((int)(x))
#define SOTU_POPC(x) __popc(x)
#define SOTU_ATOMIC_MIN_U64(p, v) atomicMin((p), (v))
#define SOTU_ATOMIC_ADD_U64(p, v) atomicAdd((p), (v))
// Loops over a thread's items and a group's terms are unrolled so that the per-item arrays are
// indexed by constants and stay in registers instead of local memory.
#define SOTU_UNROLL _Pragma("unroll")
// The merge kernels are launched with at most this many threads per block (src/merge/cuda/mod.rs BLOCK):
// the compiler keeps their registers within what such a block may use.
#define SOTU_BOUNDS __launch_bounds__(512)
#endif

// One rounding per operation, round to nearest even, never fused (FORMAT.md section 8). NVRTC
// is also given --fmad=false, but the intrinsics make it independent of the flags.
#define SOTU_ADD(a, b) __dadd_rn((a), (b))
#define SOTU_SUB(a, b) __dsub_rn((a), (b))
#define SOTU_MUL(a, b) __dmul_rn((a), (b))
#define SOTU_DIV(a, b) __ddiv_rn((a), (b))

// Elements per thread per step: 8 consecutive elements (16 bytes of bf16), and 8 keep bits.
#define SOTU_ITEMS 8
// u64 words per term descriptor (layout above sotu_walk_start; src/merge/cuda/launch.rs TermDesc).
#define SOTU_TERM_WORDS 14
// Terms per launch: the running value ranks live in shared memory.
#define SOTU_MAX_TERMS 64
// Masked terms scanned together: four 16-bit counts packed in one u64.
#define SOTU_GROUP 4

// dtype codes, shared with src/merge/cuda/compile.rs.
#define SOTU_F16 0
#define SOTU_BF16 1
#define SOTU_F32 2
#define SOTU_F64 3

// ---------------------------------------------------------------------------------------------
// The mask function (FORMAT.md section 4).

SOTU_DEV u32 sotu_mix32(u32 x) {
    x ^= x >> 16;
    x *= 0x21f0aaadu;
    x ^= x >> 15;
    x *= 0x735a2d97u;
    x ^= x >> 15;
    return x;
}

// The XOR constant of the block of 2^32 elements whose index has high word `high`.
SOTU_DEV u32 sotu_block_const(u32 k0, u32 k1, u32 high) { return sotu_mix32(k1 ^ high) ^ k0; }

SOTU_DEV u32 sotu_u(u32 k0, u32 k1, u64 i) {
    return sotu_mix32((u32)i ^ sotu_block_const(k0, k1, (u32)(i >> 32)));
}

// lo <= u < hi as one unsigned compare; width = hi - lo may be 2^32.
SOTU_DEV bool sotu_in(u32 u, u32 lo, u64 width) { return (u64)(u32)(u - lo) < width; }

// ---------------------------------------------------------------------------------------------
// Exact loads to f64.

SOTU_DEV double sotu_f16_to_f64(u32 h) {
    u32 e = (h >> 10) & 31u, m = h & 1023u;
    double v;
    if (e == 0) {
        v = (double)m * 5.9604644775390625e-08;  // m * 2^-24, exact
    } else if (e == 31) {
        v = SOTU_F64_FROM_BITS(m ? 0x7ff8000000000000ull : 0x7ff0000000000000ull);
    } else {
        v = SOTU_F64_FROM_BITS(((u64)(e - 15 + 1023) << 52) | ((u64)m << 42));
    }
    return (h & 0x8000u) ? -v : v;
}

template <int D>
SOTU_DEV double sotu_load(const unsigned char* p, u64 i) {
    if (D == SOTU_F16) return sotu_f16_to_f64(((const u16*)p)[i]);
    if (D == SOTU_BF16) return (double)SOTU_F32_FROM_BITS((u32)((const u16*)p)[i] << 16);
    if (D == SOTU_F32) return (double)SOTU_F32_FROM_BITS(((const u32*)p)[i]);
    return SOTU_F64_FROM_BITS(((const u64*)p)[i]);
}

// ---------------------------------------------------------------------------------------------
// The single rounding from f64 to the output dtype: round to nearest even, subnormals kept,
// overflow to infinity, canonical NaN. Done in integer arithmetic rather than with conversion
// instructions, so that it is the same code on the device and in the host emulation, and does
// not round twice (f64 -> f32 -> bf16 would).

template <int EB, int MB>
SOTU_DEV u64 sotu_round_small(double x, u64 qnan) {
    const u64 b = SOTU_F64_BITS(x);
    const u64 ax = b & 0x7fffffffffffffffull;
    if (ax > 0x7ff0000000000000ull) return qnan;
    const u64 sgn = (b >> 63) << (EB + MB);
    const u64 inf = (((u64)1 << EB) - 1) << MB;
    if (ax == 0x7ff0000000000000ull) return sgn | inf;
    const int e = (int)(ax >> 52);
    // An f64 subnormal (or zero) is below half the smallest subnormal of every target: zero.
    if (e == 0) return sgn;
    const u64 m = (ax & 0xfffffffffffffull) | (1ull << 52);  // x = m * 2^(e - 1075)
    const int bias = (1 << (EB - 1)) - 1;
    const int te = e - 1023 + bias;  // the target's biased exponent, if x is normal there
    int shift = 52 - MB;
    if (te < 1) shift += 1 - te;  // subnormal in the target: fewer significant bits
    if (shift > 54) return sgn;   // m / 2^shift < 1/2: rounds to zero
    u64 r = m >> shift;
    const u64 rem = m & ((1ull << shift) - 1);
    const u64 half = 1ull << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) r++;
    // With the implicit bit in r, (te - 1) << MB + r is the encoding; a carry out of the
    // significand moves into the exponent, which is right, up to and including infinity.
    u64 enc = te < 1 ? r : ((u64)(te - 1) << MB) + r;
    if (enc >= inf) enc = inf;
    return sgn | enc;
}

template <int D>
SOTU_DEV u64 sotu_round_bits(double x) {
    if (D == SOTU_F16) return sotu_round_small<5, 10>(x, 0x7e00ull);
    if (D == SOTU_BF16) return sotu_round_small<8, 7>(x, 0x7fc0ull);
    if (D == SOTU_F32) return sotu_round_small<8, 23>(x, 0x7fc00000ull);
    return x != x ? 0x7ff8000000000000ull : SOTU_F64_BITS(x);
}

// Whether a finite x becomes +-infinity in dtype D (src/dtype.rs Float::overflows).
template <int D>
SOTU_DEV bool sotu_overflows(double x) {
    const u64 ax = SOTU_F64_BITS(x) & 0x7fffffffffffffffull;
    if (ax >= 0x7ff0000000000000ull) return false;  // inf or NaN
    const double a = SOTU_F64_FROM_BITS(ax);
    if (D == SOTU_F16) return a >= 65520.0;
    if (D == SOTU_BF16) return a >= 0x1.ffp+127;
    if (D == SOTU_F32) return a >= 0x1.ffffffp+127;
    return false;
}

// Whether the result x of an element whose base value is b counts as overflowed (src/dtype.rs
// Float::becomes_nonfinite): b finite, and x infinite or NaN once rounded to dtype D.
template <int D>
SOTU_DEV bool sotu_becomes_nonfinite(double b, double x) {
    if ((SOTU_F64_BITS(b) & 0x7fffffffffffffffull) >= 0x7ff0000000000000ull) return false;
    if ((SOTU_F64_BITS(x) & 0x7fffffffffffffffull) >= 0x7ff0000000000000ull) return true;
    return sotu_overflows<D>(x);
}

template <int D>
SOTU_DEV void sotu_store(unsigned char* p, u64 i, u64 bits) {
    if (D == SOTU_F16 || D == SOTU_BF16) ((u16*)p)[i] = (u16)bits;
    else if (D == SOTU_F32) ((u32*)p)[i] = (u32)bits;
    else ((u64*)p)[i] = bits;
}

template <int D>
SOTU_DEV u64 sotu_raw(const unsigned char* p, u64 i) {
    if (D == SOTU_F16 || D == SOTU_BF16) return ((const u16*)p)[i];
    if (D == SOTU_F32) return ((const u32*)p)[i];
    return ((const u64*)p)[i];
}

// ---------------------------------------------------------------------------------------------
// Block-wide exclusive prefix sum of one u64 per thread (blockDim.x a multiple of 32, at most
// 1024). Every thread calls it (it synchronizes). `sh` holds 32 u64 of shared memory.
// Returns the sum over lower threads; *total gets the block's sum.

SOTU_DEV u64 sotu_block_scan(u64 v, u64* total, u64* sh) {
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    u64 x = v;
    for (u32 d = 1; d < 32; d <<= 1) {
        const u64 y = __shfl_up_sync(0xffffffffu, x, d);
        if (lane >= d) x += y;
    }
    if (lane == 31) sh[warp] = x;
    __syncthreads();
    // Every warp scans the warp sums itself: no divergent shuffles, one barrier fewer.
    u64 w = lane < nw ? sh[lane] : 0;
    for (u32 d = 1; d < 32; d <<= 1) {
        const u64 y = __shfl_up_sync(0xffffffffu, w, d);
        if (lane >= d) w += y;
    }
    const u64 before = __shfl_sync(0xffffffffu, w, warp == 0 ? 0 : warp - 1);
    *total = __shfl_sync(0xffffffffu, w, nw - 1);
    __syncthreads();  // sh is reused by the next scan
    return (warp == 0 ? 0 : before) + x - v;
}

// ---------------------------------------------------------------------------------------------
// The term walk, shared by the merge and ties kernels.
//
// One launch computes elements [first, first + n) of one tensor of `numel` elements. Block b
// computes the slice's elements [b*tile, min((b+1)*tile, n)), walking them in steps of
// blockDim.x * SOTU_ITEMS elements, SOTU_ITEMS consecutive elements per thread.
//
// Term descriptor t (SOTU_TERM_WORDS u64 at terms + t*SOTU_TERM_WORDS), written by
// src/merge/cuda/launch.rs (`TermDesc`) and nowhere else:
//   0 coeff (f64 bits): w_t * s_t for merge, w_t for ties
//   1 masked (1) or whole float term (0)
//   2 k0 | k1 << 32             3 lo                      4 width = hi - lo (<= 2^32)
//   5 chunk C (elements)        6 vbase: value index of the term's first uploaded value
//   7 vpos: where that value is in `values` (elements of the input dtype)
//   8 vcount: values uploaded   9 opos: where offsets[j0] is in `offsets`
//  10 j0: first chunk of the slice   11 rpos: where block 0's start rank is in `ranks`
//  12 ties: s_t, the term's rescale (f64 bits)   13 ties: theta_t, its trim threshold (f64 bits)
// A whole term (every element kept, FORMAT.md section 8) has its values indexed by element:
// vbase = first, vcount = n. Words 12 and 13 are 0 for the merge kernel.
//
// status[0]: the smallest (chunk << 16 | term) whose walk did not end at offsets[chunk + 1]
// (host sets it to ~0); status[1]: count of finite results that overflowed the output dtype.

// run[t] = the value index of term t at the block's first element.
SOTU_DEV void sotu_walk_start(const u64* terms, int nterms, const u64* ranks, u64* run) {
    for (int t = threadIdx.x; t < nterms; t += blockDim.x)
        run[t] = ranks[terms[t * SOTU_TERM_WORDS + 11] + blockIdx.x];
    __syncthreads();
}

// One step of the walk: for each term t in command-line order, this thread's values at its
// items (elements g0 .. g0 + cnt - 1): bit k of `have` says that item k has one, v[k] (the
// term's kept value there, or a whole term's value at the element); then visit(d, have, v),
// d the term's descriptor. Masked terms go SOTU_GROUP at a time, with one block scan per
// group. run[t] is the term's value index at the step's first element; with `advance` the walk
// moves it to the next step's, without it the walk can be repeated over the same step. Every
// thread of the block calls it (it synchronizes).
template <int F, class Visit>
SOTU_DEV void sotu_walk_step(const u64* terms, int nterms, const unsigned char* values,
                             const u64* offsets, u64 numel, u64 g0, int cnt, u64* run,
                             u64* scan_sh, u64* status, bool advance, Visit&& visit) {
    for (int g = 0; g < nterms; g += SOTU_GROUP) {
        const int ng = nterms - g < SOTU_GROUP ? nterms - g : SOTU_GROUP;
        u32 bits[SOTU_GROUP];
        u64 packed = 0;
        SOTU_UNROLL
        for (int q = 0; q < SOTU_GROUP; q++) {
            bits[q] = 0;
            if (q >= ng) continue;
            const u64* d = terms + (g + q) * SOTU_TERM_WORDS;
            if (d[1]) {
                const u32 k0 = (u32)d[2], k1 = (u32)(d[2] >> 32), lo = (u32)d[3];
                const u64 width = d[4];
                // The block constant changes only at multiples of 2^32.
                const u32 c = sotu_block_const(k0, k1, (u32)(g0 >> 32));
                SOTU_UNROLL
                for (int k = 0; k < SOTU_ITEMS; k++) {
                    if (k >= cnt) continue;
                    const u64 i = g0 + k;
                    const u32 ck = (u32)(i >> 32) == (u32)(g0 >> 32)
                                       ? c
                                       : sotu_block_const(k0, k1, (u32)(i >> 32));
                    if (sotu_in(sotu_mix32((u32)i ^ ck), lo, width)) bits[q] |= 1u << k;
                }
                packed |= (u64)SOTU_POPC(bits[q]) << (16 * q);
            }
        }
        u64 total;
        const u64 before = sotu_block_scan(packed, &total, scan_sh);
        SOTU_UNROLL
        for (int q = 0; q < SOTU_GROUP; q++) {
            if (q >= ng) continue;
            const int t = g + q;
            const u64* d = terms + t * SOTU_TERM_WORDS;
            const u64 vbase = d[6], vpos = d[7], vcount = d[8];
            double v[SOTU_ITEMS];
            u32 have = 0;
            SOTU_UNROLL
            for (int k = 0; k < SOTU_ITEMS; k++) v[k] = 0.0;
            if (!d[1]) {
                SOTU_UNROLL
                for (int k = 0; k < SOTU_ITEMS; k++) {
                    if (k >= cnt) continue;
                    const u64 r = g0 + k;
                    if (r >= vbase && r - vbase < vcount) {
                        v[k] = sotu_load<F>(values, vpos + (r - vbase));
                        have |= 1u << k;
                    }
                }
            } else if (cnt > 0) {
                const u64 C = d[5], opos = d[9], j0 = d[10];
                u64 r = run[t] + ((before >> (16 * q)) & 0xffffull);  // my first kept value
                u64 j = g0 / C;  // chunk of element g0
                u64 end = (j + 1) * C;
                if (end > numel) end = numel;
                u64 limit = offsets[opos + (j - j0) + 1];
                SOTU_UNROLL
                for (int k = 0; k < SOTU_ITEMS; k++) {
                    if (k >= cnt) continue;
                    const u64 i = g0 + k;
                    if (i >= end) {  // next chunk
                        j++;
                        end = (j + 1) * C;
                        if (end > numel) end = numel;
                        limit = offsets[opos + (j - j0) + 1];
                    }
                    if ((bits[q] >> k) & 1u) {
                        // Read only where the CPU path reads (j < limit), and only what was
                        // uploaded; anything else is a corrupt chunk, reported below.
                        if (r < limit && r >= vbase && r - vbase < vcount) {
                            v[k] = sotu_load<F>(values, vpos + (r - vbase));
                            have |= 1u << k;
                        }
                        r++;
                    }
                    // The walk of chunk j must end exactly at offsets[j + 1].
                    if (i + 1 == end && r != limit)
                        SOTU_ATOMIC_MIN_U64(&status[0], (j << 16) | (u64)t);
                }
            }
            visit(d, have, v);
        }
        if (advance) {
            __syncthreads();  // every thread has read run[] for this group
            if (threadIdx.x == 0)
                for (int q = 0; q < ng; q++) run[g + q] += (total >> (16 * q)) & 0xffffull;
            // The next read of run[] is after the next scan's barriers: no second barrier.
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The merge kernel (FORMAT.md section 8): out = round(b + sum_t coeff_t * (v_t - b)).

template <int F, int T>
SOTU_DEV void sotu_merge_body(const unsigned char* base, unsigned char* out, u64 first, u64 n,
                              u64 numel, u64 tile, const u64* terms, int nterms,
                              const unsigned char* values, const u64* offsets, const u64* ranks,
                              u64* status) {
    __shared__ u64 run[SOTU_MAX_TERMS];  // value index at the current step's start, per term
    __shared__ u64 scan_sh[32];
    const u64 t0 = (u64)blockIdx.x * tile;
    if (t0 >= n) return;  // uniform per block
    const u64 t1 = t0 + tile < n ? t0 + tile : n;
    sotu_walk_start(terms, nterms, ranks, run);
    u64 overflows = 0;
    const u64 step = (u64)blockDim.x * SOTU_ITEMS;
    for (u64 s = t0; s < t1; s += step) {
        const u64 i0 = s + (u64)threadIdx.x * SOTU_ITEMS;  // slice-local
        const int cnt = i0 >= t1 ? 0 : (t1 - i0 < SOTU_ITEMS ? (int)(t1 - i0) : SOTU_ITEMS);
        const u64 g0 = first + i0;  // global index of my first element
        double b[SOTU_ITEMS], acc[SOTU_ITEMS];
        SOTU_UNROLL
        for (int k = 0; k < SOTU_ITEMS; k++) {
            b[k] = k < cnt ? sotu_load<F>(base, i0 + k) : 0.0;
            acc[k] = -0.0;  // the additive identity (FORMAT.md section 8)
        }
        u32 touched = 0;
        sotu_walk_step<F>(terms, nterms, values, offsets, numel, g0, cnt, run, scan_sh, status,
                          true, [&](const u64* d, u32 have, const double(&v)[SOTU_ITEMS]) {
                              const double coeff = SOTU_F64_FROM_BITS(d[0]);
                              SOTU_UNROLL
                              for (int k = 0; k < SOTU_ITEMS; k++)
                                  if ((have >> k) & 1u)
                                      acc[k] = SOTU_ADD(acc[k], SOTU_MUL(coeff, SOTU_SUB(v[k], b[k])));
                              touched |= have;
                          });
        SOTU_UNROLL
        for (int k = 0; k < SOTU_ITEMS; k++) {
            if (k >= cnt) continue;
            if (F == T) {
                // Untouched elements keep the base's bits, NaN payloads included.
                if ((touched >> k) & 1u) {
                    const double x = SOTU_ADD(b[k], acc[k]);
                    overflows += sotu_becomes_nonfinite<T>(b[k], x);
                    sotu_store<T>(out, i0 + k, sotu_round_bits<T>(x));
                } else {
                    sotu_store<T>(out, i0 + k, sotu_raw<F>(base, i0 + k));
                }
            } else {
                const double x = SOTU_ADD(acc[k], b[k]);
                overflows += sotu_becomes_nonfinite<T>(b[k], x);
                sotu_store<T>(out, i0 + k, sotu_round_bits<T>(x));
            }
        }
    }
    if (overflows) SOTU_ATOMIC_ADD_U64(&status[1], overflows);
}

// ---------------------------------------------------------------------------------------------
// The ties kernel (docs/METHODS.md, `ties`; src/merge/methods.rs `ties` is the reference): the
// elementwise half of ties, with each term's threshold theta_t computed on the host. Per element,
// in f64, with tau_t = s_t * (v_t - b) where term t keeps the element and +0 elsewhere, and
// ~tau_t = tau_t where |tau_t| >= theta_t, +0 elsewhere:
//   S = sum_t w_t * ~tau_t                     from +0, in term order; sign + where S >= 0
//   N = sum w_t * ~tau_t, D = sum w_t          over the terms with ~tau_t != 0 of that sign
//   out = round(b + alpha * (D != 0 ? N / D : 0)) where some term qualifies; else the base
//   element (its bits when the dtype does not change, round(b) otherwise).
// S needs every term before N and D can start, and with up to SOTU_MAX_TERMS terms the ~tau
// cannot all stay in registers: so each step walks the terms twice, the first walk (S) leaving
// run[] where it found it, the second (N, D) advancing it.

// ~tau: s * (v - b) where `kept`, +0 elsewhere, then +0 where its magnitude is below theta.
SOTU_DEV double sotu_trimmed(bool kept, double v, double b, double s, double theta) {
    const double tau = kept ? SOTU_MUL(s, SOTU_SUB(v, b)) : 0.0;
    const double mag = SOTU_F64_FROM_BITS(SOTU_F64_BITS(tau) & 0x7fffffffffffffffull);
    return mag < theta ? 0.0 : tau;
}

template <int F, int T>
SOTU_DEV void sotu_ties_body(const unsigned char* base, unsigned char* out, u64 first, u64 n,
                             u64 numel, u64 tile, const u64* terms, int nterms,
                             const unsigned char* values, const u64* offsets, const u64* ranks,
                             u64* status, double alpha) {
    __shared__ u64 run[SOTU_MAX_TERMS];
    __shared__ u64 scan_sh[32];
    const u64 t0 = (u64)blockIdx.x * tile;
    if (t0 >= n) return;  // uniform per block
    const u64 t1 = t0 + tile < n ? t0 + tile : n;
    sotu_walk_start(terms, nterms, ranks, run);
    u64 overflows = 0;
    const u64 step = (u64)blockDim.x * SOTU_ITEMS;
    for (u64 s = t0; s < t1; s += step) {
        const u64 i0 = s + (u64)threadIdx.x * SOTU_ITEMS;  // slice-local
        const int cnt = i0 >= t1 ? 0 : (t1 - i0 < SOTU_ITEMS ? (int)(t1 - i0) : SOTU_ITEMS);
        const u64 g0 = first + i0;  // global index of my first element
        double b[SOTU_ITEMS], acc[SOTU_ITEMS], den[SOTU_ITEMS];
        SOTU_UNROLL
        for (int k = 0; k < SOTU_ITEMS; k++) {
            b[k] = k < cnt ? sotu_load<F>(base, i0 + k) : 0.0;
            acc[k] = 0.0;  // S, then N: from +0 (docs/METHODS.md)
            den[k] = 0.0;
        }
        // Pass 1: S, the elected sign.
        sotu_walk_step<F>(terms, nterms, values, offsets, numel, g0, cnt, run, scan_sh, status,
                          false, [&](const u64* d, u32 have, const double(&v)[SOTU_ITEMS]) {
                              const double w = SOTU_F64_FROM_BITS(d[0]);
                              const double sc = SOTU_F64_FROM_BITS(d[12]);
                              const double th = SOTU_F64_FROM_BITS(d[13]);
                              SOTU_UNROLL
                              for (int k = 0; k < SOTU_ITEMS; k++) {
                                  const double x = sotu_trimmed((have >> k) & 1u, v[k], b[k], sc, th);
                                  acc[k] = SOTU_ADD(acc[k], SOTU_MUL(w, x));
                              }
                          });
        u32 positive = 0;
        SOTU_UNROLL
        for (int k = 0; k < SOTU_ITEMS; k++) {
            if (acc[k] >= 0.0) positive |= 1u << k;
            acc[k] = 0.0;
        }
        // Pass 2: N and D over the terms that qualify.
        u32 any = 0;
        sotu_walk_step<F>(terms, nterms, values, offsets, numel, g0, cnt, run, scan_sh, status,
                          true, [&](const u64* d, u32 have, const double(&v)[SOTU_ITEMS]) {
                              const double w = SOTU_F64_FROM_BITS(d[0]);
                              const double sc = SOTU_F64_FROM_BITS(d[12]);
                              const double th = SOTU_F64_FROM_BITS(d[13]);
                              SOTU_UNROLL
                              for (int k = 0; k < SOTU_ITEMS; k++) {
                                  const double x = sotu_trimmed((have >> k) & 1u, v[k], b[k], sc, th);
                                  if (x != 0.0 && (x > 0.0) == (bool)((positive >> k) & 1u)) {
                                      acc[k] = SOTU_ADD(acc[k], SOTU_MUL(w, x));
                                      den[k] = SOTU_ADD(den[k], w);
                                      any |= 1u << k;
                                  }
                              }
                          });
        SOTU_UNROLL
        for (int k = 0; k < SOTU_ITEMS; k++) {
            if (k >= cnt) continue;
            if ((any >> k) & 1u) {
                const double m = den[k] != 0.0 ? SOTU_DIV(acc[k], den[k]) : 0.0;
                const double x = SOTU_ADD(b[k], SOTU_MUL(alpha, m));
                overflows += sotu_becomes_nonfinite<T>(b[k], x);
                sotu_store<T>(out, i0 + k, sotu_round_bits<T>(x));
            } else if (F == T) {
                sotu_store<T>(out, i0 + k, sotu_raw<F>(base, i0 + k));
            } else {
                sotu_store<T>(out, i0 + k, sotu_round_bits<T>(b[k]));
            }
        }
    }
    if (overflows) SOTU_ATOMIC_ADD_U64(&status[1], overflows);
}

// Every merge-family entry point takes the same arguments (src/merge/cuda/driver.rs MergeArgs,
// launch_merge): the merge kernel ignores alpha.
#define SOTU_ENTRY_PARAMS                                                                         \
    const unsigned char *base, unsigned char *out, u64 first, u64 n, u64 numel, u64 tile,         \
        const u64 *terms, int nterms, const unsigned char *values, const u64 *offsets,            \
        const u64 *ranks, u64 *status, double alpha
#define SOTU_ENTRY_ARGS base, out, first, n, numel, tile, terms, nterms, values, offsets, ranks, status

#define SOTU_MERGE_ENTRY(FN, TN, F, T)                                                  \
    extern "C" __global__ void SOTU_BOUNDS sotu_merge_##FN##_##TN(SOTU_ENTRY_PARAMS) { \
        (void)alpha;                                                                    \
        sotu_merge_body<F, T>(SOTU_ENTRY_ARGS);                                         \
    }

#define SOTU_TIES_ENTRY(FN, TN, F, T)                                                  \
    extern "C" __global__ void SOTU_BOUNDS sotu_ties_##FN##_##TN(SOTU_ENTRY_PARAMS) { \
        sotu_ties_body<F, T>(SOTU_ENTRY_ARGS, alpha);                                  \
    }

#define SOTU_FAMILY_FROM(E, FN, F) \
    E(FN, f16, F, SOTU_F16)        \
    E(FN, bf16, F, SOTU_BF16)      \
    E(FN, f32, F, SOTU_F32)        \
    E(FN, f64, F, SOTU_F64)

// Every entry point, unless the compiling program selects its own: src/merge/cuda/compile.rs
// compiles one kernel (family, from, to) at a time when it needs it (-DSOTU_SELECTED_ENTRIES
// plus a SOTU_MERGE_ENTRY or SOTU_TIES_ENTRY line), which takes a fraction of the time of all
// thirty-two, and the helpers below alone (-DSOTU_SELECTED_ENTRIES -DSOTU_HELPERS) to check that
// NVRTC and the driver work together.
#ifndef SOTU_SELECTED_ENTRIES
SOTU_FAMILY_FROM(SOTU_MERGE_ENTRY, f16, SOTU_F16)
SOTU_FAMILY_FROM(SOTU_MERGE_ENTRY, bf16, SOTU_BF16)
SOTU_FAMILY_FROM(SOTU_MERGE_ENTRY, f32, SOTU_F32)
SOTU_FAMILY_FROM(SOTU_MERGE_ENTRY, f64, SOTU_F64)
SOTU_FAMILY_FROM(SOTU_TIES_ENTRY, f16, SOTU_F16)
SOTU_FAMILY_FROM(SOTU_TIES_ENTRY, bf16, SOTU_BF16)
SOTU_FAMILY_FROM(SOTU_TIES_ENTRY, f32, SOTU_F32)
SOTU_FAMILY_FROM(SOTU_TIES_ENTRY, f64, SOTU_F64)
#define SOTU_HELPERS 1
#endif
// ---------------------------------------------------------------------------------------------
// Small kernels for the known-answer tests (FORMAT.md section 4) and the rounding checks.
#ifdef SOTU_HELPERS

// out[i] = mix32(in[i])
extern "C" __global__ void sotu_mix32_kernel(const u32* in, u32* out, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = sotu_mix32(in[i]);
}

// out[i] = u(k0, k1, idx[i])
extern "C" __global__ void sotu_u_kernel(u32 k0, u32 k1, const u64* idx, u32* out, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = sotu_u(k0, k1, idx[i]);
}

// out[4i .. 4i+4] = the bits of f64 in[i] rounded to F16, BF16, F32, F64; out[4n + i]: the
// overflow flags (bit d for dtype d).
extern "C" __global__ void sotu_round_kernel(const u64* in, u64* out, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const double x = SOTU_F64_FROM_BITS(in[i]);
        out[4 * i + 0] = sotu_round_bits<SOTU_F16>(x);
        out[4 * i + 1] = sotu_round_bits<SOTU_BF16>(x);
        out[4 * i + 2] = sotu_round_bits<SOTU_F32>(x);
        out[4 * i + 3] = sotu_round_bits<SOTU_F64>(x);
        out[4 * n + i] = (u64)sotu_overflows<SOTU_F16>(x) | ((u64)sotu_overflows<SOTU_BF16>(x) << 1) |
                         ((u64)sotu_overflows<SOTU_F32>(x) << 2);
    }
}
#endif  // SOTU_HELPERS
