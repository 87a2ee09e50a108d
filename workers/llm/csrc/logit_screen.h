// Greedy picks for an fp32 LM head from a bf16 copy of it, exact: the same token as the argmax of
// the fp32 logits GenMill's AVX-512 linear computes, at about half the cost on a CPU with
// AVX512_BF16 (VDPBF16PS runs twice the multiply-adds of an fp32 FMA).
//
// For row x and vocabulary row w_v, let y_v be the fp32 logit (the AVX-512 kernel's arithmetic: c =
// 0, then c = fma(x[k], w_v[k], c) for k in order) and a_v the approximate one (x and W rounded to
// bf16, products summed in fp32, rounded to bf16). With u = 2^-8 (bf16's unit roundoff) and
// g = K 2^-24 / (1 - K 2^-24) (K fp32 roundings):
//   |y_v - a_v| <= (2u + u^2 + g (1 + (1 + u)^2)) sum_k |x_k w_vk| + u |a_v| / (1 - u)
//               <= c1 |x| |w_v| + u' |a_v|  =: e_v          (Cauchy-Schwarz; |w_v| <= wmax)
// (plus a negligible term for the denormals VDPBF16PS flushes). Every v with a_v + e_v below
// L = max_v (a_v - e_v) has y_v < L <= max y, so the argmax is among the others: those are
// recomputed exactly, in the kernel's order, and the first maximum among them is the pick. A
// random or flat row leaves a handful of candidates; a row with a NaN or infinity is left to the
// caller (-1).

#pragma once

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define GENMILL_LOGIT_SCREEN 1

#include <immintrin.h>
#include <omp.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <vector>

namespace lscreen {

// exact fp32 logits of x against n (<= 8) weight rows: the AVX-512 linear's per-output arithmetic,
// n independent chains
static inline void exact(const float* x, const float* const* w, int n, int64_t K, float* out) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t k = 0; k < K; ++k) {
    const float xk = x[k];
    for (int j = 0; j < 8; ++j)
      if (j < n) acc[j] = std::fma(xk, w[j][k], acc[j]);
  }
  for (int j = 0; j < n; ++j) out[j] = acc[j] + 0.0f;  // + 0: the kernel adds a zero bias (-0 -> +0)
}

static inline __m512 widen(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// ids[i] = argmax_v y_v of row i (first maximum), or -1 where a value is not finite;
// candidates[i] = how many logits row i recomputed
static void screened_argmax(const float* x, int64_t sx, const uint16_t* approx, const float* w, float wmax,
                            int64_t M, int64_t N, int64_t K, int64_t* ids, int64_t* candidates) {
  const double u = 1.0 / 256, gk = K * std::ldexp(1.0, -24) / (1 - K * std::ldexp(1.0, -24));
  // margins rounded up (x 1.001, 1.005): they also cover the fp32 rounding of the bounds below
  const double c1 = (2 * u + u * u + gk * (1 + (1 + u) * (1 + u))) * 1.001;
  const float cu = float(u / (1 - u) * 1.005);
#pragma omp parallel
  {
    std::vector<int64_t> cand;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      const float* xi = x + i * sx;
      const uint16_t* a = approx + i * N;
      double ss = 0;
      for (int64_t k = 0; k < K; ++k) ss += double(xi[k]) * xi[k];
      const double base_d = (c1 * std::sqrt(ss) * wmax + 1e-30 * double(K)) * (1 + 1e-6);
      ids[i] = -1;
      candidates[i] = 0;
      if (!(base_d < FLT_MAX)) continue;
      const __m512 base = _mm512_set1_ps(float(base_d)), vcu = _mm512_set1_ps(cu);
      const __m512 big = _mm512_set1_ps(FLT_MAX);
      // pass 1: the largest lower bound, and whether every value is finite
      __m512 lo = _mm512_set1_ps(-INFINITY);
      __mmask16 bad = 0;
      for (int64_t v = 0; v < N; v += 16) {
        const __mmask16 m = N - v >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (N - v)) - 1);
        const __m512 y = widen(a + v, m), ay = _mm512_abs_ps(y);
        bad |= _mm512_mask_cmp_ps_mask(m, ay, big, _CMP_NLE_UQ);  // |y| > FLT_MAX, or NaN
        lo = _mm512_mask_max_ps(lo, m, lo, _mm512_sub_ps(_mm512_sub_ps(y, base), _mm512_mul_ps(vcu, ay)));
      }
      if (bad) continue;
      const __m512 L = _mm512_set1_ps(_mm512_reduce_max_ps(lo));
      // pass 2: the candidates, in index order
      cand.clear();
      for (int64_t v = 0; v < N; v += 16) {
        const __mmask16 m = N - v >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (N - v)) - 1);
        const __m512 y = widen(a + v, m);
        const __m512 up = _mm512_add_ps(_mm512_add_ps(y, base), _mm512_mul_ps(vcu, _mm512_abs_ps(y)));
        for (uint32_t hit = _mm512_mask_cmp_ps_mask(m, up, L, _CMP_GE_OQ); hit; hit &= hit - 1)
          cand.push_back(v + __builtin_ctz(hit));
      }
      // exact logits of the candidates; the first maximum wins, as in the argmax kernel
      int64_t pick = -1;
      float best = -INFINITY;
      bool finite = true;
      for (size_t c0 = 0; c0 < cand.size(); c0 += 8) {
        const int n = int(std::min<size_t>(8, cand.size() - c0));
        const float* rows[8];
        float y[8];
        for (int j = 0; j < n; ++j) rows[j] = w + cand[c0 + j] * K;
        exact(xi, rows, n, K, y);
        for (int j = 0; j < n; ++j) {
          finite = finite && std::isfinite(y[j]);
          if (pick < 0 || y[j] > best) pick = cand[c0 + j], best = y[j];
        }
      }
      candidates[i] = int64_t(cand.size());
      if (finite) ids[i] = pick;
    }
  }
}

}  // namespace lscreen

#endif
