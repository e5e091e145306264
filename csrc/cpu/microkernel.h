// Register-tiled GEMM for the CPU attention tiles, and the packing that feeds it.
//
// Why not BLAS: a BLAS call per tile costs a dispatcher-free but still heavy entry (argument
// checks, packing both operands, a nested OpenMP team in MKL builds, since torch turns MKL's
// dynamic threading off). Inside our own parallel region those nested teams oversubscribe the
// cores and spin at their barriers, which on a machine with another busy process made the
// kernels 50-100x slower. Here every operand is packed once per tile by the caller, and the
// product is a 6 x (2 vectors) register tile of FMAs (12 accumulators: fits AVX2's 16 registers;
// AVX-512 builds get 16-wide vectors from the same code), the shape of the classic BLIS kernels.
//
// Layouts. A is addressed as A[r * a_rs + k * a_cs], so a row-major matrix (a_cs = 1) and a
// transposed one (a_rs = 1) are the same call. B is split into column blocks of kPanel
// columns; block c starts at B + c * b_block and its row k at + k * b_ks. For a row-major B,
// b_block = kPanel and b_ks = ldb; for panels packed by pack_panels, b_block = K * kPanel and
// b_ks = kPanel. N must be a multiple of the vector width.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#ifndef CPU_CAPABILITY
#error "the CPU kernels are compiled once per instruction set, named by CPU_CAPABILITY (csrc/isa.h)"
#endif

// Each instruction set's copy has its own symbols (csrc/isa.h), as ATen's at::vec does.
namespace mmkernels::cpu::inline CPU_CAPABILITY {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
constexpr int64_t kLanes = Vec<T>::size();

template <typename T>
constexpr int64_t kPanel = 2 * kLanes<T>;  // columns of one register tile

constexpr int64_t kTileRows = 6;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[r][0 .. NV * lanes) (+)= sum_k A[r * a_rs + k * a_cs] * B[k * b_ks + 0 .. NV * lanes), r < MR.
template <typename T, int MR, int NV, bool kAccumulate>
inline void register_tile(const T* A, int64_t a_rs, int64_t a_cs, const T* B, int64_t b_ks, T* C, int64_t ldc,
                          int64_t K) {
  using V = Vec<T>;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = kAccumulate ? V::loadu(C + r * ldc + v * kLanes<T>) : V(T(0));
  }
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) b[v] = V::loadu(B + k * b_ks + v * kLanes<T>);
    const T* a = A + k * a_cs;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const V ar(a[r * a_rs]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(ar, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v].store(C + r * ldc + v * kLanes<T>);
  }
}

template <typename T, int NV, bool kAccumulate>
inline void register_tile_rows(int64_t mr, const T* A, int64_t a_rs, int64_t a_cs, const T* B, int64_t b_ks, T* C,
                               int64_t ldc, int64_t K) {
  switch (mr) {
    case 6: return register_tile<T, 6, NV, kAccumulate>(A, a_rs, a_cs, B, b_ks, C, ldc, K);
    case 5: return register_tile<T, 5, NV, kAccumulate>(A, a_rs, a_cs, B, b_ks, C, ldc, K);
    case 4: return register_tile<T, 4, NV, kAccumulate>(A, a_rs, a_cs, B, b_ks, C, ldc, K);
    case 3: return register_tile<T, 3, NV, kAccumulate>(A, a_rs, a_cs, B, b_ks, C, ldc, K);
    case 2: return register_tile<T, 2, NV, kAccumulate>(A, a_rs, a_cs, B, b_ks, C, ldc, K);
    default: return register_tile<T, 1, NV, kAccumulate>(A, a_rs, a_cs, B, b_ks, C, ldc, K);
  }
}

// C (M x N, row-major, ldc) = or += A (M x K) B (K x N), with the layouts described above.
template <typename T, bool kAccumulate>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B, int64_t b_block,
          int64_t b_ks, T* C, int64_t ldc) {
  for (int64_t c = 0; c < N; c += kPanel<T>) {
    const T* Bc = B + (c / kPanel<T>) * b_block;
    const bool full = N - c >= kPanel<T>;
    for (int64_t r = 0; r < M; r += kTileRows) {
      const int64_t mr = std::min(kTileRows, M - r);
      if (full) {
        register_tile_rows<T, 2, kAccumulate>(mr, A + r * a_rs, a_rs, a_cs, Bc, b_ks, C + r * ldc + c, ldc, K);
      } else {
        register_tile_rows<T, 1, kAccumulate>(mr, A + r * a_rs, a_rs, a_cs, Bc, b_ks, C + r * ldc + c, ldc, K);
      }
    }
  }
}

// `rows` rows of `width` source elements (row stride `stride`), widened to T and multiplied by
// `scale`, into dst (ld >= width, padding columns zeroed).
template <typename S, typename T>
void pack_rows(const S* src, int64_t stride, int64_t rows, int64_t width, T scale, T* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const S* s = src + r * stride;
    T* d = dst + r * ld;
    if constexpr (std::is_same_v<S, T>) {
      if (scale == T(1)) {
        std::copy(s, s + width, d);
      } else {
        at::vec::map([scale](Vec<T> x) { return x * Vec<T>(scale); }, d, s, width);
      }
    } else {
      for (int64_t c = 0; c < width; ++c) d[c] = scale * static_cast<T>(s[c]);
    }
    std::fill(d + width, d + ld, T(0));
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// A 16 x 16 block of floats, transposed with every step unrolled: 16 loads, 64 shuffles, 16
// stores. (ATen's AVX-512 transpose takes the block's shape at run time and loops over it, which
// made decoding's packing of K cost three times its products.)
inline void transpose_16x16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 16; i += 2) {  // pairs of rows interleaved within each 128-bit lane
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // rows g..g+3: lane L of r[g + c] holds column c + 4 L
    const auto lo = [&](int a, int b) { return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[a]), _mm512_castps_pd(t[b]))); };
    const auto hi = [&](int a, int b) { return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[a]), _mm512_castps_pd(t[b]))); };
    r[g] = lo(g, g + 2), r[g + 1] = hi(g, g + 2), r[g + 2] = lo(g + 1, g + 3), r[g + 3] = hi(g + 1, g + 3);
  }
  for (int c = 0; c < 4; ++c) {  // a 4 x 4 transpose of 128-bit lanes across the row groups
    const __m512 x0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44), x1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
    const __m512 x2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44), x3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
    _mm512_storeu_ps(dst + (c + 0) * ld_dst, _mm512_shuffle_f32x4(x0, x2, 0x88));
    _mm512_storeu_ps(dst + (c + 4) * ld_dst, _mm512_shuffle_f32x4(x0, x2, 0xDD));
    _mm512_storeu_ps(dst + (c + 8) * ld_dst, _mm512_shuffle_f32x4(x1, x3, 0x88));
    _mm512_storeu_ps(dst + (c + 12) * ld_dst, _mm512_shuffle_f32x4(x1, x3, 0xDD));
  }
}
#endif

// Rows of a (rows x width) source, scaled and transposed into panels of kPanel rows: panel p
// holds dst[p * depth * kPanel + c * kPanel + i] = scale * src[(p * kPanel + i) * stride + c],
// zero-padded to `depth` columns and to whole panels: the B operand of "keys . rows^T".
template <typename S, typename T>
void pack_panels(const S* src, int64_t stride, int64_t rows, int64_t width, int64_t depth, T scale, T* dst) {
  constexpr int64_t P = kPanel<T>;
  const int64_t panels = (rows + P - 1) / P;
  // Zero only the padding (columns past width, lanes past rows in the last panel): the copies
  // below write the rest, and zeroing every panel cost a decoding step a tenth of its time.
  for (int64_t p = 0; p < panels && width < depth; ++p) std::fill(dst + (p * depth + width) * P, dst + (p + 1) * depth * P, T(0));
  if (rows % P) {
    T* last = dst + (panels - 1) * depth * P;
    for (int64_t c = 0; c < width; ++c) std::fill(last + c * P + rows % P, last + (c + 1) * P, T(0));
  }
  int64_t j = 0;
  // Whole blocks of one vector width square by register transposes (ATen's; scalar where the ISA
  // has none): element by element, the strided stores of a key tile (decoding packs one per tile)
  // cost more than the product that reads it. The block is the ISA's own width: ATen's AVX-512
  // transposes run any block as a masked 16 x 16 one.
  constexpr int64_t W = kLanes<float>;
  if constexpr (std::is_same_v<S, float> && std::is_same_v<T, float> && P % W == 0) {
    if (scale == T(1)) {
      for (; j + W <= rows; j += W) {
        T* d = dst + (j / P) * depth * P + (j % P);
        int64_t c = 0;
        for (; c + W <= width; c += W) {
#if defined(CPU_CAPABILITY_AVX512)
          static_assert(W == 16);
          transpose_16x16(src + j * stride + c, stride, d + c * P, P);
#else
          at::vec::transpose_mxn<float, W, W>(src + j * stride + c, stride, d + c * P, P);
#endif
        }
        for (; c < width; ++c) {
          for (int64_t i = 0; i < W; ++i) d[c * P + i] = src[(j + i) * stride + c];
        }
      }
    }
  }
  for (; j < rows; ++j) {
    const S* s = src + j * stride;
    T* d = dst + (j / P) * depth * P + (j % P);
    for (int64_t c = 0; c < width; ++c) d[c * P] = scale * static_cast<T>(s[c]);
  }
}

}  // namespace mmkernels::cpu::inline CPU_CAPABILITY
