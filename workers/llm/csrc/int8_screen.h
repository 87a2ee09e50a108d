// Greedy picks for a bf16 LM head from an int8 copy of it, exact: the same token as the argmax of
// the bf16 logits GenMill's AVX-512 linear computes (csrc/avx512_linear.h), for about half its
// multiply-add cost on a CPU with AVX512_VNNI (VPDPBUSD sums four int8 products per 32-bit lane
// where VDPBF16PS sums two bf16 ones) and half its weight bytes.
//
// Row x (bf16, K even) is quantized per row: s = max|x| / 127, q = round(x / s) in [-127, 127],
// sent as unsigned q + 128 (VPDPBUSD multiplies unsigned by signed bytes; 128 x each column's weight
// sum comes off again). Column v of the head: W_v ~ c_v wq_v (c_v = max|W_v| / 127). With y_v the
// kernel's bf16 logit (fp32 sums of the bf16 products, K roundings, then one rounding to bf16) and
// a_v = s c_v sum_k q_k wq_vk:
//   |sum_k x_k W_vk - a_v| <= |x - s q|_inf |W_v|_1 + |s q|_2 |W_v - c_v wq_v|_2
//   |fp32 sum - sum_k x_k W_vk| <= g |x|_inf |W_v|_1,   g = K 2^-24 / (1 - K 2^-24)
// so e = alpha max|W_v|_1 + beta max|W_v - c_v wq_v|_2 over a panel's 48 columns (+ margins for the
// fp32 arithmetic of a_v and of the bound itself, and for the denormals VDPBF16PS flushes) bounds
// |fp32 sum - a_v| in that panel. Rounding to bf16 keeps order, so with L = max_v (a_v - e): every v
// whose a_v + e is below the least value rounding to bf16(L) has a bf16 logit below the largest one.
// The others are recomputed exactly (the kernel's instruction, K order and rounding, one vocabulary
// column per vector lane) and the first maximum among them is the pick. On the benchmark models'
// hidden states 55-75 of 32-50 thousand logits per row stay (bench/llm_head_screen.py); a row that
// keeps more than MAX_KEPT, or has a NaN or infinity, is left to the caller (-1), which runs the
// bf16 head for it. Measured on a 2-core Xeon's AVX-512 units, 64 rows: 4.5x the AVX-512 bf16 head
// and its argmax (an int8 matmul at 1.3 TOP/s, the bound and exact pass a quarter of the time); its
// AMX tiles run the bf16 head faster still, so the engine screens in int8 only without AMX.

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
  const bf16* rows;       // the bf16 head, row-major [N, K] (K even): the exact pass reads it
  float tiny;             // covers the products VDPBF16PS flushes to zero
  int64_t N, K, Kq, NB;  // NB: panels
};

struct Row {
  float s = 1, inv_s = 1, alpha = 0, beta = 0;
  bool ok = false;  // finite: screened
};

struct Kept {
  int32_t col;
  float ub;
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
static void quantize(const bf16* x, int64_t sx, const Head& h, int64_t M, uint8_t* xu, Row* rows) {
  const double g = h.K * std::ldexp(1.0, -24) / (1 - h.K * std::ldexp(1.0, -24));
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < M; ++i) {
    const bf16* xi = x + i * sx;
    uint8_t* out = xu + i * h.Kq;
    float amax = 0;
    bool finite = true;
    for (int64_t k = 0; k < h.K; ++k) {
      const float v = widen(xi[k]);
      finite = finite && std::isfinite(v);
      amax = std::max(amax, std::fabs(v));
    }
    Row r;
    std::fill(out, out + h.Kq, uint8_t(128));
    if (finite) {
      const float inv = amax > 0 ? 127.0f / amax : 0.0f;
      double q2 = 0;
      for (int64_t k = 0; k < h.K; ++k) {
        const float q = std::clamp(std::nearbyint(widen(xi[k]) * inv), -127.0f, 127.0f);
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
  const int32_t* w = reinterpret_cast<const int32_t*>(h.rows);  // K pairs
  __m512 acc = _mm512_setzero_ps();
  for (int64_t s = 0; s < h.K / 2; ++s) {
    const __m512i pair = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, w + s, 4);
    acc = zlin::Step<bf16>::madd(acc, zlin::Step<bf16>::x(x + 2 * s), _mm512_castsi512_ps(pair));
  }
  return round_bf16(_mm512_add_ps(acc, _mm512_setzero_ps()));  // the kernel adds a zero bias (-0 -> +0)
}

// ids[i]: the first maximum of row i's bf16 logits, or -1 (a NaN or infinity, or too many kept);
// kept[i]: how many logits row i recomputed
static int screened_argmax(const bf16* x, int64_t sx, const Head& h, int64_t M, int64_t* ids, int64_t* kept) {
  std::vector<uint8_t> xu(M * h.Kq);
  std::vector<Row> rows(M);
  quantize(x, sx, h, M, xu.data(), rows.data());

  struct alignas(64) Lanes {
    float v[16];
  };
  struct Thread {
    std::vector<Lanes> lo;                // per row: the largest lower bound seen, lane by lane
    std::vector<float> bar;               // per row: threshold(the largest lower bound) at the last refresh
    std::vector<std::vector<Kept>> kept;  // per row: columns whose upper bound reached the bar
    int64_t panels = 0;
  };
  std::vector<Thread> threads(omp_get_max_threads());
  for (Thread& t : threads) {
    t.lo.resize(M);
    for (Lanes& l : t.lo) std::fill(l.v, l.v + 16, -INFINITY);
    t.bar.assign(M, -INFINITY);
    t.kept.resize(M);
  }
  const auto refresh = [](Thread& t, int64_t i) { t.bar[i] = threshold(_mm512_reduce_max_ps(_mm512_load_ps(t.lo[i].v))); };
  // per panel: 2^-20 of the largest |a' / s| (|sum_k q_k wq_vk| <= Kq 127^2)
  std::vector<float> big(h.NB);
  for (int64_t p = 0; p < h.NB; ++p) big[p] = up(double(h.Kq) * 127 * 127 * h.scale_max[p] * std::ldexp(1.0, -20));

  zlin::panels(xu.data(), h.Kq, h.wq, M, h.N, h.Kq, [&](const float* acc, int64_t m0, int64_t mc, int64_t nb,
                                                         int64_t cols) {
    Thread& t = threads[omp_get_thread_num()];
    const int64_t c0 = nb * zlin::NR;
    const int nv = int((cols + 15) / 16);
    __m512i cs[zlin::NV];
    __m512 sc[zlin::NV];
    __mmask16 valid[zlin::NV];
    for (int v = 0; v < nv; ++v) {
      valid[v] = first(int(std::min<int64_t>(16, cols - 16 * v)));
      cs[v] = _mm512_maskz_loadu_epi32(valid[v], h.colsum + c0 + 16 * v);
      sc[v] = _mm512_maskz_loadu_ps(valid[v], h.scale + c0 + 16 * v);
    }
    // the bars follow the lower bounds after 1, 2, 4, 8 and then every 16 panels: a stale bar is
    // lower, so it only keeps more columns (a lane-wise max a panel is far cheaper than a reduction)
    const int64_t seen = ++t.panels;
    const bool fresh = (seen & (seen - 1)) == 0 || seen % 16 == 0;
    for (int64_t r = 0; r < mc; ++r) {
      const int64_t i = m0 + r;
      const Row& row = rows[i];
      if (!row.ok) continue;
      // the logit v of a column is within e of s a', a' = float(sum) * c_v (in fp32): e covers the
      // bound and the fp32 roundings of a' and of what is computed from it (2^-20 of the largest
      // |s a'| the panel allows; the margins of alpha and beta cover the roundings of e itself)
      const float e = std::fma(row.alpha, h.l1[nb], std::fma(row.beta, h.err2[nb], std::fma(row.s, big[nb], h.tiny)));
      // a column is kept where s a' + e may reach the bar: a' >= (bar - e) / s, a little lower
      const float q = (t.bar[i] - e) * row.inv_s;
      const float keep_at = q - std::fabs(q) * std::ldexp(1.0f, -20);
      const __m512 at = _mm512_set1_ps(keep_at);
      __m512 top = _mm512_set1_ps(-INFINITY);
      for (int v = 0; v < nv; ++v) {
        const __m512i sum = _mm512_sub_epi32(_mm512_load_si512(acc + r * zlin::NR + 16 * v), cs[v]);
        const __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), sc[v]);
        top = _mm512_mask_max_ps(top, valid[v], top, a);
        __mmask16 hit = _mm512_mask_cmp_ps_mask(valid[v], a, at, _CMP_GE_OQ);
        if (!hit) continue;
        alignas(64) float u[16];
        _mm512_store_ps(u, a);
        for (; hit; hit &= hit - 1) {
          const int j = __builtin_ctz(hit);
          t.kept[i].push_back({int32_t(c0 + 16 * v + j), up(double(u[j]) * row.s + e)});  // a few
        }
      }
      // lower bounds s a' - e of the panel's logits, lane-wise (the fused multiply-subtract rounds
      // once, within the margins of e)
      const __m512 lb = _mm512_fmsub_ps(top, _mm512_set1_ps(row.s), _mm512_set1_ps(e));
      _mm512_store_ps(t.lo[i].v, _mm512_max_ps(_mm512_load_ps(t.lo[i].v), lb));
      std::vector<Kept>& keep = t.kept[i];
      if (fresh || int64_t(keep.size()) > PRUNE_AT) refresh(t, i);
      if (int64_t(keep.size()) > PRUNE_AT) {  // the bar has risen since most of these were kept
        const float b = t.bar[i];
        keep.erase(std::remove_if(keep.begin(), keep.end(), [&](const Kept& k) { return k.ub < b; }), keep.end());
      }
    }
  });

#pragma omp parallel for schedule(dynamic)
  for (int64_t i = 0; i < M; ++i) {
    ids[i] = -1;
    kept[i] = 0;
    if (!rows[i].ok) continue;
    float lo = -INFINITY;
    for (const Thread& t : threads) lo = std::max(lo, _mm512_reduce_max_ps(_mm512_load_ps(t.lo[i].v)));
    const float bar = threshold(lo);
    std::vector<int32_t> cols;
    for (const Thread& t : threads)
      for (const Kept& k : t.kept[i])
        if (k.ub >= bar) cols.push_back(k.col);
    kept[i] = int64_t(cols.size());
    if (cols.empty() || kept[i] > MAX_KEPT) continue;
    std::sort(cols.begin(), cols.end());
    const bf16* xi = x + i * sx;
    float best = -INFINITY;
    int64_t pick = -1;
    bool nan = false;
    for (size_t j0 = 0; j0 < cols.size(); j0 += 16) {
      const int n = int(std::min<size_t>(16, cols.size() - j0));
      alignas(64) float y[16];
      _mm512_store_ps(y, exact(xi, h, cols.data() + j0, n));
      for (int j = 0; j < n; ++j) {
        nan = nan || std::isnan(y[j]);
        if (y[j] > best || pick < 0) best = y[j], pick = cols[j0 + j];  // ascending columns: the first max
      }
    }
    if (!nan) ids[i] = pick;
  }
  return 0;
}

}  // namespace i8screen

#endif
