// GenMill's CPU kernels for the LLM engine (AVX-512, fp32 and bf16; OpenMP over the work items).
//
// Built on first use by workers/llm/cpu_kernels.py (g++ -O3 -march=native -fopenmp
// -ffp-contract=off). Every kernel takes raw pointers plus strides; the Python side checks shapes,
// dtypes and layouts. Accumulation is always fp32. Where torch rounds an intermediate to the
// model dtype (bf16), the kernels round at the same places, so results stay close to the eager path.
//
//   genmill_decode_step   new tokens (one or a few per row): RoPE, KV-cache write, attention
//   genmill_prefill_step  a prompt chunk (every row at the same positions): the same, causal
//   genmill_rms_norm      (residual add +) RMSNorm, transformers' rounding order
//   genmill_silu_mul      SwiGLU's gate
//   genmill_argmax        greedy pick

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

using bf16 = uint16_t;

// ---------------------------------------------------------------------------------------------
// loads, stores, rounding

static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const bf16* p) {  // bf16 -> fp32: the bits become the high half
  __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}
static inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 load16(const bf16* p, __mmask16 m) {
  __m512i x = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}
// fp32 -> bf16 bits, round to nearest even (as torch does)
static inline __m256i to_bf16(__m512 x) {
  __m512i u = _mm512_castps_si512(x);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}
static inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
static inline void store16(bf16* p, __m512 x) { _mm256_storeu_si256((__m256i*)p, to_bf16(x)); }
static inline void store16(float* p, __m512 x, __mmask16 m) { _mm512_mask_storeu_ps(p, m, x); }
static inline void store16(bf16* p, __m512 x, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, to_bf16(x)); }

// the value x takes when stored in T: identity for fp32, bf16 rounding for bf16
static inline __m512 round_to(__m512 x, const float*) { return x; }
static inline __m512 round_to(__m512 x, const bf16*) {
  __m512i w = _mm512_cvtepu16_epi32(to_bf16(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

static inline __mmask16 first(int n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// exp of 16 floats: 2^n * p(r), x = n ln2 + r, |r| <= ln2/2, degree-6 Taylor (rel. error ~2e-7)
static inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// r[j] = sum of the 16 lanes of v[j]: a transpose-and-add tree, ~45 instructions for 16 sums
// instead of 16 separate horizontal reductions
static inline __m512 hsum16(const __m512* v) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // b[g] holds, per 128-bit block k, the block-k sums of vectors 4g..4g+3: add the blocks up
  __m512 d01 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(3, 1, 3, 1)));
  __m512 d23 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d01, d23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(d01, d23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// transpose a 16 x 16 block held as 16 rows: r[j] lane d becomes r[d] lane j
static inline void transpose16(__m512* r) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit block k: pairs of rows 2i, 2i+1 at lanes 4k..4k+3
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + c], block k: column 4k + c of rows 4i..4i+3
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int c = 0; c < 4; ++c) {  // column 4k + c: block k of u[c], u[4 + c], u[8 + c], u[12 + c]
    const __m512 v_lo = _mm512_shuffle_f32x4(u[c], u[4 + c], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512 v_hi = _mm512_shuffle_f32x4(u[c], u[4 + c], _MM_SHUFFLE(3, 1, 3, 1));
    const __m512 w_lo = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512 w_hi = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(3, 1, 3, 1));
    r[c] = _mm512_shuffle_f32x4(v_lo, w_lo, _MM_SHUFFLE(2, 0, 2, 0));
    r[4 + c] = _mm512_shuffle_f32x4(v_hi, w_hi, _MM_SHUFFLE(2, 0, 2, 0));
    r[8 + c] = _mm512_shuffle_f32x4(v_lo, w_lo, _MM_SHUFFLE(3, 1, 3, 1));
    r[12 + c] = _mm512_shuffle_f32x4(v_hi, w_hi, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// RoPE in transformers' "rotate half" layout on one head of D values (fp32 in and out):
// y[i] = x[i] cos[i] - x[i + D/2] sin[i],  y[i + D/2] = x[i + D/2] cos[i + D/2] + x[i] sin[i + D/2]
template <int D>
static inline void rope(float* x, const float* cos, const float* sin) {
  constexpr int H = D / 2;
  alignas(64) float lo[H > 16 ? H : 16], hi[H > 16 ? H : 16];
  for (int i = 0; i < H; ++i) lo[i] = x[i], hi[i] = x[i + H];
  for (int i = 0; i < H; ++i) {
    // products rounded first, then added: the same two roundings as torch's q*cos + rot(q)*sin
    const float a = lo[i] * cos[i], b = hi[i] * sin[i];
    const float c = hi[i] * cos[i + H], d = lo[i] * sin[i + H];
    x[i] = a - b;
    x[i + H] = c + d;
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
    __m512 x = round_to(load16(dst + c), (const T*)nullptr);
    if (q_scale != 1.0f) x = round_to(_mm512_mul_ps(x, _mm512_set1_ps(q_scale)), (const T*)nullptr);
    store16(dst + c, x);
  }
}


// q . k partial sums for one key row (16 lanes, summed later by hsum16)
template <int D>
static inline __m512 dot_partial(const __m512* qv, const float* kr) {
  __m512 a = _mm512_mul_ps(qv[0], load16(kr));
  for (int c = 1; c < D / 16; ++c) a = _mm512_fmadd_ps(qv[c], load16(kr + 16 * c), a);
  return a;
}
template <int D>
static inline __m512 dot_partial(const __m512* qv, const bf16* kr) {
#ifdef __AVX512BF16__
  if constexpr (D % 32 == 0) {  // qv holds q as bf16 pairs (see load_query): one dpbf16 per 32 values
    __m512 a = _mm512_setzero_ps();
    for (int c = 0; c < D / 32; ++c)
      a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_castps_si512(qv[c]), (__m512bh)_mm512_loadu_si512(kr + 32 * c));
    return a;
  }
#endif
  __m512 a = _mm512_mul_ps(qv[0], load16(kr));
  for (int c = 1; c < D / 16; ++c) a = _mm512_fmadd_ps(qv[c], load16(kr + 16 * c), a);
  return a;
}
// q (fp32 values already rounded to T) in the form dot_partial wants
template <int D>
static inline void load_query(__m512* qv, const float* q, const float*) {
  for (int c = 0; c < D / 16; ++c) qv[c] = load16(q + 16 * c);
}
template <int D>
static inline void load_query(__m512* qv, const float* q, const bf16*) {
#ifdef __AVX512BF16__
  if constexpr (D % 32 == 0) {
    for (int c = 0; c < D / 32; ++c)
      qv[c] = (__m512)_mm512_cvtne2ps_pbh(load16(q + 32 * c + 16), load16(q + 32 * c));
    return;
  }
#endif
  for (int c = 0; c < D / 16; ++c) qv[c] = load16(q + 16 * c);
}

// Attention items (one query head of one token) run G at a time, their K and V passes interleaved
// chunk by chunk: G concurrent memory streams per thread instead of one. Reading a decode step's
// KV cache is bound by memory latency, not bandwidth: one stream per core reaches ~60% of what four
// do (measured on AMD Zen 4, 2 cores: 20 vs 33 GB/s). Register budget: G * D / 16 accumulators.
template <int D> constexpr int decode_group() { return D >= 256 ? 1 : (D == 128 ? 2 : 4); }

// one item's query, its K/V blocks and key count
template <typename T, int D>
struct DecodeItem {
  __m512 qv[D / 16];
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
  constexpr int G = decode_group<D>();
  const int64_t group = H / Hkv, items = B * H, groups = (items + G - 1) / G;
  const int64_t Sp = (S + 15) / 16 * 16;
  const __m512 vscale = _mm512_set1_ps(scale);
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
      // scores, 16 keys at a time (one K pass per item), then the probabilities, then one V pass:
      // two passes measured ~20% faster here than an online softmax reading K and V tiles together
      __m512 mx[G];
      for (int g = 0; g < G; ++g) mx[g] = _mm512_set1_ps(-INFINITY);
      for (int64_t s0 = 0; s0 < longest; s0 += 16) {
        // key by key across the items (the interleave that keeps G streams going), partial sums
        // parked in L1
        alignas(64) __m512 part[G][16];
        for (int j = 0; j < 16; ++j)
          for (int g = 0; g < G; ++g)
            part[g][j] = g < g_n && s0 + j < it[g].n ? dot_partial<D>(it[g].qv, it[g].kp + (s0 + j) * D)
                                                     : _mm512_setzero_ps();
        for (int g = 0; g < g_n; ++g) {
          if (s0 >= it[g].n) continue;
          const int cnt = int(std::min<int64_t>(16, it[g].n - s0));
          const __m512 sv = _mm512_mul_ps(hsum16(part[g]), vscale);
          _mm512_store_ps(sc + g * Sp + s0, sv);
          mx[g] = _mm512_mask_max_ps(mx[g], first(cnt), mx[g], sv);
        }
      }
      // probabilities (fp32; 0 past the last key) and their sums
      float inv[G];
      for (int g = 0; g < g_n; ++g) {
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx[g]));
        __m512 lv = _mm512_setzero_ps();
        float* p = sc + g * Sp;
        for (int64_t s0 = 0; s0 < it[g].n; s0 += 16) {
          const __mmask16 valid = first(int(std::min<int64_t>(16, it[g].n - s0)));
          const __m512 pv = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(_mm512_load_ps(p + s0), m)));
          _mm512_store_ps(p + s0, pv);
          lv = _mm512_add_ps(lv, pv);
        }
        inv[g] = 1.0f / _mm512_reduce_add_ps(lv);
      }
      // sum_j p_j V_j, fp32, keys in order per item; the G items' accumulator chains interleave
      __m512 acc[G][D / 16];
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < D / 16; ++c) acc[g][c] = _mm512_setzero_ps();
      for (int64_t s0 = 0; s0 < longest; s0 += 16) {
        const int64_t stop = std::min<int64_t>(16, longest - s0);
        for (int64_t j = 0; j < stop; ++j)
          for (int g = 0; g < g_n; ++g) {
            if (s0 + j >= it[g].n) continue;
            const __m512 pj = _mm512_set1_ps(sc[g * Sp + s0 + j]);
            const T* vr = it[g].vp + (s0 + j) * D;
            for (int c = 0; c < D / 16; ++c) acc[g][c] = _mm512_fmadd_ps(pj, load16(vr + 16 * c), acc[g][c]);
          }
      }
      for (int g = 0; g < g_n; ++g) {
        const int64_t item = gi * G + g;
        const __m512 iv = _mm512_set1_ps(inv[g]);
        for (int c = 0; c < D / 16; ++c) store16(out + item * D + 16 * c, _mm512_mul_ps(acc[g][c], iv));
      }
    }
    std::free(sc);
  }
}

// ---------------------------------------------------------------------------------------------
// prefill: a chunk of Lq tokens at positions start..start+Lq-1 in every row (prompts are prefilled
// from position 0, long ones in chunks): RoPE, the chunk's k/v into cache row rows[b], and causal
// attention over cache slots 0..start+Lq-1, per (row, kv head)

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
#pragma omp parallel
  {
    std::vector<float> kt(D * Lp), vf(Lk * D), sc(R * Lp);
    alignas(64) float qf[R][D];
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t hk = 0; hk < Hkv; ++hk) {
        T* kcb = kc + (cache_rows[b] * Hkv + hk) * S * D;
        T* vcb = vc + (cache_rows[b] * Hkv + hk) * S * D;
        // the chunk's k (rotated) and v go into the cache; this (row, kv head) owns its block
        alignas(64) float buf[D];
        for (int64_t i = 0; i < Lq; ++i) {
          head_to_float<T, D>(buf, k + b * ks[0] + i * ks[1] + hk * D);
          if (cos != nullptr) rope<D>(buf, cos + (start + i) * D, sin + (start + i) * D);
          for (int c = 0; c < D; c += 16) store16(kcb + (start + i) * D + c, load16(buf + c));
          for (int c = 0; c < D; c += 16) store16(vcb + (start + i) * D + c, load16(v + b * vs[0] + i * vs[1] + hk * D + c));
        }
        // K transposed to [D][Lp] (zero-padded) in 16 x 16 blocks, and V as fp32, once for the
        // heads of this kv head
        for (int64_t j0 = 0; j0 < Lp; j0 += 16) {
          const int cnt = int(std::max<int64_t>(0, std::min<int64_t>(16, Lk - j0)));
          for (int d0 = 0; d0 < D; d0 += 16) {
            __m512 blk[16];
            for (int j = 0; j < 16; ++j) blk[j] = j < cnt ? load16(kcb + (j0 + j) * D + d0) : _mm512_setzero_ps();
            transpose16(blk);
            for (int d = 0; d < 16; ++d) _mm512_storeu_ps(kt.data() + (d0 + d) * Lp + j0, blk[d]);
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
            const __m512 vscale = _mm512_set1_ps(scale);
            for (int64_t j0 = 0; j0 < n; j0 += 32) {
              __m512 a0[R], a1[R];
              for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
              for (int d = 0; d < D; ++d) {
                const __m512 k0 = _mm512_loadu_ps(kt.data() + d * Lp + j0);
                const __m512 k1 = _mm512_loadu_ps(kt.data() + d * Lp + j0 + 16);
                for (int r = 0; r < R; ++r) {
                  const __m512 qd = _mm512_set1_ps(qf[r][d]);
                  a0[r] = _mm512_fmadd_ps(qd, k0, a0[r]);
                  a1[r] = _mm512_fmadd_ps(qd, k1, a1[r]);
                }
              }
              for (int r = 0; r < R; ++r) {
                _mm512_storeu_ps(sc.data() + r * Lp + j0, _mm512_mul_ps(a0[r], vscale));
                _mm512_storeu_ps(sc.data() + r * Lp + j0 + 16, _mm512_mul_ps(a1[r], vscale));
              }
            }
            // softmax of each row over its causal prefix; later keys get probability 0
            for (int r = 0; r < rows; ++r) {
              float* s = sc.data() + r * Lp;
              const int64_t nr = start + i0 + r + 1;
              __m512 mx = _mm512_set1_ps(-INFINITY);
              for (int64_t j0 = 0; j0 < nr; j0 += 16)
                mx = _mm512_mask_max_ps(mx, first(int(std::min<int64_t>(16, nr - j0))), mx, _mm512_loadu_ps(s + j0));
              const __m512 vm = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
              __m512 lv = _mm512_setzero_ps();
              for (int64_t j0 = 0; j0 < n; j0 += 16) {
                const __mmask16 valid = first(int(std::max<int64_t>(0, std::min<int64_t>(16, nr - j0))));
                const __m512 p = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j0), vm)));
                _mm512_storeu_ps(s + j0, p);
                lv = _mm512_add_ps(lv, p);
              }
              const float inv = 1.0f / _mm512_reduce_add_ps(lv);
              for (int64_t j0 = 0; j0 < n; j0 += 16)
                _mm512_storeu_ps(s + j0, _mm512_mul_ps(_mm512_loadu_ps(s + j0), _mm512_set1_ps(inv)));
            }
            // out rows = P V: each value row read once for the R rows
            __m512 o[R][D / 16];
            for (int r = 0; r < R; ++r)
              for (int c = 0; c < D / 16; ++c) o[r][c] = _mm512_setzero_ps();
            for (int64_t j = 0; j < n; ++j) {
              const float* vr = vf.data() + j * D;
              for (int c = 0; c < D / 16; ++c) {
                const __m512 x = _mm512_loadu_ps(vr + 16 * c);
                for (int r = 0; r < R; ++r)
                  o[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(sc[r * Lp + j]), x, o[r][c]);
              }
            }
            for (int r = 0; r < rows; ++r) {
              T* dst = out + ((b * Lq + i0 + r) * H + h) * D;
              for (int c = 0; c < D / 16; ++c) store16(dst + 16 * c, o[r][c]);
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm, optionally after a residual add: s = x + res (stored), y = w * T(s / rms(s))

template <typename T>
static void rms_norm(const T* x, const T* res, const T* w, T* sum_out, T* y, int64_t N, int64_t C, float eps) {
#pragma omp parallel for schedule(static) if (N * C >= 32768)
  for (int64_t i = 0; i < N; ++i) {
    const T* xr = x + i * C;
    T* sr = sum_out != nullptr ? sum_out + i * C : nullptr;
    __m512 ss = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 m = first(int(std::min<int64_t>(16, C - c)));
      __m512 a = load16(xr + c, m);
      if (res != nullptr) {
        a = round_to(_mm512_add_ps(a, load16(res + i * C + c, m)), (const T*)nullptr);
        store16(sr + c, a, m);
      }
      ss = _mm512_fmadd_ps(a, a, ss);
    }
    // torch: rsqrt(mean(s^2) + eps), its mean being sum * (1 / C)
    const float r = 1.0f / std::sqrt(_mm512_reduce_add_ps(ss) * (1.0f / float(C)) + eps);
    const T* src = res != nullptr ? sr : xr;
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 m = first(int(std::min<int64_t>(16, C - c)));
      const __m512 a = round_to(_mm512_mul_ps(load16(src + c, m), _mm512_set1_ps(r)), (const T*)nullptr);
      store16(y + i * C + c, _mm512_mul_ps(load16(w + c, m), a), m);
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
      const __mmask16 m = first(int(std::min<int64_t>(16, I - c)));
      const __m512 x = load16(a + c, m);
      // x * sigmoid(x) = x / (1 + exp(-x))
      const __m512 g = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
      store16(y + i * I + c, _mm512_mul_ps(round_to(g, (const T*)nullptr), load16(b + c, m)), m);
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
    __m512 best[A];
    __m512i at[A];
    __mmask16 nan[A];
    for (int a = 0; a < A; ++a) best[a] = _mm512_set1_ps(-INFINITY), at[a] = _mm512_set1_epi32(-1), nan[a] = 0;
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t c0 = 0; c0 < V; c0 += 16 * A) {
      for (int a = 0; a < A; ++a) {
        const int64_t c = c0 + 16 * a;
        if (c >= V) break;
        const __mmask16 m = first(int(std::min<int64_t>(16, V - c)));
        const __m512 v = load16(row + c, m);
        // strictly greater keeps each lane's first maximum; a lane's first NaN wins and stays
        const __mmask16 isnan = _mm512_mask_cmp_ps_mask(m & ~nan[a], v, v, _CMP_UNORD_Q);
        const __mmask16 take = _mm512_mask_cmp_ps_mask(m & ~nan[a], v, best[a], _CMP_GT_OQ) | isnan;
        best[a] = _mm512_mask_mov_ps(best[a], take, v);
        at[a] = _mm512_mask_mov_epi32(at[a], take, _mm512_add_epi32(lanes, _mm512_set1_epi32(int(c))));
        nan[a] |= isnan;
      }
    }
    int64_t pick = -1;
    float pv = -INFINITY;
    bool pnan = false;
    for (int a = 0; a < A; ++a) {  // across lanes and sets: NaN first, then the larger value, then the smaller index
      alignas(64) float bv[16];
      alignas(64) int32_t bi[16];
      _mm512_store_ps(bv, best[a]);
      _mm512_store_epi32(bi, at[a]);
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
