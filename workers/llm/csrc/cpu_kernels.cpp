// GenMill's CPU kernels for the LLM engine (AVX-512 or AVX2, fp32 and bf16; OpenMP over the work items).
//
// Built on first use by workers/llm/cpu_kernels.py (g++ -O3 -march=native -fopenmp
// -ffp-contract=off). Every kernel takes raw pointers plus strides; the Python side checks shapes,
// dtypes and layouts. Accumulation is always fp32. Where torch rounds an intermediate to the
// model dtype (bf16), the kernels round at the same places, so results stay close to the eager path.
//
//   genmill_decode_step   new tokens (one or a few per row): RoPE, KV-cache write, attention
//   genmill_prefill_step  a prompt chunk (every row at the same positions): the same, causal
//   genmill_rms_norm      (residual add +) RMSNorm, transformers' rounding order
//   genmill_layer_norm    (residual add +) LayerNorm, torch's
//   genmill_silu_mul      SwiGLU's gate
//   genmill_argmax        greedy pick
//   genmill_screened_argmax  greedy pick of an fp32 LM head from its bf16 copy, exact
//   genmill_int8_screen   greedy pick of a bf16 LM head from its int8 copy, exact
//   genmill_amx_linear    bf16 linear on AMX tiles, a row's result independent of the row count
//   genmill_amx_argmax    the argmax of each row of its output, without writing the output
//   genmill_fma_linear    fp32 linear on AVX2 + FMA tiles, the same property

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "vec16.h"
#include "amx_linear.h"
#include "fma_linear.h"
#include "avx512_linear.h"  // after vec16.h, whose masked stores it uses
#include "logit_screen.h"
#include "int8_screen.h"  // after avx512_linear.h, whose panels it runs

// the value x takes when stored in T: identity for fp32, bf16 rounding for bf16
static inline V16 round_to(V16 x, const float*) { return x; }
static inline V16 round_to(V16 x, const bf16*) { return round_bf16(x); }

// exp of 16 floats: 2^n * p(r), x = n ln2 + r, |r| <= ln2/2, degree-6 Taylor (rel. error ~2e-7)
static inline V16 exp16(V16 x) {
  x = v_max(x, v_set1(-87.0f));
  const V16 n = v_round(v_mul(x, v_set1(1.44269504f)));
  V16 r = v_fnmadd(n, v_set1(0.693145752f), x);
  r = v_fnmadd(n, v_set1(1.42860677e-6f), r);
  V16 p = v_set1(1.0f / 720);
  p = v_fmadd(p, r, v_set1(1.0f / 120));
  p = v_fmadd(p, r, v_set1(1.0f / 24));
  p = v_fmadd(p, r, v_set1(1.0f / 6));
  p = v_fmadd(p, r, v_set1(0.5f));
  p = v_fmadd(p, r, v_set1(1.0f));
  p = v_fmadd(p, r, v_set1(1.0f));
  return v_scalef(p, n);
}

// RoPE in transformers' "rotate half" layout on one head of D values (fp32 in and out):
// y[i] = x[i] cos[i] - x[i + D/2] sin[i],  y[i + D/2] = x[i + D/2] cos[i + D/2] + x[i] sin[i + D/2]
template <int D>
static inline void rope(float* x, const float* cos, const float* sin) {
  constexpr int H = D / 2;
  if constexpr (H % 16 == 0) {
    // 16 pairs at a time (scalar stores followed by the vector loads of the caller would stall)
    for (int i = 0; i < H; i += 16) {
      const V16 lo = load16(x + i), hi = load16(x + i + H);
      // products rounded first, then added: the same two roundings as torch's q*cos + rot(q)*sin
      store16(x + i, v_sub(v_mul(lo, load16(cos + i)), v_mul(hi, load16(sin + i))));
      store16(x + i + H, v_add(v_mul(hi, load16(cos + i + H)), v_mul(lo, load16(sin + i + H))));
    }
  } else {
    alignas(64) float lo[16], hi[16];
    for (int i = 0; i < H; ++i) lo[i] = x[i], hi[i] = x[i + H];
    for (int i = 0; i < H; ++i) {
      const float a = lo[i] * cos[i], b = hi[i] * sin[i];
      const float c = hi[i] * cos[i + H], d = lo[i] * sin[i + H];
      x[i] = a - b;
      x[i + H] = c + d;
    }
  }
}

// one head of D values from T storage to fp32
template <typename T, int D>
static inline void head_to_float(float* dst, const T* src) {
  for (int c = 0; c < D; c += 16) store16(dst + c, load16(src + c));
}

// ---------------------------------------------------------------------------------------------
// decode: one query per row over the static KV cache

// query rotated (RoPE), rounded to T, (OPT) scaled and rounded again: the query torch would hold
template <typename T, int D>
static inline void query_as_torch(float* dst, const T* src, const float* cos, const float* sin, float q_scale) {
  head_to_float<T, D>(dst, src);
  if (cos != nullptr) rope<D>(dst, cos, sin);
  for (int c = 0; c < D; c += 16) {
    V16 x = round_to(load16(dst + c), (const T*)nullptr);
    if (q_scale != 1.0f) x = round_to(v_mul(x, v_set1(q_scale)), (const T*)nullptr);
    store16(dst + c, x);
  }
}


// q . k partial sums for one key row (16 lanes, summed later by hsum16)
template <int D>
static inline V16 dot_partial(const V16* qv, const float* kr) {
  V16 a = v_mul(qv[0], load16(kr));
  for (int c = 1; c < D / 16; ++c) a = v_fmadd(qv[c], load16(kr + 16 * c), a);
  return a;
}
template <int D>
static inline V16 dot_partial(const V16* qv, const bf16* kr) {
#ifdef __AVX512BF16__
  if constexpr (D % 32 == 0) {  // qv holds q as bf16 pairs (see load_query): one dpbf16 per 32 values
    __m512 a = _mm512_setzero_ps();
    for (int c = 0; c < D / 32; ++c)
      a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_castps_si512(qv[c]), (__m512bh)_mm512_loadu_si512(kr + 32 * c));
    return a;
  }
#endif
  V16 a = v_mul(qv[0], load16(kr));
  for (int c = 1; c < D / 16; ++c) a = v_fmadd(qv[c], load16(kr + 16 * c), a);
  return a;
}
// q (fp32 values already rounded to T) in the form dot_partial wants
template <int D>
static inline void load_query(V16* qv, const float* q, const float*) {
  for (int c = 0; c < D / 16; ++c) qv[c] = load16(q + 16 * c);
}
template <int D>
static inline void load_query(V16* qv, const float* q, const bf16*) {
#ifdef __AVX512BF16__
  if constexpr (D % 32 == 0) {
    for (int c = 0; c < D / 32; ++c)
      qv[c] = (__m512)_mm512_cvtne2ps_pbh(load16(q + 32 * c + 16), load16(q + 32 * c));
    return;
  }
#endif
  for (int c = 0; c < D / 16; ++c) qv[c] = load16(q + 16 * c);
}

// acc += p * V row r. A bf16 row of D = 32m values loads as split32 pairs: the accumulators then
// hold each 32 columns as (even, odd), one ALU op per 16 values instead of a widening shuffle and
// a shift
template <int D>
static inline void add_row(V16* acc, float p, const float* r) {
  const V16 pv = v_set1(p);
  for (int c = 0; c < D / 16; ++c) acc[c] = v_fmadd(pv, load16(r + 16 * c), acc[c]);
}
template <int D>
static inline void add_row(V16* acc, float p, const bf16* r) {
  const V16 pv = v_set1(p);
  if constexpr (D % 32 == 0) {
    for (int c = 0; c < D / 32; ++c) {
      V16 even, odd;
      split32(r + 32 * c, even, odd);
      acc[2 * c] = v_fmadd(pv, even, acc[2 * c]);
      acc[2 * c + 1] = v_fmadd(pv, odd, acc[2 * c + 1]);
    }
  } else {
    for (int c = 0; c < D / 16; ++c) acc[c] = v_fmadd(pv, load16(r + 16 * c), acc[c]);
  }
}
// out = acc * inv, columns back in order
template <int D>
static inline void store_item(float* out, const V16* acc, float inv) {
  for (int c = 0; c < D / 16; ++c) store16(out + 16 * c, v_mul(acc[c], v_set1(inv)));
}
template <int D>
static inline void store_item(bf16* out, const V16* acc, float inv) {
  alignas(64) float split[D], row[D];
  for (int c = 0; c < D / 16; ++c) store16(split + 16 * c, v_mul(acc[c], v_set1(inv)));
  if constexpr (D % 32 == 0) {
    for (int c = 0; c < D / 32; ++c)
      for (int i = 0; i < 16; ++i) {
        row[32 * c + 2 * i] = split[32 * c + i];
        row[32 * c + 2 * i + 1] = split[32 * c + 16 + i];
      }
  } else {
    std::copy(split, split + D, row);
  }
  for (int c = 0; c < D / 16; ++c) store16(out + 16 * c, load16(row + 16 * c));
}

// Attention items (one query head of one token) run G at a time, their K and V passes interleaved
// chunk by chunk: G concurrent memory streams per thread instead of one. Reading a decode step's
// KV cache is bound by memory latency, not bandwidth: one stream per core reaches ~60% of what four
// do (measured on AMD Zen 4, 2 cores: 20 vs 33 GB/s). Register budget: G * D / 16 accumulators.
template <int D> constexpr int decode_group() { return D >= 256 ? 1 : (D == 128 ? 2 : 4); }

// How many keys ahead each stream's K and V rows are prefetched into L1, 0 for none. On the AMX
// Xeons (the -march=native build defines __AMX_TILE__) a bf16 cache's attention measured 15% faster
// with 8 (4: 9%, 12-32: 12-15%), fp32 even; on AMD Zen 5 a cross-group prefetch measured within
// noise and this one is not measured, so it stays off there.
template <typename T>
constexpr int decode_prefetch_keys() {
#ifdef __AMX_TILE__
  return sizeof(T) == 2 ? 8 : 0;
#else
  return 0;
#endif
}
template <typename T, int D>
static inline void prefetch_row(const T* p) {
  for (int i = 0; i < int(D * sizeof(T)); i += 64) _mm_prefetch((const char*)p + i, _MM_HINT_T0);
}

// one item's query, its K/V blocks and key count
template <typename T, int D>
struct DecodeItem {
  V16 qv[D / 16];
  const T* kp;
  const T* vp;
  int64_t n;
};

// B items (tokens), item b in cache row rows[b] at position pos[b]: a decode step has one item per
// row; a few tokens per row (speculative verification, short prompts) are one item each, their k/v
// all written before any of them attends, so each sees exactly the slots up to its position.
// Each (item, head)'s arithmetic depends on its own data only (not on its group), so a token scores
// the same in any batch.
template <typename T, int D>
static void decode_step(const T* q, int64_t sq, const T* k, int64_t sk, const T* v, int64_t sv, T* kc, T* vc,
                        const int64_t* rows, const int64_t* pos, const float* cos, const float* sin, T* out,
                        int64_t B, int64_t H, int64_t Hkv, int64_t S, float q_scale, float scale) {
  constexpr int G = decode_group<D>(), PF = decode_prefetch_keys<T>();
  const int64_t group = H / Hkv, items = B * H, groups = (items + G - 1) / G;
  const int64_t Sp = (S + 15) / 16 * 16;
  const V16 vscale = v_set1(scale);
#pragma omp parallel
  {
    alignas(64) float buf[D];
    // 1) each new token's k (rotated) and v go into slot pos[b] of cache row rows[b]
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t slot = ((rows[b] * Hkv + h) * S + pos[b]) * D;
        head_to_float<T, D>(buf, k + b * sk + h * D);
        if (cos != nullptr) rope<D>(buf, cos + pos[b] * D, sin + pos[b] * D);
        for (int c = 0; c < D; c += 16) store16(kc + slot + c, load16(buf + c));
        for (int c = 0; c < D; c += 16) store16(vc + slot + c, load16(v + b * sv + h * D + c));
      }
    }
    // (implicit barrier: every row's new k/v is in the cache before any query reads it)
    float* sc = (float*)std::aligned_alloc(64, G * Sp * sizeof(float));
#pragma omp for schedule(static)
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int g_n = int(std::min<int64_t>(G, items - gi * G));
      DecodeItem<T, D> it[G];
      int64_t longest = 0;
      for (int g = 0; g < g_n; ++g) {
        const int64_t b = (gi * G + g) / H, h = (gi * G + g) % H;
        it[g].n = pos[b] + 1;
        it[g].kp = kc + (rows[b] * Hkv + h / group) * S * D;
        it[g].vp = vc + (rows[b] * Hkv + h / group) * S * D;
        query_as_torch<T, D>(buf, q + b * sq + h * D, cos != nullptr ? cos + pos[b] * D : nullptr,
                             cos != nullptr ? sin + pos[b] * D : nullptr, q_scale);
        load_query<D>(it[g].qv, buf, (const T*)nullptr);
        longest = std::max(longest, it[g].n);
      }
      // the keys every item of a full group has (a decode step's group is G heads of one row: all
      // of its keys) run without per-key checks
      int64_t common = g_n == G ? it[0].n : 0;
      for (int g = 1; g < g_n; ++g) common = std::min(common, it[g].n);
      // scores, 16 keys at a time (one K pass per item), then the probabilities, then one V pass:
      // two passes measured ~20% faster here than an online softmax reading K and V tiles together
      V16 mx[G];
      for (int g = 0; g < G; ++g) mx[g] = v_set1(-INFINITY);
      for (int64_t s0 = 0; s0 < longest; s0 += 16) {
        // key by key across the items (the interleave that keeps G streams going), partial sums
        // parked in L1
        alignas(64) V16 part[G][16];
        if (s0 + 16 <= common) {
          for (int j = 0; j < 16; ++j)
            for (int g = 0; g < G; ++g) {
              if (PF) prefetch_row<T, D>(it[g].kp + std::min<int64_t>(s0 + j + PF, common - 1) * D);
              part[g][j] = dot_partial<D>(it[g].qv, it[g].kp + (s0 + j) * D);
            }
        } else {
          for (int j = 0; j < 16; ++j)
            for (int g = 0; g < G; ++g)
              part[g][j] = g < g_n && s0 + j < it[g].n ? dot_partial<D>(it[g].qv, it[g].kp + (s0 + j) * D)
                                                       : v_zero();
        }
        for (int g = 0; g < g_n; ++g) {
          if (s0 >= it[g].n) continue;
          const int cnt = int(std::min<int64_t>(16, it[g].n - s0));
          const V16 sv = v_mul(hsum16(part[g]), vscale);
          store16(sc + g * Sp + s0, sv);
          mx[g] = v_max_where(mx[g], sv, first(cnt));
        }
      }
      // probabilities (fp32; 0 past the last key) and their sums
      float inv[G];
      for (int g = 0; g < g_n; ++g) {
        const V16 m = v_set1(v_reduce_max(mx[g]));
        V16 lv = v_zero();
        float* p = sc + g * Sp;
        for (int64_t s0 = 0; s0 < it[g].n; s0 += 16) {
          const Mask valid = first(int(std::min<int64_t>(16, it[g].n - s0)));
          const V16 pv = v_zero_unless(exp16(v_sub(load16(p + s0), m)), valid);
          store16(p + s0, pv);
          lv = v_add(lv, pv);
        }
        inv[g] = 1.0f / v_reduce_add(lv);
      }
      // sum_j p_j V_j, fp32, keys in order per item; the G items' accumulator chains interleave
      // over their common keys, then each item finishes alone. For a bf16 cache the accumulators
      // hold each 32 columns in (even, odd) order (add_row), put back in order by store_item.
      V16 acc[G][D / 16];
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < D / 16; ++c) acc[g][c] = v_zero();
      for (int64_t j = 0; j < common; ++j)
        for (int g = 0; g < G; ++g) {
          if (PF) prefetch_row<T, D>(it[g].vp + std::min<int64_t>(j + PF, common - 1) * D);
          add_row<D>(acc[g], sc[g * Sp + j], it[g].vp + j * D);
        }
      for (int g = 0; g < g_n; ++g)
        for (int64_t j = common; j < it[g].n; ++j) add_row<D>(acc[g], sc[g * Sp + j], it[g].vp + j * D);
      for (int g = 0; g < g_n; ++g) store_item<D>(out + (gi * G + g) * D, acc[g], inv[g]);
    }
    std::free(sc);
  }
}

// ---------------------------------------------------------------------------------------------
// prefill: a chunk of Lq tokens at positions start..start+Lq-1 in every row (prompts are prefilled
// from position 0, long ones in chunks): RoPE, the chunk's k/v into cache row rows[b], and causal
// attention over cache slots 0..start+Lq-1, per (row, kv head)

#include "amx_attention.h"  // after exp16, which it uses

// into L2, the lines of one head of D values
constexpr int64_t PREFETCH_TOKENS = 8;
template <typename T, int D>
static inline void prefetch_head(const T* p) {
  for (int64_t c = 0; c < int64_t(D * sizeof(T)); c += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p) + c, _MM_HINT_T1);
}

// How prefill scores take K: fp32 values, one d per step (FMA); or, for a bf16 cache on a CPU
// with AVX512_BF16, pairs of values, two d per step (VDPBF16PS: exact products of the bf16 query
// and key, summed in fp32 like the decode kernel's dot_partial), with half the loads and steps
template <typename T, int D, typename = void>
struct PairQK {
  static constexpr int K = 1;
  static inline V16 load(const T* p) { return load16(p); }
  static inline void query(float* dst, const float* q) { std::copy(q, q + D, dst); }
  static inline V16 madd(V16 q, V16 k, V16 acc) { return v_fmadd(q, k, acc); }
};
#ifdef __AVX512BF16__
template <int D>
struct PairQK<bf16, D, std::enable_if_t<D % 32 == 0>> {
  static constexpr int K = 2;
  static inline V16 load(const bf16* p) { return _mm512_castsi512_ps(_mm512_loadu_si512(p)); }
  // q (fp32 values already rounded to bf16) as pairs: word i = (q[2i], q[2i + 1])
  static inline void query(float* dst, const float* q) {
    for (int c = 0; c < D / 32; ++c)
      store16(dst + 16 * c, (__m512)_mm512_cvtne2ps_pbh(load16(q + 32 * c + 16), load16(q + 32 * c)));
  }
  static inline V16 madd(V16 q, V16 k, V16 acc) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_castps_si512(q), (__m512bh)_mm512_castps_si512(k));
  }
};
#endif

// R query rows at once: the key tile (and value rows) loaded once serve R rows
template <int D> constexpr int prefill_rows() { return D <= 64 ? 4 : (D == 128 ? 2 : 1); }

template <typename T, int D>
static void prefill_step(const T* q, const int64_t* qs, const T* k, const int64_t* ks, const T* v,
                         const int64_t* vs, T* kc, T* vc, const int64_t* cache_rows, int64_t start,
                         const float* cos, const float* sin, T* out, int64_t B, int64_t H, int64_t Hkv, int64_t Lq,
                         int64_t S, float q_scale, float scale) {
  // q/k/v: [B, Lq, heads * D] rows with strides {batch, token} (elements); out is [B, Lq, H, D]
  constexpr int R = prefill_rows<D>();
  const int64_t group = H / Hkv;
  const int64_t Lk = start + Lq;  // query i sits at position start + i and sees keys 0..start+i
  const int64_t Lp = (Lk + 31) / 32 * 32;  // whole 32-key steps (zero-padded keys)
  // bf16 on AMX: QK^T and PV on the tiles (amx_attention.h); the rest as below
  bool tiles = false;
#ifdef GENMILL_AMX
  if constexpr (std::is_same_v<T, bf16> && D % 32 == 0) tiles = amx::permitted();
#endif
#pragma omp parallel
  {
    std::vector<float> kt(tiles ? 0 : D * Lp), vf(tiles ? 0 : Lk * D), sc(tiles ? 0 : R * Lp);
    alignas(64) float qf[R][D];
#ifdef GENMILL_AMX
    amx_attn::Workspace ws;
    if (tiles) amx::configure();
#endif
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t hk = 0; hk < Hkv; ++hk) {
        T* kcb = kc + (cache_rows[b] * Hkv + hk) * S * D;
        T* vcb = vc + (cache_rows[b] * Hkv + hk) * S * D;
        // the chunk's k (rotated) and v go into the cache; this (row, kv head) owns its block
        alignas(64) float buf[D];
        for (int64_t i = 0; i < Lq; ++i) {
          // a token's q/k/v are a strided slice of the projection's output, which the linear may
          // have streamed past the caches: fetch a few tokens ahead, and this item's query heads
          // for the attention below
          if (i + PREFETCH_TOKENS < Lq) {
            const int64_t f = i + PREFETCH_TOKENS;
            prefetch_head<T, D>(k + b * ks[0] + f * ks[1] + hk * D);
            prefetch_head<T, D>(v + b * vs[0] + f * vs[1] + hk * D);
            for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
              prefetch_head<T, D>(q + b * qs[0] + f * qs[1] + h * D);
          }
          head_to_float<T, D>(buf, k + b * ks[0] + i * ks[1] + hk * D);
          if (cos != nullptr) rope<D>(buf, cos + (start + i) * D, sin + (start + i) * D);
          for (int c = 0; c < D; c += 16) store16(kcb + (start + i) * D + c, load16(buf + c));
          for (int c = 0; c < D; c += 16) store16(vcb + (start + i) * D + c, load16(v + b * vs[0] + i * vs[1] + hk * D + c));
        }
#ifdef GENMILL_AMX
        if constexpr (std::is_same_v<T, bf16> && D % 32 == 0) {
          if (tiles) {
            const auto query = [&](float* dst, const T* src, int64_t p) {
              query_as_torch<T, D>(dst, src, cos != nullptr ? cos + p * D : nullptr,
                                   cos != nullptr ? sin + p * D : nullptr, q_scale);
            };
            amx_attn::prefill_heads<D>(q + b * qs[0], qs[1], kcb, vcb, start, Lq, hk * group, (hk + 1) * group,
                                       scale, out + b * Lq * H * D, H * D, ws, query);
            continue;
          }
        }
#endif
        // K transposed to [D][Lp] (zero-padded) in 16 x 16 blocks, and V as fp32, once for the
        // heads of this kv head; with bf16 pairs, K's 32-bit words (pairs of values) transposed to
        // [D/2][Lp] instead
        for (int64_t j0 = 0; j0 < Lp; j0 += 16) {
          const int cnt = int(std::max<int64_t>(0, std::min<int64_t>(16, Lk - j0)));
          for (int d0 = 0; d0 < D / PairQK<T, D>::K; d0 += 16) {
            V16 blk[16];
            for (int j = 0; j < 16; ++j)
              blk[j] = j < cnt ? PairQK<T, D>::load(kcb + (j0 + j) * D + PairQK<T, D>::K * d0) : v_zero();
            transpose16(blk);
            for (int d = 0; d < 16; ++d) store16(kt.data() + (d0 + d) * Lp + j0, blk[d]);
          }
        }
        for (int64_t j = 0; j < Lk; ++j) head_to_float<T, D>(vf.data() + j * D, vcb + j * D);
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          for (int64_t i0 = 0; i0 < Lq; i0 += R) {
            const int rows = int(std::min<int64_t>(R, Lq - i0));
            for (int r = 0; r < R; ++r) {
              const int64_t i = i0 + r;
              if (r < rows)
                query_as_torch<T, D>(qf[r], q + b * qs[0] + i * qs[1] + h * D,
                                     cos != nullptr ? cos + (start + i) * D : nullptr,
                                     cos != nullptr ? sin + (start + i) * D : nullptr, q_scale);
              else std::fill(qf[r], qf[r] + D, 0.0f);
            }
            const int64_t n = start + i0 + rows;  // keys 0..n-1 are visible to some row of the block
            // scores: R rows x 32 keys per step (2R independent FMA chains), the key tiles read
            // once per d for the R rows; scaled as they are stored
            const V16 vscale = v_set1(scale);
            alignas(64) float qk[R][D];  // the queries as the K step takes them
            for (int r = 0; r < R; ++r) PairQK<T, D>::query(qk[r], qf[r]);
            for (int64_t j0 = 0; j0 < n; j0 += 32) {
              V16 a0[R], a1[R];
              for (int r = 0; r < R; ++r) a0[r] = a1[r] = v_zero();
              for (int d = 0; d < D / PairQK<T, D>::K; ++d) {
                V16 k0 = load16(kt.data() + d * Lp + j0), k1 = load16(kt.data() + d * Lp + j0 + 16);
                in_register(k0);  // one load for the R rows, not one per row (measured 1.3-1.9x)
                in_register(k1);
                for (int r = 0; r < R; ++r) {
                  const V16 qd = v_set1(qk[r][d]);
                  a0[r] = PairQK<T, D>::madd(qd, k0, a0[r]);
                  a1[r] = PairQK<T, D>::madd(qd, k1, a1[r]);
                }
              }
              for (int r = 0; r < R; ++r) {
                store16(sc.data() + r * Lp + j0, v_mul(a0[r], vscale));
                store16(sc.data() + r * Lp + j0 + 16, v_mul(a1[r], vscale));
              }
            }
            // softmax of each row over its causal prefix; later keys get probability 0; the
            // normalisation (1 / sum) is applied to the output row
            float inv[R];
            std::fill(inv, inv + R, 0.0f);
            for (int r = 0; r < rows; ++r) {
              float* s = sc.data() + r * Lp;
              const int64_t nr = start + i0 + r + 1;
              V16 mx = v_set1(-INFINITY);
              for (int64_t j0 = 0; j0 < nr; j0 += 16)
                mx = v_max_where(mx, load16(s + j0), first(int(std::min<int64_t>(16, nr - j0))));
              const V16 vm = v_set1(v_reduce_max(mx));
              V16 lv = v_zero();
              for (int64_t j0 = 0; j0 < n; j0 += 16) {
                const Mask valid = first(int(std::max<int64_t>(0, std::min<int64_t>(16, nr - j0))));
                const V16 p = v_zero_unless(exp16(v_sub(load16(s + j0), vm)), valid);
                store16(s + j0, p);
                lv = v_add(lv, p);
              }
              inv[r] = 1.0f / v_reduce_add(lv);
            }
            // out rows = P V: each value row read once for the R rows
            V16 o[R][D / 16];
            for (int r = 0; r < R; ++r)
              for (int c = 0; c < D / 16; ++c) o[r][c] = v_zero();
            for (int64_t j = 0; j < n; ++j) {
              const float* vr = vf.data() + j * D;
              for (int c = 0; c < D / 16; ++c) {
                V16 x = load16(vr + 16 * c);
                in_register(x);  // one load for the R rows
                for (int r = 0; r < R; ++r)
                  o[r][c] = v_fmadd(v_set1(sc[r * Lp + j]), x, o[r][c]);
              }
            }
            for (int r = 0; r < rows; ++r) {
              T* dst = out + ((b * Lq + i0 + r) * H + h) * D;
              for (int c = 0; c < D / 16; ++c) store16(dst + 16 * c, v_mul(o[r][c], v_set1(inv[r])));
            }
          }
        }
      }
    }
#ifdef GENMILL_AMX
    if (tiles) _tile_release();
#endif
  }
}

// ---------------------------------------------------------------------------------------------
// the residual add before a norm: 16 columns of a row from c, x + res rounded to T and stored to
// s (just x when res is null)
template <typename T>
static inline V16 residual_sum(const T* x, const T* res, T* s, int64_t c, Mask m) {
  V16 a = load16(x + c, m);
  if (res != nullptr) {
    a = round_to(v_add(a, load16(res + c, m)), (const T*)nullptr);
    store16(s + c, a, m);
  }
  return a;
}

// ---------------------------------------------------------------------------------------------
// RMSNorm, optionally after a residual add: s = x + res (stored), y = w * T(s / rms(s))

template <typename T>
static void rms_norm(const T* x, const T* res, const T* w, T* sum_out, T* y, int64_t N, int64_t C, float eps) {
#pragma omp parallel for schedule(static) if (N * C >= 32768)
  for (int64_t i = 0; i < N; ++i) {
    const T* xr = x + i * C;
    T* sr = sum_out != nullptr ? sum_out + i * C : nullptr;
    const T* rr = res != nullptr ? res + i * C : nullptr;
    V16 ss = v_zero();
    for (int64_t c = 0; c < C; c += 16) {
      const V16 a = residual_sum(xr, rr, sr, c, first(int(std::min<int64_t>(16, C - c))));
      ss = v_fmadd(a, a, ss);
    }
    // torch: rsqrt(mean(s^2) + eps), its mean being sum * (1 / C)
    const float r = 1.0f / std::sqrt(v_reduce_add(ss) * (1.0f / float(C)) + eps);
    const T* src = res != nullptr ? sr : xr;
    for (int64_t c = 0; c < C; c += 16) {
      const Mask m = first(int(std::min<int64_t>(16, C - c)));
      const V16 a = round_to(v_mul(load16(src + c, m), v_set1(r)), (const T*)nullptr);
      store16(y + i * C + c, v_mul(load16(w + c, m), a), m);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm (OPT), optionally after a residual add: s = x + res (stored), y = T(((s - mean) * rstd)
// * w + b), fp32 inside as torch computes it (mean and biased variance of the row, eps inside the
// root; w and b may be null: no affine part)

template <typename T>
static void layer_norm(const T* x, const T* res, const T* w, const T* bias, T* sum_out, T* y, int64_t N,
                       int64_t C, float eps) {
#pragma omp parallel for schedule(static) if (N * C >= 32768)
  for (int64_t i = 0; i < N; ++i) {
    const T* xr = x + i * C;
    T* sr = sum_out != nullptr ? sum_out + i * C : nullptr;
    const T* rr = res != nullptr ? res + i * C : nullptr;
    V16 sum = v_zero();
    for (int64_t c = 0; c < C; c += 16)
      sum = v_add(sum, residual_sum(xr, rr, sr, c, first(int(std::min<int64_t>(16, C - c)))));
    const T* src = res != nullptr ? sr : xr;
    const float mean = v_reduce_add(sum) / float(C);
    const V16 vmean = v_set1(mean);
    V16 sq = v_zero();
    for (int64_t c = 0; c < C; c += 16) {
      const Mask m = first(int(std::min<int64_t>(16, C - c)));
      const V16 d = v_zero_unless(v_sub(load16(src + c, m), vmean), m);
      sq = v_fmadd(d, d, sq);
    }
    const V16 rstd = v_set1(1.0f / std::sqrt(v_reduce_add(sq) / float(C) + eps));
    for (int64_t c = 0; c < C; c += 16) {
      const Mask m = first(int(std::min<int64_t>(16, C - c)));
      V16 a = v_mul(v_sub(load16(src + c, m), vmean), rstd);
      if (w != nullptr) a = v_mul(a, load16(w + c, m));
      if (bias != nullptr) a = v_add(a, load16(bias + c, m));
      store16(y + i * C + c, a, m);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU's gate: y = T(silu(a)) * b for h = [a | b] (rows of 2I values), torch's two roundings

template <typename T>
static void silu_mul(const T* h, T* y, int64_t N, int64_t I) {
#pragma omp parallel for schedule(static) if (N * I >= 32768)
  for (int64_t i = 0; i < N; ++i) {
    const T* a = h + i * 2 * I;
    const T* b = a + I;
    for (int64_t c = 0; c < I; c += 16) {
      const Mask m = first(int(std::min<int64_t>(16, I - c)));
      const V16 x = load16(a + c, m);
      // x * sigmoid(x) = x / (1 + exp(-x))
      const V16 g = v_div(x, v_add(v_set1(1.0f), exp16(v_sub(v_zero(), x))));
      store16(y + i * I + c, v_mul(round_to(g, (const T*)nullptr), load16(b + c, m)), m);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// greedy pick: index of each row's first maximum (a NaN counts as the maximum, as in torch.max)

template <typename T>
static void argmax_rows(const T* x, int64_t* out, int64_t N, int64_t V) {
  constexpr int A = 4;  // independent (best, index) lane sets: one set would wait on each compare
#pragma omp parallel for schedule(static) if (N * V >= 65536)
  for (int64_t i = 0; i < N; ++i) {
    const T* row = x + i * V;
    V16 best[A];
    I16 at[A];
    Mask nan[A];
    for (int a = 0; a < A; ++a) best[a] = v_set1(-INFINITY), at[a] = i_set1(-1), nan[a] = 0;
    const I16 lanes = i_lanes();
    for (int64_t c0 = 0; c0 < V; c0 += 16 * A) {
      for (int a = 0; a < A; ++a) {
        const int64_t c = c0 + 16 * a;
        if (c >= V) break;
        const Mask m = first(int(std::min<int64_t>(16, V - c)));
        const V16 v = load16(row + c, m);
        // strictly greater keeps each lane's first maximum; a lane's first NaN wins and stays
        const Mask isnan = v_nan(v, m & ~nan[a]);
        const Mask take = v_greater(v, best[a], m & ~nan[a]) | isnan;
        best[a] = v_select(best[a], v, take);
        at[a] = i_select(at[a], i_add(lanes, i_set1(int32_t(c))), take);
        nan[a] |= isnan;
      }
    }
    int64_t pick = -1;
    float pv = -INFINITY;
    bool pnan = false;
    for (int a = 0; a < A; ++a) {  // across lanes and sets: NaN first, then the larger value, then the smaller index
      alignas(64) float bv[16];
      alignas(64) int32_t bi[16];
      store16(bv, best[a]);
      i_store(bi, at[a]);
      for (int l = 0; l < 16; ++l) {
        if (bi[l] < 0) continue;
        const bool ln = (nan[a] >> l) & 1;
        const bool better = pick < 0 || (ln && (!pnan || bi[l] < pick)) ||
                            (!ln && !pnan && (bv[l] > pv || (bv[l] == pv && bi[l] < pick)));
        if (better) pick = bi[l], pv = bv[l], pnan = ln;
      }
    }
    out[i] = pick < 0 ? 0 : pick;
  }
}

// ---------------------------------------------------------------------------------------------
// C entry points; return 0 on success, 1 for an unsupported head size

#define GENMILL_HEAD_DIMS(X) X(16) X(32) X(64) X(128) X(256)

extern "C" int genmill_decode_step(int is_bf16, const void* q, int64_t sq, const void* k, int64_t sk, const void* v,
                                   int64_t sv, void* kc, void* vc, const int64_t* rows, const int64_t* pos,
                                   const float* cos, const float* sin, void* out, int64_t B, int64_t H, int64_t Hkv,
                                   int64_t S, int64_t D, float q_scale, float scale) {
#define GENMILL_CASE(DD)                                                                                      \
  if (D == DD) {                                                                                              \
    if (is_bf16)                                                                                              \
      decode_step<bf16, DD>((const bf16*)q, sq, (const bf16*)k, sk, (const bf16*)v, sv, (bf16*)kc, (bf16*)vc, \
                            rows, pos, cos, sin, (bf16*)out, B, H, Hkv, S, q_scale, scale);                  \
    else                                                                                                      \
      decode_step<float, DD>((const float*)q, sq, (const float*)k, sk, (const float*)v, sv, (float*)kc,      \
                             (float*)vc, rows, pos, cos, sin, (float*)out, B, H, Hkv, S, q_scale, scale);    \
    return 0;                                                                                                 \
  }
  GENMILL_HEAD_DIMS(GENMILL_CASE)
#undef GENMILL_CASE
  return 1;
}

extern "C" int genmill_prefill_step(int is_bf16, const void* q, const int64_t* qs, const void* k, const int64_t* ks,
                                    const void* v, const int64_t* vs, void* kc, void* vc, const int64_t* rows,
                                    int64_t start, const float* cos, const float* sin, void* out, int64_t B,
                                    int64_t H, int64_t Hkv, int64_t Lq, int64_t S, int64_t D, float q_scale,
                                    float scale) {
#define GENMILL_CASE(DD)                                                                                    \
  if (D == DD) {                                                                                            \
    if (is_bf16)                                                                                            \
      prefill_step<bf16, DD>((const bf16*)q, qs, (const bf16*)k, ks, (const bf16*)v, vs, (bf16*)kc,         \
                             (bf16*)vc, rows, start, cos, sin, (bf16*)out, B, H, Hkv, Lq, S, q_scale, scale); \
    else                                                                                                    \
      prefill_step<float, DD>((const float*)q, qs, (const float*)k, ks, (const float*)v, vs, (float*)kc,    \
                              (float*)vc, rows, start, cos, sin, (float*)out, B, H, Hkv, Lq, S, q_scale,    \
                              scale);                                                                       \
    return 0;                                                                                               \
  }
  GENMILL_HEAD_DIMS(GENMILL_CASE)
#undef GENMILL_CASE
  return 1;
}

extern "C" int genmill_argmax(int is_bf16, const void* x, int64_t* out, int64_t N, int64_t V) {
  if (is_bf16) argmax_rows<bf16>((const bf16*)x, out, N, V);
  else argmax_rows<float>((const float*)x, out, N, V);
  return 0;
}

// 1: done; 0: not built here (no AVX512_BF16)
extern "C" int genmill_screened_argmax(const float* x, int64_t sx, const void* approx, const float* w, float wmax,
                                       int64_t M, int64_t N, int64_t K, int64_t* ids, int64_t* candidates) {
#ifdef GENMILL_LOGIT_SCREEN
  lscreen::screened_argmax(x, sx, (const uint16_t*)approx, w, wmax, M, N, K, ids, candidates);
  return 1;
#else
  return 0;
#endif
}

extern "C" int genmill_silu_mul(int is_bf16, const void* h, void* y, int64_t N, int64_t I) {
  if (is_bf16) silu_mul<bf16>((const bf16*)h, (bf16*)y, N, I);
  else silu_mul<float>((const float*)h, (float*)y, N, I);
  return 0;
}

extern "C" int genmill_rms_norm(int is_bf16, const void* x, const void* res, const void* w, void* sum_out, void* y,
                                int64_t N, int64_t C, float eps) {
  if (is_bf16)
    rms_norm<bf16>((const bf16*)x, (const bf16*)res, (const bf16*)w, (bf16*)sum_out, (bf16*)y, N, C, eps);
  else
    rms_norm<float>((const float*)x, (const float*)res, (const float*)w, (float*)sum_out, (float*)y, N, C, eps);
  return 0;
}

extern "C" int genmill_layer_norm(int is_bf16, const void* x, const void* res, const void* w, const void* b,
                                  void* sum_out, void* y, int64_t N, int64_t C, float eps) {
  if (is_bf16)
    layer_norm<bf16>((const bf16*)x, (const bf16*)res, (const bf16*)w, (const bf16*)b, (bf16*)sum_out, (bf16*)y, N,
                     C, eps);
  else
    layer_norm<float>((const float*)x, (const float*)res, (const float*)w, (const float*)b, (float*)sum_out,
                      (float*)y, N, C, eps);
  return 0;
}

// is_bf16: the head's dtype (x and rows alike); amx: the int8 copy packed for amx::blocks (summed on
// AMX tiles), else for zlin panels (VPDPBUSD). A bf16 head with an AMX copy is a head on AMX tiles
// (its exact pass on the tiles); the others run on GenMill's AVX-512 kernel. 0: done; 1: not built
// here (no VNNI and bf16, or amx without AMX tiles)
extern "C" int genmill_int8_screen(const void* x, int64_t sx, const void* wq, const int32_t* colsum,
                                   const float* scale, const float* scale_max, const float* l1, const float* err2,
                                   const void* rows, float tiny, int64_t M, int64_t N, int64_t K, int is_bf16,
                                   int amx, int64_t* ids, int64_t* kept) {
#ifdef GENMILL_INT8_SCREEN
  const int64_t panel = amx ? 32 : zlin::NR;
  // the head's fp32 additions: round to nearest even on the vector units; on AMX tiles, whose order
  // of additions the ISA leaves open, a bound for any faithful rounding
  const bool amx_head = is_bf16 && amx;
  const double unit = std::ldexp(1.0, amx_head ? -23 : -24);
  const i8screen::Head h{(const int8_t*)wq, colsum, scale, scale_max, l1, err2, rows, tiny, N, K,
                        (K + 3) / 4 * 4, (N + panel - 1) / panel, panel, unit};
  if (!is_bf16) return i8screen::screened_argmax((const float*)x, sx, h, M, amx != 0, ids, kept);
  if (!amx_head) return i8screen::screened_argmax((const bf16*)x, sx, h, M, amx != 0, ids, kept);
#ifdef GENMILL_AMX
  if (amx) return i8screen::amx_screened_argmax((const bf16*)x, sx, h, M, ids, kept);
#endif
#endif
  return 1;
}

// the vector width this build runs (512: AVX-512, 256: AVX2), for the Python side to report
extern "C" int genmill_isa() { return GENMILL_ISA; }

// 1 when built with the AMX linear and the OS grants this process the tile registers
extern "C" int genmill_amx_available() {
#ifdef GENMILL_AMX
  return amx::permitted() ? 1 : 0;
#else
  return 0;
#endif
}

extern "C" int genmill_amx_linear(const void* x, int64_t sx, const void* wp, const float* bias, void* y, int64_t M,
                                  int64_t N, int64_t K, int relu) {
#ifdef GENMILL_AMX
  return amx::linear((const bf16*)x, sx, (const bf16*)wp, bias, (bf16*)y, M, N, K, relu != 0);
#else
  return 1;
#endif
}

extern "C" int genmill_amx_argmax(const void* x, int64_t sx, const void* wp, const float* bias, int64_t* ids,
                                  int64_t M, int64_t N, int64_t K) {
#ifdef GENMILL_AMX
  return amx::argmax((const bf16*)x, sx, (const bf16*)wp, bias, ids, M, N, K);
#else
  return 1;
#endif
}

extern "C" int genmill_fma_linear(const float* x, int64_t sx, const float* wp, const float* bias, float* y, int64_t M,
                                  int64_t N, int64_t K, int relu) {
  return fmalin::linear(x, sx, wp, bias, y, M, N, K, relu != 0);
}

// 0: done; 1: not built here (no AVX-512, or bf16 without AVX512_BF16)
extern "C" int genmill_avx512_linear(int is_bf16, const void* x, int64_t sx, const void* wp, const float* bias,
                                     void* y, int64_t M, int64_t N, int64_t K, int relu) {
#ifdef GENMILL_AVX512_LINEAR
  if (!is_bf16) return zlin::linear((const float*)x, sx, (const float*)wp, bias, (float*)y, M, N, K, relu != 0);
#ifdef __AVX512BF16__
  return zlin::linear((const bf16*)x, sx, (const bf16*)wp, bias, (bf16*)y, M, N, K, relu != 0);
#endif
#endif
  return 1;
}
