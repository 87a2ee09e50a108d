// Greedy picks for a bf16 LM head from an int8 copy of it, exact: the same token as the argmax of
// the bf16 logits GenMill's AVX-512 linear (csrc/avx512_linear.h) or AMX linear (csrc/amx_linear.h)
// computes, for half its weight bytes and, on a CPU with AVX512_VNNI, about half its multiply-add cost
// (VPDPBUSD sums four int8 products per 32-bit lane where VDPBF16PS sums two bf16 ones; on AMX,
// TDPBUSD does twice TDPBF16PS's work a tile).
//
// Row x (bf16, K even) is quantized per row: s = max|x| / 127, q = round(x / s) in [-127, 127],
// sent as unsigned q + 128 (VPDPBUSD and TDPBUSD multiply unsigned by signed bytes; 128 x each
// column's weight sum comes off again). Column v of the head: W_v ~ c_v wq_v (c_v = max|W_v| / 127).
// With y_v the kernel's bf16 logit (fp32 sums of the bf16 products, K roundings, then one rounding
// to bf16) and a_v = s c_v sum_k q_k wq_vk:
//   |sum_k x_k W_vk - a_v| <= |x - s q|_inf |W_v|_1 + |s q|_2 |W_v - c_v wq_v|_2
//   |fp32 sum - sum_k x_k W_vk| <= g |x|_inf |W_v|_1,   g = K u / (1 - K u)
// (u the unit roundoff of the head's additions: 2^-24, or 2^-23 on AMX tiles), so e = alpha
// max|W_v|_1 + beta max|W_v - c_v wq_v|_2 over a panel's columns (48, or 32 on AMX; + margins for
// the fp32 arithmetic of a_v and of the bound itself, and for the denormals the bf16 instructions
// flush) bounds |fp32 sum - a_v| in that panel. Rounding to bf16 keeps order, so with
// L = max_v (a_v - e): every v whose a_v + e is below the least value rounding to bf16(L) has a bf16
// logit below the largest one. The others are recomputed exactly (the head's own instructions, K
// order and rounding) and the first maximum among them is the pick. On the benchmark models' hidden
// states 55-75 of 32-50 thousand logits per row stay (bench/llm_head_screen.py); a row that keeps
// more than MAX_KEPT, or has a NaN or infinity, is left to the caller (-1), which runs the bf16 head
// for it. Measured on a 2-core Xeon, 64 rows, heads from memory: on its AVX-512 units 3.4-3.9x the
// AVX-512 bf16 head and its argmax; on its AMX tiles 1.4-1.6x the AMX head with its argmax fused in
// for OPT's 50k vocabulary, and about even for Llama's 32k (the sums' epilogue and the exact pass
// weigh more against a smaller head).

#pragma once

#if defined(GENMILL_AVX512_LINEAR) && defined(__AVX512BF16__) && defined(__AVX512VNNI__)
#define GENMILL_INT8_SCREEN 1

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace i8screen {

constexpr int64_t MAX_KEPT = 4096;  // candidates a row may keep before the caller's full head is cheaper
constexpr int64_t PRUNE_AT = 256;   // a thread's candidates of a row are re-filtered past this many

// the int8 copy of a bf16 head (cpu_kernels.int8_screen_pack), and the bf16 head
struct Head {
  const int8_t* wq;       // zlin panels of K/4 steps of 4 bytes per column (K padded to a multiple of 4)
  const int32_t* colsum;  // 128 x each column's int8 weight sum
  const float* scale;     // c_v
  // per panel of zlin::NR columns, rounded up: the largest c_v, |W_v|_1 and |W_v - c_v wq_v|_2 (a
  // bound per panel, not per column: a few more logits kept, a third of the per-logit work)
  const float* scale_max;
  const float* l1;
  const float* err2;
  const void* rows;       // the head, row-major [N, K] (bf16 with K even, or fp32): the exact pass reads it
  float tiny;             // covers the products VDPBF16PS (or TDPBF16PS) flushes to zero
  int64_t N, K, Kq, NB;  // NB: panels
  int64_t panel;         // columns per panel: zlin::NR (the AVX-512 head) or 32 (the AMX head's blocks)
  // the unit roundoff of the head's fp32 sums: 2^-24 for the AVX-512 kernel (VDPBF16PS or FMA, round
  // to nearest even); 2^-23 for AMX tiles, whose internal order of additions the ISA leaves open (a
  // bound for any faithful rounding; the summation term is ~1% of the bound, the quantization's the rest)
  double unit;
};

struct Row {
  float s = 1, inv_s = 1, alpha = 0, beta = 0;
  bool ok = false;  // finite: screened
};

struct Kept {
  int32_t col;
  float a;  // a' (see screen)
};

static inline __m512 round_bf16(__m512 v) {  // v rounded to bf16 (nearest even), back in fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}
static inline float round_bf16(float v) { return _mm512_cvtss_f32(round_bf16(_mm512_set1_ps(v))); }

static inline float widen(bf16 v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// a double rounded to fp32 upwards, downwards
static inline float up(double v) {
  const float f = float(v);
  return double(f) < v ? std::nextafter(f, INFINITY) : f;
}
static inline float down(double v) {
  const float f = float(v);
  return double(f) > v ? std::nextafter(f, -INFINITY) : f;
}

// the least fp32 value that may round to bf16(lo) or above: the midpoint between bf16(lo) and the
// bf16 value below it (a value at the midpoint may round either way, so it is kept)
static inline float threshold(float lo) {
  const float bar = round_bf16(lo);
  if (std::isinf(bar)) return bar < 0 ? bar : widen(0x7F7F);  // above the largest finite bf16: the largest
  // bf16(lo) is -0 or +0: every negative value above the largest negative normal may round to zero
  // (VCVTNEPS2BF16 takes denormal inputs as zero)
  if (bar == 0) return -std::ldexp(1.0f, -126);
  uint32_t bits;
  std::memcpy(&bits, &bar, sizeof(bits));
  bits = bar > 0 ? bits - 0x10000 : bits + 0x10000;
  float below;
  std::memcpy(&below, &bits, sizeof(below));
  return (bar + below) * 0.5f;  // exact: two bf16 values (8 significant bits) and a halving
}

// row i of x as unsigned bytes q + 128 (K padded with 128, whose weights are zero) and its bound terms
static inline float as_float(bf16 v) { return widen(v); }
static inline float as_float(float v) { return v; }

// the least fp32 value a logit reaching the largest one may have, given a lower bound lo of the
// largest: the bf16 head rounds its logits (threshold), the fp32 head does not
static inline float bar_from(float lo, const bf16*) { return threshold(lo); }
static inline float bar_from(float lo, const float*) { return lo; }

template <typename T>
static void quantize(const T* x, int64_t sx, const Head& h, int64_t M, uint8_t* xu, Row* rows) {
  const double g = h.K * h.unit / (1 - h.K * h.unit);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < M; ++i) {
    const T* xi = x + i * sx;
    uint8_t* out = xu + i * h.Kq;
    float amax = 0;
    bool finite = true;
    for (int64_t k = 0; k < h.K; ++k) {
      const float v = as_float(xi[k]);
      finite = finite && std::isfinite(v);
      amax = std::max(amax, std::fabs(v));
    }
    Row r;
    std::fill(out, out + h.Kq, uint8_t(128));
    if (finite) {
      const float inv = amax > 0 ? 127.0f / amax : 0.0f;
      double q2 = 0;
      for (int64_t k = 0; k < h.K; ++k) {
        const float q = std::clamp(std::nearbyint(as_float(xi[k]) * inv), -127.0f, 127.0f);
        out[k] = uint8_t(int(q) + 128);
        q2 += double(q) * q;
      }
      r.s = amax > 0 ? amax / 127.0f : 1.0f;
      r.inv_s = 1 / r.s;
      // |x - s q| <= s (1/2 + the rounding of x * inv, far below 2^-10); margins 2^-16 cover the fp32
      // rounding of these terms and of e below
      r.alpha = float((r.s * (0.5 + std::ldexp(1.0, -10)) + g * amax) * (1 + std::ldexp(1.0, -16)));
      r.beta = float(r.s * std::sqrt(q2) * (1 + std::ldexp(1.0, -16)));
      r.ok = true;
    }
    rows[i] = r;
  }
}

// the bf16 logits of row x (bf16, K even) for the columns cols[0..n), n <= 16: the AVX-512 linear's
// own arithmetic for each (VDPBF16PS over the K pairs in order, + 0, one rounding), in fp32; one
// column per lane, its K pairs gathered from the row-major head (each lane reads along one row)
static inline __m512 exact(const bf16* x, const Head& h, const int32_t* cols, int n) {
  const __mmask16 m = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
  const __m512i idx = _mm512_mullo_epi32(_mm512_maskz_loadu_epi32(m, cols), _mm512_set1_epi32(int32_t(h.K / 2)));
  const int32_t* w = static_cast<const int32_t*>(h.rows);  // K pairs
  __m512 acc = _mm512_setzero_ps();
  for (int64_t s = 0; s < h.K / 2; ++s) {
    const __m512i pair = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, w + s, 4);
    acc = zlin::Step<bf16>::madd(acc, zlin::Step<bf16>::x(x + 2 * s), _mm512_castsi512_ps(pair));
  }
  return round_bf16(_mm512_add_ps(acc, _mm512_setzero_ps()));  // the kernel adds a zero bias (-0 -> +0)
}

// ids[i]: the first maximum of row i's bf16 logits, or -1 (a NaN or infinity, or too many kept);
// kept[i]: how many logits row i recomputed. sums(xu, visit): the int8 copy's int32 sums of the
// quantized rows xu (Kq bytes each), visit(acc, ld, m0, mc, nb, cols) taking acc[r * ld + c] for rows
// m0 + r (r < mc) and columns nb * panel + c (c < cols) in the thread that computed them; 0 when
// done. exact(): a thread's exact pass, exact(xi, cols, n) the head's logits of row xi (as fp32
// values) for n <= 16 ascending columns (lanes 0..n-1).
template <typename T, typename Sums, typename Exact>
static int screen(const T* x, int64_t sx, const Head& h, int64_t M, int64_t* ids, int64_t* kept, Sums&& sums,
                  Exact&& exact) {
  std::vector<uint8_t> xu(M * h.Kq);
  std::vector<Row> rows(M);
  quantize(x, sx, h, M, xu.data(), rows.data());

  // per panel: 2^-20 of the largest |a' / s| (|sum_k q_k wq_vk| <= Kq 127^2)
  std::vector<float> big(h.NB);
  for (int64_t p = 0; p < h.NB; ++p) big[p] = up(double(h.Kq) * 127 * 127 * h.scale_max[p] * std::ldexp(1.0, -20));
  // the logit v of a column is within e of s a', a' = float(sum) * c_v (in fp32): e covers the bound
  // and the fp32 roundings of a' and of what is computed from it (2^-20 of the largest |s a'| the
  // panel allows; the margins of alpha and beta cover the roundings of e itself)
  const auto bound = [&](const Row& row, float l1, float err2, float big_) {
    return std::fma(row.alpha, l1, std::fma(row.beta, err2, std::fma(row.s, big_, h.tiny)));
  };
  // a row's bound over every panel decides which columns are kept, a panel's own is computed only
  // for those (per row and panel, the common case is then a few vector compares: the scan ran about
  // 1.4x as fast as with a bound per row and panel, on the AMX head of OPT's vocabulary)
  const float l1_max = *std::max_element(h.l1, h.l1 + h.NB), err2_max = *std::max_element(h.err2, h.err2 + h.NB);
  const float big_max = *std::max_element(big.begin(), big.end());
  std::vector<float> e_max(M);
  for (int64_t i = 0; i < M; ++i) e_max[i] = bound(rows[i], l1_max, err2_max, big_max);
  // the a' from which s a' + e_max may reach `bar`: (bar - e_max) / s, a little lower
  const auto keep_from = [](const Row& row, float e_max_, float bar) {
    const float q = (bar - e_max_) * row.inv_s;
    return q - std::fabs(q) * std::ldexp(1.0f, -20);
  };

  struct Thread {
    std::vector<float> top;               // per row: the largest a' kept
    std::vector<float> lo;                // per row: its lower bound s a' - e
    std::vector<float> keep_at;           // per row: a' from which a column may reach the bar from lo
    std::vector<std::vector<Kept>> kept;  // per row: columns that may have, when seen
  };
  std::vector<Thread> threads(omp_get_max_threads());
  for (Thread& t : threads) {
    t.top.assign(M, -INFINITY);
    t.lo.assign(M, -INFINITY);
    t.keep_at.assign(M, -INFINITY);
    t.kept.resize(M);
  }

  // A column is kept where s a' + e_max may reach the bar from lo: a' >= (bar - e_max) / s, a
  // little lower. Any column whose a' exceeds every earlier one of its row is kept (s a' + e_max is
  // above the kept one's s a' - e), so lo, raised only by kept columns, still ends at or above the
  // lower bound of the column with the largest a': bars only rise, and a column passed over had its
  // upper bound below a bar, below the final one.
  const int status = sums(xu.data(), [&](const int32_t* acc, int64_t ld, int64_t m0, int64_t mc, int64_t nb,
                                           int64_t cols) {
    Thread& t = threads[omp_get_thread_num()];
    const int64_t c0 = nb * h.panel;
    const int nv = int((cols + 15) / 16);
    __m512i cs[zlin::NV];
    __m512 sc[zlin::NV];
    __mmask16 valid[zlin::NV];
    for (int v = 0; v < nv; ++v) {
      valid[v] = first(int(std::min<int64_t>(16, cols - 16 * v)));
      cs[v] = _mm512_maskz_loadu_epi32(valid[v], h.colsum + c0 + 16 * v);
      sc[v] = _mm512_maskz_loadu_ps(valid[v], h.scale + c0 + 16 * v);
    }
    for (int64_t r = 0; r < mc; ++r) {
      const int64_t i = m0 + r;
      const Row& row = rows[i];
      if (!row.ok) continue;
      const __m512 at = _mm512_set1_ps(t.keep_at[i]);
      alignas(64) float u[zlin::NV][16];
      __mmask16 hit[zlin::NV];
      __mmask16 any = 0;
      for (int v = 0; v < nv; ++v) {
        const __m512i sum = _mm512_sub_epi32(_mm512_load_si512(acc + r * ld + 16 * v), cs[v]);
        const __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), sc[v]);
        hit[v] = _mm512_mask_cmp_ps_mask(valid[v], a, at, _CMP_GE_OQ);
        any |= hit[v];
        _mm512_store_ps(u[v], a);
      }
      if (!any) continue;
      std::vector<Kept>& keep = t.kept[i];
      float top = t.top[i];
      for (int v = 0; v < nv; ++v)
        for (__mmask16 m = hit[v]; m; m &= m - 1) {
          const int j = __builtin_ctz(m);
          keep.push_back({int32_t(c0 + 16 * v + j), u[v][j]});
          top = std::max(top, u[v][j]);
        }
      if (top > t.top[i]) {  // a new largest a' (most kept columns are not): its lower bound
        t.top[i] = top;
        const float lo = std::fma(top, row.s, -bound(row, h.l1[nb], h.err2[nb], big[nb]));  // one rounding, in e's margins
        if (lo > t.lo[i]) {
          t.lo[i] = lo;
          t.keep_at[i] = keep_from(row, e_max[i], bar_from(lo, x));
        }
      }
      if (int64_t(keep.size()) > PRUNE_AT) {  // the bar has risen since most of these were kept
        const float at_least = t.keep_at[i];
        keep.erase(std::remove_if(keep.begin(), keep.end(), [&](const Kept& k) { return k.a < at_least; }), keep.end());
      }
    }
  });
  if (status != 0) return status;

#pragma omp parallel
  {
    auto pass = exact();
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < M; ++i) {
      ids[i] = -1;
      kept[i] = 0;
      if (!rows[i].ok) continue;
      float lo = -INFINITY;
      for (const Thread& t : threads) lo = std::max(lo, t.lo[i]);
      const float bar = bar_from(lo, x), at_least = keep_from(rows[i], e_max[i], bar);
      std::vector<int32_t> cols;
      for (const Thread& t : threads)
        for (const Kept& k : t.kept[i]) {
          if (k.a < at_least) continue;  // (s a' + e_max below the bar)
          const int64_t p = k.col / h.panel;
          if (up(double(k.a) * rows[i].s + bound(rows[i], h.l1[p], h.err2[p], big[p])) >= bar) cols.push_back(k.col);
        }
      kept[i] = int64_t(cols.size());
      if (cols.empty() || kept[i] > MAX_KEPT) continue;
      std::sort(cols.begin(), cols.end());
      const T* xi = x + i * sx;
      float best = -INFINITY;
      int64_t pick = -1;
      bool nan = false;
      for (size_t j0 = 0; j0 < cols.size(); j0 += 16) {
        const int n = int(std::min<size_t>(16, cols.size() - j0));
        alignas(64) float y[16];
        _mm512_store_ps(y, pass(xi, cols.data() + j0, n));
        for (int j = 0; j < n; ++j) {
          nan = nan || std::isnan(y[j]);
          if (y[j] > best || pick < 0) best = y[j], pick = cols[j0 + j];  // ascending columns: the first max
        }
      }
      if (!nan) ids[i] = pick;
    }
  }
  return 0;
}

// the fp32 logits of row x for the columns cols[0..n), n <= 16: the AVX-512 linear's fp32 arithmetic
// (lscreen::exact, one FMA chain per column in K order)
static inline __m512 exact(const float* x, const Head& h, const int32_t* cols, int n) {
  alignas(64) float y[16] = {};
  const float* w[8];
  for (int j0 = 0; j0 < n; j0 += 8) {
    const int m = std::min(8, n - j0);
    for (int j = 0; j < m; ++j) w[j] = static_cast<const float*>(h.rows) + int64_t(cols[j0 + j]) * h.K;
    lscreen::exact(x, w, m, h.K, y + j0);
  }
  return _mm512_load_ps(y);
}

// the int8 copy's sums on VPDPBUSD panels (zlin), for a head on GenMill's AVX-512 kernel
static inline auto panel_sums(const Head& h, int64_t M) {
  return [&h, M](const uint8_t* xu, auto&& visit) {
    zlin::panels(xu, h.Kq, h.wq, M, h.N, h.Kq, [&](const float* acc, int64_t m0, int64_t mc, int64_t nb, int64_t cols) {
      visit(reinterpret_cast<const int32_t*>(acc), zlin::NR, m0, mc, nb, cols);
    });
    return 0;
  };
}

#ifdef GENMILL_AMX
// the int8 copy's sums on AMX tiles (TDPBUSD), the copy packed as amx::blocks reads it (blocks of 32
// columns, K steps of 64 bytes)
static inline auto tile_sums(const Head& h, int64_t M) {
  return [&h, M](const uint8_t* xu, auto&& visit) {
    return amx::blocks(xu, h.Kq, h.wq, M, h.N, h.Kq, [&](const int32_t* c, int64_t row0, int rows, int64_t nb) {
      visit(c, 32, row0, rows, nb, std::min<int64_t>(32, h.N - nb * 32));
    });
  };
}

// The exact pass of a bf16 head on AMX tiles: the kept columns' logits on the tiles themselves, one
// row against 16 columns at a time, their K steps in order from zero, as amx::linear sums each output
// (a tile's element depends on its own A row and B column only), so the values are the head's bit
// for bit without modelling TDPBF16PS's internal order of additions. The columns' rows are turned
// into the VNNI pair layout of a B tile by 16 x 16 transposes.
class AmxExact {
 public:
  explicit AmxExact(const Head& h)
      : h_(h), steps_((h.K + 31) / 32),
        x_(static_cast<bf16*>(std::aligned_alloc(64, steps_ * 64))),
        b_(static_cast<float*>(std::aligned_alloc(64, steps_ * 1024))) {
    amx::configure_one_row();
  }
  ~AmxExact() {
    _tile_release();
    std::free(x_);
    std::free(b_);
  }
  AmxExact(const AmxExact&) = delete;
  AmxExact& operator=(const AmxExact&) = delete;

  __m512 operator()(const bf16* xi, const int32_t* cols, int n) {
    if (xi != row_) {  // the row, zero-padded to whole K steps (as the packed head is)
      std::memcpy(x_, xi, h_.K * sizeof(bf16));
      std::memset(x_ + h_.K, 0, (steps_ * 32 - h_.K) * sizeof(bf16));
      row_ = xi;
    }
    const int32_t* w = static_cast<const int32_t*>(h_.rows);  // K pairs per column
    const int64_t pairs = h_.K / 2;
    for (int64_t ks = 0; ks < steps_; ++ks) {
      const __mmask16 m = first(int(std::min<int64_t>(16, pairs - ks * 16)));
      V16 r[16];  // (32-bit pairs, moved as floats)
      for (int j = 0; j < 16; ++j)
        r[j] = j < n ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(m, w + cols[j] * pairs + ks * 16)) : v_zero();
      transpose16(r);  // row p: pair p of the step, column by column (vec16.h)
      for (int p = 0; p < 16; ++p) _mm512_store_ps(b_ + ks * 256 + p * 16, r[p]);
    }
    _tile_zero(0);
    for (int64_t ks = 0; ks < steps_; ++ks) {
      _tile_loadd(4, x_ + ks * 32, 64);
      _tile_loadd(6, b_ + ks * 256, 64);
      _tile_dpbf16ps(0, 4, 6);
    }
    alignas(64) float c[16];
    _tile_stored(0, c, 64);
    return round_bf16(_mm512_add_ps(_mm512_load_ps(c), _mm512_setzero_ps()));  // as amx::linear, no bias
  }

 private:
  const Head& h_;
  const int64_t steps_;
  bf16* const x_;
  float* const b_;  // B tiles of the step's pairs (bit patterns, held as floats)
  const bf16* row_ = nullptr;
};

// the screen of a bf16 head on AMX tiles: the int8 copy summed on the tiles too, the exact pass on
// the bf16 tiles (AmxExact)
static int amx_screened_argmax(const bf16* x, int64_t sx, const Head& h, int64_t M, int64_t* ids, int64_t* kept) {
  return screen(x, sx, h, M, ids, kept, tile_sums(h, M), [&] { return AmxExact(h); });
}
#endif

// the screen of a head on GenMill's AVX-512 kernel (bf16 or fp32), its exact pass the kernel's own
// arithmetic; `amx`: the int8 copy summed on AMX tiles (packed for amx::blocks), else on VPDPBUSD
template <typename T>
static int screened_argmax(const T* x, int64_t sx, const Head& h, int64_t M, bool amx, int64_t* ids, int64_t* kept) {
  const auto pass = [&] { return [&](const T* xi, const int32_t* cols, int n) { return exact(xi, h, cols, n); }; };
#ifdef GENMILL_AMX
  if (amx) return screen(x, sx, h, M, ids, kept, tile_sums(h, M), pass);
#endif
  if (amx) return 1;
  return screen(x, sx, h, M, ids, kept, panel_sums(h, M), pass);
}

}  // namespace i8screen

#endif
