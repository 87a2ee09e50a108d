// bf16 linear on Intel AMX tiles (y = x W^T + b, fp32 accumulation, one rounding to bf16 at the end).
//
// Why not oneDNN's: its bf16 kernels pick their blocking by row count, and on AMX CPUs a row's
// result changes with it (measured: from 33 rows on, for 2304 x 768 and the LM head). Speculative
// verification runs batch x (k+1) rows where a decode step runs batch rows, so a near-tie between
// the two top logits could flip. Here every output element is summed over K in the same order
// (32 values per tile step, steps in order) whatever the number of rows, so a row comes out the
// same in any batch. Measured against oneDNN on a 2-core Xeon slice (Sapphire Rapids class): 64-row
// linears 9-46% faster with cached weights, prompt-sized ones (4352 rows) 8-29% slower.
//
// Weight layout (packed once, by cpu_kernels.amx_pack): N padded to 32, K to 32; blocks of 32 output
// columns, each a run of K/32 steps, each step two B tiles (16 columns each) in the VNNI pairs
// layout AMX reads: wp[nb][ks][t][kp][n][e] = W[nb*32 + t*16 + n][ks*32 + 2*kp + e]. A thread
// streams its contiguous share of column blocks front to back, prefetching AHEAD into L2. The same
// driver (`blocks`) runs int8 weights packed alike (K steps of 64, quadruples for pairs; TDPBUSD) for
// the LM head's int8 screen (csrc/int8_screen.h).

#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__) && defined(__AVX512BF16__)
#define GENMILL_AMX 1

#include <sys/syscall.h>
#include <unistd.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace amx {

constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
constexpr int MC = 256;  // rows per chunk at most: a chunk's x (MC x K bf16) stays in L2 across column blocks
// ... and fills at most this much of it (OPT's 3072-wide fc2 with 256-row chunks of 1.5 MiB: 8% slower
// than with 128 rows); never fewer than 64 rows, so that a decode step's rows share one weight pass
constexpr int64_t CHUNK_BYTES = 768 << 10;
constexpr int KS_L1 = 8;  // K steps per slice: 16 KiB of a block's weights (4 steps: 12-16% slower at prompt shapes)
// how far ahead of its reads a thread prefetches its weights into L2 (8-32 KiB measured alike; 0, as
// before: 15.4 GB/s of weights from memory at decode shapes on a 2-core Xeon slice, 18.2 with it)
constexpr int64_t AHEAD = 16 << 10;

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands out the AMX register state only on request (once per process)
static bool permitted() {
  static const bool ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return ok;
}

// tiles 0-3: C (2 x 2 blocks of 16 x 16 fp32), 4-5: A (16 rows x 32 K), 6-7: B (16 K pairs x 16 cols)
static void configure() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;
  _tile_loadconfig(&cfg);
}

// one row against 16 columns: tile 0 C (1 x 16 fp32), 4 A (1 row x 32 K), 6 B (16 K pairs x 16 cols)
static void configure_one_row() {
  TileConfig cfg;
  cfg.rows[0] = cfg.rows[4] = 1, cfg.rows[6] = 16;
  cfg.colsb[0] = cfg.colsb[4] = cfg.colsb[6] = 64;
  _tile_loadconfig(&cfg);
}

// bias, ReLU, round to bf16 and store the valid part of a 32 x 32 fp32 block: a full block one
// 64-byte store a row (two 32-byte halves: 4% slower prompt-sized linears on a 2-core Xeon slice);
// `stream`: those go out as non-temporal stores (a large output would otherwise be read in first
// and evict the weights and inputs from the caches)
static inline void store_block(const float* c, const float* bias, bool relu, bf16* out, int64_t ldo, int rows,
                               int cols, bool stream) {
  if (cols == 32) {
    stream = stream && ldo % 32 == 0 && reinterpret_cast<uintptr_t>(out) % 64 == 0;
    const __m512 b0 = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    const __m512 b1 = bias ? _mm512_loadu_ps(bias + 16) : _mm512_setzero_ps();
    for (int m = 0; m < rows; ++m) {
      __m512 lo = _mm512_add_ps(_mm512_load_ps(c + m * 32), b0);
      __m512 hi = _mm512_add_ps(_mm512_load_ps(c + m * 32 + 16), b1);
      if (relu) lo = _mm512_max_ps(lo, _mm512_setzero_ps()), hi = _mm512_max_ps(hi, _mm512_setzero_ps());
      const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
      if (stream)
        _mm512_stream_si512((__m512i*)(out + m * ldo), v);
      else
        _mm512_storeu_si512(out + m * ldo, v);
    }
    return;
  }
  for (int h = 0; h < 2 && 16 * h < cols; ++h) {
    const int n = std::min(16, cols - 16 * h);
    const __mmask16 mask = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * h) : _mm512_setzero_ps();
    for (int m = 0; m < rows; ++m) {
      __m512 v = _mm512_add_ps(_mm512_load_ps(c + m * 32 + 16 * h), b);
      if (relu) v = _mm512_max_ps(v, _mm512_setzero_ps());
      _mm256_mask_storeu_epi16(out + m * ldo + 16 * h, mask, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

// The sums of x[M, K] (row stride sx) W^T, W packed as above, block by block: out(c, row0, rows, nb)
// takes the sums c[r * 32 + j] of rows row0 + r (r < rows) and columns nb * 32 + j of one 32 x 32
// block, in the thread (of the OpenMP team) that computed them; each thread has a contiguous run of
// column blocks, ascending. In: bf16 (x and W bf16, fp32 sums, K steps of 32) or uint8_t (x
// unsigned bytes, W signed bytes packed alike with K steps of 64 and quadruples for pairs, int32
// sums: TDPBUSD); either way a K step is 64 bytes of a row. 0: done; 1: no AMX; 2: out of memory.
template <typename In>
using Sum = std::conditional_t<std::is_same_v<In, bf16>, float, int32_t>;
template <typename In>
constexpr int64_t K_STEP = 64 / sizeof(In);

template <typename In, typename Out>
static int blocks(const In* x, int64_t sx, const void* wp, int64_t M, int64_t N, int64_t K, Out&& out) {
  static_assert(std::is_same_v<In, bf16> || std::is_same_v<In, uint8_t>);
  if (!permitted()) return 1;
  constexpr int64_t STEP = K_STEP<In>;
  const int64_t Kp = (K + STEP - 1) / STEP * STEP, KS = Kp / STEP, NB = (N + 31) / 32;
  const int64_t chunk = std::clamp<int64_t>(CHUNK_BYTES / (Kp * int64_t(sizeof(In))) / 32 * 32, 64, MC);
  const int64_t rows = std::min<int64_t>(M, chunk), Mp = (rows + 31) / 32 * 32;
  // the chunk's rows that the tiles cannot read from x in place, zero-padded to whole tiles (32 rows,
  // K to Kp): all of them when K is not a whole number of K steps, else only a last partial row tile. (A
  // copy of every chunk cost up to a third of a prompt-sized linear with few outputs.)
  In* xa = (In*)std::aligned_alloc(64, Mp * Kp * sizeof(In));
  if (xa == nullptr) return 2;
  // one parallel region for all chunks, the threads meeting only where a chunk's rows are copied
  // (a region per chunk: prompt-sized linears 5-8% slower on a 2-core Xeon slice)
#pragma omp parallel
  {
    configure();
    // partial sums of one column block over the chunk's rows, carried between K slices
    alignas(64) Sum<In> acc[MC * 32];
    for (int64_t m0 = 0; m0 < M; m0 += chunk) {
      const int64_t mc = std::min<int64_t>(chunk, M - m0), mp = (mc + 31) / 32 * 32;
      const int64_t in_place = K == Kp ? mc / 32 * 32 : 0;  // rows [0, in_place) are read from x
      const auto rows_at = [&](int64_t mb) { return mb < in_place ? x + (m0 + mb) * sx : xa + mb * Kp; };
      const int64_t stride_at[2] = {Kp * int64_t(sizeof(In)), sx * int64_t(sizeof(In))};
      if (in_place < mp) {  // (the same in every thread)
        // every thread is done with the previous chunk's copy before this one overwrites it
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t m = in_place; m < mp; ++m) {
          In* dst = xa + m * Kp;
          if (m < mc) {
            std::memcpy(dst, x + (m0 + m) * sx, K * sizeof(In));
            std::memset(dst + K, 0, (Kp - K) * sizeof(In));  // (the padded weights are zero too)
          } else {
            std::memset(dst, 0, Kp * sizeof(In));
          }
        }
        // (implicit barrier: the chunk's rows are in place)
      }
      // each thread a contiguous run of column blocks: one weight stream, prefetched into L2 AHEAD
      // bytes ahead of its reads, spread over the tile steps
      const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
      const int64_t nb_lo = NB * tid / nth, nb_hi = NB * (tid + 1) / nth;
      const char* const w0 = static_cast<const char*>(wp);  // 2 KiB a block's K step
      const char* const stream_end = w0 + nb_hi * KS * 2048;
      const char* pf = std::min(w0 + nb_lo * KS * 2048 + AHEAD, stream_end);
      const int per_step = int((32 + mp / 32 - 1) / (mp / 32));  // 32 lines per K step, over the row tiles
      for (int64_t nb = nb_lo; nb < nb_hi; ++nb) {
        const char* wb = w0 + nb * KS * 2048;
        // K in slices of KS_L1 steps: the slice of this block's weights (KS_L1 x 2 KiB) stays in L1
        // while every row tile of the chunk passes over it; sums continue across slices in K order
        for (int64_t k0 = 0; k0 < KS; k0 += KS_L1) {
          const int64_t k1 = std::min<int64_t>(KS, k0 + KS_L1);
          for (int64_t mb = 0; mb < mp; mb += 32) {
            Sum<In>* c = acc + mb * 32;
            const In* a = rows_at(mb);
            const int64_t lda = stride_at[mb < in_place];
            if (k0 == 0) {
              _tile_zero(0);
              _tile_zero(1);
              _tile_zero(2);
              _tile_zero(3);
            } else {
              _tile_loadd(0, c, 128);
              _tile_loadd(1, c + 16, 128);
              _tile_loadd(2, c + 16 * 32, 128);
              _tile_loadd(3, c + 16 * 32 + 16, 128);
            }
            for (int64_t ks = k0; ks < k1; ++ks) {
              _tile_loadd(4, a + ks * STEP, lda);
              _tile_loadd(5, a + 16 * lda / int64_t(sizeof(In)) + ks * STEP, lda);
              _tile_loadd(6, wb + ks * 2048, 64);
              _tile_loadd(7, wb + ks * 2048 + 1024, 64);
              for (int i = 0; i < per_step && pf < stream_end; ++i, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
              if constexpr (std::is_same_v<In, bf16>) {
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
              } else {
                _tile_dpbusd(0, 4, 6);
                _tile_dpbusd(1, 4, 7);
                _tile_dpbusd(2, 5, 6);
                _tile_dpbusd(3, 5, 7);
              }
            }
            _tile_stored(0, c, 128);
            _tile_stored(1, c + 16, 128);
            _tile_stored(2, c + 16 * 32, 128);
            _tile_stored(3, c + 16 * 32 + 16, 128);
          }
        }
        for (int64_t mb = 0; mb < mp; mb += 32) out(acc + mb * 32, m0 + mb, int(std::min<int64_t>(32, mc - mb)), nb);
      }
    }
    _tile_release();
  }
  std::free(xa);
  return 0;
}

// y[M, N] = x[M, K] (row stride sx) W^T + bias, W packed as above; bias fp32 or null
static int linear(const bf16* x, int64_t sx, const bf16* wp, const float* bias, bf16* y, int64_t M, int64_t N,
                  int64_t K, bool relu) {
  // past 1 MiB of output, non-temporal stores (from 8 MiB, as before: prompt prefills 2-3% slower,
  // their 6 MiB outputs read in from memory line by line before being written)
  const bool stream = M * N * int64_t(sizeof(bf16)) > (int64_t(1) << 20);
  const int status = blocks(x, sx, wp, M, N, K, [&](const float* c, int64_t row0, int rows, int64_t nb) {
    store_block(c, bias ? bias + nb * 32 : nullptr, relu, y + row0 * N + nb * 32, N, rows,
                int(std::min<int64_t>(32, N - nb * 32)), stream);
  });
  if (stream) _mm_sfence();  // the non-temporal stores are visible before the caller reads y
  return status;
}

// ids[i]: the argmax of row i of the bf16 logits `linear` (no ReLU) would write, by the argmax
// kernel's rules (the first maximum; a NaN counts as the maximum, the first one wins), without
// writing them. For greedy decode steps: the logits are a step's widest output (6 MiB for 64 rows
// of a 50k vocabulary), written and then read back by the argmax. Each thread keeps, per row and
// vector lane, the largest value seen and its column (column c in lane c % 16, columns in
// ascending order, so a strict > keeps the first of equal ones) and the first NaN's column; rows
// reduce their lanes at the end, the threads' runs (ascending columns) in thread order.
static int argmax(const bf16* x, int64_t sx, const bf16* wp, const float* bias, int64_t* ids, int64_t M, int64_t N,
                  int64_t K) {
  struct alignas(64) Lanes {
    float value[16];
    int32_t id[16];   // -1: no column yet
    int32_t nan[16];  // the lane's first NaN column, or INT32_MAX
  };
  const int nth = omp_get_max_threads();
  std::vector<Lanes> lanes(size_t(nth) * M);
  for (Lanes& l : lanes)
    for (int j = 0; j < 16; ++j) l.value[j] = -INFINITY, l.id[j] = -1, l.nan[j] = INT32_MAX;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int status = blocks(x, sx, wp, M, N, K, [&](const float* c, int64_t row0, int rows, int64_t nb) {
    const int cols = int(std::min<int64_t>(32, N - nb * 32));
    const __mmask16 m_lo = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
    const __mmask16 m_hi = cols >= 32 ? __mmask16(0xFFFF) : cols > 16 ? __mmask16((1u << (cols - 16)) - 1) : 0;
    const __m512 b0 = bias ? _mm512_maskz_loadu_ps(m_lo, bias + nb * 32) : _mm512_setzero_ps();
    const __m512 b1 = bias ? _mm512_maskz_loadu_ps(m_hi, bias + nb * 32 + 16) : _mm512_setzero_ps();
    const __m512i id_lo = _mm512_add_epi32(lane, _mm512_set1_epi32(int32_t(nb * 32)));
    const __m512i id_hi = _mm512_add_epi32(id_lo, _mm512_set1_epi32(16));
    Lanes* const mine = lanes.data() + size_t(omp_get_thread_num()) * M + row0;
    for (int r = 0; r < rows; ++r) {
      // the logits as `linear` rounds them to bf16, back in fp32 (exact)
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_add_ps(_mm512_load_ps(c + r * 32 + 16), b1),
                                                        _mm512_add_ps(_mm512_load_ps(c + r * 32), b0));
      const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(both)), 16));
      const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(both, 1)), 16));
      Lanes& l = mine[r];
      __m512 v = _mm512_load_ps(l.value);
      __m512i id = _mm512_load_si512(l.id), nan = _mm512_load_si512(l.nan);
      const __mmask16 unset = _mm512_cmplt_epi32_mask(id, _mm512_setzero_si512());
      // lane by lane: the low half's column first, then the high half's (ascending columns)
      __mmask16 take = _mm512_mask_cmp_ps_mask(m_lo, lo, v, _CMP_GT_OQ) | (unset & m_lo);
      v = _mm512_mask_mov_ps(v, take, lo), id = _mm512_mask_mov_epi32(id, take, id_lo);
      take = _mm512_mask_cmp_ps_mask(m_hi, hi, v, _CMP_GT_OQ);
      v = _mm512_mask_mov_ps(v, take, hi), id = _mm512_mask_mov_epi32(id, take, id_hi);
      const __mmask16 first_nan = _mm512_cmpeq_epi32_mask(nan, _mm512_set1_epi32(INT32_MAX));
      nan = _mm512_mask_mov_epi32(nan, first_nan & _mm512_mask_cmp_ps_mask(m_lo, lo, lo, _CMP_UNORD_Q), id_lo);
      nan = _mm512_mask_min_epi32(nan, _mm512_mask_cmp_ps_mask(m_hi, hi, hi, _CMP_UNORD_Q), nan, id_hi);
      _mm512_store_ps(l.value, v);
      _mm512_store_si512(l.id, id);
      _mm512_store_si512(l.nan, nan);
    }
  });
  if (status != 0) return status;
  for (int64_t i = 0; i < M; ++i) {
    // the first NaN of any thread's run; else the largest value, the first column among equals
    int64_t pick = -1, first_nan = INT64_MAX;
    float top = -INFINITY;
    for (int t = 0; t < nth; ++t) {
      const Lanes& l = lanes[size_t(t) * M + i];
      for (int j = 0; j < 16; ++j) {
        if (l.nan[j] != INT32_MAX) first_nan = std::min<int64_t>(first_nan, l.nan[j]);
        if (l.id[j] < 0) continue;
        if (pick < 0 || l.value[j] > top || (l.value[j] == top && l.id[j] < pick)) top = l.value[j], pick = l.id[j];
      }
    }
    ids[i] = first_nan != INT64_MAX ? first_nan : pick;
  }
  return 0;
}

}  // namespace amx

#endif
