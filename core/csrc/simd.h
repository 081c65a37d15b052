// Vector exp for the compiled CPU kernels (attention softmax, MoE SwiGLU), with AVX-512 and
// AVX2+FMA variants behind function-level targets: the binary still runs on CPUs without them, and
// the callers choose at run time with has_avx512() / has_avx2(). MEDREPORT_NO_AVX512=1 makes
// has_avx512() false, which is how the tests check the AVX2 variants on an AVX-512 machine.
#pragma once

#include <cstdlib>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MEDREPORT_X86 1
#endif

#ifdef MEDREPORT_X86
namespace medreport_simd {

// exp(x) for x <= 0 (scores minus the row max): 2^n * 2^f with n = round(x log2 e), |f| <= 1/2,
// 2^f by its degree-6 Taylor polynomial in f ln 2 (relative error ~2e-7, about float eps); inputs
// below -87 (whose exp underflows to 0 or a denormal) give 0 or a tiny normal, as in a softmax.
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpos_avx2(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 y = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 t = _mm256_mul_ps(_mm256_sub_ps(y, n), _mm256_set1_ps(0.693147180559945309f));  // f ln 2
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// The same with 16 lanes where the CPU has AVX-512.
__attribute__((target("avx512f"))) inline __m512 exp_nonpos_avx512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 t = _mm512_mul_ps(_mm512_sub_ps(y, n), _mm512_set1_ps(0.693147180559945309f));
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

inline bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

inline bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && std::getenv("MEDREPORT_NO_AVX512") == nullptr;
  return ok;
}

}  // namespace medreport_simd
#endif
