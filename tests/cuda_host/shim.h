// Host emulation of the CUDA vocabulary used by kernels/merge.cu, so that the kernel source
// itself runs on a CPU (tests/cuda_host.rs). Compile with -std=c++17 -ffp-contract=off.
//
// Each block's threads are fibers (ucontext) run in one OS thread; __syncthreads passes control
// round robin to the next thread of the block, so each runs up to its next barrier while the
// others wait there: the semantics of a block-wide barrier, for kernels whose barriers are
// reached by all threads (CUDA requires that too). Warp shuffles go through a slot array and two
// barriers. Blocks run one after another, so `__shared__` can be `static`, and atomics are plain.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <ucontext.h>
#include <vector>

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define SOTU_DEV static inline
#define SOTU_UNROLL
#define SOTU_BOUNDS

struct SotuDim3 {
    unsigned x, y, z;
};
static SotuDim3 threadIdx, blockIdx, blockDim, gridDim;

static inline double sotu_host_f64(u64 x) {
    double d;
    std::memcpy(&d, &x, 8);
    return d;
}
static inline u64 sotu_host_bits(double d) {
    u64 x;
    std::memcpy(&x, &d, 8);
    return x;
}
static inline float sotu_host_f32(u32 x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
#define SOTU_F64_FROM_BITS(x) sotu_host_f64((u64)(x))
#define SOTU_F64_BITS(x) sotu_host_bits(x)
#define SOTU_F32_FROM_BITS(x) sotu_host_f32((u32)(x))
#define SOTU_POPC(x) ((u32)__builtin_popcount((u32)(x)))
#define SOTU_ATOMIC_MIN_U64(p, v) \
    do {                          \
        u64 sotu_v_ = (v);        \
        if (sotu_v_ < *(p)) *(p) = sotu_v_; \
    } while (0)
#define SOTU_ATOMIC_ADD_U64(p, v) (*(p) += (v))

// One IEEE binary64 operation each; -ffp-contract=off keeps them from fusing.
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }

// ---- fibers ----
static std::vector<ucontext_t> sotu_ctx;
static std::vector<std::vector<char>> sotu_stack;
static std::vector<char> sotu_done;
static ucontext_t sotu_main;
static int sotu_cur, sotu_n;
static std::function<void()> sotu_body;

static void sotu_fiber_entry() {
    sotu_body();
    sotu_done[sotu_cur] = 1;
    // returning resumes sotu_main (uc_link)
}

static inline void __syncthreads() {
    const int me = sotu_cur;
    const int next = (me + 1) % sotu_n;
    if (sotu_done[next]) {
        std::fprintf(stderr, "shim: a barrier that not every thread of the block reaches\n");
        std::abort();
    }
    if (next == me) return;
    sotu_cur = next;
    threadIdx.x = next;
    swapcontext(&sotu_ctx[me], &sotu_ctx[next]);
}

static u64 sotu_slots[1024];

template <class T>
static inline T __shfl_up_sync(unsigned, T v, unsigned d) {
    const unsigned tid = threadIdx.x;
    sotu_slots[tid] = (u64)v;
    __syncthreads();
    const T r = (tid & 31u) >= d ? (T)sotu_slots[tid - d] : v;
    __syncthreads();
    return r;
}

template <class T>
static inline T __shfl_sync(unsigned, T v, int src) {
    const unsigned tid = threadIdx.x;
    sotu_slots[tid] = (u64)v;
    __syncthreads();
    const T r = (T)sotu_slots[(tid & ~31u) + ((unsigned)src & 31u)];
    __syncthreads();
    return r;
}

// Runs `kernel` on a grid of `grid` blocks of `block` threads (1-D).
static inline void sotu_launch(unsigned grid, unsigned block, std::function<void()> kernel) {
    const size_t stack = 256 * 1024;
    sotu_n = (int)block;
    sotu_ctx.assign(block, ucontext_t{});
    sotu_stack.resize(block);
    sotu_done.assign(block, 0);
    sotu_body = kernel;
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; b++) {
        blockIdx = {b, 0, 0};
        for (unsigned t = 0; t < block; t++) {
            sotu_stack[t].resize(stack);
            sotu_done[t] = 0;
            getcontext(&sotu_ctx[t]);
            sotu_ctx[t].uc_stack.ss_sp = sotu_stack[t].data();
            sotu_ctx[t].uc_stack.ss_size = stack;
            sotu_ctx[t].uc_link = &sotu_main;
            makecontext(&sotu_ctx[t], sotu_fiber_entry, 0);
        }
        for (unsigned t = 0; t < block; t++) {
            if (sotu_done[t]) continue;
            sotu_cur = (int)t;
            threadIdx = {t, 0, 0};
            swapcontext(&sotu_main, &sotu_ctx[t]);
        }
        for (unsigned t = 0; t < block; t++) {
            if (!sotu_done[t]) {
                std::fprintf(stderr, "shim: thread %u of block %u did not finish\n", t, b);
                std::abort();
            }
        }
    }
}
