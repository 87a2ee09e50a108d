// A prompt chunk's attention for one (row, kv head) on Intel AMX tiles (bf16 products, fp32 sums).
//
// Why: the AVX-512 path (cpu_kernels.cpp, prefill_step) runs QK^T and PV as fp32 FMAs at ~80-90
// GFLOP/s on a 2-core Xeon, a fifth of a prompt's prefill time there for 128-token prompts, and a
// growing share for longer ones (the work grows with the square of the length). On the tiles both
// products run at the matmul rate. The scores are the same products summed in fp32 (bf16 times
// bf16 is exact in fp32); the probabilities are rounded to bf16 before P V, as torch's own CPU
// flash attention does for bf16. Everything else (RoPE, the cache write, the softmax) is the
// AVX-512 path's.
//
// Layouts (built per item, in the thread's workspace): K as B tiles of 16 keys x 32 head values
// (VNNI pairs along the head dim), V as B tiles of 16 head values x 32 keys (pairs along the keys,
// keys zero-padded to whole steps), query and probability rows as A tiles of 16 rows.

#pragma once

#ifdef GENMILL_AMX

#include <algorithm>
#include <cstring>
#include <vector>

namespace amx_attn {

struct Workspace {
  std::vector<uint32_t> kb;  // packed K, bf16 pairs
  std::vector<uint32_t> vb;  // packed V, bf16 pairs
  std::vector<float> sc;     // 16 rows of scores, then probabilities (fp32)
  std::vector<bf16> pa;      // 16 rows of probabilities (bf16), keys padded to whole 32-key steps
  std::vector<float> o;      // 16 output rows (fp32)
  alignas(64) bf16 qa[16 * 256];
};

// K rows 0..Lk-1 ([Lk][D], from the cache) -> kb[jb][ks][dp][j] = pair (2 dp, 2 dp + 1) of head
// values ks*32.. of key jb*16 + j; keys past Lk are zero. Per (jb, ks): a 16 x 16 transpose of
// 32-bit pairs.
template <int D>
static void pack_k(const bf16* k, int64_t Lk, uint32_t* kb) {
  constexpr int KS = D / 32;
  for (int64_t j0 = 0; j0 < Lk; j0 += 16) {
    const int cnt = int(std::min<int64_t>(16, Lk - j0));
    for (int ks = 0; ks < KS; ++ks) {
      V16 blk[16];
      for (int j = 0; j < 16; ++j)
        blk[j] = j < cnt ? _mm512_castsi512_ps(_mm512_loadu_si512(k + (j0 + j) * D + ks * 32)) : v_zero();
      transpose16(blk);
      uint32_t* dst = kb + ((j0 / 16) * KS + ks) * 256;
      for (int dp = 0; dp < 16; ++dp) _mm512_storeu_si512(dst + dp * 16, _mm512_castps_si512(blk[dp]));
    }
  }
}

// V rows 0..Lk-1 -> vb[nb][js][jp][n] = (V[js*32 + 2 jp][nb*16 + n], V[js*32 + 2 jp + 1][...]);
// keys past Lk are zero (a zero probability times a stale value must stay zero)
template <int D>
static void pack_v(const bf16* v, int64_t Lk, uint32_t* vb) {
  const int64_t JS = (Lk + 31) / 32;
  for (int64_t j = 0; j < JS * 32; j += 2) {
    const int64_t js = j / 32, jp = (j % 32) / 2;
    for (int nb = 0; nb < D / 16; ++nb) {
      const __m256i zero = _mm256_setzero_si256();
      const __m256i a = j < Lk ? _mm256_loadu_si256((const __m256i*)(v + j * D + nb * 16)) : zero;
      const __m256i b = j + 1 < Lk ? _mm256_loadu_si256((const __m256i*)(v + (j + 1) * D + nb * 16)) : zero;
      // pair n = a[n] | b[n] << 16
      const __m512i pairs =
          _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
      _mm512_storeu_si512(vb + ((nb * JS + js) * 16 + jp) * 16, pairs);
    }
  }
}

// Heads h0..h1-1 of one (row, kv head): queries i = 0..Lq-1 at positions start + i attend keys
// 0..start+i of kc/vc (this row's cache block, [S][D]). q(i, h) = q + i*sq + h*D; the output row
// (i, h) goes to out + i*so + h*D. `query` turns a raw query head into the fp32 values torch would
// hold (RoPE, rounding, q_scale), as in the AVX-512 path.
template <int D, typename Query>
static void prefill_heads(const bf16* q, int64_t sq, const bf16* kc, const bf16* vc, int64_t start, int64_t Lq,
                          int64_t h0, int64_t h1, float scale, bf16* out, int64_t so, Workspace& ws,
                          const Query& query) {
  constexpr int KS = D / 32;
  const int64_t Lk = start + Lq, JB = (Lk + 15) / 16, JS = (Lk + 31) / 32, Lp = JS * 32;
  ws.kb.resize(JB * KS * 256);
  ws.vb.resize((D / 16) * JS * 256);
  ws.sc.resize(16 * Lp);
  ws.pa.resize(16 * Lp);
  ws.o.resize(16 * D);
  pack_k<D>(kc, Lk, ws.kb.data());
  pack_v<D>(vc, Lk, ws.vb.data());
  alignas(64) float qf[D];
  const V16 vscale = v_set1(scale);
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t i0 = 0; i0 < Lq; i0 += 16) {
      const int rows = int(std::min<int64_t>(16, Lq - i0));
      for (int r = 0; r < 16; ++r) {
        if (r < rows) {
          query(qf, q + (i0 + r) * sq + h * D, start + i0 + r);
          for (int c = 0; c < D; c += 16) store16(ws.qa + r * D + c, load16(qf + c));
        } else {
          std::memset(ws.qa + r * D, 0, D * sizeof(bf16));
        }
      }
      const int64_t n = start + i0 + rows;  // keys visible to some row of the block
      // scores: 16 rows x 16 keys per tile, head values in steps of 32
      // (up to 128 head values: the query block stays in tiles 2-5 across the key blocks)
      if constexpr (KS <= 4) {
        _tile_loadd(2, ws.qa, D * sizeof(bf16));
        if constexpr (KS > 1) _tile_loadd(3, ws.qa + 32, D * sizeof(bf16));
        if constexpr (KS > 2) _tile_loadd(4, ws.qa + 64, D * sizeof(bf16));
        if constexpr (KS > 3) _tile_loadd(5, ws.qa + 96, D * sizeof(bf16));
      }
      for (int64_t jb = 0; jb < (n + 15) / 16; ++jb) {
        const uint32_t* kt = ws.kb.data() + jb * KS * 256;
        _tile_zero(0);
        if constexpr (KS <= 4) {
          // tile numbers are immediates: one product per resident query tile
          _tile_loadd(6, kt, 64);
          _tile_dpbf16ps(0, 2, 6);
          if constexpr (KS > 1) {
            _tile_loadd(7, kt + 256, 64);
            _tile_dpbf16ps(0, 3, 7);
          }
          if constexpr (KS > 2) {
            _tile_loadd(6, kt + 512, 64);
            _tile_dpbf16ps(0, 4, 6);
          }
          if constexpr (KS > 3) {
            _tile_loadd(7, kt + 768, 64);
            _tile_dpbf16ps(0, 5, 7);
          }
        } else {
          for (int ks = 0; ks < KS; ++ks) {
            _tile_loadd(4, ws.qa + ks * 32, D * sizeof(bf16));
            _tile_loadd(6, kt + ks * 256, 64);
            _tile_dpbf16ps(0, 4, 6);
          }
        }
        _tile_stored(0, ws.sc.data() + jb * 16, Lp * sizeof(float));
      }
      // softmax of each row over its causal prefix (later keys and padded rows: probability 0),
      // normalised, rounded to bf16 for P V
      for (int r = 0; r < 16; ++r) {
        float* s = ws.sc.data() + r * Lp;
        bf16* p = ws.pa.data() + r * Lp;
        const int64_t nr = r < rows ? start + i0 + r + 1 : 0;
        V16 mx = v_set1(-INFINITY);
        for (int64_t j0 = 0; j0 < nr; j0 += 16)
          mx = v_max_where(mx, v_mul(load16(s + j0), vscale), first(int(std::min<int64_t>(16, nr - j0))));
        const V16 vm = v_set1(nr > 0 ? v_reduce_max(mx) : 0.0f);
        V16 lv = v_zero();
        for (int64_t j0 = 0; j0 < nr; j0 += 16) {
          const Mask valid = first(int(std::min<int64_t>(16, nr - j0)));
          const V16 e = v_zero_unless(exp16(v_sub(v_mul(load16(s + j0), vscale), vm)), valid);
          store16(s + j0, e);
          lv = v_add(lv, e);
        }
        const V16 inv = v_set1(nr > 0 ? 1.0f / v_reduce_add(lv) : 0.0f);
        for (int64_t j0 = 0; j0 < Lp; j0 += 16)
          store16(p + j0, j0 < nr ? v_mul(load16(s + j0), inv) : v_zero());
      }
      // out = P V: 16 rows x 16 head values per tile, keys in steps of 32
      const int64_t js_n = (n + 31) / 32;
      for (int nb = 0; nb < D / 16; ++nb) {
        _tile_zero(0);
        for (int64_t js = 0; js < js_n; ++js) {
          _tile_loadd(4, ws.pa.data() + js * 32, Lp * sizeof(bf16));
          _tile_loadd(6, ws.vb.data() + (nb * JS + js) * 256, 64);
          _tile_dpbf16ps(0, 4, 6);
        }
        _tile_stored(0, ws.o.data() + nb * 16, D * sizeof(float));
      }
      for (int r = 0; r < rows; ++r) {
        bf16* dst = out + (i0 + r) * so + h * D;
        for (int c = 0; c < D; c += 16) store16(dst + c, load16(ws.o.data() + r * D + c));
      }
    }
  }
}

}  // namespace amx_attn

#endif
