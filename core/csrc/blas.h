// The BLAS that libtorch_cpu carries (MKL on x86 wheels; OpenBLAS elsewhere), called directly by the
// compiled kernels: at::mm's fixed cost (~3-5 us of tensor bookkeeping per call) is most of the
// small GEMMs they run (a 2-row expert GEMM, a 64-row attention block). Fortran interface,
// column-major, LP64.
#pragma once

#include <type_traits>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*);
}

namespace medreport_blas {

// Column-major C[m,n] = alpha * op(A) op(B) + beta * C.
template <typename scalar_t>
inline void gemm(char ta, char tb, int m, int n, int k, scalar_t alpha, const scalar_t* A, int lda,
                 const scalar_t* B, int ldb, scalar_t beta, scalar_t* C, int ldc) {
  if constexpr (std::is_same_v<scalar_t, float>)
    sgemm_(&ta, &tb, &m, &n, &k, &alpha, A, &lda, B, &ldb, &beta, C, &ldc);
  else
    dgemm_(&ta, &tb, &m, &n, &k, &alpha, A, &lda, B, &ldb, &beta, C, &ldc);
}

}  // namespace medreport_blas
