// fp32 linear on AVX2 + FMA (y = x W^T + b, then ReLU if asked): a BLIS-style register tile of
// 6 rows x 16 output columns (12 accumulators), for CPUs without AVX-512.
//
// Why not oneDNN's: on an AVX2-only CPU (measured on a 2-core Zen 3) its fp32 kernels reach ~70%
// of the FMA peak at the shapes of a decode step (64 x 768 x 3072: ~130 GFLOP/s of ~185) and lose
// another 10-20% when the weights stream from memory, as they do in a decode step; this tile
// reaches ~160 cached and ~140 streamed there. On prompt-sized row counts (500-700) it is from
// even with oneDNN to ~7% slower, depending on the shape.
// It also sums every output over K in one order (k = 0, 1, ..., K-1, then the bias) whatever the
// number of rows, so a row comes out the same in any batch (a speculative verification runs batch
// x (k+1) rows where a decode step runs batch rows), where oneDNN's one-row path sums differently.
//
// Weight layout (packed once, by cpu_kernels.fma_pack): N padded to a multiple of 16, panels of 16
// output columns, each K rows of 16 values: wp[nb][k][c] = W[nb*16 + c][k]. A thread streams its
// share of panels front to back and prefetches the next panel while it computes the current one.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace fmalin {

constexpr int NR = 16;   // output columns per panel: two 8-lane registers
constexpr int MR = 6;    // rows per register tile: 12 accumulators + 2 weight vectors + 1 broadcast
constexpr int KC = 256;  // K per slice: a panel's slice (16 KiB) stays in L1 while the row tiles pass over it
constexpr int MC = 96;   // rows per chunk: the chunk's x (MC x K) stays in L2 across panels

// acc[r, :] = (first ? 0 : acc[r, :]) + sum over k in [k0, k1) of x[r, k] w[k, :], k in order;
// `next`: the following panel, whose same K slice is prefetched into L2 (null: none)
template <int R>
static inline void tile(const float* x, int64_t sx, const float* w, const float* next, int64_t k0, int64_t k1,
                        float* acc, bool first) {
  __m256 c0[R], c1[R];
  for (int r = 0; r < R; ++r) {
    c0[r] = first ? _mm256_setzero_ps() : _mm256_load_ps(acc + r * NR);
    c1[r] = first ? _mm256_setzero_ps() : _mm256_load_ps(acc + r * NR + 8);
  }
  for (int64_t k = k0; k < k1; ++k) {
    const __m256 b0 = _mm256_load_ps(w + k * NR), b1 = _mm256_load_ps(w + k * NR + 8);
    if (next) _mm_prefetch(reinterpret_cast<const char*>(next + k * NR), _MM_HINT_T1);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * sx + k);
      c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(acc + r * NR, c0[r]);
    _mm256_store_ps(acc + r * NR + 8, c1[r]);
  }
}

static inline void tile_rows(int rows, const float* x, int64_t sx, const float* w, const float* next, int64_t k0,
                             int64_t k1, float* acc, bool first) {
  switch (rows) {
    case 6: return tile<6>(x, sx, w, next, k0, k1, acc, first);
    case 5: return tile<5>(x, sx, w, next, k0, k1, acc, first);
    case 4: return tile<4>(x, sx, w, next, k0, k1, acc, first);
    case 3: return tile<3>(x, sx, w, next, k0, k1, acc, first);
    case 2: return tile<2>(x, sx, w, next, k0, k1, acc, first);
    default: return tile<1>(x, sx, w, next, k0, k1, acc, first);
  }
}

// lanes [0, n) set, for the masked load/store of a panel's last, partial 8 columns
static inline __m256i lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// y[m, n0 : n0 + cols] = acc[m, :cols] + bias, ReLU if asked; `stream`: a full panel's 16 values
// (one 64-byte line of y) go out as non-temporal stores, so a large output is not read in first
// and does not evict the weights and inputs from the caches
static inline void store_rows(const float* acc, const float* bias, bool relu, float* y, int64_t ldy, int64_t rows,
                              int64_t cols, bool stream) {
  if (stream && cols == NR && ldy % NR == 0 && reinterpret_cast<uintptr_t>(y) % 64 == 0) {
    const __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    const __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
    for (int64_t m = 0; m < rows; ++m) {
      __m256 lo = _mm256_add_ps(_mm256_load_ps(acc + m * NR), b0);
      __m256 hi = _mm256_add_ps(_mm256_load_ps(acc + m * NR + 8), b1);
      if (relu) lo = _mm256_max_ps(lo, _mm256_setzero_ps()), hi = _mm256_max_ps(hi, _mm256_setzero_ps());
      _mm256_stream_ps(y + m * ldy, lo);
      _mm256_stream_ps(y + m * ldy + 8, hi);
    }
    return;
  }
  for (int h = 0; h < 2 && 8 * h < cols; ++h) {
    const int64_t n = std::min<int64_t>(8, cols - 8 * h);
    const __m256i mask = lanes(n);
    const __m256 b = bias ? _mm256_maskload_ps(bias + 8 * h, mask) : _mm256_setzero_ps();
    for (int64_t m = 0; m < rows; ++m) {
      __m256 v = _mm256_add_ps(_mm256_load_ps(acc + m * NR + 8 * h), b);
      if (relu) v = _mm256_max_ps(v, _mm256_setzero_ps());
      if (n == 8) _mm256_storeu_ps(y + m * ldy + 8 * h, v);
      else _mm256_maskstore_ps(y + m * ldy + 8 * h, mask, v);
    }
  }
}

// y[M, N] = x[M, K] (row stride sx) W^T + bias (fp32 or null), W packed as above
static int linear(const float* x, int64_t sx, const float* wp, const float* bias, float* y, int64_t M, int64_t N,
                  int64_t K, bool relu) {
  const int64_t NB = (N + NR - 1) / NR;
  const bool stream = M * N * int64_t(sizeof(float)) > (int64_t(8) << 20);  // > 8 MiB of output
#pragma omp parallel
  {
    alignas(64) float acc[MC * NR];  // the partial sums of one panel over the chunk's rows
    for (int64_t m0 = 0; m0 < M; m0 += MC) {
      const int64_t mc = std::min<int64_t>(MC, M - m0);
#pragma omp for schedule(static)
      for (int64_t nb = 0; nb < NB; ++nb) {
        const float* w = wp + nb * K * NR;
        const float* next = nb + 1 < NB ? w + K * NR : nullptr;
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
          const int64_t k1 = std::min<int64_t>(K, k0 + KC);
          for (int64_t mb = 0; mb < mc; mb += MR)  // the first row tile prefetches for the next panel
            tile_rows(int(std::min<int64_t>(MR, mc - mb)), x + (m0 + mb) * sx, sx, w, mb == 0 ? next : nullptr,
                      k0, k1, acc + mb * NR, k0 == 0);
        }
        store_rows(acc, bias ? bias + nb * NR : nullptr, relu, y + m0 * N + nb * NR, N, mc,
                   std::min<int64_t>(NR, N - nb * NR), stream);
      }
    }
    if (stream) _mm_sfence();  // each thread's non-temporal stores are visible before y is read
  }
  return 0;
}

}  // namespace fmalin
