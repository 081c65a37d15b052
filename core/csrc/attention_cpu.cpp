// Block-sparse attention forward on CPU (inference): all branches of core/attention.py in one pass.
//
// One task per (batch*head row, group of c/b query blocks). For each branch the task forms the
// blocks' scores against the branch's key ranges with direct BLAS calls (the keys are read in
// place: the local window and the global blocks, the visible compressed summaries, the selected raw
// blocks), takes one softmax per row, folds the branch's gate into the probabilities and adds
// P @ V straight into the output rows (beta = 1 after the first branch). Nothing is gathered or
// copied, and no score matrix outlives its call (at most c query rows x a few hundred keys).
//
// Against the PyTorch path (one flash-kernel call per chunk and branch, then merging and gating as
// separate passes) it removes the per-call framework cost, the log-sum-exp merge of the global
// keys, the gather of the selected blocks and the gating passes over the output.
//
// The selection itself (top-k compressed blocks per query block, softmaxed over candidates and
// summed over heads) is computed by the caller (core/attention.py) and passed in as indices.
//
// Inference only (no autograd), float32 / float64. The float32 softmax has AVX-512 and AVX2+FMA
// paths chosen at run time (function-level targets, so the binary still runs on CPUs without them;
// MEDREPORT_NO_AVX512=1 forces the AVX2 path, which is how the tests check both on one machine).
//
// Legend: BH batch*heads, T tokens, d head dim, b block size, C compressed blocks of c tokens,
// Q selecting query blocks, K top-k, G gate columns (branches).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "blas.h"
#include "simd.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using medreport_blas::gemm;
#ifdef MEDREPORT_X86
using namespace medreport_simd;
#endif

// ---------------------------------------------------------------------------------- row softmax
// row[0:valid) <- gate * softmax(row[0:valid)), row[valid:L) <- 0. valid >= 1.

template <typename scalar_t>
void softmax_row_scalar(scalar_t* row, int valid, int L, scalar_t gate) {
  scalar_t m = row[0];
  for (int j = 1; j < valid; ++j) m = row[j] > m ? row[j] : m;
  scalar_t sum = 0;
  for (int j = 0; j < valid; ++j) {
    row[j] = std::exp(row[j] - m);
    sum += row[j];
  }
  const scalar_t f = gate / sum;
  for (int j = 0; j < valid; ++j) row[j] *= f;
  for (int j = valid; j < L; ++j) row[j] = 0;
}

#ifdef MEDREPORT_X86
__attribute__((target("avx2,fma"))) inline float hmax(__m256 v) {
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  a = _mm_max_ss(a, _mm_shuffle_ps(a, a, 1));
  return _mm_cvtss_f32(a);
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_shuffle_ps(a, a, 1));
  return _mm_cvtss_f32(a);
}

__attribute__((target("avx2,fma"))) void softmax_row_avx2(float* row, int valid, int L, float gate) {
  const int v8 = valid & ~7;
  __m256 mv = _mm256_set1_ps(-INFINITY);
  int j = 0;
  for (; j < v8; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(row + j));
  float m = hmax(mv);
  for (; j < valid; ++j) m = row[j] > m ? row[j] : m;
  const __m256 mb = _mm256_set1_ps(m);
  __m256 sv = _mm256_setzero_ps();
  for (j = 0; j < v8; j += 8) {
    const __m256 e = exp_nonpos_avx2(_mm256_sub_ps(_mm256_loadu_ps(row + j), mb));
    _mm256_storeu_ps(row + j, e);
    sv = _mm256_add_ps(sv, e);
  }
  float sum = hsum(sv);
  for (; j < valid; ++j) {
    row[j] = std::exp(row[j] - m);
    sum += row[j];
  }
  const float f = gate / sum;
  const __m256 fb = _mm256_set1_ps(f);
  for (j = 0; j < v8; j += 8) _mm256_storeu_ps(row + j, _mm256_mul_ps(_mm256_loadu_ps(row + j), fb));
  for (; j < valid; ++j) row[j] *= f;
  for (j = valid; j < L; ++j) row[j] = 0.f;
}

// The same with 16 lanes where the CPU has AVX-512 (the exp polynomial and the passes over the row
// are most of the softmax's cost, and the softmax ~a fifth of a block's time).
__attribute__((target("avx512f"))) void softmax_row_avx512(float* row, int valid, int L, float gate) {
  const int v16 = valid & ~15;
  __m512 mv = _mm512_set1_ps(-INFINITY);
  int j = 0;
  for (; j < v16; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(row + j));
  float m = _mm512_reduce_max_ps(mv);
  for (; j < valid; ++j) m = row[j] > m ? row[j] : m;
  const __m512 mb = _mm512_set1_ps(m);
  __m512 sv = _mm512_setzero_ps();
  for (j = 0; j < v16; j += 16) {
    const __m512 e = exp_nonpos_avx512(_mm512_sub_ps(_mm512_loadu_ps(row + j), mb));
    _mm512_storeu_ps(row + j, e);
    sv = _mm512_add_ps(sv, e);
  }
  float sum = _mm512_reduce_add_ps(sv);
  for (; j < valid; ++j) {
    row[j] = std::exp(row[j] - m);
    sum += row[j];
  }
  const float f = gate / sum;
  const __m512 fb = _mm512_set1_ps(f);
  for (j = 0; j < v16; j += 16) _mm512_storeu_ps(row + j, _mm512_mul_ps(_mm512_loadu_ps(row + j), fb));
  for (; j < valid; ++j) row[j] *= f;
  for (j = valid; j < L; ++j) row[j] = 0.f;
}

#endif

template <typename scalar_t>
inline void softmax_row(scalar_t* row, int valid, int L, scalar_t gate) {
#ifdef MEDREPORT_X86
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (has_avx512()) return softmax_row_avx512(row, valid, L, gate);
    if (has_avx2()) return softmax_row_avx2(row, valid, L, gate);
  }
#endif
  softmax_row_scalar(row, valid, L, gate);
}

// ---------------------------------------------------------------------------------- one block

template <typename scalar_t>
struct KeyRange {
  const scalar_t* k;
  const scalar_t* v;
  int n;
};

// One branch of lq consecutive query rows: S = scale * Q K^T over the ranges (the last lq keys causal when
// `causal`), row softmax times the rows' gate, O (+)= P V. Q [lq, d] and O [lq, d] row-major with
// row stride d; S is a [lq, L] row-major scratch (= column-major S^T [L, lq]).
template <typename scalar_t>
void attend(const scalar_t* Q, scalar_t* O, int lq, int d, const KeyRange<scalar_t>* ranges, int nr, bool causal,
            scalar_t scale, const scalar_t* gate, int64_t gate_stride, bool accumulate, std::vector<scalar_t>& S) {
  int L = 0;
  for (int r = 0; r < nr; ++r) L += ranges[r].n;
  if (static_cast<int64_t>(S.size()) < static_cast<int64_t>(L) * lq) S.resize(static_cast<size_t>(L) * lq);
  scalar_t* s = S.data();
  // S^T[l0:l0+n, :] = K_r [n,d] Q^T: column-major (n x lq) = (K_r as d x n)^T (Q as d x lq)
  for (int r = 0, l0 = 0; r < nr; l0 += ranges[r].n, ++r)
    gemm<scalar_t>('T', 'N', ranges[r].n, lq, d, scale, ranges[r].k, d, Q, d, scalar_t(0), s + l0, L);
  for (int i = 0; i < lq; ++i)
    softmax_row<scalar_t>(s + static_cast<int64_t>(i) * L, causal ? L - lq + i + 1 : L, L,
                          gate ? gate[i * gate_stride] : scalar_t(1));
  // O^T [d, lq] (+)= sum_r V_r^T [d, n] P_r^T [n, lq]
  for (int r = 0, l0 = 0; r < nr; l0 += ranges[r].n, ++r) {
    const scalar_t beta = (accumulate || r > 0) ? scalar_t(1) : scalar_t(0);
    gemm<scalar_t>('N', 'N', d, lq, ranges[r].n, scalar_t(1), ranges[r].v, d, s + l0, L, beta, O, d);
  }
}

enum Branch : int64_t { LOCAL = 0, COMPRESSED = 1, SELECTED = 2 };

template <typename scalar_t>
void bsa_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* cmp_k,
                const at::Tensor* cmp_v, const at::Tensor* sel_idx, const at::Tensor* sel_ok, const at::Tensor* gates,
                int64_t H, int64_t b, int64_t w, int64_t g, int64_t c, const std::vector<int64_t>& branches, double scale_d,
                at::Tensor& o) {
  const int64_t BH = q.size(0), T = q.size(1), d = q.size(2);
  const int64_t N = (T + b - 1) / b;  // query blocks (the last may be partial)
  const int64_t C = cmp_k ? cmp_k->size(1) : (sel_idx ? T / c : 0);
  const int64_t i_first = c / b;  // first block with a complete compressed block behind it
  const int64_t Qs = sel_idx ? sel_idx->size(1) : 0, K = sel_idx ? sel_idx->size(2) : 0;
  const int64_t G = gates ? gates->size(2) : 0;
  const scalar_t scale = static_cast<scalar_t>(scale_d);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const scalar_t* ckp = cmp_k ? cmp_k->data_ptr<scalar_t>() : nullptr;
  const scalar_t* cvp = cmp_v ? cmp_v->data_ptr<scalar_t>() : nullptr;
  const int64_t* sip = sel_idx ? sel_idx->data_ptr<int64_t>() : nullptr;
  const bool* sop = sel_ok ? sel_ok->data_ptr<bool>() : nullptr;
  const scalar_t* gp = gates ? gates->data_ptr<scalar_t>() : nullptr;
  scalar_t* op = o.data_ptr<scalar_t>();
  // One task per (row, group of c/b query blocks): the blocks of a group see the same compressed
  // summaries (their count changes only at multiples of c), so the group's compressed branch is one
  // call on all its rows (c rows against the summaries: bigger GEMMs than one per 64-row block);
  // consecutive blocks of a group that selected the same raw blocks share one call the same way.
  const int64_t gb = c / b, NG = (N + gb - 1) / gb;
  const int64_t tasks = BH * NG;
  // dynamic schedule: a group's cost grows with its position (compressed summaries visible), so a
  // static split of the task range would leave one core idle at the end
  std::atomic<int64_t> next{0};
  const int64_t grab = std::max<int64_t>(1, 8 / gb);
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (tasks + grab - 1) / grab));
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    std::vector<scalar_t> S;
    std::vector<KeyRange<scalar_t>> ranges(static_cast<size_t>(std::max<int64_t>(2, K)));
    std::vector<char> written(static_cast<size_t>(gb));
    for (int64_t t0 = next.fetch_add(grab); t0 < tasks; t0 = next.fetch_add(grab)) {
      for (int64_t t = t0; t < std::min(tasks, t0 + grab); ++t) {
        const int64_t bh = t / NG, bn = bh / H, i0 = (t % NG) * gb, i1 = std::min(N, i0 + gb);
        const scalar_t* krow = kp + bh * T * d;
        const scalar_t* vrow = vp + bh * T * d;
        std::fill(written.begin(), written.end(), 0);
        auto rows = [&](int64_t ia, int64_t ib) { return std::min(T, ib * b) - ia * b; };
        // blocks ia..ib-1 are about to get one call: whether it adds to their rows (beta 1) or
        // writes them (beta 0); unwritten blocks among written ones are zeroed first
        auto accumulate = [&](int64_t ia, int64_t ib) {
          bool any = false, all = true;
          for (int64_t i = ia; i < ib; ++i) {
            if (written[i - i0]) any = true;
            else all = false;
          }
          if (any && !all)
            for (int64_t i = ia; i < ib; ++i)
              if (!written[i - i0]) std::memset(op + (bh * T + i * b) * d, 0, sizeof(scalar_t) * rows(i, i + 1) * d);
          for (int64_t i = ia; i < ib; ++i) written[i - i0] = 1;
          return any;
        };
        auto call = [&](int64_t ia, int64_t ib, int nr, bool causal, size_t n) {
          const int64_t r0 = ia * b;
          const scalar_t* gate = gp ? gp + (bh * T + r0) * G + static_cast<int64_t>(n) : nullptr;
          const bool acc = accumulate(ia, ib);
          attend<scalar_t>(qp + (bh * T + r0) * d, op + (bh * T + r0) * d, static_cast<int>(rows(ia, ib)), static_cast<int>(d),
                           ranges.data(), nr, causal, scale, gate, G, acc, S);
        };
        // the selected raw blocks of query block i as key ranges -> their count
        auto selection = [&](int64_t i) {
          int nr = 0;
          const int64_t a = i - i_first;
          if (C == 0 || a < 0 || a >= Qs) return nr;
          for (int64_t kk = 0; kk < K; ++kk) {
            const int64_t off = (bn * Qs + a) * K + kk;
            if (!sop[off]) continue;
            const int64_t j = sip[off];
            TORCH_CHECK(j >= 0 && (j + 1) * c <= i * b, "bsa_forward: selected block ", j, " is not before query block ", i);
            ranges[nr++] = {krow + j * c * d, vrow + j * c * d, static_cast<int>(c)};
          }
          return nr;
        };
        auto same_selection = [&](int64_t i, int64_t i2) {
          const int64_t a = i - i_first, a2 = i2 - i_first;
          if (a < 0 || a2 >= Qs) return false;
          for (int64_t kk = 0; kk < K; ++kk) {
            const int64_t o1 = (bn * Qs + a) * K + kk, o2 = (bn * Qs + a2) * K + kk;
            if (sop[o1] != sop[o2] || (sop[o1] && sip[o1] != sip[o2])) return false;
          }
          return true;
        };
        for (size_t n = 0; n < branches.size(); ++n) {
          if (branches[n] == LOCAL) {
            for (int64_t i = i0; i < i1; ++i) {
              const int64_t r0 = i * b, lq = rows(i, i + 1), ws = std::max<int64_t>(0, i - w) * b;  // window start
              int nr = 0;
              if (ws <= g * b) {  // global and window keys together are the prefix up to the own rows
                ranges[nr++] = {krow, vrow, static_cast<int>(r0 + lq)};
              } else {
                if (g > 0) ranges[nr++] = {krow, vrow, static_cast<int>(g * b)};
                ranges[nr++] = {krow + ws * d, vrow + ws * d, static_cast<int>(r0 + lq - ws)};
              }
              call(i, i + 1, nr, true, n);
            }
          } else if (branches[n] == COMPRESSED) {
            const int64_t nvis = std::min<int64_t>(C, i0 * b / c);  // summaries ending at or before the group start
            if (nvis == 0) continue;  // rows without keys in a branch get nothing from it (as in the PyTorch path)
            ranges[0] = {ckp + bh * C * d, cvp + bh * C * d, static_cast<int>(nvis)};
            call(i0, i1, 1, false, n);
          } else {  // SELECTED: runs of consecutive blocks with the same selection
            for (int64_t i = i0; i < i1;) {
              int64_t e = i + 1;
              while (e < i1 && same_selection(i, e)) ++e;
              const int nr = selection(i);
              if (nr > 0) call(i, e, nr, false, n);
              i = e;
            }
          }
        }
        for (int64_t i = i0; i < i1; ++i)
          if (!written[i - i0]) std::memset(op + (bh * T + i * b) * d, 0, sizeof(scalar_t) * rows(i, i + 1) * d);
      }
    }
  });
}

const at::Tensor* opt(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

at::Tensor bsa_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& cmp_k,
                       const c10::optional<at::Tensor>& cmp_v, const c10::optional<at::Tensor>& sel_idx,
                       const c10::optional<at::Tensor>& sel_ok, const c10::optional<at::Tensor>& gates, int64_t n_heads,
                       int64_t block, int64_t window, int64_t global_blocks, int64_t compress, std::vector<int64_t> branches,
                       double scale) {
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.sizes() == q.sizes(), "bsa_forward: q, k, v must be [BH, T, d] alike");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, "bsa_forward: float32 or float64 only");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "bsa_forward: q, k, v dtypes differ");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "bsa_forward: q, k, v must be contiguous");
  TORCH_CHECK(block > 0 && compress > 0 && compress % block == 0 && window >= 0 && global_blocks >= 0,
              "bsa_forward: bad block geometry");
  TORCH_CHECK(n_heads > 0 && q.size(0) % n_heads == 0, "bsa_forward: BH must be a multiple of n_heads");
  TORCH_CHECK(!branches.empty(), "bsa_forward: no branch");
  const int64_t BH = q.size(0), T = q.size(1), d = q.size(2), B = BH / n_heads, N = (T + block - 1) / block;
  bool uses_cmp = false, uses_sel = false;
  for (auto br : branches) {
    TORCH_CHECK(br >= 0 && br <= 2, "bsa_forward: branch ids are 0 local, 1 compressed, 2 selected");
    uses_cmp |= br == COMPRESSED;
    uses_sel |= br == SELECTED;
  }
  const at::Tensor *ck = opt(cmp_k), *cv = opt(cmp_v), *si = opt(sel_idx), *so = opt(sel_ok), *gt = opt(gates);
  if (uses_cmp && T >= compress) {
    TORCH_CHECK(ck && cv, "bsa_forward: the compressed branch needs cmp_k and cmp_v");
    TORCH_CHECK(ck->dim() == 3 && ck->size(0) == BH && ck->size(1) == T / compress && ck->size(2) == d && cv->sizes() == ck->sizes() &&
                    ck->is_contiguous() && cv->is_contiguous() && ck->scalar_type() == q.scalar_type() &&
                    cv->scalar_type() == q.scalar_type(),
                "bsa_forward: cmp_k/cmp_v must be contiguous [BH, T // compress, d] of q's dtype");
  } else {
    ck = cv = nullptr;
  }
  if (uses_sel && si) {
    TORCH_CHECK(so && si->dim() == 3 && si->size(0) == B && so->sizes() == si->sizes() && si->scalar_type() == at::kLong &&
                    so->scalar_type() == at::kBool && si->is_contiguous() && so->is_contiguous(),
                "bsa_forward: sel_idx (int64) and sel_ok (bool) must be contiguous [B, Q, K]");
    TORCH_CHECK(si->size(1) <= std::max<int64_t>(0, N - compress / block), "bsa_forward: sel_idx has more query blocks than T allows");
  } else {
    si = so = nullptr;
  }
  if (branches.size() > 1) {
    TORCH_CHECK(gt && gt->dim() == 3 && gt->size(0) == BH && gt->size(1) == T && gt->size(2) == static_cast<int64_t>(branches.size()) &&
                    gt->is_contiguous() && gt->scalar_type() == q.scalar_type(),
                "bsa_forward: with several branches, gates must be contiguous [BH, T, n_branches] of q's dtype");
  } else {
    gt = nullptr;
  }
  TORCH_CHECK(T < (int64_t(1) << 31) / std::max<int64_t>(1, d), "bsa_forward: sequence too long for 32-bit BLAS indices");
  auto o = at::empty_like(q);
  if (T == 0) return o;
  if (q.scalar_type() == at::kFloat)
    bsa_kernel<float>(q, k, v, ck, cv, si, so, gt, n_heads, block, window, global_blocks, compress, branches, scale, o);
  else
    bsa_kernel<double>(q, k, v, ck, cv, si, so, gt, n_heads, block, window, global_blocks, compress, branches, scale, o);
  return o;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(medreport, m) {
  m.def("bsa_forward(Tensor q, Tensor k, Tensor v, Tensor? cmp_k, Tensor? cmp_v, Tensor? sel_idx, Tensor? sel_ok, "
        "Tensor? gates, int n_heads, int block, int window, int global_blocks, int compress, int[] branches, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(medreport, CPU, m) { m.impl("bsa_forward", &bsa_forward); }
