// The ISA-specific half of native_step.cpp: dot products of GGUF weight blocks with int8
// activations, and the vector math of one decoder step. Included twice by native_step.cpp,
// once per target (AVX2 + FMA + F16C, and the same with AVX-512 VNNI on 256-bit vectors), each
// time inside its own namespace and `#pragma GCC target` region. No include guard on purpose.
//
// Numerics are fixed per (weight row, activation row): blocks are accumulated in file order into
// one fp32 vector and reduced the same way whatever the tile shape, batch size or thread split,
// so a token's logits do not depend on what else runs in its batch.

// ---------------------------------------------------------------------------------------------
// Small vector helpers.

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// exp(x) for x <= 0 (softmax, silu): 2^(x log2 e) as 2^n * p(f), p a degree-6 polynomial
// (|rel. error| < 2e-7 on [-87, 0]); below -87 (and -inf) the result is 0.
inline __m256 exp_ps(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
  const __m256 y = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(y, n);  // [-0.5, 0.5]
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), live);
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline __m256 load_half8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// n floats -> float16 (round to nearest even), n % 8 == 0.
void to_half(const float* x, int64_t n, uint16_t* y) {
  for (int64_t i = 0; i < n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// n_heads rows of D values -> int8 codes and one scale per row (symmetric absmax, as
// model/kv_cache.py's Int8KVCache: s = max(amax, 1e-8) / 127, q = round_half_even(x / s)).
void quantize_kv(const float* x, int64_t n_heads, int64_t D, int8_t* q, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  constexpr int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t h = 0; h < n_heads; ++h) {
    const float* xh = x + h * D;
    __m256 mx = _mm256_setzero_ps();
    for (int64_t c = 0; c < D; c += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(xh + c)));
    const float sh = std::max(hmax(mx), 1e-8f) / 127.0f;
    const __m256 sv = _mm256_set1_ps(sh);
    for (int64_t c = 0; c < D; c += 8) {
      __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xh + c), sv), rnd);
      v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
      const __m128i i32lo = _mm256_castsi256_si128(_mm256_cvtps_epi32(v));
      const __m128i i32hi = _mm256_extracti128_si256(_mm256_cvtps_epi32(v), 1);
      const __m128i i16 = _mm_packs_epi32(i32lo, i32hi);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + h * D + c), _mm_packs_epi16(i16, i16));
    }
    s[h] = sh;
  }
}

// ---------------------------------------------------------------------------------------------
// Activations quantized per 32-block to int8 (llama.cpp's Q8_1): x ~= d * q, s = d * sum(q).

inline void quantize_row(const float* x, int64_t K, int8_t* q, float* d, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < K / QK; ++b) {
    const float* xb = x + b * QK;
    const __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
    const __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
    __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1));
    m = _mm256_max_ps(m, _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    const float amax = hmax(m);
    const float db = amax / 127.0f;
    const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
    constexpr int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, id), rnd));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, id), rnd));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, id), rnd));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, id), rnd));
    const int32_t isum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
    i0 = _mm256_packs_epi32(i0, i1);  // packs work per 128-bit lane; the permute restores order
    i2 = _mm256_packs_epi32(i2, i3);
    i0 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i0, i2), perm);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QK), i0);
    d[b] = db;
    s[b] = db * static_cast<float>(isum);
  }
}

// ---------------------------------------------------------------------------------------------
// One row group (8 weight rows, interleaved by make_linear) x T activation rows over the whole
// K: lane i of acc[t] is (row i, act row t). Q4_0: w = d (q - 8); Q4_1: w = d q + m; Q8_0:
// w = d q. Per block b, for all 8 rows at once:
//   sum_k w_k x_k = d_w d_x sum(q * xq) + m_w s_x      (s_x = d_x sum(xq); m_w = 0 for Q8_0).
// The integer sums are exact (u8 x s8 products: Q4 codes <= 15; Q8_0 as |q| x sign-adjusted x,
// at most 2 * 128 * 127 per pair, so the AVX2 pairwise add cannot saturate); the fp32 steps run
// in block order for each (row, act row), whatever the tile: batch-invariant, and identical on
// both instruction sets.

// acc + (4 consecutive u8 x s8 products summed) per 32-bit lane.
inline __m256i dot4_add(__m256i acc, __m256i u, __m256i s) {
#if MIAOTUI_VNNI
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Q8_0 with VNNI: dpbusd multiplies u8 by s8 without saturating, so the activations go in as
// u = x + 128 against the signed weights, and 128 * sum(w) comes off: the same integer sum as
// |w| x sign(w) x (AVX2's way), without its eight sign operations per activation row and block.
template <int T>
inline void group_tile_q8_offset(const uint8_t* grp, int64_t nb, const uint8_t* xu, int64_t K, const float* xd,
                                 __m256* out) {
  constexpr int64_t GB = group_block_bytes(QT_Q8_0);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi8(1);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = grp + b * GB;
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    __m256i w[8];
    __m256i sw0 = _mm256_setzero_si256(), sw1 = _mm256_setzero_si256();
    for (int c = 0; c < 8; c += 2) {
      w[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * c));
      w[c + 1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * (c + 1)));
      sw0 = _mm256_dpbusd_epi32(sw0, ones, w[c]);
      sw1 = _mm256_dpbusd_epi32(sw1, ones, w[c + 1]);
    }
    const __m256i offset = _mm256_slli_epi32(_mm256_add_epi32(sw0, sw1), 7);  // 128 * sum(w) per row
    for (int t = 0; t < T; ++t) {
      const uint8_t* x = xu + t * K + b * QK;
      __m256i p[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                      _mm256_setzero_si256()};
      for (int c = 0; c < 8; ++c)
        p[c % 4] = _mm256_dpbusd_epi32(p[c % 4], bcast4(reinterpret_cast<const int8_t*>(x + 4 * c)), w[c]);
      const __m256i psum = _mm256_sub_epi32(
          _mm256_add_epi32(_mm256_add_epi32(p[0], p[1]), _mm256_add_epi32(p[2], p[3])), offset);
      const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(xd[t * (K / QK) + b]));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(psum), scale, acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) out[t] = acc[t];
}

template <int QT, int T>
inline void group_tile(const uint8_t* grp, int64_t nb, const int8_t* xq, int64_t K, const float* xd, const float* xs,
                       __m256* out) {
  constexpr int64_t GB = group_block_bytes(QT);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = grp + b * GB;
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    __m256i w[8], u[8];
    __m256 mw = _mm256_setzero_ps();
    if constexpr (QT == QT_Q8_0) {
      for (int c = 0; c < 8; ++c) {
        w[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * c));
        u[c] = _mm256_sign_epi8(w[c], w[c]);  // |q| as u8 (|-128| = 128 fits)
      }
    } else {
      mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)));
      const __m256i lo = _mm256_set1_epi8(0x0F);
      for (int p = 0; p < 4; ++p) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 + 32 * p));
        u[p] = _mm256_and_si256(raw, lo);
        u[p + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), lo);
      }
    }
    for (int t = 0; t < T; ++t) {
      const int8_t* x = xq + t * K + b * QK;
      // values 4c..4c+3 (Q8_0) or, for Q4, the order the nibbles were split in: loads 0..3 are
      // values 4p.., loads 4..7 values 16 + 4p..
      __m256i p[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                      _mm256_setzero_si256()};
      for (int c = 0; c < 8; ++c) {
        const int8_t* xc = QT == QT_Q8_0 ? x + 4 * c : x + (c < 4 ? 4 * c : 16 + 4 * (c - 4));
        if constexpr (QT == QT_Q8_0) {
          p[c % 4] = dot4_add(p[c % 4], u[c], _mm256_sign_epi8(bcast4(xc), w[c]));
        } else {
          p[c % 4] = dot4_add(p[c % 4], u[c], bcast4(xc));
        }
      }
      const __m256i psum = _mm256_add_epi32(_mm256_add_epi32(p[0], p[1]), _mm256_add_epi32(p[2], p[3]));
      const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(xd[t * (K / QK) + b]));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(psum), scale, acc[t]);
      if constexpr (QT != QT_Q8_0) acc[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xs[t * (K / QK) + b]), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) out[t] = acc[t];
}

// Activation rows per tile: the accumulators and the 8 unpacked code vectors fit in 16 ymm
// registers on AVX2 for 2 rows; AVX-512VL's 32 hold 8.
#if MIAOTUI_VNNI
constexpr int TILE_T = 8;
#else
constexpr int TILE_T = 2;
#endif

// Rows [r0, r0 + 8) (fewer in a last, padded group) of out (N, ldo) for activation rows
// [n0, n1).
template <int QT>
inline void group_x_acts(const uint8_t* grp, int64_t valid, const QuantActs& a, int64_t n0, int64_t n1, int64_t r0,
                         float* out, int64_t ldo, const float* bias) {
  const int64_t K = a.K, nb = K / QK;
  __m256 res[TILE_T];
  alignas(32) float lanes[8];
  for (int64_t t0 = n0; t0 < n1; t0 += TILE_T) {
    const int T = static_cast<int>(std::min<int64_t>(TILE_T, n1 - t0));
    const int8_t* xq = a.q.data() + t0 * K;
    const float* xd = a.d.data() + t0 * nb;
    const float* xs = a.s.data() + t0 * nb;
    switch (T) {
#define MIAOTUI_T_CASE(TT)                                                                  \
  case TT:                                                                                  \
    if constexpr (TT <= TILE_T) {                                                           \
      if constexpr (MIAOTUI_VNNI && QT == QT_Q8_0 && TT > 1) /* one row: sum(w) unshared */ \
        if (a.has_u) {                                                                      \
          group_tile_q8_offset<TT>(grp, nb, a.u.data() + t0 * K, K, xd, res);               \
          break;                                                                            \
        }                                                                                   \
      group_tile<QT, TT>(grp, nb, xq, K, xd, xs, res);                                      \
    }                                                                                       \
    break;
      MIAOTUI_T_CASE(1)
      MIAOTUI_T_CASE(2)
      MIAOTUI_T_CASE(3)
      MIAOTUI_T_CASE(4)
      MIAOTUI_T_CASE(5)
      MIAOTUI_T_CASE(6)
      MIAOTUI_T_CASE(7)
      MIAOTUI_T_CASE(8)
#undef MIAOTUI_T_CASE
    }
    for (int t = 0; t < T; ++t) {
      float* o = out + (t0 + t) * ldo + r0;
      if (valid == 8) {
        const __m256 bv = bias ? _mm256_loadu_ps(bias + r0) : _mm256_setzero_ps();
        _mm256_storeu_ps(o, _mm256_add_ps(res[t], bv));
      } else {
        _mm256_store_ps(lanes, res[t]);
        for (int64_t i = 0; i < valid; ++i) o[i] = lanes[i] + (bias ? bias[r0 + i] : 0.0f);
      }
    }
  }
}

// Software prefetch of the next row group's weights, for products with fewer than
// PREFETCH_BELOW activation rows: a decode streams its weights from DRAM (the hardware prefetcher
// alone leaves it ~25 % slower); a larger batch reuses each group for every row, and the
// prefetches were 4 % of a batched translation's time (perf), waiting on the miss buffers.
constexpr int PREFETCH_GROUPS = 1;  // distance, in row groups
constexpr int64_t PREFETCH_BELOW = 16;
// Activation bytes per pass over an item's rows: a prefill's rows are taken in chunks that stay
// in L1 while each row group of the item meets them (all rows at once would read the whole
// (N, K) activation matrix from L2 for every 8 weight rows).
constexpr int64_t ACT_CHUNK_BYTES = 24 * 1024;

// Rows [m0, m1) of y (N, ldo) = x W^T (+ bias) for one weight; m0 is a multiple of 8.
template <int QT>
void linear_rows_qt(const Weight& W, const QuantActs& a, int64_t m0, int64_t m1, float* out, int64_t ldo,
                    const float* bias) {
  const bool prefetch = PREFETCH_GROUPS > 0 && a.N < PREFETCH_BELOW;
  const int64_t chunk = std::max<int64_t>(TILE_T, ACT_CHUNK_BYTES / a.K / TILE_T * TILE_T);
  for (int64_t n0 = 0; n0 < a.N; n0 += chunk) {
    const int64_t n1 = std::min(a.N, n0 + chunk);
    for (int64_t r = m0; r < m1; r += ROW_GROUP) {
      const uint8_t* grp = W.data + (r / ROW_GROUP) * W.group_bytes;
      if (prefetch && r + (PREFETCH_GROUPS + 1) * ROW_GROUP <= m1)
        for (int64_t off = 0; off < W.group_bytes; off += 64)
          _mm_prefetch(reinterpret_cast<const char*>(grp + PREFETCH_GROUPS * W.group_bytes + off), _MM_HINT_T0);
      group_x_acts<QT>(grp, std::min(ROW_GROUP, m1 - r), a, n0, n1, r, out, ldo, bias);
    }
  }
}

void linear_rows(const Weight& W, const QuantActs& a, int64_t m0, int64_t m1, float* out, int64_t ldo,
                 const float* bias) {
  switch (W.qtype) {
    case QT_Q4_0: linear_rows_qt<QT_Q4_0>(W, a, m0, m1, out, ldo, bias); break;
    case QT_Q4_1: linear_rows_qt<QT_Q4_1>(W, a, m0, m1, out, ldo, bias); break;
    case QT_Q8_0: linear_rows_qt<QT_Q8_0>(W, a, m0, m1, out, ldo, bias); break;
  }
}

void quantize_rows(const float* x, int64_t n0, int64_t n1, QuantActs& a) {
  const int64_t K = a.K, nb = K / QK;
  for (int64_t n = n0; n < n1; ++n) {
    quantize_row(x + n * K, K, a.q.data() + n * K, a.d.data() + n * nb, a.s.data() + n * nb);
#if MIAOTUI_VNNI
    if (a.has_u)
      for (int64_t k = 0; k < K; k += 32) {  // K % 32 == 0
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + n * K + k));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.u.data() + n * K + k),
                            _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80))));
      }
#endif
  }
}

// ---------------------------------------------------------------------------------------------
// Elementwise pieces of a decoder block.


// y = x / rms(x) * w over one row of C values (C % 8 == 0).
void rms_norm_row(const float* x, const float* w, float eps, int64_t C, float* y) {
  const float ms = dot_f32(x, x, C) / static_cast<float>(C);
  const __m256 r = _mm256_set1_ps(1.0f / std::sqrt(ms + eps));
  for (int64_t i = 0; i < C; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), r), _mm256_loadu_ps(w + i)));
}

// y = silu(g) * u, n % 8 == 0.
void silu_mul(const float* g, const float* u, int64_t n, float* y) {
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    // silu(g) = g / (1 + e^-g); e^-g via e^-|g| keeps the exponent argument <= 0.
    const __m256 e = exp_ps(_mm256_or_ps(gv, sign));  // e^-|g|
    const __m256 neg = _mm256_cmp_ps(gv, _mm256_setzero_ps(), _CMP_LT_OQ);
    const __m256 sig = _mm256_blendv_ps(_mm256_div_ps(one, _mm256_add_ps(one, e)),
                                        _mm256_div_ps(e, _mm256_add_ps(one, e)), neg);
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
  }
}

// Rotate-half RoPE (NeoX / HF layout) of n_heads heads of D values in place.
void rope_heads(float* x, int64_t n_heads, int64_t D, const float* cos, const float* sin) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < n_heads; ++h) {
    float* v = x + h * D;
    for (int64_t i = 0; i < half; i += 8) {
      const __m256 x1 = _mm256_loadu_ps(v + i), x2 = _mm256_loadu_ps(v + i + half);
      const __m256 c1 = _mm256_loadu_ps(cos + i), s1 = _mm256_loadu_ps(sin + i);
      const __m256 c2 = _mm256_loadu_ps(cos + i + half), s2 = _mm256_loadu_ps(sin + i + half);
      _mm256_storeu_ps(v + i, _mm256_fnmadd_ps(x2, s1, _mm256_mul_ps(x1, c1)));
      _mm256_storeu_ps(v + i + half, _mm256_fmadd_ps(x1, s2, _mm256_mul_ps(x2, c2)));
    }
  }
}

// Lane i of the result = the sum of v[i]'s eight lanes, as ((0+1)+(2+3))+((4+5)+(6+7)): eight
// dot products finished at once, each by the same tree whatever the other seven hold.
inline __m256 reduce8(const __m256* v) {
  const __m256 s01 = _mm256_hadd_ps(v[0], v[1]), s23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 s45 = _mm256_hadd_ps(v[4], v[5]), s67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// sc[0, n) <- exp(sc - max); *m = max, *l = sum of the exps.
inline void softmax_row(float* sc, int64_t n, float* m, float* l) {
  __m256 mx = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(sc + j));
  float mg = hmax(mx);
  for (; j < n; ++j) mg = std::max(mg, sc[j]);
  const __m256 mv = _mm256_set1_ps(mg);
  __m256 sv = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(sc + j), mv));
    _mm256_storeu_ps(sc + j, e);
    sv = _mm256_add_ps(sv, e);
  }
  float sum = hsum(sv);
  if (j < n) {  // tail through the same vector exp, padded with -inf (exp -> 0)
    alignas(32) float tail[8];
    for (int i = 0; i < 8; ++i) tail[i] = j + i < n ? sc[j + i] - mg : -INFINITY;
    _mm256_store_ps(tail, exp_ps(_mm256_load_ps(tail)));
    for (int64_t i = 0; j + i < n; ++i) {
      sc[j + i] = tail[i];
      sum += tail[i];
    }
  }
  *m = mg;
  *l = sum;
}

// Decode attention's P V for the GG query heads of KV head hk: each slot's V row is read (and
// converted) once for all of them, as the K rows are for the scores. Per head the same products
// in the same order as one head at a time (o += p_j v_j, j ascending): the same bits. Keys below
// `prefetch_to` - AHEAD are fetched ahead (the first KV head's pass; its row holds every head).
// GG * NV accumulators: 24 of AVX-512VL's 32 vector registers for 3 heads at D = 64.
#if MIAOTUI_VNNI
constexpr int PV_GROUP_MAX = 3;
#else
constexpr int PV_GROUP_MAX = 1;  // 16 registers: one head at a time
#endif
template <int NV, int GG, bool I8, typename Elem>
void decode_pv_group(const float* scores, int64_t n, const Elem* vc, const int64_t* slots, int64_t kv_stride,
                     int64_t hk, int64_t D, const float* v_scale, int64_t HK, int64_t prefetch_to, float* acc) {
  constexpr int64_t AHEAD = 16;
  __m256 o[GG][NV];
  for (int g = 0; g < GG; ++g)
    for (int c = 0; c < NV; ++c) o[g][c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    if (j + AHEAD < prefetch_to) {
      const char* p = reinterpret_cast<const char*>(vc + slots[j + AHEAD] * kv_stride);
      for (int64_t off = 0; off < kv_stride * static_cast<int64_t>(sizeof(Elem)); off += 64)
        _mm_prefetch(p + off, _MM_HINT_T0);
    }
    __m256 pj[GG];
    for (int g = 0; g < GG; ++g) pj[g] = _mm256_set1_ps(scores[g * KV_SPLIT + j]);
    const Elem* row = vc + slots[j] * kv_stride + hk * D;
    for (int c = 0; c < NV; ++c) {
      __m256 v;
      if constexpr (I8) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * c));
        v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), _mm256_set1_ps(v_scale[slots[j] * HK + hk]));
      } else {
        v = load_half8(row + 8 * c);
      }
      for (int g = 0; g < GG; ++g) o[g][c] = _mm256_fmadd_ps(pj[g], v, o[g][c]);
    }
  }
  for (int g = 0; g < GG; ++g)
    for (int c = 0; c < NV; ++c) _mm256_storeu_ps(acc + g * D + 8 * c, o[g][c]);
}

// One attention work item: T consecutive query tokens of one sequence, all H = HK * G query
// heads (row r = t * H + h, head h = kv head h / G; token t's heads at q + t * q_stride),
// against keys [0, n_keys[t]) of one split of the context (`slots`: the split's cache slots,
// n_keys[T-1] of them, the largest). A slot's K (V) row holds the HK KV heads side by side
// (kv_stride halves apart), read whole: one contiguous run per slot. Unnormalised softmax per
// row relative to the split's maximum: writes m[r], l[r] and acc[r * D..] (sum of exp * v);
// splits are merged by merge_splits. Each K and V row is converted to fp32 once for all rows.
// A row's arithmetic is the same whatever T is (8-key score blocks from the split start,
// sequential PV sums), so a token gets the same output alone, in a batch, or in any prefill chunk.
// Scratch: kbuf 8 * HK * D, vbuf KV_SPLIT * HK * D, scores T * H * KV_SPLIT floats. NV: D / 8
// when known at compile time (keeps the row's accumulators in registers), 0 for any D.
template <int NV, bool I8>
void attend_tile_nv(const float* q, int64_t q_stride, int64_t T, int64_t HK, int64_t G, const int64_t* n_keys,
                    const KVRows& kv, const int64_t* slots, int64_t D, float scale, float* kbuf, float* vbuf,
                    float* scores, float* m, float* l, float* acc) {
  const int64_t nv = NV ? NV : D / 8, n_max = n_keys[T - 1], W = HK * D, H = HK * G, kv_stride = W;
  using Elem = std::conditional_t<I8, int8_t, uint16_t>;
  const Elem* kc = static_cast<const Elem*>(kv.k);
  const Elem* vc = static_cast<const Elem*>(kv.v);
  // K/V rows are scattered through the paged cache (block by block): fetch them ahead, the
  // hardware prefetcher does not follow the slot list (measured 3 GB/s without).
  constexpr int64_t AHEAD = 16;
  auto prefetch_row = [&](const Elem* base, int64_t j) {
    if (j >= n_max) return;
    const char* p = reinterpret_cast<const char*>(base + slots[j] * kv_stride);
    for (int64_t off = 0; off < W * static_cast<int64_t>(sizeof(Elem)); off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
  };
  // slot's row (HK heads x D) -> fp32; int8 rows times their per-head scales
  auto convert_row = [&](const Elem* src, const float* scales, float* dst) {
    if constexpr (I8) {
      for (int64_t hk = 0; hk < HK; ++hk) {
        const __m256 sc = _mm256_set1_ps(scales[hk]);
        for (int64_t c = 0; c < D / 8; ++c) {
          const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + hk * D + 8 * c));
          _mm256_storeu_ps(dst + hk * D + 8 * c, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), sc));
        }
      }
    } else {
      for (int64_t c = 0; c < W / 8; ++c) _mm256_storeu_ps(dst + 8 * c, load_half8(src + 8 * c));
    }
  };
  for (int64_t j = 0; j < AHEAD; ++j) prefetch_row(kc, j);
  const __m256 sv = _mm256_set1_ps(scale);
  for (int64_t j0 = 0; j0 < n_max; j0 += 8) {
    for (int64_t i = 0; i < 8; ++i) {  // keys past n_max: any finite row (slot of key 0); unused
      prefetch_row(kc, j0 + AHEAD + i);
      const int64_t slot = slots[j0 + i < n_max ? j0 + i : 0];
      convert_row(kc + slot * kv_stride, kv.k_scale + slot * HK, kbuf + i * W);
    }
    for (int64_t t = 0; t < T; ++t) {
      if (n_keys[t] <= j0) continue;
      for (int64_t h = 0; h < H; ++h) {
        const float* qr = q + t * q_stride + h * D;
        const float* kb = kbuf + (h / G) * D;
        __m256 a[8];
        for (int i = 0; i < 8; ++i) a[i] = _mm256_mul_ps(_mm256_loadu_ps(qr), _mm256_loadu_ps(kb + i * W));
        for (int64_t c = 1; c < nv; ++c) {
          const __m256 qc = _mm256_loadu_ps(qr + 8 * c);
          for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kb + i * W + 8 * c), a[i]);
        }
        _mm256_storeu_ps(scores + (t * H + h) * KV_SPLIT + j0, _mm256_mul_ps(reduce8(a), sv));
      }
    }
  }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t r = t * H + h;
      if (n_keys[t] > 0) softmax_row(scores + r * KV_SPLIT, n_keys[t], m + r, l + r);
    }
  for (int64_t j = 0; j < AHEAD; ++j) prefetch_row(vc, j);
  if constexpr (PV_GROUP_MAX >= 3 && NV == 8) {
    if (T == 1 && (G == 2 || G == 3)) {  // decode, all G heads of a KV head at once
      auto pv = G == 2 ? decode_pv_group<NV, 2, I8, Elem> : decode_pv_group<NV, 3, I8, Elem>;
      for (int64_t hk = 0; hk < HK; ++hk)
        pv(scores + hk * G * KV_SPLIT, n_keys[0], vc, slots, kv_stride, hk, D, kv.v_scale, HK, hk == 0 ? n_max : 0,
           acc + hk * G * D);
      return;
    }
  }
  if (T == 1) {  // decode: each head reads its V rows from the cache (L1 after its group's first
    // head), no buffer; the same products in the same order as the buffered path below
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / G;
      const float* p = scores + h * KV_SPLIT;
      __m256 o[MAX_HEAD_DIM / 8];
      for (int64_t c = 0; c < nv; ++c) o[c] = _mm256_setzero_ps();
      for (int64_t j = 0; j < n_keys[0]; ++j) {
        if (h == 0) prefetch_row(vc, j + AHEAD);
        const __m256 pj = _mm256_set1_ps(p[j]);
        const Elem* row = vc + slots[j] * kv_stride + hk * D;
        if constexpr (I8) {
          const __m256 sc = _mm256_set1_ps(kv.v_scale[slots[j] * HK + hk]);
          for (int64_t c = 0; c < nv; ++c) {
            const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * c));
            const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), sc);
            o[c] = _mm256_fmadd_ps(pj, v, o[c]);
          }
        } else {
          for (int64_t c = 0; c < nv; ++c) o[c] = _mm256_fmadd_ps(pj, load_half8(row + 8 * c), o[c]);
        }
      }
      for (int64_t c = 0; c < nv; ++c) _mm256_storeu_ps(acc + h * D + 8 * c, o[c]);
    }
    return;
  }
  for (int64_t j = 0; j < n_max; ++j) {
    prefetch_row(vc, j + AHEAD);
    convert_row(vc + slots[j] * kv_stride, kv.v_scale + slots[j] * HK, vbuf + j * W);
  }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t r = t * H + h;
      const float* p = scores + r * KV_SPLIT;
      const float* vb = vbuf + (h / G) * D;
      __m256 o[MAX_HEAD_DIM / 8];
      for (int64_t c = 0; c < nv; ++c) o[c] = _mm256_setzero_ps();
      for (int64_t j = 0; j < n_keys[t]; ++j) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        for (int64_t c = 0; c < nv; ++c) o[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vb + j * W + 8 * c), o[c]);
      }
      for (int64_t c = 0; c < nv; ++c) _mm256_storeu_ps(acc + r * D + 8 * c, o[c]);
    }
}

void attend_tile(const float* q, int64_t q_stride, int64_t T, int64_t HK, int64_t G, const int64_t* n_keys,
                 const KVRows& kv, const int64_t* slots, int64_t D, float scale, float* kbuf, float* vbuf,
                 float* scores, float* m, float* l, float* acc) {
  const bool i8 = kv.k_scale != nullptr;
  auto run = D == 64 ? (i8 ? attend_tile_nv<8, true> : attend_tile_nv<8, false>)
                     : (i8 ? attend_tile_nv<0, true> : attend_tile_nv<0, false>);
  run(q, q_stride, T, HK, G, n_keys, kv, slots, D, scale, kbuf, vbuf, scores, m, l, acc);
}

// out (D) = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M) over S splits of one head, M = max m_s.
// Split s's values are at m[s * stride], l[s * stride], acc[s * stride * D].
void merge_splits(int64_t S, int64_t stride, const float* m, const float* l, const float* acc, int64_t D, float* out) {
  float M = -INFINITY;
  for (int64_t s = 0; s < S; ++s) M = std::max(M, m[s * stride]);
  float L = 0.0f;
  const int64_t nv = D / 8;
  __m256 o[MAX_HEAD_DIM / 8];
  for (int64_t c = 0; c < nv; ++c) o[c] = _mm256_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    const float w = std::exp(m[s * stride] - M);
    L += l[s * stride] * w;
    const __m256 wv = _mm256_set1_ps(w);
    const float* a = acc + s * stride * D;
    for (int64_t c = 0; c < nv; ++c) o[c] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a + 8 * c), o[c]);
  }
  const __m256 inv = _mm256_set1_ps(1.0f / L);
  for (int64_t c = 0; c < nv; ++c) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(o[c], inv));
}
