// fp32 and bf16 linears on AVX-512 (y = x W^T + b, fp32 accumulation, bias added in fp32, ReLU if
// asked, one rounding to the output dtype): a register tile of 8 rows x 48 output columns (24 zmm
// accumulators), FMA for fp32 and VDPBF16PS (pairs of K) for bf16.
//
// Why not oneDNN's: at a decode step's shapes (64 rows) with the weights streaming from memory, as
// they do in a decode step, its kernels fetch the weights at 8-11 GB/s and lose 15-25% of their
// cached rate. Here each thread streams a contiguous run of panels and prefetches the next K slice
// into L2 while its row tiles pass over the current one, spreading the prefetches over the tiles.
// Measured on a 2-core AMD EPYC (Zen 5), decode-step shapes with the weights from memory: bf16
// 540-790 GFLOP/s against oneDNN's 460-690, fp32 310-385 against 285-335; prompt-sized shapes even
// in fp32, 2-8% slower in bf16. Every output is also summed over K in one order (step 0, 1, ...,
// then the bias) whatever the number of rows, so a row comes out the same in any batch (a
// speculative verification runs batch x (k+1) rows where a decode step runs batch rows); oneDNN's
// blocking changes with the row count.
//
// Weight layout (packed once, by cpu_kernels.avx512_pack): panels of 48 output columns, the last one
// narrower when 48 does not divide N (no padding: the packed weight has N x K elements); a panel of
// width n is K steps of 4n bytes: fp32 wp[k][c] = W[n0 + c][k]; bf16 (K padded to even)
// wp[k/2][c][e] = W[n0 + c][2*(k/2) + e], the pairs layout VDPBF16PS reads.

#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define GENMILL_AVX512_LINEAR 1

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace zlin {

constexpr int NV = 3;        // zmm vectors (16 columns each) per panel (2 x 12 or 2 x 14 tiles: slower)
constexpr int NR = 16 * NV;  // 48 output columns per panel
constexpr int MR = 8;        // rows per register tile: 24 accumulators + 3 weight vectors + 1 broadcast
constexpr int KC = 128;      // K steps per slice: a panel's slice (24 KiB) stays in L1 for the row tiles
// rows per chunk: a chunk's x (~X_BYTES) stays in L2 while every panel passes over it, and each
// panel's weights are read once per chunk (at least 64 rows: a decode step's weights, streamed from
// memory, are read once)
constexpr int64_t X_BYTES = 384 << 10, MC_MIN = 64, MC_MAX = 512;

// one K step: fp32 takes one k per step, bf16 a pair (x's two values broadcast as one 32-bit lane)
template <typename T>
struct Step;
template <>
struct Step<float> {
  static constexpr int K = 1;
  static inline __m512 x(const float* p) { return _mm512_set1_ps(*p); }
  static inline __m512 madd(__m512 acc, __m512 a, __m512 w) { return _mm512_fmadd_ps(a, w, acc); }
};
// the 32 bits at p (a step's K values of x) in every lane
static inline __m512 broadcast32(const void* p) {
  int32_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return _mm512_castsi512_ps(_mm512_set1_epi32(bits));
}
#ifdef __AVX512BF16__
template <>
struct Step<bf16> {
  static constexpr int K = 2;
  static inline __m512 x(const bf16* p) { return broadcast32(p); }
  static inline __m512 madd(__m512 acc, __m512 a, __m512 w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_castps_si512(a), (__m512bh)_mm512_castps_si512(w));
  }
};
#endif
#ifdef __AVX512VNNI__
// int8 (csrc/int8_screen.h): x as unsigned bytes, W as signed ones, four K a step (VPDPBUSD), the
// int32 sums carried in the fp32 accumulators' bits
template <>
struct Step<uint8_t> {
  static constexpr int K = 4;
  static inline __m512 x(const uint8_t* p) { return broadcast32(p); }
  static inline __m512 madd(__m512 acc, __m512 a, __m512 w) {
    return _mm512_castsi512_ps(
        _mm512_dpbusd_epi32(_mm512_castps_si512(acc), _mm512_castps_si512(a), _mm512_castps_si512(w)));
  }
};
#endif

// one panel: its weights, bytes per K step (4 x its width), and the lanes of its last vector
struct Panel {
  const char* w;
  int64_t step_bytes;
  int nv;           // vectors of columns: 3, or fewer for a narrow last panel
  __mmask16 last;   // the last vector's columns
};

// the weight lines a thread prefetches into L2 during one K slice, spread over the slice's row tiles
// (a burst of them at the start of a slice measured slower: it fills the miss queues, then idles)
struct Prefetch {
  const char* p;
  const char* end;
  int per_step;
};

// acc[r, :] = (first ? 0 : acc[r, :]) + the steps [s0, s1) of x[r] W^T, in order, issuing
// pf.per_step of the slice's prefetches per step; V: the panel's vectors (a narrow last panel has
// fewer, its last one masked)
template <typename T, int R, int V>
static inline void tile(const T* x, int64_t sx, const Panel& p, int64_t s0, int64_t s1, float* acc, bool first,
                        Prefetch& pf) {
  __m512 c[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) c[r][v] = first ? _mm512_setzero_ps() : _mm512_load_ps(acc + r * NR + 16 * v);
  for (int64_t s = s0; s < s1; ++s) {
    const float* ws = reinterpret_cast<const float*>(p.w + s * p.step_bytes);
    __m512 b[V];
    for (int v = 0; v < V; ++v)
      b[v] = V == NV || v + 1 < V ? _mm512_loadu_ps(ws + 16 * v) : _mm512_maskz_loadu_ps(p.last, ws + 16 * v);
    for (int i = 0; i < pf.per_step && pf.p < pf.end; ++i, pf.p += 64) _mm_prefetch(pf.p, _MM_HINT_T1);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 a = Step<T>::x(x + r * sx + s * Step<T>::K);
      for (int v = 0; v < V; ++v) c[r][v] = Step<T>::madd(c[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm512_store_ps(acc + r * NR + 16 * v, c[r][v]);
}

template <typename T, int V>
static inline void tile_rows(int rows, const T* x, int64_t sx, const Panel& p, int64_t s0, int64_t s1, float* acc,
                             bool first, Prefetch& pf) {
  switch (rows) {
    case 8: return tile<T, 8, V>(x, sx, p, s0, s1, acc, first, pf);
    case 7: return tile<T, 7, V>(x, sx, p, s0, s1, acc, first, pf);
    case 6: return tile<T, 6, V>(x, sx, p, s0, s1, acc, first, pf);
    case 5: return tile<T, 5, V>(x, sx, p, s0, s1, acc, first, pf);
    case 4: return tile<T, 4, V>(x, sx, p, s0, s1, acc, first, pf);
    case 3: return tile<T, 3, V>(x, sx, p, s0, s1, acc, first, pf);
    case 2: return tile<T, 2, V>(x, sx, p, s0, s1, acc, first, pf);
    default: return tile<T, 1, V>(x, sx, p, s0, s1, acc, first, pf);
  }
}

template <typename T>
static inline void tile_rows(int rows, const T* x, int64_t sx, const Panel& p, int64_t s0, int64_t s1, float* acc,
                             bool first, Prefetch& pf) {
  switch (p.nv) {
    case 3: return tile_rows<T, 3>(rows, x, sx, p, s0, s1, acc, first, pf);
    case 2: return tile_rows<T, 2>(rows, x, sx, p, s0, s1, acc, first, pf);
    default: return tile_rows<T, 1>(rows, x, sx, p, s0, s1, acc, first, pf);
  }
}

// 16 outputs of a row: stored as fp32, or rounded once to bf16
static inline void store_out(float* y, __m512 v, __mmask16 m, bool stream) {
  if (stream) _mm512_stream_ps(y, v);
  else _mm512_mask_storeu_ps(y, m, v);
}
static inline void store_out(bf16* y, __m512 v, __mmask16 m, bool) { store16(y, v, m); }

// y[m, n0 : n0 + cols] = acc[m, :cols] + bias, ReLU if asked; `stream`: an fp32 output over 8 MiB
// goes out in non-temporal stores (full, aligned 64-byte lines only), so it is not read in first and
// does not evict the weights and inputs from the caches
template <typename Y>
static inline void store_rows(const float* acc, const float* bias, bool relu, Y* y, int64_t ldy, int64_t rows,
                              int64_t cols, bool stream) {
  for (int v = 0; v < NV && 16 * v < cols; ++v) {
    const int n = int(std::min<int64_t>(16, cols - 16 * v));
    const __mmask16 m = first(n);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + 16 * v) : _mm512_setzero_ps();
    const bool nt = stream && n == 16 && ldy % 16 == 0 && reinterpret_cast<uintptr_t>(y) % 64 == 0;
    for (int64_t r = 0; r < rows; ++r) {
      __m512 o = _mm512_add_ps(_mm512_load_ps(acc + r * NR + 16 * v), b);
      if (relu) o = _mm512_max_ps(o, _mm512_setzero_ps());
      store_out(y + r * ldy + 16 * v, o, m, nt);
    }
  }
}

// The panels of x[M, K] (row stride sx, in elements) W^T, W packed as above (K a whole number of
// steps): out(acc, m0, rows, nb, cols) takes the sums acc[r * NR + c] (c < cols) of rows m0.. of
// panel nb, in the thread that computed them; threads split the panels, each a contiguous run.
template <typename T, typename Out>
static void panels(const T* x, int64_t sx, const void* wp, int64_t M, int64_t N, int64_t K, Out&& out) {
  const int64_t NB = (N + NR - 1) / NR, steps = K / Step<T>::K, full = steps * NR * 4;
  const char* w0 = reinterpret_cast<const char*>(wp);
  const int64_t MC = std::clamp<int64_t>(X_BYTES / (K * int64_t(sizeof(T))) / MR * MR, MC_MIN, MC_MAX);
  auto panel = [&](int64_t nb) {
    const int64_t cols = std::min<int64_t>(NR, N - nb * NR);
    const int nv = int((cols + 15) / 16);
    return Panel{w0 + nb * full, cols * 4, nv, first(int(cols - 16 * (nv - 1)))};
  };
  const auto start = [&](int64_t nb) { return w0 + std::min(nb * full, steps * N * 4); };  // of panel nb
#pragma omp parallel
  {
    alignas(64) float acc[MC_MAX * NR];  // the partial sums of one panel over the chunk's rows
    // each thread a contiguous run of panels: one weight stream, prefetched a slice ahead
    const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t nb_lo = NB * tid / nth, nb_hi = NB * (tid + 1) / nth;
    const char* stream_end = start(nb_hi);
    for (int64_t m0 = 0; m0 < M; m0 += MC) {
      const int64_t mc = std::min<int64_t>(MC, M - m0);
      for (int64_t nb = nb_lo; nb < nb_hi; ++nb) {
        const Panel p = panel(nb);
        for (int64_t s0 = 0; s0 < steps; s0 += KC) {
          const int64_t s1 = std::min<int64_t>(steps, s0 + KC);
          // while the row tiles pass over this slice, the next one in the thread's weight stream (after
          // a panel's last slice, the next panel's first) comes into L2
          const char* ahead = std::min(p.w + s1 * p.step_bytes, stream_end);
          const int64_t tile_steps = (mc + MR - 1) / MR * (s1 - s0), lines = (s1 - s0) * NV;
          Prefetch pf{ahead, std::min(ahead + (s1 - s0) * NR * 4, stream_end),
                      int((lines + tile_steps - 1) / tile_steps)};
          for (int64_t mb = 0; mb < mc; mb += MR)
            tile_rows<T>(int(std::min<int64_t>(MR, mc - mb)), x + (m0 + mb) * sx, sx, p, s0, s1, acc + mb * NR,
                         s0 == 0, pf);
        }
        out(static_cast<const float*>(acc), m0, mc, nb, p.step_bytes / 4);
      }
    }
    _mm_sfence();  // the thread's non-temporal stores, if `out` made any, are visible after the region
  }
}

// y[M, N] = x[M, K] (row stride sx, in elements) W^T + bias (fp32 or null), W packed as above; for
// bf16, K is even
template <typename T>
static int linear(const T* x, int64_t sx, const T* wp, const float* bias, T* y, int64_t M, int64_t N, int64_t K,
                  bool relu) {
  const bool stream = std::is_same<T, float>::value && M * N * int64_t(sizeof(float)) > (int64_t(8) << 20);
  panels(x, sx, wp, M, N, K, [&](const float* acc, int64_t m0, int64_t mc, int64_t nb, int64_t cols) {
    store_rows(acc, bias ? bias + nb * NR : nullptr, relu, y + m0 * N + nb * NR, N, mc, cols, stream);
  });
  return 0;
}

}  // namespace zlin

#endif
