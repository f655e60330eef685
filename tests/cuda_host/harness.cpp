// Runs kernels/merge.cu on the CPU through shim.h, for tests/cuda_host.rs.
//
//   harness merge IN OUT   IN: one launch of a merge-family kernel (layout in main below),
//                          OUT: status[2] + bytes
//   harness mix32 IN OUT   u32 in, u32 out
//   harness u K0 K1 IN OUT u64 indices in, u32 out
//   harness round IN OUT   f64 bits in; 4 rounded words per input, then overflow flags
#define SOTU_HOST 1
#include "../../kernels/merge.cu"

#include <fstream>
#include <iterator>
#include <string>

static std::vector<unsigned char> slurp(const char* path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        std::fprintf(stderr, "cannot read %s\n", path);
        std::exit(2);
    }
    return std::vector<unsigned char>(std::istreambuf_iterator<char>(f), {});
}

static void spit(const char* path, const void* p, size_t n) {
    std::ofstream f(path, std::ios::binary);
    f.write((const char*)p, (std::streamsize)n);
    if (!f) {
        std::fprintf(stderr, "cannot write %s\n", path);
        std::exit(2);
    }
}

struct Reader {
    const std::vector<unsigned char>& b;
    size_t at = 0;
    u64 word() {
        if (at + 8 > b.size()) {
            std::fprintf(stderr, "input too short\n");
            std::exit(2);
        }
        u64 x;
        std::memcpy(&x, &b[at], 8);
        at += 8;
        return x;
    }
    // A length-prefixed block, padded to 8 bytes.
    std::vector<unsigned char> block() {
        const u64 n = word();
        if (at + n > b.size()) {
            std::fprintf(stderr, "input too short\n");
            std::exit(2);
        }
        std::vector<unsigned char> v(b.begin() + at, b.begin() + at + n);
        at += (n + 7) & ~7ull;
        v.resize(n + 8);  // slack, never read by a correct kernel
        return v;
    }
};

typedef void (*MergeFn)(const unsigned char*, unsigned char*, u64, u64, u64, u64, const u64*,
                        int, const unsigned char*, const u64*, const u64*, u64*, double);

// The entry point of `family` (0 merge, 1 ties) from dtype `from` to `to`.
static MergeFn pick(u64 family, u64 from, u64 to) {
#define P(K, FN) {K##_##FN##_f16, K##_##FN##_bf16, K##_##FN##_f32, K##_##FN##_f64}
    static const MergeFn table[2][4][4] = {
        {P(sotu_merge, f16), P(sotu_merge, bf16), P(sotu_merge, f32), P(sotu_merge, f64)},
        {P(sotu_ties, f16), P(sotu_ties, bf16), P(sotu_ties, f32), P(sotu_ties, f64)},
    };
#undef P
    if (family > 1 || from > 3 || to > 3) {
        std::fprintf(stderr, "bad kernel or dtype\n");
        std::exit(2);
    }
    return table[family][from][to];
}

static const int SIZE[4] = {2, 2, 4, 8};

int main(int argc, char** argv) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: harness merge|mix32|u|round ... IN OUT\n");
        return 2;
    }
    const std::string mode = argv[1];
    if (mode == "merge") {
        // Layout (u64 little endian): family (0 merge, 1 ties), from, to, alpha (f64 bits),
        // first, n, numel, tile, block, nterms, then blocks (u64 length + bytes, padded to 8):
        // terms, values, offsets, ranks, base.
        const auto in = slurp(argv[2]);
        Reader r{in};
        const u64 family = r.word(), from = r.word(), to = r.word();
        const double alpha = sotu_host_f64(r.word());
        const u64 first = r.word(), n = r.word(), numel = r.word(), tile = r.word(),
                  block = r.word(), nterms = r.word();
        const auto terms = r.block(), values = r.block(), offsets = r.block(),
                   ranks = r.block(), base = r.block();
        std::vector<unsigned char> out(n * SIZE[to] + 8, 0xAB);
        u64 status[2] = {~0ull, 0};
        const unsigned grid = (unsigned)((n + tile - 1) / tile);
        const MergeFn f = pick(family, from, to);
        sotu_launch(grid, (unsigned)block, [&] {
            f(base.data(), out.data(), first, n, numel, tile, (const u64*)terms.data(),
              (int)nterms, values.data(), (const u64*)offsets.data(), (const u64*)ranks.data(),
              status, alpha);
        });
        std::vector<unsigned char> res(16 + n * SIZE[to]);
        std::memcpy(res.data(), status, 16);
        std::memcpy(res.data() + 16, out.data(), n * SIZE[to]);
        spit(argv[3], res.data(), res.size());
        return 0;
    }
    if (mode == "mix32") {
        const auto in = slurp(argv[2]);
        const u64 n = in.size() / 4;
        std::vector<u32> out(n);
        sotu_launch(2, 32, [&] { sotu_mix32_kernel((const u32*)in.data(), out.data(), n); });
        spit(argv[3], out.data(), n * 4);
        return 0;
    }
    if (mode == "u") {
        const u32 k0 = (u32)std::stoul(argv[2], nullptr, 0), k1 = (u32)std::stoul(argv[3], nullptr, 0);
        const auto in = slurp(argv[4]);
        const u64 n = in.size() / 8;
        std::vector<u32> out(n);
        sotu_launch(2, 32, [&] { sotu_u_kernel(k0, k1, (const u64*)in.data(), out.data(), n); });
        spit(argv[5], out.data(), n * 4);
        return 0;
    }
    if (mode == "round") {
        const auto in = slurp(argv[2]);
        const u64 n = in.size() / 8;
        std::vector<u64> out(5 * n);
        sotu_launch(4, 64, [&] { sotu_round_kernel((const u64*)in.data(), out.data(), n); });
        spit(argv[3], out.data(), out.size() * 8);
        return 0;
    }
    std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
    return 2;
}
