// Fused MoE inference on CPU: counting-sort dispatch, each expert's SwiGLU on its contiguous slice,
// experts spread over the cores (one core per expert, not both cores per small GEMM), weighted
// combine. One call replaces the ~20 framework ops of the Python dispatch paths (core/moe.py),
// whose fixed cost (~5-10 us each from Python) is most of the time at decode sizes, and runs the
// ~128-row expert GEMMs of a 1K-token batch one per core instead of splitting each over both cores.
//
// Inference only (no autograd), CPU, float32 / float64. Each expert's GEMMs call the BLAS that
// libtorch ships directly, on the core at::parallel_for gave it (compiled with -fopenmp: without it
// at::parallel_for runs on one thread); the SwiGLU between them is ATen's (vectorised), once over
// all rows, outside the parallel regions.
//
// Legend: N tokens, K top-k, D width, E experts, F expert hidden.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include "blas.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// Per calling thread, reused across calls: fresh multi-MB buffers cost a page fault per 4 KB on
// every call (measured: ~700 faults per call at 1K tokens, as much time as the expert GEMMs' gap
// to the dense FFN). Bounded by the chunk size below; thread_local so that concurrent callers
// (the web UI serves requests from several threads) never share one.
struct Workspace {
  at::Tensor xs, h13;
  void ensure(int64_t rows, int64_t D, int64_t F2, const at::TensorOptions& opt) {
    if (!xs.defined() || xs.scalar_type() != opt.dtype().toScalarType() || xs.size(0) < rows ||
        xs.size(1) != D || h13.size(1) != F2) {
      // always normal tensors, never inference tensors: a workspace first made under
      // torch.inference_mode() could not be updated in place by a later call under no_grad
      c10::InferenceMode normal(false);
      xs = at::empty({rows, D}, opt);
      h13 = at::empty({rows, F2}, opt);
    }
  }
};
thread_local Workspace tls_ws;

// Row-major C[m,n] = A[m,k] @ B[k,n] (row strides lda, ldb, ldc) = column-major C^T = B^T A^T.
template <typename scalar_t>
void gemm_rm(int m, int n, int k, const scalar_t* A, int lda, const scalar_t* B, int ldb, scalar_t* C, int ldc) {
  medreport_blas::gemm<scalar_t>('N', 'N', n, m, k, scalar_t(1), B, ldb, A, lda, scalar_t(0), C, ldc);
}

// Tokens [n0, n1) of x through their experts into y: counting sort of the assignments by expert;
// pass 1: each core gathers its experts' rows and runs their up-projections; the SwiGLU once over
// all rows (ATen, vectorised); pass 2: each core its experts' down-projections; then the
// routing-weighted combine in token order.
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
  // experts to cores: longest first onto the least-loaded core (row counts are uneven)
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), E));
  std::vector<int64_t> order(E);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cnt[a] > cnt[b]; });
  std::vector<std::vector<int64_t>> plan(nt);
  std::vector<int64_t> load(nt, 0);
  for (int64_t e : order) {
    if (cnt[e] == 0) continue;
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    plan[t].push_back(e);
    load[t] += cnt[e];
  }

  Workspace& w = tls_ws;
  auto xs = w.xs.narrow(0, 0, NK), h13 = w.h13.narrow(0, 0, NK);  // [N*K,D], [N*K,2F]
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* xsp = xs.data_ptr<scalar_t>();
  scalar_t* hp = h13.data_ptr<scalar_t>();
  const scalar_t* w13p = W13.data_ptr<scalar_t>();
  const scalar_t* w2p = W2.data_ptr<scalar_t>();
  const int iD = static_cast<int>(D), iF = static_cast<int>(Fh), iF2 = static_cast<int>(2 * Fh);

  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {  // pass 1: gather + up-projection
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t e : plan[t]) {
        const int64_t s = start[e], c = cnt[e];
        for (int64_t r = s; r < s + c; ++r)
          std::memcpy(xsp + r * D, xp + tok[r] * D, sizeof(scalar_t) * D);
        gemm_rm<scalar_t>(static_cast<int>(c), iF2, iD, xsp + s * D, iD, w13p + e * D * 2 * Fh, iF2,
                          hp + s * 2 * Fh, iF2);  // [c,D] @ [D,2F]
      }
  });
  auto h = h13.narrow(1, 0, Fh);  // [N*K,F]: silu(gate) * up, two ATen calls over all rows
  at::silu_(h);
  h.mul_(h13.narrow(1, Fh, Fh));
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {  // pass 2: down-projection
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t e : plan[t]) {
        const int64_t s = start[e], c = cnt[e];
        gemm_rm<scalar_t>(static_cast<int>(c), iD, iF, hp + s * 2 * Fh, iF2, w2p + e * Fh * D, iD,
                          xsp + s * D, iD);  // [c,F] @ [F,D] into the consumed inputs' rows
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
  tls_ws.ensure(std::min(N, chunk) * K, ew.D, 2 * ew.Fh, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "moe_experts", [&] {
    for (int64_t n0 = 0; n0 < N; n0 += chunk)
      run_chunk<scalar_t>(x, wts.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), ew.W13, ew.W2, n0,
                          std::min(N, n0 + chunk), K, counts.data_ptr<int64_t>(), y);
  });
  return std::make_tuple(y, counts);
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
      scalar_t sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t v = std::exp(bv[k] - bv[0]);
        wp[r * K + k] = v;
        sum += v;
      }
      for (int64_t k = 0; k < K; ++k) {
        wp[r * K + k] /= sum;
        ip[r * K + k] = bi[k];
      }
    }
  });
}

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
  tls_ws.ensure(std::min(N, chunk) * K, ew.D, 2 * ew.Fh, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "moe_forward", [&] {
    for (int64_t n0 = 0; n0 < N; n0 += chunk) {
      const int64_t n1 = std::min(N, n0 + chunk);
      const auto logits = at::mm(x.narrow(0, n0, n1 - n0), RwT).contiguous();  // [n,E]
      route_rows<scalar_t>(logits.data_ptr<scalar_t>(), n1 - n0, E, K, idx.data_ptr<int64_t>() + n0 * K,
                           wts.data_ptr<scalar_t>() + n0 * K);
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
