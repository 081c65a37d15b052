// Fused MoE inference on CPU: the router's top-k (its logits too, for fp32 with <= 16 experts on
// AVX-512), counting-sort dispatch, each expert's SwiGLU on its contiguous slice, experts dealt to
// the cores as they free up (one core per expert, not both cores per small GEMM), weighted combine. One call replaces the ~20 framework ops of the Python dispatch paths (core/moe.py),
// whose fixed cost (~5-10 us each from Python) is most of the time at decode sizes, and runs the
// ~128-row expert GEMMs of a 1K-token batch one per core instead of splitting each over both cores.
//
// Inference only (no autograd), CPU, float32 / float64. Each expert's GEMMs call the BLAS that
// libtorch ships directly, on the core at::parallel_for gave it (compiled with -fopenmp: without it
// at::parallel_for runs on one thread). Each expert runs in tiles of 128 rows, gather -> up-projection
// -> SwiGLU (vectorised here, AVX-512 / AVX2 chosen at run time: simd.h) -> down-projection, so that
// a tile stays in the core's cache from its gather to its output.
//
// Legend: N tokens, K top-k, D width, E experts, F expert hidden.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include "blas.h"
#include "simd.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// Rows of each expert's GEMMs per tile: one tile's inputs, hidden and outputs (128 x (D + 2F + D)
// floats, 0.5 MB at the demo sizes) stay in a core's L2 cache from the gather to the down-projection.
constexpr int64_t kTile = 128;

// Per calling thread, reused across calls: fresh multi-MB buffers cost a page fault per 4 KB on
// every call (measured: ~700 faults per call at 1K tokens, as much time as the expert GEMMs' gap
// to the dense FFN). Bounded by the chunk size below; thread_local so that concurrent callers
// (the web UI serves requests from several threads) never share one.
struct Workspace {
  at::Tensor xs, h13;  // [chunk*K, D] gathered rows, then expert outputs; [cores, kTile, 2F] hidden
  void ensure(int64_t rows, int64_t D, int64_t F2, int64_t cores, const at::TensorOptions& opt) {
    if (!xs.defined() || xs.scalar_type() != opt.dtype().toScalarType() || xs.size(0) < rows ||
        xs.size(1) != D || h13.size(0) < cores || h13.size(2) != F2) {
      // always normal tensors, never inference tensors: a workspace first made under
      // torch.inference_mode() could not be updated in place by a later call under no_grad
      c10::InferenceMode normal(false);
      xs = at::empty({rows, D}, opt);
      h13 = at::empty({cores, kTile, F2}, opt);
    }
  }
};
thread_local Workspace tls_ws;

// Row-major C[m,n] = A[m,k] @ B[k,n] (row strides lda, ldb, ldc) = column-major C^T = B^T A^T.
template <typename scalar_t>
void gemm_rm(int m, int n, int k, const scalar_t* A, int lda, const scalar_t* B, int ldb, scalar_t* C, int ldc) {
  medreport_blas::gemm<scalar_t>('N', 'N', n, m, k, scalar_t(1), B, ldb, A, lda, scalar_t(0), C, ldc);
}

// ------------------------------------------------------------------------------------- SwiGLU
// Row [gate | up] of 2F -> its first F entries <- silu(gate) * up. silu(g) = g * sigmoid(g), with
// sigmoid from z = exp(-|g|) in (0, 1]: 1 / (1 + z) for g >= 0, z / (1 + z) below, so the exp never
// overflows and the vector exp for non-positive inputs serves.

template <typename scalar_t>
inline scalar_t swiglu_value(scalar_t g, scalar_t u) {
  const scalar_t z = std::exp(-std::abs(g));
  return g * (g >= 0 ? scalar_t(1) : z) / (scalar_t(1) + z) * u;
}

template <typename scalar_t>
void swiglu_row_scalar(scalar_t* h, int F) {
  for (int j = 0; j < F; ++j) h[j] = swiglu_value(h[j], h[F + j]);
}

#ifdef MEDREPORT_X86
using namespace medreport_simd;

__attribute__((target("avx2,fma"))) void swiglu_row_avx2(float* h, int F) {
  const int f8 = F & ~7;
  const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
  int j = 0;
  for (; j < f8; j += 8) {
    const __m256 g = _mm256_loadu_ps(h + j);
    const __m256 z = exp_nonpos_avx2(_mm256_or_ps(g, sign));  // exp(-|g|)
    const __m256 num = _mm256_blendv_ps(one, z, g);          // z where g's sign bit is set
    const __m256 sg = _mm256_div_ps(num, _mm256_add_ps(one, z));
    _mm256_storeu_ps(h + j, _mm256_mul_ps(_mm256_mul_ps(g, sg), _mm256_loadu_ps(h + F + j)));
  }
  for (; j < F; ++j) h[j] = swiglu_value(h[j], h[F + j]);  // the tail
}

__attribute__((target("avx512f"))) void swiglu_row_avx512(float* h, int F) {
  const int f16 = F & ~15;
  const __m512 one = _mm512_set1_ps(1.0f);
  int j = 0;
  for (; j < f16; j += 16) {
    const __m512 g = _mm512_loadu_ps(h + j);
    const __m512 z = exp_nonpos_avx512(_mm512_castsi512_ps(
        _mm512_or_si512(_mm512_castps_si512(g), _mm512_set1_epi32(static_cast<int>(0x80000000u)))));
    const __mmask16 negm = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 num = _mm512_mask_blend_ps(negm, one, z);
    const __m512 sg = _mm512_div_ps(num, _mm512_add_ps(one, z));
    _mm512_storeu_ps(h + j, _mm512_mul_ps(_mm512_mul_ps(g, sg), _mm512_loadu_ps(h + F + j)));
  }
  for (; j < F; ++j) h[j] = swiglu_value(h[j], h[F + j]);  // the tail
}
#endif

template <typename scalar_t>
inline void swiglu_row(scalar_t* h, int F) {
#ifdef MEDREPORT_X86
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (has_avx512()) return swiglu_row_avx512(h, F);
    if (has_avx2()) return swiglu_row_avx2(h, F);
  }
#endif
  swiglu_row_scalar(h, F);
}

// Tokens [n0, n1) of x through their experts into y: counting sort of the assignments by expert;
// then each core takes whole experts (longest first onto the least-loaded core) and runs each in
// tiles of kTile rows: gather the rows, up-projection, SwiGLU, down-projection into the tile's
// (consumed) input rows, all while the tile is in the core's cache; then the routing-weighted
// combine in token order.
template <typename scalar_t>
void run_chunk(const at::Tensor& x, const scalar_t* wp, const int64_t* ip, const at::Tensor& W13,
               const at::Tensor& W2, int64_t n0, int64_t n1, int64_t K, int64_t* cp_total, at::Tensor& y) {
  const int64_t N = n1 - n0, D = x.size(1), E = W13.size(0), Fh = W2.size(1), NK = N * K;
  std::vector<int64_t> cnt(E, 0);
  for (int64_t a = 0; a < NK; ++a) {
    const int64_t e = ip[n0 * K + a];
    TORCH_CHECK(e >= 0 && e < E, "moe_experts: expert id out of range");
    ++cnt[e];
  }
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) {
    start[e + 1] = start[e] + cnt[e];
    cp_total[e] += cnt[e];
  }
  std::vector<int64_t> pos(NK), tok(NK);  // assignment (token-major) -> sorted row; row -> token
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t a = 0; a < NK; ++a) {
      const int64_t r = fill[ip[n0 * K + a]]++;
      pos[a] = r;
      tok[r] = n0 + a / K;
    }
  }
  // experts dealt to the cores as they free up, longest first (row counts are uneven, and a core
  // slowed by other load then takes fewer experts instead of holding the other at the barrier)
  Workspace& w = tls_ws;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), E, w.h13.size(0)}));
  std::vector<int64_t> order;
  for (int64_t e = 0; e < E; ++e)
    if (cnt[e] > 0) order.push_back(e);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cnt[a] > cnt[b]; });
  std::atomic<int64_t> next{0};

  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* xsp = w.xs.data_ptr<scalar_t>();  // [N*K, D]
  const scalar_t* w13p = W13.data_ptr<scalar_t>();
  const scalar_t* w2p = W2.data_ptr<scalar_t>();
  const int iD = static_cast<int>(D), iF = static_cast<int>(Fh), iF2 = static_cast<int>(2 * Fh);

  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      scalar_t* hp = w.h13.data_ptr<scalar_t>() + t * kTile * 2 * Fh;  // this core's [kTile, 2F]
      for (int64_t i = next++; i < static_cast<int64_t>(order.size()); i = next++)
        for (int64_t e = order[i], s = start[e]; s < start[e + 1]; s += kTile) {
          const int64_t c = std::min(kTile, start[e + 1] - s);
          for (int64_t r = s; r < s + c; ++r)  // gather
            std::memcpy(xsp + r * D, xp + tok[r] * D, sizeof(scalar_t) * D);
          gemm_rm<scalar_t>(static_cast<int>(c), iF2, iD, xsp + s * D, iD, w13p + e * D * 2 * Fh, iF2,
                            hp, iF2);  // [c,D] @ [D,2F] -> [c, gate | up]
          for (int64_t r = 0; r < c; ++r) swiglu_row<scalar_t>(hp + r * 2 * Fh, iF);  // [c,F] (ld 2F)
          gemm_rm<scalar_t>(static_cast<int>(c), iD, iF, hp, iF2, w2p + e * Fh * D, iD, xsp + s * D,
                            iD);  // [c,F] @ [F,D] into the tile's consumed input rows
        }
    }
  });

  // combine: y[n] = sum_k w[n,k] * (output of assignment n,k), in token order
  scalar_t* yp = y.data_ptr<scalar_t>();
  at::parallel_for(0, N, 64, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      scalar_t* dst = yp + (n0 + n) * D;
      const scalar_t* src = xsp + pos[n * K] * D;
      const scalar_t w0 = wp[(n0 + n) * K];
      for (int64_t d = 0; d < D; ++d) dst[d] = w0 * src[d];
      for (int64_t k = 1; k < K; ++k) {
        src = xsp + pos[n * K + k] * D;
        const scalar_t wk = wp[(n0 + n) * K + k];
        for (int64_t d = 0; d < D; ++d) dst[d] += wk * src[d];
      }
    }
  });
}

// The expert weights in x's dtype, contiguous, checked against x [N,D] and E experts.
struct ExpertWeights {
  at::Tensor W13, W2;  // [E,D,2F], [E,F,D]
  int64_t E, D, Fh;
  ExpertWeights(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2, const char* op) {
    TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), op, ": x must be a CPU tensor [N,D]");
    TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3, op, ": w13 [E,D,2F], w2 [E,F,D]");
    W13 = w13.to(x.scalar_type()).contiguous();
    W2 = w2.to(x.scalar_type()).contiguous();
    E = W13.size(0), D = x.size(1), Fh = W2.size(1);
    TORCH_CHECK(W13.size(1) == D && W13.size(2) == 2 * Fh && W2.size(0) == E && W2.size(2) == D, op,
                ": shapes do not match: x [N,D], w13 [E,D,2F], w2 [E,F,D]");
  }
};

// x [N,D], w_NK [N,K] routing weights, idx_NK [N,K] int64 expert ids, w13 [E,D,2F] (gate | up),
// w2 [E,F,D], chunk: tokens per pass (bounds the workspace)  ->  (y [N,D], counts [E] int64)
std::tuple<at::Tensor, at::Tensor> moe_experts(const at::Tensor& x_in, const at::Tensor& w_in,
                                               const at::Tensor& idx_in, const at::Tensor& w13,
                                               const at::Tensor& w2, int64_t chunk) {
  TORCH_CHECK(w_in.dim() == 2 && idx_in.dim() == 2, "moe_experts: w [N,K], idx [N,K]");
  TORCH_CHECK(idx_in.scalar_type() == at::kLong, "moe_experts: idx must be int64");
  TORCH_CHECK(chunk > 0, "moe_experts: chunk must be positive");
  const auto x = x_in.contiguous();
  const ExpertWeights ew(x, w13, w2, "moe_experts");
  const auto wts = w_in.to(x.scalar_type()).contiguous();
  const auto idx = idx_in.contiguous();
  const int64_t N = x.size(0), K = idx.size(1);
  TORCH_CHECK(idx.size(0) == N && wts.size(0) == N && wts.size(1) == K, "moe_experts: w and idx must be [N,K]");
  auto counts = at::zeros({ew.E}, idx.options());
  auto y = at::empty({N, ew.D}, x.options());
  if (N == 0) return std::make_tuple(y, counts);
  tls_ws.ensure(std::min(N, chunk) * K, ew.D, 2 * ew.Fh, at::get_num_threads(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "moe_experts", [&] {
    for (int64_t n0 = 0; n0 < N; n0 += chunk)
      run_chunk<scalar_t>(x, wts.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), ew.W13, ew.W2, n0,
                          std::min(N, n0 + chunk), K, counts.data_ptr<int64_t>(), y);
  });
  return std::make_tuple(y, counts);
}

// The routing weights of a row's top-k logits bv[0..K), largest first: their softmax (which equals
// renormalising the top-k of the full softmax).
template <typename scalar_t>
inline void topk_softmax(const scalar_t* bv, int64_t K, scalar_t* w) {
  scalar_t sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += (w[k] = std::exp(bv[k] - bv[0]));
  for (int64_t k = 0; k < K; ++k) w[k] /= sum;
}

// Rows [n0, n1) of the router logits [n, E] -> the k largest per row (ties: the lower expert id)
// and a softmax over those k, which equals renormalising the top-k of the full softmax
// (core.moe.MoE.route). One pass over the experts per row, inserting into a sorted top-k.
template <typename scalar_t>
void route_rows(const scalar_t* lp, int64_t n, int64_t E, int64_t K, int64_t* ip, scalar_t* wp) {
  at::parallel_for(0, n, 256, [&](int64_t b, int64_t e) {
    std::vector<scalar_t> bv(K);
    std::vector<int64_t> bi(K);
    for (int64_t r = b; r < e; ++r) {
      const scalar_t* row = lp + r * E;
      for (int64_t k = 0; k < K; ++k) {  // (a row of NaN keeps experts 0..K-1: NaN out, as in PyTorch)
        bv[k] = -std::numeric_limits<scalar_t>::infinity();
        bi[k] = k;
      }
      for (int64_t j = 0; j < E; ++j) {
        const scalar_t v = row[j];
        if (!(v > bv[K - 1])) continue;
        int64_t p = K - 1;
        while (p > 0 && v > bv[p - 1]) {
          bv[p] = bv[p - 1];
          bi[p] = bi[p - 1];
          --p;
        }
        bv[p] = v;
        bi[p] = j;
      }
      topk_softmax(bv.data(), K, wp + r * K);
      for (int64_t k = 0; k < K; ++k) ip[r * K + k] = bi[k];
    }
  });
}

#ifdef MEDREPORT_X86
// The same routing for float rows with at most 16 experts on AVX-512, logits computed here: a row's
// E logits are one 16-lane register (lanes >= E unused), built as sum_d x[r,d] * RwT16[d,:] with
// four rows per pass sharing each RwT16 load; the top-k by masked max-reductions (ties: the lowest
// expert id, from the lowest set bit of the compare mask). NaN logits count as -inf, so a row with
// NaN gets NaN weights, as route_rows gives. Replaces a skinny [n,D] @ [D,E] GEMM (~120 GFLOP/s,
// bound by reading x) and a scalar insertion sort per row: the router was ~12 % of a 16K-token call.
// x [n,D] rows, RwT16 [D,16] (zero beyond E).
// Groups [g0, g1) of four rows (the lambdas of at::parallel_for do not inherit a target attribute,
// so the vector code is this function, called from one).
__attribute__((target("avx512f"))) void route_groups_avx512(const float* xp, int64_t n, int64_t D,
                                                           const float* RwT16, int64_t E, int64_t K,
                                                           int64_t* ip, float* wp, int64_t g0, int64_t g1) {
  const __mmask16 valid = static_cast<__mmask16>((1u << E) - 1u);
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  float bv[16];
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t r0 = 4 * g, nr = std::min<int64_t>(4, n - r0);
    const float* x0 = xp + r0 * D;
    const float* x1 = xp + (r0 + std::min<int64_t>(1, nr - 1)) * D;  // (short last group: repeats rows)
    const float* x2 = xp + (r0 + std::min<int64_t>(2, nr - 1)) * D;
    const float* x3 = xp + (r0 + std::min<int64_t>(3, nr - 1)) * D;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < D; ++d) {
      const __m512 w = _mm512_loadu_ps(RwT16 + d * 16);
      a0 = _mm512_fmadd_ps(_mm512_set1_ps(x0[d]), w, a0);
      a1 = _mm512_fmadd_ps(_mm512_set1_ps(x1[d]), w, a1);
      a2 = _mm512_fmadd_ps(_mm512_set1_ps(x2[d]), w, a2);
      a3 = _mm512_fmadd_ps(_mm512_set1_ps(x3[d]), w, a3);
    }
    const __m512 acc[4] = {a0, a1, a2, a3};
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t r = r0 + i;
      // NaN -> -inf (an ordered compare is false for NaN), lanes >= E -> -inf
      const __m512 v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(acc[i], acc[i], _CMP_ORD_Q) & valid, ninf, acc[i]);
      __mmask16 avail = valid;
      for (int64_t k = 0; k < K; ++k) {
        const float m = _mm512_mask_reduce_max_ps(avail, v);
        const __mmask16 hit = _mm512_mask_cmp_ps_mask(avail, v, _mm512_set1_ps(m), _CMP_EQ_OQ);
        const int j = __builtin_ctz(static_cast<unsigned>(hit));
        bv[k] = m;
        ip[r * K + k] = j;
        avail = static_cast<__mmask16>(avail & ~(1u << j));
      }
      topk_softmax(bv, K, wp + r * K);
    }
  }
}

void route_rows_avx512(const float* xp, int64_t n, int64_t D, const float* RwT16, int64_t E, int64_t K,
                       int64_t* ip, float* wp) {
  at::parallel_for(0, (n + 3) / 4, 64, [&](int64_t b, int64_t e) {
    route_groups_avx512(xp, n, D, RwT16, E, K, ip, wp, b, e);
  });
}
#endif

// Softmax router + top-k + experts in one call (balance "aux" at inference), chunk by chunk so
// that a chunk's tokens are still in cache when they are gathered.
// x [N,D], router_w [E,D] -> (y [N,D], counts [E] int64)
std::tuple<at::Tensor, at::Tensor> moe_forward(const at::Tensor& x_in, const at::Tensor& router_w,
                                               const at::Tensor& w13, const at::Tensor& w2,
                                               int64_t top_k, int64_t chunk) {
  TORCH_CHECK(chunk > 0, "moe_forward: chunk must be positive");
  const auto x = x_in.contiguous();
  const ExpertWeights ew(x, w13, w2, "moe_forward");
  const int64_t N = x.size(0), E = ew.E, K = top_k;
  TORCH_CHECK(router_w.dim() == 2 && router_w.size(0) == E && router_w.size(1) == ew.D,
              "moe_forward: the router weight must be [E,D]");
  TORCH_CHECK(K >= 1 && K <= E, "moe_forward: need 1 <= top_k <= n_experts");
  const auto RwT = router_w.to(x.scalar_type()).t();  // [D,E]
  auto counts = at::zeros({E}, x.options().dtype(at::kLong));
  auto y = at::empty({N, ew.D}, x.options());
  if (N == 0) return std::make_tuple(y, counts);
  auto idx = at::empty({N, K}, x.options().dtype(at::kLong));
  auto wts = at::empty({N, K}, x.options());
  tls_ws.ensure(std::min(N, chunk) * K, ew.D, 2 * ew.Fh, at::get_num_threads(), x.options());
  bool fast = false;  // the AVX-512 router for float and E <= 16
  at::Tensor RwT16;
#ifdef MEDREPORT_X86
  if (x.scalar_type() == at::kFloat && E <= 16 && has_avx512()) {
    fast = true;
    RwT16 = at::zeros({ew.D, 16}, x.options());
    RwT16.narrow(1, 0, E).copy_(RwT);
  }
#endif
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "moe_forward", [&] {
    for (int64_t n0 = 0; n0 < N; n0 += chunk) {
      const int64_t n1 = std::min(N, n0 + chunk);
      if (fast) {
#ifdef MEDREPORT_X86
        route_rows_avx512(x.data_ptr<float>() + n0 * ew.D, n1 - n0, ew.D, RwT16.data_ptr<float>(), E, K,
                          idx.data_ptr<int64_t>() + n0 * K, wts.data_ptr<float>() + n0 * K);
#endif
      } else {
        const auto logits = at::mm(x.narrow(0, n0, n1 - n0), RwT).contiguous();  // [n,E]
        route_rows<scalar_t>(logits.data_ptr<scalar_t>(), n1 - n0, E, K, idx.data_ptr<int64_t>() + n0 * K,
                             wts.data_ptr<scalar_t>() + n0 * K);
      }
      run_chunk<scalar_t>(x, wts.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), ew.W13, ew.W2, n0, n1, K,
                          counts.data_ptr<int64_t>(), y);
    }
  });
  return std::make_tuple(y, counts);
}

}  // namespace

TORCH_LIBRARY(medreport, m) {
  m.def("moe_experts(Tensor x, Tensor w, Tensor idx, Tensor w13, Tensor w2, int chunk) -> (Tensor, Tensor)");
  m.def("moe_forward(Tensor x, Tensor router_w, Tensor w13, Tensor w2, int top_k, int chunk) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(medreport, CPU, m) {
  m.impl("moe_experts", &moe_experts);
  m.impl("moe_forward", &moe_forward);
}
