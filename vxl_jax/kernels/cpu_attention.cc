// Fused flash-attention forward and backward for the CPU: XLA FFI custom calls (float32). The forward
// (VxlFlashAttentionForwardF32) is described here; the backward (VxlFlashAttentionBackwardF32) below,
// before its handler.
//
// Computes what vxl_jax/model/attention.py::_forward computes: query t of batch b sees the kept memory
// entries [0, mem_len[b]) of mem_k/mem_v (no mask inside) and the step's own keys j <= q_pos[b, t]; one
// softmax over both, scores scaled by H^-0.5, grouped-query heads (query head n uses kv head n / G).
//
//   inputs   q [B, T, N, H] f32, k/v [B, U, K, H] f32, mem_k/mem_v [B, S, K, H] f32, mem_len [B] s32,
//            q_pos [B, T] s32
//   results  out [B, T, N, H] f32, lse [B, K, G, T] f32 (natural log-sum-exp of the scaled scores;
//            a row that sees no key: out 0, lse -1e30)
//
// Layout of the work: for one (batch, kv head) the G query heads are folded into the rows (row = t*G + g).
// A work item is a strip of RS = 16*RV consecutive rows. Everything inside keeps the rows in the vector
// lanes ("transposed" layout), so no key tile is ever transposed or packed:
//
//   Q^T  [H][RS]   the strip's queries, pre-scaled by H^-0.5 * log2(e) (scores in base 2)
//   S^T  [nk][RS]  scores of a chunk of nk <= TK keys:   S^T[j][r] = sum_h K[j][h] * Q^T[h][r]
//                  (broadcast K[j][h], FMA against Q^T rows: 8 keys x RV vectors of accumulators)
//   softmax        column max / exp2 / sum are plain vertical vector operations over the chunk
//   O^T  [H][RS]   O^T[h][r] = alpha[r] * O^T[h][r] + sum_j V[j][h] * P^T[j][r]
//                  (broadcast V[j][h], FMA against P^T rows: 8 head dims x RV vectors)
//
// Memory keys come first (chunks up to mem_len, no mask), then the own keys (chunks up to the largest
// visible key of the strip, masked per row only in chunks that reach past the smallest one). Keys beyond
// mem_len (scratch) are never read. Strips are spread over std::threads (VXL_KERNEL_THREADS, default the
// hardware concurrency), largest first; small calls run on the calling thread.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;        // floats per vector
#ifndef VXL_KERNEL_TILE
#define VXL_KERNEL_TILE 128
#endif
#ifndef VXL_KERNEL_MAX_RV
#define VXL_KERNEL_MAX_RV 3
#endif
constexpr int kTile = VXL_KERNEL_TILE;  // keys per chunk (S^T chunk = kTile x RS floats, stays in L1/L2)
constexpr int kKeys = 8;          // keys per score micro-kernel
constexpr int kDims = 8;          // head dims per P.V micro-kernel
constexpr float kNeg = -1e30f;    // finite "minus infinity" of the running max (as _forward)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

#if defined(__GNUC__) && !defined(__clang__)
#define VXL_UNROLL _Pragma("GCC unroll 16")
#else
#define VXL_UNROLL
#endif

// ---------------------------------------------------------------------------------------------------
// A 16-lane float vector: AVX-512 registers, or a portable array the compiler may vectorise.

#if defined(__AVX512F__)

using vf = __m512;
static inline vf ld(const float* p) { return _mm512_loadu_ps(p); }
static inline void st(float* p, vf x) { _mm512_storeu_ps(p, x); }
static inline vf bc(const float* p) { return _mm512_set1_ps(*p); }
static inline vf splat(float x) { return _mm512_set1_ps(x); }
static inline vf zero() { return _mm512_setzero_ps(); }
static inline vf fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }

// Lanes r where key index j is visible (j < lim[r]) keep x, the others become fill.
static inline vf keep_visible(vf x, int j, const int32_t* lim, vf fill) {
  __mmask16 m = _mm512_cmpgt_epi32_mask(_mm512_loadu_si512(lim), _mm512_set1_epi32(j));
  return _mm512_mask_blend_ps(m, fill, x);
}

// 2^x for x <= 0 (results below 2^-149 flush to 0): x = n + f, |f| <= 1/2, 2^f by its degree-7 Taylor
// polynomial (truncation < 1e-8 relative), 2^n applied exactly by vscalefps.
static inline vf exp2v(vf x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-160.0f));
  vf n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf f = _mm512_sub_ps(x, n);
  vf p = _mm512_set1_ps(1.525273380405984e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

#else  // portable fallback

struct vf {
  float x[kLanes];
};
static inline vf ld(const float* p) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r.x[i] = p[i];
  return r;
}
static inline void st(float* p, const vf& a) {
  for (int i = 0; i < kLanes; ++i) p[i] = a.x[i];
}
static inline vf splat(float v) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r.x[i] = v;
  return r;
}
static inline vf bc(const float* p) { return splat(*p); }
static inline vf zero() { return splat(0.0f); }
static inline vf fma(const vf& a, const vf& b, const vf& c) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r.x[i] = std::fma(a.x[i], b.x[i], c.x[i]);
  return r;
}
static inline vf mul(const vf& a, const vf& b) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r.x[i] = a.x[i] * b.x[i];
  return r;
}
static inline vf add(const vf& a, const vf& b) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r.x[i] = a.x[i] + b.x[i];
  return r;
}
static inline vf sub(const vf& a, const vf& b) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r.x[i] = a.x[i] - b.x[i];
  return r;
}
static inline vf vmax(const vf& a, const vf& b) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r.x[i] = a.x[i] > b.x[i] ? a.x[i] : b.x[i];
  return r;
}
static inline vf keep_visible(const vf& a, int j, const int32_t* lim, const vf& fill) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r.x[i] = j < lim[i] ? a.x[i] : fill.x[i];
  return r;
}
static inline vf exp2v(const vf& a) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r.x[i] = std::exp2(std::max(a.x[i], -160.0f));
  return r;
}

#endif

// ---------------------------------------------------------------------------------------------------
// Micro-kernels.

// S^T[k][.] = K[j0 + k] . Q^T for NK keys and RV row vectors. kp: key j0's row, kstride: between keys.
template <int RV, int NK>
static inline void score_kernel(const float* __restrict qt, const float* __restrict kp, int64_t kstride,
                                int h_dim, float* __restrict s) {
  constexpr int RS = RV * kLanes;
  vf acc[NK][RV];
  VXL_UNROLL for (int k = 0; k < NK; ++k) VXL_UNROLL for (int r = 0; r < RV; ++r) acc[k][r] = zero();
  const float* kr[NK];
  VXL_UNROLL for (int k = 0; k < NK; ++k) kr[k] = kp + k * kstride;
  for (int h = 0; h < h_dim; ++h) {
    vf qv[RV];
    VXL_UNROLL for (int r = 0; r < RV; ++r) qv[r] = ld(qt + h * RS + r * kLanes);
    VXL_UNROLL for (int k = 0; k < NK; ++k) {
      vf b = bc(kr[k] + h);
      VXL_UNROLL for (int r = 0; r < RV; ++r) acc[k][r] = fma(b, qv[r], acc[k][r]);
    }
  }
  VXL_UNROLL for (int k = 0; k < NK; ++k) VXL_UNROLL for (int r = 0; r < RV; ++r)
      st(s + k * RS + r * kLanes, acc[k][r]);
}

template <int RV>
static void scores(const float* qt, const float* kp, int64_t kstride, int h_dim, int nk, float* s) {
  constexpr int RS = RV * kLanes;
  int j = 0;
  for (; j + kKeys <= nk; j += kKeys) score_kernel<RV, kKeys>(qt, kp + j * kstride, kstride, h_dim, s + j * RS);
  const float* kj = kp + j * kstride;
  float* sj = s + j * RS;
  switch (nk - j) {
    case 1: score_kernel<RV, 1>(qt, kj, kstride, h_dim, sj); break;
    case 2: score_kernel<RV, 2>(qt, kj, kstride, h_dim, sj); break;
    case 3: score_kernel<RV, 3>(qt, kj, kstride, h_dim, sj); break;
    case 4: score_kernel<RV, 4>(qt, kj, kstride, h_dim, sj); break;
    case 5: score_kernel<RV, 5>(qt, kj, kstride, h_dim, sj); break;
    case 6: score_kernel<RV, 6>(qt, kj, kstride, h_dim, sj); break;
    case 7: score_kernel<RV, 7>(qt, kj, kstride, h_dim, sj); break;
    default: break;
  }
}

// O^T[d][.] = alpha * O^T[d][.] + sum_j V[j][h0 + d] * P^T[j][.] for HB head dims and RV row vectors
// (alpha null: no rescale; the backward accumulates dQ^T with it).
// ot: O^T row h0; vp: V row 0 at column h0.
template <int RV, int HB>
static inline void pv_kernel(float* __restrict ot, const float* __restrict alpha, const float* __restrict p,
                             int nk, const float* __restrict vp, int64_t vstride) {
  constexpr int RS = RV * kLanes;
  vf acc[HB][RV];
  if (alpha != nullptr) {
    vf al[RV];
    VXL_UNROLL for (int r = 0; r < RV; ++r) al[r] = ld(alpha + r * kLanes);
    VXL_UNROLL for (int d = 0; d < HB; ++d) VXL_UNROLL for (int r = 0; r < RV; ++r)
        acc[d][r] = mul(ld(ot + d * RS + r * kLanes), al[r]);
  } else {
    VXL_UNROLL for (int d = 0; d < HB; ++d) VXL_UNROLL for (int r = 0; r < RV; ++r)
        acc[d][r] = ld(ot + d * RS + r * kLanes);
  }
  for (int j = 0; j < nk; ++j) {
    vf pv[RV];
    VXL_UNROLL for (int r = 0; r < RV; ++r) pv[r] = ld(p + j * RS + r * kLanes);
    const float* vr = vp + j * vstride;
    VXL_UNROLL for (int d = 0; d < HB; ++d) {
      vf b = bc(vr + d);
      VXL_UNROLL for (int r = 0; r < RV; ++r) acc[d][r] = fma(b, pv[r], acc[d][r]);
    }
  }
  VXL_UNROLL for (int d = 0; d < HB; ++d) VXL_UNROLL for (int r = 0; r < RV; ++r)
      st(ot + d * RS + r * kLanes, acc[d][r]);
}

template <int RV>
static void pv(float* ot, const float* alpha, const float* p, int nk, const float* vp, int64_t vstride, int h_dim) {
  constexpr int RS = RV * kLanes;
  int h = 0;
  for (; h + kDims <= h_dim; h += kDims) pv_kernel<RV, kDims>(ot + h * RS, alpha, p, nk, vp + h, vstride);
  float* oh = ot + h * RS;
  const float* vh = vp + h;
  switch (h_dim - h) {
    case 1: pv_kernel<RV, 1>(oh, alpha, p, nk, vh, vstride); break;
    case 2: pv_kernel<RV, 2>(oh, alpha, p, nk, vh, vstride); break;
    case 3: pv_kernel<RV, 3>(oh, alpha, p, nk, vh, vstride); break;
    case 4: pv_kernel<RV, 4>(oh, alpha, p, nk, vh, vstride); break;
    case 5: pv_kernel<RV, 5>(oh, alpha, p, nk, vh, vstride); break;
    case 6: pv_kernel<RV, 6>(oh, alpha, p, nk, vh, vstride); break;
    case 7: pv_kernel<RV, 7>(oh, alpha, p, nk, vh, vstride); break;
    default: break;
  }
}

// Online softmax over one chunk of scores s [nk][RS] (base 2), in place -> probabilities. With masked, key
// j of the chunk is own key j_base + j, visible to row r iff j_base + j < lim[r]. Updates the running max
// m and sum l, writes the rescale factor of the accumulator to alpha.
template <int RV>
static void softmax_chunk(float* s, int nk, bool masked, int j_base, const int32_t* lim, float* m, float* l,
                          float* alpha) {
  constexpr int RS = RV * kLanes;
  const vf neg_inf = splat(-INFINITY);
  const vf zeros = zero();
  VXL_UNROLL for (int r = 0; r < RV; ++r) {
    const int32_t* lr = lim + r * kLanes;
    float* sr = s + r * kLanes;
    vf mx0 = neg_inf, mx1 = neg_inf;
    int j = 0;
    if (masked) {
      for (; j < nk; ++j) mx0 = vmax(mx0, keep_visible(ld(sr + j * RS), j_base + j, lr, neg_inf));
    } else {
      for (; j + 2 <= nk; j += 2) {
        mx0 = vmax(mx0, ld(sr + j * RS));
        mx1 = vmax(mx1, ld(sr + (j + 1) * RS));
      }
      for (; j < nk; ++j) mx0 = vmax(mx0, ld(sr + j * RS));
    }
    vf m_old = ld(m + r * kLanes);
    vf m_new = vmax(m_old, vmax(mx0, mx1));          // >= kNeg: finite
    vf a = exp2v(sub(m_old, m_new));
    vf sum0 = zero(), sum1 = zero();
    j = 0;
    if (masked) {
      for (; j < nk; ++j) {
        vf pj = keep_visible(exp2v(sub(ld(sr + j * RS), m_new)), j_base + j, lr, zeros);
        st(sr + j * RS, pj);
        sum0 = add(sum0, pj);
      }
    } else {
      for (; j + 2 <= nk; j += 2) {
        vf p0 = exp2v(sub(ld(sr + j * RS), m_new));
        vf p1 = exp2v(sub(ld(sr + (j + 1) * RS), m_new));
        st(sr + j * RS, p0);
        st(sr + (j + 1) * RS, p1);
        sum0 = add(sum0, p0);
        sum1 = add(sum1, p1);
      }
      for (; j < nk; ++j) {
        vf p0 = exp2v(sub(ld(sr + j * RS), m_new));
        st(sr + j * RS, p0);
        sum0 = add(sum0, p0);
      }
    }
    st(m + r * kLanes, m_new);
    st(l + r * kLanes, fma(ld(l + r * kLanes), a, add(sum0, sum1)));
    st(alpha + r * kLanes, a);
  }
}

// ---------------------------------------------------------------------------------------------------
// The whole call.

struct Problem {
  const float *q, *k, *v, *mk, *mv;
  const int32_t *mem_len, *q_pos;
  float *out, *lse;
  int64_t b, t, n, h, u, kv, g, s;
  int64_t rows;   // t * g: folded rows per (batch, kv head)
};

struct Item {
  int32_t b, kh, row0, rv;   // rows row0 .. row0 + 16*rv - 1 of (b, kh)
  double cost;
};

static inline int64_t own_limit(const Problem& pr, int64_t b, int64_t t) {
  int64_t p = static_cast<int64_t>(pr.q_pos[b * pr.t + t]) + 1;
  return std::min<int64_t>(std::max<int64_t>(p, 0), pr.u);
}

static inline int64_t memory_length(const Problem& pr, int64_t b) {
  return std::min<int64_t>(std::max<int64_t>(pr.mem_len[b], 0), pr.s);
}

struct Scratch {
  float* base = nullptr;
  float *qt, *ot, *s, *m, *l, *alpha;
  int32_t* lim;
  explicit Scratch(int64_t h_dim, int rs) {
    size_t floats = static_cast<size_t>(2 * h_dim * rs + static_cast<int64_t>(kTile) * rs + 4 * rs);
    size_t bytes = ((floats * sizeof(float)) + 63) / 64 * 64;
    base = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (base == nullptr) throw std::bad_alloc();
    qt = base;
    ot = qt + h_dim * rs;
    s = ot + h_dim * rs;
    m = s + static_cast<int64_t>(kTile) * rs;
    l = m + rs;
    alpha = l + rs;
    lim = reinterpret_cast<int32_t*>(alpha + rs);
  }
  ~Scratch() { std::free(base); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// The keys a strip of (b, kh) sees, in chunks of up to kTile: the memory entries [0, mem_len) unmasked, then
// the own keys [0, hi), masked in the chunks that reach past lo (the strip's smallest visible limit).
// fn(k, v, nk, masked, j_base, key): k/v the chunk's first key row, j_base its own-key index, key its index
// in [memory | own keys] order.
template <typename Fn>
static void for_each_chunk(const Problem& pr, int64_t b, int64_t kh, int32_t lo, int32_t hi, Fn fn) {
  const int64_t H = pr.h, kstride = pr.kv * H, ml = memory_length(pr, b);
  if (ml > 0) {
    const float* kb = pr.mk + (b * pr.s * pr.kv + kh) * H;
    const float* vb = pr.mv + (b * pr.s * pr.kv + kh) * H;
    for (int64_t c = 0; c < ml; c += kTile)
      fn(kb + c * kstride, vb + c * kstride, static_cast<int>(std::min<int64_t>(kTile, ml - c)), false, 0, c);
  }
  if (hi > 0) {
    const float* kb = pr.k + (b * pr.u * pr.kv + kh) * H;
    const float* vb = pr.v + (b * pr.u * pr.kv + kh) * H;
    for (int64_t c = 0; c < hi; c += kTile) {
      int nk = static_cast<int>(std::min<int64_t>(kTile, hi - c));
      fn(kb + c * kstride, vb + c * kstride, nk, c + nk > lo, static_cast<int>(c), ml + c);
    }
  }
}

template <int RV>
static void run_strip(const Problem& pr, const Item& it, Scratch& sc) {
  constexpr int RS = RV * kLanes;
  const int64_t H = pr.h, G = pr.g, b = it.b, kh = it.kh;
  const int64_t kstride = pr.kv * H;
  const float qscale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(H))) * kLog2e;

  // Q^T of the strip (rows past the end repeat the last row: computed, never written).
  int32_t lo = INT32_MAX, hi = 0;
  for (int r = 0; r < RS; ++r) {
    int64_t row = std::min<int64_t>(it.row0 + r, pr.rows - 1);
    int64_t t = row / G, g = row % G;
    const float* qr = pr.q + ((b * pr.t + t) * pr.n + kh * G + g) * H;
    for (int64_t h = 0; h < H; ++h) sc.qt[h * RS + r] = qr[h] * qscale;
    int32_t lim = static_cast<int32_t>(own_limit(pr, b, t));
    sc.lim[r] = lim;
    lo = std::min(lo, lim);
    hi = std::max(hi, lim);
  }
  std::fill(sc.ot, sc.ot + H * RS, 0.0f);
  std::fill(sc.m, sc.m + RS, kNeg);
  std::fill(sc.l, sc.l + RS, 0.0f);

  for_each_chunk(pr, b, kh, lo, hi, [&](const float* kp, const float* vp, int nk, bool masked, int j_base, int64_t) {
    scores<RV>(sc.qt, kp, kstride, static_cast<int>(H), nk, sc.s);
    softmax_chunk<RV>(sc.s, nk, masked, j_base, sc.lim, sc.m, sc.l, sc.alpha);
    pv<RV>(sc.ot, sc.alpha, sc.s, nk, vp, kstride, static_cast<int>(H));
  });

  // out = O / l, lse = (m + log2 l) ln 2; rows that saw nothing: 0 and kNeg.
  const int64_t end = std::min<int64_t>(RS, pr.rows - it.row0);
  for (int64_t r = 0; r < end; ++r) {
    int64_t row = it.row0 + r, t = row / G, g = row % G;
    float l = sc.l[r];
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
    float* o = pr.out + ((b * pr.t + t) * pr.n + kh * G + g) * H;
    for (int64_t h = 0; h < H; ++h) o[h] = sc.ot[h * RS + r] * inv;
    pr.lse[((b * pr.kv + kh) * G + g) * pr.t + t] = l > 0.0f ? (sc.m[r] + std::log2(l)) * kLn2 : kNeg;
  }
}

static int64_t kernel_threads() {
  int64_t threads = static_cast<int64_t>(std::thread::hardware_concurrency());
  if (const char* env = std::getenv("VXL_KERNEL_THREADS")) {
    int64_t n = std::atoll(env);
    if (n > 0) threads = n;
  }
  return std::max<int64_t>(threads, 1);
}

// Runs fn(i) for i in [0, count) on up to `threads` threads (the calling one included), each with its own
// state made by make(); rethrows a failure as bad_alloc.
template <typename Make, typename Fn>
static void parallel_for(int64_t threads, size_t count, Make make, Fn fn) {
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  auto worker = [&]() {
    try {
      auto state = make();
      for (size_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) fn(i, *state);
    } catch (...) {
      failed = true;
    }
  };
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, static_cast<int64_t>(count)));
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  for (int64_t i = 1; i < threads; ++i) {
    try {
      pool.emplace_back(worker);
    } catch (const std::system_error&) {
      break;
    }
  }
  worker();
  for (auto& th : pool) th.join();
  if (failed) throw std::bad_alloc();
}

// Rows of one (batch, kv head) in strips of 16*max_rv rows, the remainder in the narrowest strip that
// covers it; every strip an item, spread over threads largest first.
static void run_all(const Problem& pr, int max_rv) {
  std::vector<Item> items;
  double total = 0.0;
  const int64_t full = max_rv * kLanes;
  for (int64_t b = 0; b < pr.b; ++b) {
    const double ml = static_cast<double>(memory_length(pr, b));
    for (int64_t kh = 0; kh < pr.kv; ++kh) {
      for (int64_t row0 = 0; row0 < pr.rows; row0 += full) {
        int64_t left = pr.rows - row0;
        int rv = left >= full ? max_rv : static_cast<int>((left + kLanes - 1) / kLanes);
        int64_t t_hi = (std::min<int64_t>(row0 + rv * kLanes, pr.rows) - 1) / pr.g;
        double cost = (ml + static_cast<double>(own_limit(pr, b, t_hi)) + 8.0) * rv * kLanes * pr.h;
        items.push_back({static_cast<int32_t>(b), static_cast<int32_t>(kh), static_cast<int32_t>(row0), rv, cost});
        total += cost;
      }
    }
  }

  // A thread pays off above a few hundred microseconds of work (cost ~ multiply-adds / 2).
  const int64_t threads = std::min<int64_t>(kernel_threads(), static_cast<int64_t>(total / 2.0e6) + 1);
  if (threads > 1)
    std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
  parallel_for(threads, items.size(), [&]() { return std::make_unique<Scratch>(pr.h, static_cast<int>(full)); },
               [&](size_t i, Scratch& sc) {
                 const Item& it = items[i];
                 if (it.rv == 1) {
                   run_strip<1>(pr, it, sc);
                 } else if (it.rv == 2) {
                   run_strip<2>(pr, it, sc);
                 } else {
                   run_strip<3>(pr, it, sc);
                 }
               });
}

// Reads and checks the shapes shared by both handlers into pr (and the input pointers); who names the call.
static ffi::Error read_problem(const char* who, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                               ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::F32>& mem_k, ffi::Buffer<ffi::F32>& mem_v,
                               ffi::Buffer<ffi::S32>& mem_len, ffi::Buffer<ffi::S32>& q_pos, Problem& pr) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  auto md = mem_k.dimensions(), nd = mem_v.dimensions();
  auto fail = [who](const char* what) { return ffi::Error::InvalidArgument(std::string(who) + ": " + what); };
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 4 || nd.size() != 4)
    return fail("q, k, v, mem_k, mem_v must be rank 4");
  pr.b = qd[0];
  pr.t = qd[1];
  pr.n = qd[2];
  pr.h = qd[3];
  pr.u = kd[1];
  pr.kv = kd[2];
  pr.s = md[1];
  for (int i = 0; i < 4; ++i)
    if (vd[i] != kd[i] || nd[i] != md[i]) return fail("k/v or mem_k/mem_v shapes differ");
  if (kd[0] != pr.b || md[0] != pr.b || kd[3] != pr.h || md[3] != pr.h || md[2] != pr.kv || pr.kv <= 0 ||
      pr.n % pr.kv != 0)
    return fail("inconsistent q/k/mem shapes");
  if (mem_len.element_count() != static_cast<size_t>(pr.b) ||
      q_pos.element_count() != static_cast<size_t>(pr.b * pr.t))
    return fail("mem_len must be [B] and q_pos [B, T]");
  pr.g = pr.n / pr.kv;
  pr.rows = pr.t * pr.g;
  if (pr.h > (1 << 20) || pr.rows > INT32_MAX / 2 || pr.u > INT32_MAX / 2 || pr.s > INT32_MAX / 2)
    return fail("shapes too large");
  pr.q = q.typed_data();
  pr.k = k.typed_data();
  pr.v = v.typed_data();
  pr.mk = mem_k.typed_data();
  pr.mv = mem_v.typed_data();
  pr.mem_len = mem_len.typed_data();
  pr.q_pos = q_pos.typed_data();
  return ffi::Error::Success();
}

static ffi::Error Forward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                          ffi::Buffer<ffi::F32> mem_k, ffi::Buffer<ffi::F32> mem_v, ffi::Buffer<ffi::S32> mem_len,
                          ffi::Buffer<ffi::S32> q_pos, ffi::ResultBuffer<ffi::F32> out,
                          ffi::ResultBuffer<ffi::F32> lse) {
  Problem pr;
  if (ffi::Error err = read_problem("vxl flash attention", q, k, v, mem_k, mem_v, mem_len, q_pos, pr); err.failure())
    return err;
  pr.out = out->typed_data();
  pr.lse = lse->typed_data();
  if (pr.b == 0 || pr.rows == 0) return ffi::Error::Success();
  if (pr.h == 0) {
    for (int64_t b = 0; b < pr.b; ++b)
      for (int64_t kh = 0; kh < pr.kv; ++kh)
        for (int64_t g = 0; g < pr.g; ++g)
          for (int64_t t = 0; t < pr.t; ++t) {
            bool any = memory_length(pr, b) > 0 || own_limit(pr, b, t) > 0;
            pr.lse[((b * pr.kv + kh) * pr.g + g) * pr.t + t] = any ? std::log(static_cast<float>(
                memory_length(pr, b) + own_limit(pr, b, t))) : kNeg;
          }
    return ffi::Error::Success();
  }
  try {
    run_all(pr, std::min(VXL_KERNEL_MAX_RV, 3));
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("vxl flash attention: ") + e.what());
  }
  return ffi::Error::Success();
}

// ===================================================================================================
// Backward: (dq, dk, dv, d_mem_k, d_mem_v) from (q, k, v, mem_k, mem_v, mem_len, q_pos, out, lse, d_out).
//
// Same folded rows and strips as the forward. Per strip, per chunk of nk keys (the forward's chunks):
//
//   S^T  [nk][RS]  scores (base 2, Q^T pre-scaled by H^-0.5 log2 e), P^T = exp2(S^T - lse log2 e), masked
//   dP^T [nk][RS]  dP^T[j][r] = V[j] . dO^T[.][r]                       (the score micro-kernel)
//   dS^T           P^T * (dP^T - delta)          (delta[r] = d_out[r] . out[r])
//   dQ^T [H][RS]   += K^T dS^T                                          (the P.V micro-kernel, no rescale)
//   dV   [nk][Hp]  += P^T dO     dK [nk][Hp] += dS^T Q                  (outer micro-kernel: broadcast P^T[j][r],
//                                                                        FMA against row r of dO / Q, h in lanes)
//
// dQ of a strip is complete when its chunks are done (written once). dK/dV accumulate, for one
// (batch, kv head) "pair", in a buffer [mem_len + U][Hp] (Hp: H rounded up to 16). A work item is a
// contiguous range of a pair's strips. With several threads, fewer than 3 pairs per thread, and pairs that
// do not fall evenly on the threads (their costs differ, or their count is no multiple of the threads), a
// pair is split into c = ceil(3 threads / pairs) items of about equal cost, each with its own buffer,
// summed in a fixed order at the end; else (the step: B=1, K=2 on 2 threads; CLIP's many frames) one item
// per pair accumulates in its thread's buffer. So the bits do not depend on the thread count unless c
// does (then dk/dv differ by rounding). Finally dK = scale * buffer, dV = buffer; memory entries at or
// beyond mem_len and keys no row sees get exactly 0. Scratch entries are never read.
//
// FLOPs: 5 matmuls of 2H per (row, key) pair computed (10H; the forward's 2 matmuls are 4H); the
// elementwise part (exp2, dS) is ~1/20 of that.

constexpr int kJ = 6;             // keys per outer micro-kernel
constexpr int kHV = 4;            // head-dim vectors per outer micro-kernel
constexpr float kNoRow = 1e30f;   // lse (base 2) of a row that must contribute nothing: exp2(s - 1e30) = 0

// A[j][.] += sum_r P^T[j][r] * X[r][.] for NJ keys (rows of A hp apart) and HV vectors of head dims;
// P^T [nk][RS] at key j0, X [RS][hp] at the first head-dim vector.
template <int RV, int NJ, int HV>
static inline void outer_kernel(float* __restrict a, int64_t hp, const float* __restrict p,
                                const float* __restrict x) {
  constexpr int RS = RV * kLanes;
  vf acc[NJ][HV];
  VXL_UNROLL for (int j = 0; j < NJ; ++j) VXL_UNROLL for (int c = 0; c < HV; ++c)
      acc[j][c] = ld(a + j * hp + c * kLanes);
  for (int r = 0; r < RS; ++r) {
    vf xv[HV];
    VXL_UNROLL for (int c = 0; c < HV; ++c) xv[c] = ld(x + r * hp + c * kLanes);
    VXL_UNROLL for (int j = 0; j < NJ; ++j) {
      vf b = bc(p + j * RS + r);
      VXL_UNROLL for (int c = 0; c < HV; ++c) acc[j][c] = fma(b, xv[c], acc[j][c]);
    }
  }
  VXL_UNROLL for (int j = 0; j < NJ; ++j) VXL_UNROLL for (int c = 0; c < HV; ++c)
      st(a + j * hp + c * kLanes, acc[j][c]);
}

template <int RV, int HV>
static void outer_keys(float* a, int64_t hp, const float* p, int nk, const float* x) {
  constexpr int RS = RV * kLanes;
  int j = 0;
  for (; j + kJ <= nk; j += kJ) outer_kernel<RV, kJ, HV>(a + j * hp, hp, p + j * RS, x);
  float* aj = a + j * hp;
  const float* pj = p + j * RS;
  switch (nk - j) {
    case 1: outer_kernel<RV, 1, HV>(aj, hp, pj, x); break;
    case 2: outer_kernel<RV, 2, HV>(aj, hp, pj, x); break;
    case 3: outer_kernel<RV, 3, HV>(aj, hp, pj, x); break;
    case 4: outer_kernel<RV, 4, HV>(aj, hp, pj, x); break;
    case 5: outer_kernel<RV, 5, HV>(aj, hp, pj, x); break;
    default: break;
  }
}

template <int RV>
static void outer(float* a, int64_t hp, const float* p, int nk, const float* x) {
  const int nv = static_cast<int>(hp / kLanes);
  int c = 0;
  for (; c + kHV <= nv; c += kHV) outer_keys<RV, kHV>(a + c * kLanes, hp, p, nk, x + c * kLanes);
  switch (nv - c) {
    case 1: outer_keys<RV, 1>(a + c * kLanes, hp, p, nk, x + c * kLanes); break;
    case 2: outer_keys<RV, 2>(a + c * kLanes, hp, p, nk, x + c * kLanes); break;
    case 3: outer_keys<RV, 3>(a + c * kLanes, hp, p, nk, x + c * kLanes); break;
    default: break;
  }
}

// P^T = exp2(S^T - lse2) (masked: own key j_base + j visible to row r iff < lim[r]), dS^T = P^T (dP^T - delta),
// in place: s becomes P^T, dp becomes dS^T.
template <int RV>
static void probs_chunk(float* s, float* dp, int nk, bool masked, int j_base, const float* lse2,
                        const float* delta, const int32_t* lim) {
  constexpr int RS = RV * kLanes;
  const vf zeros = zero();
  VXL_UNROLL for (int r = 0; r < RV; ++r) {
    const vf l = ld(lse2 + r * kLanes), d = ld(delta + r * kLanes);
    const int32_t* lr = lim + r * kLanes;
    float* sr = s + r * kLanes;
    float* dr = dp + r * kLanes;
    if (masked) {
      for (int j = 0; j < nk; ++j) {
        vf p = keep_visible(exp2v(sub(ld(sr + j * RS), l)), j_base + j, lr, zeros);
        st(sr + j * RS, p);
        st(dr + j * RS, mul(p, sub(ld(dr + j * RS), d)));
      }
    } else {
      for (int j = 0; j < nk; ++j) {
        vf p = exp2v(sub(ld(sr + j * RS), l));
        st(sr + j * RS, p);
        st(dr + j * RS, mul(p, sub(ld(dr + j * RS), d)));
      }
    }
  }
}

struct BwdProblem {
  Problem f;                       // q, k, v, mk, mv, mem_len, q_pos, lse (out/lse as inputs), shapes
  const float *o, *d_out;
  float *dq, *dk, *dv, *dmk, *dmv;
  int64_t hp;                      // H rounded up to a multiple of 16
};

struct BwdItem {
  int32_t b, kh, s0, s1;           // strips s0 .. s1 - 1 of the pair (b, kh)
  int32_t part;                    // index of its buffer among the pair's parts (-1: the thread's buffer)
  int64_t keys;                    // rows of its buffer: mem_len + the own keys its rows see
  size_t offset;                   // of its buffer in the shared parts (part >= 0)
  double cost;
};

struct BwdScratch {
  float* base = nullptr;
  float *qt, *dot, *qr, *dor, *s, *dp, *dqt, *lse2, *delta, *zeros;
  int32_t* lim;
  const float* qrow[3 * kLanes];   // the strip's rows of q and d_out
  const float* drow[3 * kLanes];
  float* acc = nullptr;            // the thread's pair buffer (dK then dV), grown on demand
  size_t acc_floats = 0;
  BwdScratch(int64_t h_dim, int64_t hp, int rs) {
    size_t floats = static_cast<size_t>(3 * h_dim * rs + 2 * hp * rs + 2 * static_cast<int64_t>(kTile) * rs +
                                        3 * rs + hp + 4 * kLanes);
    size_t bytes = ((floats * sizeof(float)) + 63) / 64 * 64;
    base = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (base == nullptr) throw std::bad_alloc();
    std::memset(base, 0, bytes);
    auto round = [](int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; };
    qt = base;
    dot = qt + round(h_dim * rs);
    dqt = dot + round(h_dim * rs);
    qr = dqt + round(h_dim * rs);
    dor = qr + hp * rs;
    s = dor + hp * rs;
    dp = s + static_cast<int64_t>(kTile) * rs;
    lse2 = dp + static_cast<int64_t>(kTile) * rs;
    delta = lse2 + rs;
    zeros = delta + rs;
    lim = reinterpret_cast<int32_t*>(zeros + hp);
  }
  float* pair_buffer(size_t floats) {
    if (floats > acc_floats) {
      std::free(acc);
      size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
      acc = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (acc == nullptr) throw std::bad_alloc();
      acc_floats = floats;
    }
    return acc;
  }
  ~BwdScratch() {
    std::free(base);
    std::free(acc);
  }
  BwdScratch(const BwdScratch&) = delete;
  BwdScratch& operator=(const BwdScratch&) = delete;
};

// One strip: rows row0 .. row0 + RS - 1 of (b, kh), rows >= end padding (contribute nothing). Accumulates
// into acc_k/acc_v (rows: memory keys, then own keys), writes the strip's dq.
template <int RV>
static void run_strip_bwd(const BwdProblem& bp, int64_t b, int64_t kh, int64_t row0, BwdScratch& sc,
                          float* acc_k, float* acc_v) {
  constexpr int RS = RV * kLanes;
  const Problem& pr = bp.f;
  const int64_t H = pr.h, G = pr.g, hp = bp.hp;
  const int64_t kstride = pr.kv * H;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(H)));
  const float qscale = scale * kLog2e;
  const int64_t end = std::min<int64_t>(RS, pr.rows - row0);

  // The strip's rows (padding rows: a zero row, lse2 kNoRow, lim 0: they contribute nothing).
  int32_t lo = INT32_MAX, hi = 0;
  for (int r = 0; r < RS; ++r) {
    if (r < end) {
      int64_t row = row0 + r, t = row / G, g = row % G;
      int64_t at = ((b * pr.t + t) * pr.n + kh * G + g) * H;
      sc.qrow[r] = pr.q + at;
      sc.drow[r] = bp.d_out + at;
      const float* orow = bp.o + at;
      float delta = 0.0f;
      for (int64_t h = 0; h < H; ++h) delta += sc.drow[r][h] * orow[h];
      sc.delta[r] = delta;
      float lse = pr.lse[((b * pr.kv + kh) * G + g) * pr.t + t];
      sc.lse2[r] = lse > -1e29f ? lse * kLog2e : kNoRow;     // a row that saw nothing contributes nothing
      int32_t lim = static_cast<int32_t>(own_limit(pr, b, t));
      sc.lim[r] = lim;
      lo = std::min(lo, lim);
      hi = std::max(hi, lim);
    } else {
      sc.qrow[r] = sc.drow[r] = sc.zeros;
      sc.delta[r] = 0.0f;
      sc.lse2[r] = kNoRow;
      sc.lim[r] = 0;
      lo = 0;
    }
  }
  for (int64_t h = 0; h < H; ++h) {          // transposed copies: contiguous stores, one load per row
    VXL_UNROLL for (int r = 0; r < RS; ++r) sc.qt[h * RS + r] = sc.qrow[r][h] * qscale;
    VXL_UNROLL for (int r = 0; r < RS; ++r) sc.dot[h * RS + r] = sc.drow[r][h];
  }
  for (int r = 0; r < RS; ++r) {             // row-major copies (columns H .. hp stay 0)
    std::memcpy(sc.qr + r * hp, sc.qrow[r], static_cast<size_t>(H) * sizeof(float));
    std::memcpy(sc.dor + r * hp, sc.drow[r], static_cast<size_t>(H) * sizeof(float));
  }
  std::fill(sc.dqt, sc.dqt + H * RS, 0.0f);

  for_each_chunk(pr, b, kh, lo, hi, [&](const float* kp, const float* vp, int nk, bool masked, int j_base,
                                        int64_t key) {
    scores<RV>(sc.qt, kp, kstride, static_cast<int>(H), nk, sc.s);
    scores<RV>(sc.dot, vp, kstride, static_cast<int>(H), nk, sc.dp);
    probs_chunk<RV>(sc.s, sc.dp, nk, masked, j_base, sc.lse2, sc.delta, sc.lim);
    pv<RV>(sc.dqt, nullptr, sc.dp, nk, kp, kstride, static_cast<int>(H));   // dQ^T += K^T dS^T: pv's kernel, no rescale
    outer<RV>(acc_v + key * hp, hp, sc.s, nk, sc.dor);                       // dV += P^T dO
    outer<RV>(acc_k + key * hp, hp, sc.dp, nk, sc.qr);                       // dK += dS^T Q
  });

  for (int64_t r = 0; r < end; ++r) {
    int64_t row = row0 + r, t = row / G, g = row % G;
    float* o = bp.dq + ((b * pr.t + t) * pr.n + kh * G + g) * H;
    for (int64_t h = 0; h < H; ++h) o[h] = sc.dqt[h * RS + r] * scale;
  }
}

// dk/dv/d_mem_k/d_mem_v of one pair from its buffers, summed in order (parts[i] with keys[i] rows each:
// memory entries, then own keys; rows beyond a buffer count 0).
static void flush_pair(const BwdProblem& bp, int64_t b, int64_t kh, const float* const* parts_k,
                       const float* const* parts_v, const int64_t* keys, int count) {
  const Problem& pr = bp.f;
  const int64_t H = pr.h, hp = bp.hp, kstride = pr.kv * H;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(H)));
  const int64_t ml = memory_length(pr, b);
  auto emit = [&](int64_t row, float* __restrict dk, float* __restrict dv) {   // buffer row -> one key's gradients
    std::fill(dk, dk + H, 0.0f);
    std::fill(dv, dv + H, 0.0f);
    for (int i = 0; i < count; ++i) {
      if (row >= keys[i]) continue;
      const float* __restrict pk = parts_k[i] + row * hp;
      const float* __restrict pv = parts_v[i] + row * hp;
      for (int64_t h = 0; h < H; ++h) dk[h] += pk[h];
      for (int64_t h = 0; h < H; ++h) dv[h] += pv[h];
    }
    for (int64_t h = 0; h < H; ++h) dk[h] *= scale;
  };
  for (int64_t j = 0; j < pr.s; ++j) {
    float* dk = bp.dmk + (b * pr.s + j) * kstride + kh * H;
    float* dv = bp.dmv + (b * pr.s + j) * kstride + kh * H;
    if (j < ml) {
      emit(j, dk, dv);
    } else {
      std::fill(dk, dk + H, 0.0f);
      std::fill(dv, dv + H, 0.0f);
    }
  }
  for (int64_t j = 0; j < pr.u; ++j)
    emit(ml + j, bp.dk + (b * pr.u + j) * kstride + kh * H, bp.dv + (b * pr.u + j) * kstride + kh * H);
}

static void run_all_bwd(const BwdProblem& bp, int max_rv) {
  const Problem& pr = bp.f;
  const int64_t full = max_rv * kLanes;
  const int64_t strips = (pr.rows + full - 1) / full;
  const int64_t pairs = pr.b * pr.kv;
  auto strip_rv = [&](int64_t i) {
    int64_t left = pr.rows - i * full;
    return left >= full ? max_rv : static_cast<int>((left + kLanes - 1) / kLanes);
  };
  auto strip_hi = [&](int64_t b, int64_t i) {      // own keys strip i of batch b sees
    int64_t t_hi = (std::min<int64_t>((i + 1) * full, pr.rows) - 1) / pr.g;
    int64_t hi = 0;
    for (int64_t t = (i * full) / pr.g; t <= t_hi; ++t) hi = std::max(hi, own_limit(pr, b, t));
    return hi;
  };
  // Cost of every strip (per batch: the kv heads cost the same).
  std::vector<double> cost(static_cast<size_t>(pr.b * strips));
  std::vector<int64_t> hi(static_cast<size_t>(pr.b * strips));
  std::vector<double> pair_cost(static_cast<size_t>(pr.b), 0.0);
  double total = 0.0;
  for (int64_t b = 0; b < pr.b; ++b) {
    const double ml = static_cast<double>(memory_length(pr, b));
    for (int64_t i = 0; i < strips; ++i) {
      int64_t h = strip_hi(b, i);
      double c = (ml + static_cast<double>(h) + 8.0) * strip_rv(i) * kLanes * pr.h;
      cost[b * strips + i] = c;
      hi[b * strips + i] = h;
      pair_cost[b] += c;
    }
    total += pair_cost[b] * pr.kv;
  }
  int64_t threads = kernel_threads();
  // A thread pays off above a few hundred microseconds of work (cost ~ multiply-adds / 5).
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, static_cast<int64_t>(total / 0.8e6) + 1));
  // Splits per pair: enough items to balance the threads, unless whole pairs already do.
  bool equal = std::all_of(pair_cost.begin(), pair_cost.end(), [&](double c) { return c == pair_cost[0]; });
  int64_t split = 1;
  if (threads > 1 && pairs < 3 * threads && !(equal && pairs % threads == 0)) {
    split = std::min<int64_t>(strips, (3 * threads + pairs - 1) / pairs);
    // The parts' buffers stay below ~1 GiB (many threads, long sequences): fewer, larger parts.
    int64_t ml_max = 0;
    for (int64_t b = 0; b < pr.b; ++b) ml_max = std::max(ml_max, memory_length(pr, b));
    const double pair_floats = 2.0 * static_cast<double>((ml_max + pr.u) * bp.hp);
    while (split > 1 && static_cast<double>(split * pairs) * pair_floats > 256.0 * 1024 * 1024) --split;
  }

  std::vector<BwdItem> items;
  std::vector<int32_t> first(static_cast<size_t>(pairs + 1), 0);   // items of pair p: first[p] .. first[p+1]-1
  size_t parts_floats = 0;
  for (int64_t b = 0; b < pr.b; ++b) {
    const int64_t ml = memory_length(pr, b);
    for (int64_t kh = 0; kh < pr.kv; ++kh) {
      first[b * pr.kv + kh] = static_cast<int32_t>(items.size());
      // Cut the strips into `split` ranges of about equal cost.
      int64_t s0 = 0;
      double done = 0.0;
      for (int64_t part = 0; part < split && s0 < strips; ++part) {
        double goal = pair_cost[b] * static_cast<double>(part + 1) / static_cast<double>(split);
        int64_t s1 = s0;
        double c = 0.0;
        int64_t h = 0;
        while (s1 < strips && (s1 == s0 || part == split - 1 || done + c + 0.5 * cost[b * strips + s1] <= goal)) {
          c += cost[b * strips + s1];
          h = std::max(h, hi[b * strips + s1]);
          ++s1;
        }
        done += c;
        BwdItem it{static_cast<int32_t>(b), static_cast<int32_t>(kh), static_cast<int32_t>(s0),
                   static_cast<int32_t>(s1), -1, ml + (split > 1 ? h : pr.u), 0, c};
        if (split > 1) {
          it.part = static_cast<int32_t>(part);
          it.offset = parts_floats;
          parts_floats += static_cast<size_t>(2 * it.keys * bp.hp);
        }
        items.push_back(it);
        s0 = s1;
      }
    }
  }
  first[pairs] = static_cast<int32_t>(items.size());
  std::vector<float> parts(parts_floats);     // zeroed
  std::vector<size_t> order(items.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  if (threads > 1)
    std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) { return items[x].cost > items[y].cost; });

  parallel_for(threads, items.size(),
               [&]() { return std::make_unique<BwdScratch>(pr.h, bp.hp, static_cast<int>(full)); },
               [&](size_t i, BwdScratch& sc) {
                 const BwdItem& it = items[order[i]];
                 const size_t floats = static_cast<size_t>(it.keys * bp.hp);
                 float* acc_k;
                 if (it.part >= 0) {
                   acc_k = parts.data() + it.offset;
                 } else {
                   acc_k = sc.pair_buffer(2 * floats);
                   std::fill(acc_k, acc_k + 2 * floats, 0.0f);
                 }
                 float* acc_v = acc_k + floats;
                 for (int64_t s = it.s0; s < it.s1; ++s) {
                   int rv = strip_rv(s);
                   if (rv == 1) {
                     run_strip_bwd<1>(bp, it.b, it.kh, s * full, sc, acc_k, acc_v);
                   } else if (rv == 2) {
                     run_strip_bwd<2>(bp, it.b, it.kh, s * full, sc, acc_k, acc_v);
                   } else {
                     run_strip_bwd<3>(bp, it.b, it.kh, s * full, sc, acc_k, acc_v);
                   }
                 }
                 if (it.part < 0) flush_pair(bp, it.b, it.kh, &acc_k, &acc_v, &it.keys, 1);
               });
  if (split > 1) {
    parallel_for(threads, static_cast<size_t>(pairs), []() { return std::make_unique<int>(0); },
                 [&](size_t p, int&) {
                   std::vector<const float*> pk, pv;
                   std::vector<int64_t> keys;
                   for (int32_t i = first[p]; i < first[p + 1]; ++i) {
                     const BwdItem& it = items[i];
                     pk.push_back(parts.data() + it.offset);
                     pv.push_back(parts.data() + it.offset + static_cast<size_t>(it.keys * bp.hp));
                     keys.push_back(it.keys);
                   }
                   flush_pair(bp, static_cast<int64_t>(p) / pr.kv, static_cast<int64_t>(p) % pr.kv, pk.data(),
                              pv.data(), keys.data(), static_cast<int>(keys.size()));
                 });
  }
}

static ffi::Error Backward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                           ffi::Buffer<ffi::F32> mem_k, ffi::Buffer<ffi::F32> mem_v,
                           ffi::Buffer<ffi::S32> mem_len, ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::F32> out,
                           ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> dq,
                           ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                           ffi::ResultBuffer<ffi::F32> d_mem_k, ffi::ResultBuffer<ffi::F32> d_mem_v) {
  BwdProblem bp;
  Problem& pr = bp.f;
  if (ffi::Error err = read_problem("vxl flash attention backward", q, k, v, mem_k, mem_v, mem_len, q_pos, pr);
      err.failure())
    return err;
  const size_t q_count = static_cast<size_t>(pr.b * pr.t * pr.n * pr.h);
  if (out.element_count() != q_count || d_out.element_count() != q_count ||
      lse.element_count() != static_cast<size_t>(pr.b * pr.t * pr.n))
    return ffi::Error::InvalidArgument(
        "vxl flash attention backward: out/d_out must be shaped like q, lse [B, K, G, T]");
  pr.out = nullptr;
  pr.lse = const_cast<float*>(lse.typed_data());   // read only
  bp.o = out.typed_data();
  bp.d_out = d_out.typed_data();
  bp.dq = dq->typed_data();
  bp.dk = dk->typed_data();
  bp.dv = dv->typed_data();
  bp.dmk = d_mem_k->typed_data();
  bp.dmv = d_mem_v->typed_data();
  bp.hp = (pr.h + kLanes - 1) / kLanes * kLanes;
  if (pr.b == 0 || pr.h == 0) return ffi::Error::Success();     // every result is empty
  if (pr.rows == 0) {
    std::fill(bp.dk, bp.dk + dk->element_count(), 0.0f);
    std::fill(bp.dv, bp.dv + dv->element_count(), 0.0f);
    std::fill(bp.dmk, bp.dmk + d_mem_k->element_count(), 0.0f);
    std::fill(bp.dmv, bp.dmv + d_mem_v->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  try {
    run_all_bwd(bp, std::min(VXL_KERNEL_MAX_RV, 3));
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("vxl flash attention backward: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

// The seven inputs both handlers take first, in read_problem's order.
template <typename Binding>
static auto bind_inputs(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::Buffer<ffi::F32>>()   // q
      .template Arg<ffi::Buffer<ffi::F32>>()   // k
      .template Arg<ffi::Buffer<ffi::F32>>()   // v
      .template Arg<ffi::Buffer<ffi::F32>>()   // mem_k
      .template Arg<ffi::Buffer<ffi::F32>>()   // mem_v
      .template Arg<ffi::Buffer<ffi::S32>>()   // mem_len
      .template Arg<ffi::Buffer<ffi::S32>>();  // q_pos
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(VxlFlashAttentionForwardF32, Forward,
                              bind_inputs(ffi::Ffi::Bind())
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>()); // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(VxlFlashAttentionBackwardF32, Backward,
                              bind_inputs(ffi::Ffi::Bind())
                                  .Arg<ffi::Buffer<ffi::F32>>()   // out
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()   // d_out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dv
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d_mem_k
                                  .Ret<ffi::Buffer<ffi::F32>>()); // d_mem_v
