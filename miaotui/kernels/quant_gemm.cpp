// Quantized linear layers on AVX2: y (N, M) = x (N, K) @ W^T, W stored as group-wise integers.
//
// Activations are quantized per 32-block to int8 with one fp32 scale d (x ~= d * xq, as
// llama.cpp's Q8_0), so every 32-block of a weight row is an integer dot product
// (_mm256_maddubs_epi16 + _mm256_madd_epi16: 32 MACs in two instructions) scaled once in fp32.
// Result: y = W_deq @ x_hat with x_hat = d * xq, up to fp32 rounding (bound in reference.py).
//
// - Row kernels (decode, N <= 2-3): each weight row is streamed from memory once and dotted
//   against all N activation rows (held in L1).
// - Tile kernels (larger N): 8 weight rows are repacked on the fly so that one maddubs against
//   4 broadcast activation bytes serves 8 rows, and the fp32 work is shared by 8 rows.
// - Dequantize + MKL (checking only): 256 weight rows at a time to fp32, then at::mm; the full
//   fp32 weight never exists.
//
// Layouts (see packed.py): int8 qweight (M, K) with scale (M, K/G), G % 16 == 0;
// int4 qweight (M, K/2) with, inside each 32-block, element j in the low nibble of byte j and
// element j+16 in the high nibble (GGUF Q4_0 order), scale and optional offset (M, K/G), G % 32 == 0.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t QK = 32;  // activation block: one fp32 scale per 32 int8 values (Q8_0)
constexpr int NT = 4;       // activation rows per micro-kernel call (4 fp32 accumulators)

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// One row of K floats -> int8 codes q, block scales d and d * sum(q) per 32-block.
// d = amax / 127, q = round_half_even(x * (127 / amax)), as llama.cpp's quantize_row_q8_1.
void quantize_row(const float* x, int64_t K, int8_t* q, float* d, float* ds) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < K / QK; ++b) {
    const float* xb = x + b * QK;
    __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
    __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
    __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1));
    m = _mm256_max_ps(m, _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float db = amax / 127.0f;
    const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
    constexpr int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, id), rnd));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, id), rnd));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, id), rnd));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, id), rnd));
    const int32_t isum = hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
    // packs work per 128-bit lane; the final permute restores element order.
    i0 = _mm256_packs_epi32(i0, i1);
    i2 = _mm256_packs_epi32(i2, i3);
    i0 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i0, i2), perm);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QK), i0);
    d[b] = db;
    ds[b] = db * static_cast<float>(isum);
  }
}

// Quantized activations: codes (N, K), block scales d and d * sum(codes) (N, K/32).
struct QuantX {
  std::vector<int8_t> q;
  std::vector<float> d, ds;
};

QuantX quantize_x(const float* x, int64_t N, int64_t K) {
  const int64_t nb = K / QK;
  QuantX r{std::vector<int8_t>(N * K), std::vector<float>(N * nb), std::vector<float>(N * nb)};
  const int64_t grain = std::max<int64_t>(1, 65536 / K);  // ~64k values before going parallel
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      quantize_row(x + n * K, K, r.q.data() + n * K, r.d.data() + n * nb, r.ds.data() + n * nb);
  });
  return r;
}

// ---------------------------------------------------------------------------------------------
// Weight-side helpers shared by the kernels.

inline __m256i load_i8x32(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// 16 packed bytes -> 32 codes 0..15: element j in the low nibble of byte j, j+16 in the high.
inline __m256i unpack_nibbles(const uint8_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
}

inline __m256i bcast_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Block -> weight-group index (G >= 32), so the inner loops need no division.
std::vector<int32_t> group_index(int64_t nb, int64_t G) {
  std::vector<int32_t> g(nb);
  for (int64_t b = 0; b < nb; ++b) g[b] = static_cast<int32_t>(b * QK / G);
  return g;
}

// ---------------------------------------------------------------------------------------------
// Row kernels (decode): R weight rows against T activation rows, R * T <= 4, over the full K.
// The activation blocks are loaded once for the R rows; U = 4 / (R * T) independent accumulator
// sets keep 4 FMA chains in flight. Processing several rows per call also amortizes the per-row
// reduction, which matters for K = 576 (18 blocks a row).

// G16: two scales per 32-block; lanes 0-3 of the madd result hold elements 0-15, lanes 4-7
// elements 16-31, so the vector [s0 x4, s1 x4] applies both.
template <bool G16>
inline __m256 row_scale(const float* s, const int32_t* gidx, int64_t b) {
  if (G16) return _mm256_set_m128(_mm_set1_ps(s[2 * b + 1]), _mm_set1_ps(s[2 * b]));
  return _mm256_set1_ps(s[gidx[b]]);
}

constexpr int units(int R, int T) { return R * T >= 4 ? 1 : 4 / (R * T); }

// acc (R, T) vectors -> res[r * T + t] sums.
template <int R, int T>
inline void reduce_rows(__m256 (*acc)[R][T], int U, float* res) {
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      __m256 a = acc[0][r][t];
      for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[u][r][t]);
      res[r * T + t] = hsum_ps(a);
    }
}

template <int R, int T, bool G16>
void rows_i8(const int8_t* w, int64_t K, const float* s, int64_t ng, const int32_t* gidx, int64_t nb,
             const int8_t* xq, const float* xd, float* res) {
  constexpr int U = units(R, T);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[U][R][T];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[u][r][t] = _mm256_setzero_ps();
  auto block = [&](__m256 (&a)[R][T], int64_t b) {
    __m256i xv[T];
    __m256 dx[T];
    for (int t = 0; t < T; ++t) {
      xv[t] = load_i8x32(xq + t * K + b * QK);
      dx[t] = _mm256_set1_ps(xd[t * nb + b]);
    }
    for (int r = 0; r < R; ++r) {
      const __m256i wv = load_i8x32(w + r * K + b * QK);
      const __m256i aw = _mm256_sign_epi8(wv, wv);  // |w| as u8 (|-128| = 128 fits)
      const __m256 sv = row_scale<G16>(s + r * ng, gidx, b);
      for (int t = 0; t < T; ++t) {
        // maddubs wants u8 x s8: |w| * (x * sign(w)); |x| <= 127 keeps int16 pair sums <= 32512.
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[t], wv)), ones);
        a[r][t] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(p), sv), dx[t], a[r][t]);
      }
    }
  };
  int64_t b = 0;
  for (; b + U <= nb; b += U)
    for (int u = 0; u < U; ++u) block(acc[u], b + u);
  for (; b < nb; ++b) block(acc[0], b);
  reduce_rows<R, T>(acc, U, res);
}

// Paired activation layout for the int4 row kernel: blocks (2p, 2p+1) become 64 bytes
// [x_2p[0:16], x_2p+1[0:16], x_2p[16:32], x_2p+1[16:32]] and 8 scales [d_2p x4, d_2p+1 x4]. One
// 32-byte load of packed weights (two blocks) then unpacks with no lane crossing: its low nibbles
// pair with the first 32 activation bytes, its high nibbles with the second.
struct PairedX {
  std::vector<int8_t> q;  // (N, npair * 64)
  std::vector<float> d;   // (N, npair * 8)
  int64_t npair;
};

PairedX pair_x(const QuantX& qx, int64_t N, int64_t K) {
  const int64_t nb = K / QK, np = nb / 2;
  PairedX r{std::vector<int8_t>(N * np * 64), std::vector<float>(N * np * 8), np};
  for (int64_t n = 0; n < N; ++n)
    for (int64_t p = 0; p < np; ++p) {
      const int8_t* src = qx.q.data() + n * K + 2 * p * QK;
      const __m256i a = load_i8x32(src), b = load_i8x32(src + QK);
      int8_t* dst = r.q.data() + (n * np + p) * 64;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute2x128_si256(a, b, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32), _mm256_permute2x128_si256(a, b, 0x31));
      const float d0 = qx.d[n * nb + 2 * p], d1 = qx.d[n * nb + 2 * p + 1];
      _mm256_storeu_ps(r.d.data() + (n * np + p) * 8, _mm256_set_m128(_mm_set1_ps(d1), _mm_set1_ps(d0)));
    }
  return r;
}

// Mask of the first n % 8 lanes, for the tails of the per-group offset dot products.
inline __m256i tail_mask(int64_t n) {
  const int64_t k = n % 8;
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(k)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// int4: s * sum_b d_b dot(q, xq)_b over pairs of blocks, plus the offset term
// sum_g o_g * xgs_g (o = -8 s without offsets) folded into the same accumulators.
template <int R, int T>
void rows_i4(const uint8_t* w, int64_t K, const float* s, const float* o, int64_t ng, const int32_t* gidx,
             int64_t nb, const int8_t* xq, const float* xd, const PairedX& px, int64_t n0, const float* xgs,
             float* res) {
  constexpr int U = units(R, T);
  const int64_t np = px.npair;
  const int8_t* xp = px.q.data() + n0 * np * 64;
  const float* dp = px.d.data() + n0 * np * 8;
  const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(0x0F);
  __m256 acc[U][R][T];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[u][r][t] = _mm256_setzero_ps();
  auto pair = [&](__m256 (&a)[R][T], int64_t p) {
    __m256i xa[T], xb[T];
    __m256 dv[T];
    for (int t = 0; t < T; ++t) {
      xa[t] = load_i8x32(xp + t * np * 64 + p * 64);
      xb[t] = load_i8x32(xp + t * np * 64 + p * 64 + 32);
      dv[t] = _mm256_loadu_ps(dp + t * np * 8 + p * 8);
    }
    for (int r = 0; r < R; ++r) {
      const __m256i v = load_i8x32(w + r * (K / 2) + p * QK);
      const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      const float* sr = s + r * ng;
      const __m256 sv = _mm256_set_m128(_mm_set1_ps(sr[gidx[2 * p + 1]]), _mm_set1_ps(sr[gidx[2 * p]]));
      for (int t = 0; t < T; ++t) {
        // int16 lanes: two products each from lo and hi, |sum| <= 4 * 15 * 127 < 32767.
        const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xa[t]), _mm256_maddubs_epi16(hi, xb[t]));
        const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));  // lanes 0-3: block 2p, 4-7: 2p+1
        a[r][t] = _mm256_fmadd_ps(f, _mm256_mul_ps(sv, dv[t]), a[r][t]);
      }
    }
  };
  int64_t p = 0;
  for (; p + U <= np; p += U)
    for (int u = 0; u < U; ++u) pair(acc[u], p + u);
  for (; p < np; ++p) pair(acc[0], p);
  if (nb % 2) {  // last block alone, natural activation layout
    const int64_t b = nb - 1;
    for (int r = 0; r < R; ++r) {
      const __m256i wv = unpack_nibbles(w + r * (K / 2) + b * (QK / 2));
      const __m256 sv = _mm256_set1_ps(s[r * ng + gidx[b]]);
      for (int t = 0; t < T; ++t) {
        const __m256i pr = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, load_i8x32(xq + t * K + b * QK)), ones);
        acc[0][r][t] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(pr), sv), _mm256_set1_ps(xd[t * nb + b]),
                                       acc[0][r][t]);
      }
    }
  }
  const __m256 omul = _mm256_set1_ps(o ? 1.0f : -8.0f);
  const float* ov = o ? o : s;
  const __m256i mask = tail_mask(ng);
  for (int64_t g = 0; g < ng; g += 8) {
    const bool full = g + 8 <= ng;
    for (int r = 0; r < R; ++r) {
      const float* orow = ov + r * ng + g;
      const __m256 oo = _mm256_mul_ps(omul, full ? _mm256_loadu_ps(orow) : _mm256_maskload_ps(orow, mask));
      for (int t = 0; t < T; ++t) {
        const float* xs = xgs + t * ng + g;
        acc[0][r][t] = _mm256_fmadd_ps(oo, full ? _mm256_loadu_ps(xs) : _mm256_maskload_ps(xs, mask), acc[0][r][t]);
      }
    }
  }
  reduce_rows<R, T>(acc, U, res);
}

// ---------------------------------------------------------------------------------------------
// Tile kernels (batched decode and prefill): 8 weight rows are repacked on the fly so that for
// every 32-block, vector c holds bytes 4c..4c+3 of rows 0..7. maddubs against 4 activation bytes
// broadcast to all lanes then leaves one row per int32 lane: the fp32 scaling and accumulation
// is done once for 8 rows, and the result is 8 contiguous outputs.

constexpr int64_t TR = 8;                 // weight rows per tile
constexpr int64_t TILE_BLOCK = TR * QK;   // bytes of one repacked 32-block

inline void transpose_store(__m256i r[8], uint8_t* dst) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);      // chunks 0,1 | 4,5
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);  // chunks 2,3 | 6,7
  }
  for (int h = 0; h < 2; ++h) {  // rows 0-3, rows 4-7
    u[4 * h + 0] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);      // chunk 0 | 4
    u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);      // chunk 1 | 5
    u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);  // chunk 2 | 6
    u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);  // chunk 3 | 7
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32 * c), _mm256_permute2x128_si256(u[c], u[4 + c], 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32 * (c + 4)), _mm256_permute2x128_si256(u[c], u[4 + c], 0x31));
  }
}

void repack_i8(const int8_t* w, int64_t K, int64_t valid, uint8_t* dst) {
  for (int64_t b = 0; b < K / QK; ++b) {
    __m256i r[8];
    for (int64_t i = 0; i < TR; ++i) r[i] = i < valid ? load_i8x32(w + i * K + b * QK) : _mm256_setzero_si256();
    transpose_store(r, dst + b * TILE_BLOCK);
  }
}

void repack_i4(const uint8_t* w, int64_t K, int64_t valid, uint8_t* dst) {
  for (int64_t b = 0; b < K / QK; ++b) {
    __m256i r[8];
    for (int64_t i = 0; i < TR; ++i) r[i] = i < valid ? unpack_nibbles(w + i * (K / 2) + b * (QK / 2)) : _mm256_setzero_si256();
    transpose_store(r, dst + b * TILE_BLOCK);
  }
}

// (valid, ng) row-major per-row values -> (ng, 8) with zero padding; mul scales them.
void repack_groups(const float* v, int64_t ng, int64_t valid, float mul, float* dst) {
  for (int64_t g = 0; g < ng; ++g)
    for (int64_t i = 0; i < TR; ++i) dst[g * TR + i] = i < valid ? mul * v[i * ng + g] : 0.0f;
}

// int8 tile: sub-blocks of 16 (G16, two scale vectors per block) or one of 32 per block.
template <int T, bool G16>
void tile_i8(const uint8_t* wt, const float* st, const int32_t* gidx, int64_t nb, const int8_t* xq,
             const float* xd, int64_t K, __m256* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[T];
  for (int i = 0; i < T; ++i) acc[i] = _mm256_setzero_ps();
  constexpr int SUB = G16 ? 2 : 1;
  for (int64_t b = 0; b < nb; ++b) {
    for (int h = 0; h < SUB; ++h) {
      __m256i isum[T];
      for (int i = 0; i < T; ++i) isum[i] = _mm256_setzero_si256();
      for (int c = h * 8 / SUB; c < (h + 1) * 8 / SUB; ++c) {
        const __m256i wv = load_i8x32(wt + b * TILE_BLOCK + c * 32);
        const __m256i aw = _mm256_sign_epi8(wv, wv);
        for (int i = 0; i < T; ++i) {
          const __m256i xv = _mm256_sign_epi8(bcast_i32(xq + i * K + b * QK + 4 * c), wv);
          isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xv), ones));
        }
      }
      const __m256 sv = _mm256_loadu_ps(st + (G16 ? 2 * b + h : gidx[b]) * TR);
      for (int i = 0; i < T; ++i)
        acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(isum[i]), sv), _mm256_set1_ps(xd[i * nb + b]), acc[i]);
    }
  }
  for (int i = 0; i < T; ++i) out[i] = acc[i];
}

// int4 tile: the maddubs int16 results of a whole block are summed in int16 (8 chunks x 2 pairs
// x 15 x 127 = 30480 < 32767), then one madd per block. `ot` holds the per-group offsets (or -8 s).
template <int T>
void tile_i4(const uint8_t* wt, const float* st, const float* ot, const int32_t* gidx, int64_t nb,
             int64_t ng, const int8_t* xq, const float* xd, const float* xgs, int64_t K, __m256* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[T];
  for (int i = 0; i < T; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i s16[T];
    for (int i = 0; i < T; ++i) s16[i] = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      const __m256i wv = load_i8x32(wt + b * TILE_BLOCK + c * 32);
      for (int i = 0; i < T; ++i)
        s16[i] = _mm256_add_epi16(s16[i], _mm256_maddubs_epi16(wv, bcast_i32(xq + i * K + b * QK + 4 * c)));
    }
    const __m256 sv = _mm256_loadu_ps(st + gidx[b] * TR);
    for (int i = 0; i < T; ++i) {
      const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[i], ones));
      acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(f, sv), _mm256_set1_ps(xd[i * nb + b]), acc[i]);
    }
  }
  for (int64_t g = 0; g < ng; ++g) {
    const __m256 ov = _mm256_loadu_ps(ot + g * TR);
    for (int i = 0; i < T; ++i) acc[i] = _mm256_fmadd_ps(ov, _mm256_set1_ps(xgs[i * ng + g]), acc[i]);
  }
  for (int i = 0; i < T; ++i) out[i] = acc[i];
}

// Compile-time T for a runtime tile height 1..4.
template <typename F>
inline void with_t(int T, F f) {
  switch (T) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// Compile-time (R, T) with R * T <= 4 for the row kernels.
template <typename F>
inline void with_rt(int R, int T, F f) {
  using std::integral_constant;
  switch (R * 8 + T) {
    case 8 + 1: f(integral_constant<int, 1>{}, integral_constant<int, 1>{}); break;
    case 16 + 1: f(integral_constant<int, 2>{}, integral_constant<int, 1>{}); break;
    case 24 + 1: f(integral_constant<int, 3>{}, integral_constant<int, 1>{}); break;
    case 32 + 1: f(integral_constant<int, 4>{}, integral_constant<int, 1>{}); break;
    case 8 + 2: f(integral_constant<int, 1>{}, integral_constant<int, 2>{}); break;
    case 16 + 2: f(integral_constant<int, 2>{}, integral_constant<int, 2>{}); break;
    case 8 + 3: f(integral_constant<int, 1>{}, integral_constant<int, 3>{}); break;
    case 8 + 4: f(integral_constant<int, 1>{}, integral_constant<int, 4>{}); break;
    default: TORCH_INTERNAL_ASSERT(false, "no row kernel for R=", R, " T=", T);
  }
}

// ---------------------------------------------------------------------------------------------
// Drivers.

// Activation rows handled per pass over a thread's weight rows (row path): bounds the quantized x
// that must stay cache-resident (N_BLK * K bytes) while the weight rows are streamed.
constexpr int64_t N_BLK = 64;

// Rows per parallel chunk: enough bytes that the thread start-up cost is amortized.
int64_t row_grain(int64_t row_bytes) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_bytes)); }

// body(r, R, n0, T): weight rows r..r+R against activation rows n0..n0+T (R * T <= 4, R <= max_r),
// all threads.
template <typename Body>
void for_rows(int64_t M, int64_t N, int64_t row_bytes, int max_r, Body body) {
  at::parallel_for(0, M, row_grain(row_bytes), [&](int64_t r0, int64_t r1) {
    for (int64_t nb0 = 0; nb0 < N; nb0 += N_BLK) {
      const int64_t nb1 = std::min(N, nb0 + N_BLK);
      const int T = static_cast<int>(std::min<int64_t>(NT, nb1 - nb0)), R = std::min(max_r, std::max(1, NT / T));
      for (int64_t r = r0; r < r1; r += R)
        for (int64_t n0 = nb0; n0 < nb1; n0 += T)
          body(r, static_cast<int>(std::min<int64_t>(R, r1 - r)), n0, static_cast<int>(std::min<int64_t>(T, nb1 - n0)));
    }
  });
}

// pack(r0, valid, wt, st, ot) fills one tile's buffers; kern(T, n0, wt, st, ot, res) computes
// T activation rows against it; results + bias go to out (N, M). For N > N_BLK, tiles are repacked
// 8 at a time and swept by N_BLK activation rows at a time, so both stay in L2; otherwise one
// tile at a time stays in L1.

template <typename Pack, typename Kern>
void for_tiles(int64_t M, int64_t N, int64_t K, int64_t ng, float* out, const float* bias, Pack pack, Kern kern) {
  const int64_t ntiles = (M + TR - 1) / TR, wsize = K / QK * TILE_BLOCK, gsize = ng * TR;
  const int64_t tile_group = N > N_BLK ? 8 : 1;
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> wt(tile_group * wsize);
    std::vector<float> st(tile_group * gsize), ot(tile_group * gsize), bv(tile_group * TR, 0.0f);
    alignas(32) float tmp[TR];
    __m256 res[NT];
    for (int64_t g0 = t0; g0 < t1; g0 += tile_group) {
      const int64_t g1 = std::min(t1, g0 + tile_group);
      for (int64_t t = g0; t < g1; ++t) {
        const int64_t j = t - g0, r0 = t * TR, valid = std::min(TR, M - r0);
        pack(r0, valid, wt.data() + j * wsize, st.data() + j * gsize, ot.data() + j * gsize);
        for (int64_t i = 0; i < TR; ++i) bv[j * TR + i] = bias && i < valid ? bias[r0 + i] : 0.0f;
      }
      for (int64_t nb0 = 0; nb0 < N; nb0 += N_BLK) {
        const int64_t nb1 = std::min(N, nb0 + N_BLK);
        for (int64_t t = g0; t < g1; ++t) {
          const int64_t j = t - g0, r0 = t * TR, valid = std::min(TR, M - r0);
          const __m256 b = _mm256_loadu_ps(bv.data() + j * TR);
          for (int64_t n0 = nb0; n0 < nb1; n0 += NT) {
            const int T = static_cast<int>(std::min<int64_t>(NT, nb1 - n0));
            kern(T, n0, wt.data() + j * wsize, st.data() + j * gsize, ot.data() + j * gsize, res);
            for (int i = 0; i < T; ++i) {
              float* dst = out + (n0 + i) * M + r0;
              if (valid == TR) {
                _mm256_storeu_ps(dst, _mm256_add_ps(res[i], b));
              } else {
                _mm256_store_ps(tmp, _mm256_add_ps(res[i], b));
                std::memcpy(dst, tmp, valid * sizeof(float));
              }
            }
          }
        }
      }
    }
  });
}

void dequant_row_i8(const int8_t* w, const float* s, int64_t K, int64_t G, float* dst) {
  for (int64_t g = 0; g < K / G; ++g) {
    const __m256 sv = _mm256_set1_ps(s[g]);
    for (int64_t k = g * G; k < (g + 1) * G; k += 8) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k));
      _mm256_storeu_ps(dst + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), sv));
    }
  }
}

void dequant_row_i4(const uint8_t* w, const float* s, const float* o, int64_t K, int64_t G, float* dst) {
  const __m128i m4 = _mm_set1_epi8(0x0F);
  for (int64_t g = 0; g < K / G; ++g) {
    const __m256 sv = _mm256_set1_ps(s[g]);
    const __m256 ov = _mm256_set1_ps(o ? o[g] : -8.0f * s[g]);
    for (int64_t k = g * G; k < (g + 1) * G; k += QK) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k / 2));
      const __m128i lo = _mm_and_si128(raw, m4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
      const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
      for (int p = 0; p < 4; ++p) {
        const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p]));
        _mm256_storeu_ps(dst + k + 8 * p, _mm256_fmadd_ps(q, sv, ov));
      }
    }
  }
}

// Dequantize `tile` weight rows at a time into one fp32 buffer and run MKL on each tile, so the
// full fp32 weight never exists.
template <typename Dequant>
at::Tensor dequant_mm(const at::Tensor& x, int64_t M, int64_t K, const c10::optional<at::Tensor>& bias,
                      int64_t tile, Dequant dequant) {
  const int64_t N = x.size(0);
  at::Tensor out = at::empty({N, M}, x.options());
  tile = std::max<int64_t>(TR, std::min(tile, M));
  at::Tensor buf = at::empty({tile, K}, x.options());
  float* bufp = buf.data_ptr<float>();
  for (int64_t r0 = 0; r0 < M; r0 += tile) {
    const int64_t rows = std::min(tile, M - r0);
    at::parallel_for(0, rows, 16, [&](int64_t a, int64_t b) {
      for (int64_t r = a; r < b; ++r) dequant(r0 + r, bufp + r * K);
    });
    at::Tensor dst = out.narrow(1, r0, rows);  // row stride M: BLAS writes it in place
    at::Tensor wt = buf.narrow(0, 0, rows).t();
    if (bias.has_value())
      at::addmm_out(dst, bias->narrow(0, r0, rows), x, wt);
    else
      at::mm_out(dst, x, wt);
  }
  return out;
}


// x (..., K) of any float dtype -> contiguous float32 (N, K); a no-op view for the usual input.
at::Tensor as_rows(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "x has ", x.size(-1), " input features, the weight expects K=", K);
  TORCH_CHECK(K % QK == 0, "K must be a multiple of 32, got ", K);
  if (x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous()) return x;  // the usual case
  return x.reshape({-1, K}).to(at::kFloat).contiguous();
}

// (N, M) float32 -> (..., M) in x's dtype.
at::Tensor as_output(const at::Tensor& out, const at::Tensor& x, int64_t M) {
  if (x.dim() == 2 && x.scalar_type() == at::kFloat) return out;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = M;
  const at::Tensor y = out.view(shape);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

c10::optional<at::Tensor> as_bias(const c10::optional<at::Tensor>& bias, int64_t M) {
  if (!bias.has_value()) return c10::nullopt;
  TORCH_CHECK(bias->numel() == M, "bias must have M=", M, " values, got ", bias->numel());
  if (bias->scalar_type() == at::kFloat && bias->is_contiguous()) return bias;
  return bias->to(at::kFloat).contiguous();
}

at::Tensor as_groups(const at::Tensor& v, const char* name, int64_t M, int64_t ng) {
  TORCH_CHECK(v.scalar_type() == at::kFloat && v.is_contiguous() && v.numel() == M * ng, name,
              " must be a contiguous float32 (M, K/G) = (", M, ", ", ng, ") tensor");
  return v;
}

}  // namespace

// Paths: 0 = row kernels (decode), 1 = 8-row tile kernels (batched), 2 = dequantize + MKL GEMM,
// -1 = chosen by N. Measured on SmolLM2 shapes (Zen 3, 1 and 2 threads): the row kernels win up
// to N = 2 (int8) / 3 (int4), the tile kernels above; the tile kernels beat fp32 MKL, and so the
// dequantize + MKL path, at every N measured (up to 512), so auto never picks GEMM.
enum Path : int64_t { AUTO = -1, ROWS = 0, TILES = 1, GEMM = 2 };
constexpr int64_t ROWS_MAX_N_INT8 = 2, ROWS_MAX_N_INT4 = 3;
constexpr int64_t GEMM_TILE_ROWS = 256;  // fp32 rows per dequantized tile (256 x 576 x 4 B = 590 kB)

int64_t choose_path(int64_t n, int64_t bits) {
  return n <= (bits == 4 ? ROWS_MAX_N_INT4 : ROWS_MAX_N_INT8) ? ROWS : TILES;
}

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scale_in,
                       int64_t group_size, const c10::optional<at::Tensor>& bias_in, int64_t path) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar && qweight.is_contiguous(),
              "qweight must be a contiguous int8 (M, K) tensor");
  const int64_t M = qweight.size(0), K = qweight.size(1), G = group_size;
  TORCH_CHECK(G > 0 && K % G == 0 && (G == 16 || G % QK == 0), "unsupported group_size ", G, " for K=", K);
  const int64_t ng = K / G, nb = K / QK;
  const at::Tensor x = as_rows(x_in, K);
  const at::Tensor scale = as_groups(scale_in, "scale", M, ng);
  const c10::optional<at::Tensor> bias = as_bias(bias_in, M);
  const int64_t N = x.size(0);
  if (path == AUTO) path = choose_path(N, 8);
  const int8_t* wp = qweight.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  if (path == GEMM)
    return as_output(dequant_mm(x, M, K, bias, GEMM_TILE_ROWS,
                                [&](int64_t r, float* dst) { dequant_row_i8(wp + r * K, sp + r * ng, K, G, dst); }),
                     x_in, M);
  const QuantX qx = quantize_x(x.data_ptr<float>(), N, K);
  const int8_t* xq = qx.q.data();
  const float* xd = qx.d.data();
  const std::vector<int32_t> gidx = group_index(nb, G == 16 ? QK : G);
  at::Tensor out = at::empty({N, M}, x.options());
  float* op = out.data_ptr<float>();
  if (path == ROWS) {
    for_rows(M, N, K, NT, [&](int64_t r, int R, int64_t n0, int T) {
      float res[NT];
      with_rt(R, T, [&](auto rc, auto tc) {
        constexpr int RC = decltype(rc)::value, TC = decltype(tc)::value;
        if (G == 16)
          rows_i8<RC, TC, true>(wp + r * K, K, sp + r * ng, ng, gidx.data(), nb, xq + n0 * K, xd + n0 * nb, res);
        else
          rows_i8<RC, TC, false>(wp + r * K, K, sp + r * ng, ng, gidx.data(), nb, xq + n0 * K, xd + n0 * nb, res);
      });
      for (int i = 0; i < R; ++i)
        for (int t = 0; t < T; ++t) op[(n0 + t) * M + r + i] = res[i * T + t] + (bp ? bp[r + i] : 0.0f);
    });
    return as_output(out, x_in, M);
  }
  for_tiles(
      M, N, K, ng, op, bp,
      [&](int64_t r0, int64_t valid, uint8_t* wt, float* st, float*) {
        repack_i8(wp + r0 * K, K, valid, wt);
        repack_groups(sp + r0 * ng, ng, valid, 1.0f, st);
      },
      [&](int T, int64_t n0, const uint8_t* wt, const float* st, const float*, __m256* res) {
        with_t(T, [&](auto t) {
          if (G == 16)
            tile_i8<decltype(t)::value, true>(wt, st, gidx.data(), nb, xq + n0 * K, xd + n0 * nb, K, res);
          else
            tile_i8<decltype(t)::value, false>(wt, st, gidx.data(), nb, xq + n0 * K, xd + n0 * nb, K, res);
        });
      });
  return as_output(out, x_in, M);
}

// int4: value = q * s + o, or (q - 8) * s without offset (o = -8 s). Per group g and row n,
// sum_k (q s + o) x_hat_k = s * sum_b d_b dot(q, xq)_b + o * sum_b d_b sum(xq)_b.
at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scale_in,
                       const c10::optional<at::Tensor>& offset_in, int64_t group_size,
                       const c10::optional<at::Tensor>& bias_in, int64_t path) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte && qweight.is_contiguous(),
              "qweight must be a contiguous uint8 (M, K/2) tensor");
  const int64_t M = qweight.size(0), K = qweight.size(1) * 2, G = group_size;
  TORCH_CHECK(G > 0 && G % QK == 0 && K % G == 0, "unsupported group_size ", G, " for K=", K);
  const int64_t ng = K / G, nb = K / QK;
  const at::Tensor x = as_rows(x_in, K);
  const at::Tensor scale = as_groups(scale_in, "scale", M, ng);
  const c10::optional<at::Tensor> offset =
      offset_in.has_value() ? c10::optional<at::Tensor>(as_groups(*offset_in, "offset", M, ng)) : c10::nullopt;
  const c10::optional<at::Tensor> bias = as_bias(bias_in, M);
  const int64_t N = x.size(0);
  if (path == AUTO) path = choose_path(N, 4);
  const uint8_t* wp = qweight.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* opp = offset.has_value() ? offset->data_ptr<float>() : nullptr;
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  if (path == GEMM)
    return as_output(dequant_mm(x, M, K, bias, GEMM_TILE_ROWS,
                                [&](int64_t r, float* dst) {
                                  dequant_row_i4(wp + r * (K / 2), sp + r * ng, opp ? opp + r * ng : nullptr, K, G, dst);
                                }),
                     x_in, M);
  const QuantX qx = quantize_x(x.data_ptr<float>(), N, K);
  const int8_t* xq = qx.q.data();
  const float* xd = qx.d.data();
  const std::vector<int32_t> gidx = group_index(nb, G);
  // Per-group activation sums sum_b d_b sum(xq)_b, (N, K/G): the offset term of every row.
  std::vector<float> xgs(N * ng, 0.0f);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < nb; ++b) xgs[n * ng + gidx[b]] += qx.ds[n * nb + b];
  at::Tensor out = at::empty({N, M}, x.options());
  float* op = out.data_ptr<float>();
  if (path == ROWS) {
    const PairedX px = pair_x(qx, N, K);
    for_rows(M, N, K / 2, NT, [&](int64_t r, int R, int64_t n0, int T) {
      float res[NT];
      with_rt(R, T, [&](auto rc, auto tc) {
        rows_i4<decltype(rc)::value, decltype(tc)::value>(wp + r * (K / 2), K, sp + r * ng, opp ? opp + r * ng : nullptr,
                                                          ng, gidx.data(), nb, xq + n0 * K, xd + n0 * nb, px, n0,
                                                          xgs.data() + n0 * ng, res);
      });
      for (int i = 0; i < R; ++i)
        for (int t = 0; t < T; ++t) op[(n0 + t) * M + r + i] = res[i * T + t] + (bp ? bp[r + i] : 0.0f);
    });
    return as_output(out, x_in, M);
  }
  for_tiles(
      M, N, K, ng, op, bp,
      [&](int64_t r0, int64_t valid, uint8_t* wt, float* st, float* ot) {
        repack_i4(wp + r0 * (K / 2), K, valid, wt);
        repack_groups(sp + r0 * ng, ng, valid, 1.0f, st);
        if (opp)
          repack_groups(opp + r0 * ng, ng, valid, 1.0f, ot);
        else
          repack_groups(sp + r0 * ng, ng, valid, -8.0f, ot);
      },
      [&](int T, int64_t n0, const uint8_t* wt, const float* st, const float* ot, __m256* res) {
        with_t(T, [&](auto t) {
          tile_i4<decltype(t)::value>(wt, st, ot, gidx.data(), nb, ng, xq + n0 * K, xd + n0 * nb,
                                      xgs.data() + n0 * ng, K, res);
        });
      });
  return as_output(out, x_in, M);
}

// For tests: the activation quantization of the integer paths, as (codes, d, d * sum(codes)).
std::vector<at::Tensor> quantize_activations(const at::Tensor& x_in) {
  const at::Tensor x = as_rows(x_in, x_in.size(-1));
  const int64_t N = x.size(0), K = x.size(1), nb = K / QK;
  const QuantX q = quantize_x(x.data_ptr<float>(), N, K);
  at::Tensor codes = at::empty({N, K}, x.options().dtype(at::kChar));
  at::Tensor d = at::empty({N, nb}, x.options()), ds = at::empty({N, nb}, x.options());
  std::memcpy(codes.data_ptr<int8_t>(), q.q.data(), N * K);
  std::memcpy(d.data_ptr<float>(), q.d.data(), N * nb * sizeof(float));
  std::memcpy(ds.data_ptr<float>(), q.ds.data(), N * nb * sizeof(float));
  return {codes, d, ds};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "x (..., K) @ W^T (+ bias) for int8 W (M, K)");
  m.def("int4_linear", &int4_linear, "x (..., K) @ W^T (+ bias) for int4 W (M, K/2 bytes)");
  m.def("choose_path", &choose_path, "path for N activation rows and 8/4-bit weights: 0 rows, 1 tiles, 2 gemm");
  m.def("quantize_activations", &quantize_activations, "x -> (int8 codes, block scales d, d * sum)");
}
