// 16 fp32 lanes for GenMill's CPU kernels: one AVX-512 register, or two AVX2 registers.
//
// The kernels (cpu_kernels.cpp) are written once over this layer; -march=native picks the branch.
// The AVX-512 branch is the intrinsics themselves. The AVX2 branch (AVX2 + FMA: Intel since
// Haswell, AMD since Zen) pairs two 8-lane registers and turns lane masks (a 16-bit integer, as
// AVX-512's __mmask16) into blend vectors where it needs them. Both branches round, add and
// compare the same way lane by lane; only horizontal sums may add in a different order.

#pragma once

#include <immintrin.h>

#include <cstdint>

using bf16 = uint16_t;
using Mask = uint16_t;  // bit i: lane i (AVX-512's __mmask16 is the same type)

static inline Mask first(int n) { return n >= 16 ? Mask(0xFFFF) : Mask((1u << n) - 1); }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// ---------------------------------------------------------------------------------------------
// AVX-512

#define GENMILL_ISA 512
using V16 = __m512;
using I16 = __m512i;

static inline V16 v_zero() { return _mm512_setzero_ps(); }
static inline V16 v_set1(float x) { return _mm512_set1_ps(x); }
static inline V16 v_add(V16 a, V16 b) { return _mm512_add_ps(a, b); }
static inline V16 v_sub(V16 a, V16 b) { return _mm512_sub_ps(a, b); }
static inline V16 v_mul(V16 a, V16 b) { return _mm512_mul_ps(a, b); }
static inline V16 v_div(V16 a, V16 b) { return _mm512_div_ps(a, b); }
static inline V16 v_max(V16 a, V16 b) { return _mm512_max_ps(a, b); }
static inline V16 v_fmadd(V16 a, V16 b, V16 c) { return _mm512_fmadd_ps(a, b, c); }    // a b + c
static inline V16 v_fnmadd(V16 a, V16 b, V16 c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
static inline V16 v_round(V16 x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline V16 v_scalef(V16 p, V16 n) { return _mm512_scalef_ps(p, n); }  // p 2^n, n integral
static inline V16 v_max_where(V16 a, V16 b, Mask m) { return _mm512_mask_max_ps(a, m, a, b); }
static inline V16 v_zero_unless(V16 x, Mask m) { return _mm512_maskz_mov_ps(m, x); }
static inline V16 v_select(V16 a, V16 b, Mask m) { return _mm512_mask_mov_ps(a, m, b); }  // m ? b : a
static inline Mask v_nan(V16 x, Mask m) { return _mm512_mask_cmp_ps_mask(m, x, x, _CMP_UNORD_Q); }
static inline Mask v_greater(V16 a, V16 b, Mask m) { return _mm512_mask_cmp_ps_mask(m, a, b, _CMP_GT_OQ); }
static inline float v_reduce_add(V16 x) { return _mm512_reduce_add_ps(x); }
static inline float v_reduce_max(V16 x) { return _mm512_reduce_max_ps(x); }
// keeps x in a register: GCC otherwise folds the load of a vector that several FMAs share into
// each of them, a load per use
static inline void in_register(V16& x) { __asm__("" : "+v"(x)); }

static inline I16 i_set1(int32_t x) { return _mm512_set1_epi32(x); }
static inline I16 i_lanes() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
static inline I16 i_add(I16 a, I16 b) { return _mm512_add_epi32(a, b); }
static inline I16 i_select(I16 a, I16 b, Mask m) { return _mm512_mask_mov_epi32(a, m, b); }
static inline void i_store(int32_t* p, I16 x) { _mm512_storeu_si512(p, x); }

static inline V16 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline V16 load16(const bf16* p) {  // bf16 -> fp32: the bits become the high half
  __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}
static inline V16 load16(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
static inline V16 load16(const bf16* p, Mask m) {
  __m512i x = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}
// fp32 -> bf16 bits, round to nearest even (as torch does)
static inline __m256i to_bf16(V16 x) {
  __m512i u = _mm512_castps_si512(x);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}
static inline void store16(float* p, V16 x) { _mm512_storeu_ps(p, x); }
static inline void store16(bf16* p, V16 x) { _mm256_storeu_si256((__m256i*)p, to_bf16(x)); }
static inline void store16(float* p, V16 x, Mask m) { _mm512_mask_storeu_ps(p, m, x); }
static inline void store16(bf16* p, V16 x, Mask m) { _mm256_mask_storeu_epi16(p, m, to_bf16(x)); }
// 32 bf16 as two fp32 vectors, lanes in (even, odd) order: even[i] = p[2i], odd[i] = p[2i + 1].
// One 64-byte load and two ALU ops, where load16 spends a widening shuffle and a shift per 16
static inline void split32(const bf16* p, V16& even, V16& odd) {
  const __m512i x = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(int(0xFFFF0000u))));
}
// the value x takes when stored as bf16
static inline V16 round_bf16(V16 x) {
  __m512i w = _mm512_cvtepu16_epi32(to_bf16(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// r[j] = sum of the 16 lanes of v[j]: a transpose-and-add tree, ~45 instructions for 16 sums
// instead of 16 separate horizontal reductions
static inline V16 hsum16(const V16* v) {
  V16 a[8], b[4];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // b[g] holds, per 128-bit block k, the block-k sums of vectors 4g..4g+3: add the blocks up
  V16 d01 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(3, 1, 3, 1)));
  V16 d23 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d01, d23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(d01, d23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// transpose a 16 x 16 block held as 16 rows: r[j] lane d becomes r[d] lane j
static inline void transpose16(V16* r) {
  V16 t[16], u[16];
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
    const V16 v_lo = _mm512_shuffle_f32x4(u[c], u[4 + c], _MM_SHUFFLE(2, 0, 2, 0));
    const V16 v_hi = _mm512_shuffle_f32x4(u[c], u[4 + c], _MM_SHUFFLE(3, 1, 3, 1));
    const V16 w_lo = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(2, 0, 2, 0));
    const V16 w_hi = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(3, 1, 3, 1));
    r[c] = _mm512_shuffle_f32x4(v_lo, w_lo, _MM_SHUFFLE(2, 0, 2, 0));
    r[4 + c] = _mm512_shuffle_f32x4(v_hi, w_hi, _MM_SHUFFLE(2, 0, 2, 0));
    r[8 + c] = _mm512_shuffle_f32x4(v_lo, w_lo, _MM_SHUFFLE(3, 1, 3, 1));
    r[12 + c] = _mm512_shuffle_f32x4(v_hi, w_hi, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

#elif defined(__AVX2__) && defined(__FMA__)
// ---------------------------------------------------------------------------------------------
// AVX2 + FMA: lanes 0-7 in lo, 8-15 in hi

#define GENMILL_ISA 256
struct V16 {
  __m256 lo, hi;
};
struct I16 {
  __m256i lo, hi;
};

#define GENMILL_V2(name, op) \
  static inline V16 name(V16 a, V16 b) { return {op(a.lo, b.lo), op(a.hi, b.hi)}; }
GENMILL_V2(v_add, _mm256_add_ps)
GENMILL_V2(v_sub, _mm256_sub_ps)
GENMILL_V2(v_mul, _mm256_mul_ps)
GENMILL_V2(v_div, _mm256_div_ps)
GENMILL_V2(v_max, _mm256_max_ps)
#undef GENMILL_V2

static inline V16 v_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline V16 v_set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
static inline V16 v_fmadd(V16 a, V16 b, V16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
static inline V16 v_fnmadd(V16 a, V16 b, V16 c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
static inline V16 v_round(V16 x) {
  constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(x.lo, mode), _mm256_round_ps(x.hi, mode)};
}
// p 2^n for integral n: n (clamped to where the result is 0 or inf anyway) is applied as two
// powers of two, each a valid float, so n = 128 or a subnormal result comes out as scalef gives it
static inline __m256 scalef8(__m256 p, __m256 n) {
  n = _mm256_min_ps(_mm256_max_ps(n, _mm256_set1_ps(-252.0f)), _mm256_set1_ps(254.0f));
  const __m256i k = _mm256_cvtps_epi32(n);
  const __m256i k1 = _mm256_srai_epi32(k, 1), k2 = _mm256_sub_epi32(k, k1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}
static inline V16 v_scalef(V16 p, V16 n) { return {scalef8(p.lo, n.lo), scalef8(p.hi, n.hi)}; }

// lane bits -> blend vectors (all ones where the bit is set)
static inline __m256i mask8(unsigned bits) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(bits)), lane_bit), lane_bit);
}
static inline Mask bits(__m256 lo, __m256 hi) {
  return Mask(unsigned(_mm256_movemask_ps(lo)) | (unsigned(_mm256_movemask_ps(hi)) << 8));
}
static inline V16 v_select(V16 a, V16 b, Mask m) {  // m ? b : a
  return {_mm256_blendv_ps(a.lo, b.lo, _mm256_castsi256_ps(mask8(m & 0xFF))),
          _mm256_blendv_ps(a.hi, b.hi, _mm256_castsi256_ps(mask8(m >> 8)))};
}
static inline V16 v_max_where(V16 a, V16 b, Mask m) { return m == 0xFFFF ? v_max(a, b) : v_select(a, v_max(a, b), m); }
static inline V16 v_zero_unless(V16 x, Mask m) { return m == 0xFFFF ? x : v_select(v_zero(), x, m); }
static inline Mask v_nan(V16 x, Mask m) {
  return m & bits(_mm256_cmp_ps(x.lo, x.lo, _CMP_UNORD_Q), _mm256_cmp_ps(x.hi, x.hi, _CMP_UNORD_Q));
}
static inline Mask v_greater(V16 a, V16 b, Mask m) {
  return m & bits(_mm256_cmp_ps(a.lo, b.lo, _CMP_GT_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_GT_OQ));
}
static inline float reduce8(__m256 x, bool take_max) {
  __m128 a = take_max ? _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1))
                      : _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  __m128 b = _mm_movehl_ps(a, a);
  a = take_max ? _mm_max_ps(a, b) : _mm_add_ps(a, b);
  b = _mm_shuffle_ps(a, a, 1);
  return _mm_cvtss_f32(take_max ? _mm_max_ss(a, b) : _mm_add_ss(a, b));
}
static inline float v_reduce_add(V16 x) { return reduce8(_mm256_add_ps(x.lo, x.hi), false); }
static inline float v_reduce_max(V16 x) { return reduce8(_mm256_max_ps(x.lo, x.hi), true); }
static inline void in_register(V16& x) { __asm__("" : "+x"(x.lo), "+x"(x.hi)); }

static inline I16 i_set1(int32_t x) { return {_mm256_set1_epi32(x), _mm256_set1_epi32(x)}; }
static inline I16 i_lanes() { return {_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15)}; }
static inline I16 i_add(I16 a, I16 b) { return {_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)}; }
static inline I16 i_select(I16 a, I16 b, Mask m) {
  return {_mm256_blendv_epi8(a.lo, b.lo, mask8(m & 0xFF)), _mm256_blendv_epi8(a.hi, b.hi, mask8(m >> 8))};
}
static inline void i_store(int32_t* p, I16 x) {
  _mm256_storeu_si256((__m256i*)p, x.lo);
  _mm256_storeu_si256((__m256i*)(p + 8), x.hi);
}

static inline __m256 widen_bf16(__m128i x) {  // 8 bf16 -> fp32: the bits become the high half
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
}
static inline V16 load16(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline V16 load16(const bf16* p) {
  return {widen_bf16(_mm_loadu_si128((const __m128i*)p)), widen_bf16(_mm_loadu_si128((const __m128i*)(p + 8)))};
}
static inline void split32(const bf16* p, V16& even, V16& odd) {  // as in the AVX-512 part
  const __m256i a = _mm256_loadu_si256((const __m256i*)p), b = _mm256_loadu_si256((const __m256i*)(p + 16));
  const __m256i high = _mm256_set1_epi32(int(0xFFFF0000u));
  even = {_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(b, 16))};
  odd = {_mm256_castsi256_ps(_mm256_and_si256(a, high)), _mm256_castsi256_ps(_mm256_and_si256(b, high))};
}
// masked loads and stores: whole vectors when every lane is on (the common case), else lane by
// lane through a buffer (row tails only)
template <typename T>
static inline V16 load16(const T* p, Mask m) {
  if (m == 0xFFFF) return load16(p);
  alignas(32) T buf[16] = {};
  for (int i = 0; i < 16; ++i)
    if ((m >> i) & 1) buf[i] = p[i];
  return load16(buf);
}
// fp32 -> bf16 bits, round to nearest even (as torch does), 8 lanes
static inline __m256i bf16_bits(__m256 x) {
  __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  return _mm256_srli_epi32(u, 16);
}
static inline __m256i to_bf16(V16 x) {  // 16 bf16 in order (packus interleaves 128-bit halves)
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits(x.lo), bf16_bits(x.hi)), 0xD8);
}
static inline void store16(float* p, V16 x) {
  _mm256_storeu_ps(p, x.lo);
  _mm256_storeu_ps(p + 8, x.hi);
}
static inline void store16(bf16* p, V16 x) { _mm256_storeu_si256((__m256i*)p, to_bf16(x)); }
template <typename T>
static inline void store16(T* p, V16 x, Mask m) {
  if (m == 0xFFFF) return store16(p, x);
  alignas(32) T buf[16];
  store16(buf, x);
  for (int i = 0; i < 16; ++i)
    if ((m >> i) & 1) p[i] = buf[i];
}
static inline V16 round_bf16(V16 x) {  // the value x takes when stored as bf16
  return {_mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(x.lo), 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(x.hi), 16))};
}

// the 8 lane sums of s[0..7], in order
static inline __m256 hsum8(const __m256* s) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
  // a: per 128-bit half h, the half-h sums of s0..s3; b: of s4..s7
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
// r[j] = sum of the 16 lanes of v[j]
static inline V16 hsum16(const V16* v) {
  __m256 s[16];
  for (int j = 0; j < 16; ++j) s[j] = _mm256_add_ps(v[j].lo, v[j].hi);
  return {hsum8(s), hsum8(s + 8)};
}

// 8 x 8 transpose: r[j] lane d becomes r[d] lane j
static inline void transpose8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}
// transpose a 16 x 16 block held as 16 rows: four 8 x 8 transposes, the off-diagonal two swapped
static inline void transpose16(V16* r) {
  __m256 a[8], b[8], c[8], d[8];  // rows 0-7 / 8-15, columns 0-7 / 8-15
  for (int j = 0; j < 8; ++j) a[j] = r[j].lo, b[j] = r[j].hi, c[j] = r[8 + j].lo, d[j] = r[8 + j].hi;
  transpose8(a), transpose8(b), transpose8(c), transpose8(d);
  for (int j = 0; j < 8; ++j) r[j] = {a[j], c[j]}, r[8 + j] = {b[j], d[j]};
}

#else
#error "GenMill's CPU kernels need AVX-512 (F, BW, VL) or AVX2 with FMA"
#endif
