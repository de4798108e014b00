/* One input row times a block-quantized matrix held split (see quant/linear.py):
 *
 *   y[r] = sum_g scale[r,g] * (q[r,g,:] . x[g,:])  +  sum_g offset[r,g] * sum(x[g,:])
 *
 * q: (rows, groups, S) int8, S = 32 or 16; scale, offset: (rows, groups) float16 or float32
 * (offset may be NULL); x: (groups * S) float32; y: (rows) float32.
 *
 * Each row keeps S running sums (acc[k] += scale_g * (q_k * x_k)) in vector registers, so a
 * weight costs one int8 -> float conversion, a multiply and a multiply-add, and the only
 * horizontal sum is one per row: the loop runs near the memory bandwidth of the int8 values. Rows are split between OpenMP threads (torch's own libgomp, as
 * the library is loaded into a process that has torch).
 *
 * Built at first use by quant/matvec.py with the system C compiler (-O3 -march=native -fopenmp).
 */
#include <stdint.h>
#include <string.h>

typedef _Float16 half;
/* 16-lane vectors in GCC / clang vector extensions: the compiler maps them to the machine's SIMD
 * registers (one AVX-512 register, two AVX2 or four NEON ones). */
typedef float vfloat __attribute__((vector_size(64)));
typedef int8_t vint8 __attribute__((vector_size(16)));

/* 16 int8 values as 16 floats. GCC 12 scalarizes __builtin_convertvector from int8, so x86
 * gets the sign-extend + convert instructions spelled out. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline vfloat load_q(const int8_t *p) {
    return (vfloat)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#elif defined(__AVX2__)
#include <immintrin.h>
static inline vfloat load_q(const int8_t *p) {
    __m256 halves[2] = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))),
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))))};
    vfloat v;
    memcpy(&v, halves, sizeof v);
    return v;
}
#else
static inline vfloat load_q(const int8_t *p) {
    vfloat v;
    for (int k = 0; k < 16; k++) v[k] = (float)p[k];
    return v;
}
#endif

static inline vfloat load_x(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float lanes_sum(vfloat v) {
    float t = 0.0f;
    for (int k = 0; k < 16; k++) t += v[k];
    return t;
}

/* S / 16 vectors of running sums per row; scale multiplies q * x lane by lane. */
#define ROW_KERNEL(NAME, S, FACTOR)                                                             \
    static void NAME(const int8_t *q, const FACTOR *scale, const FACTOR *offset,              \
                     const float *x, const float *xsum, float *y,                              \
                     int64_t rows, int64_t groups, int threads) {                             \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                     \
        for (int64_t r = 0; r < rows; r++) {                                                  \
            const int8_t *qr = q + r * groups * S;                                            \
            const FACTOR *sr = scale + r * groups;                                            \
            vfloat acc0 = {0}, acc1 = {0};                                                    \
            for (int64_t g = 0; g < groups; g++) {                                            \
                const float s = (float)sr[g];                                                 \
                const int8_t *qg = qr + g * S;                                                \
                const float *xg = x + g * S;                                                  \
                acc0 += s * (load_q(qg) * load_x(xg));                                        \
                if (S == 32) acc1 += s * (load_q(qg + 16) * load_x(xg + 16));                 \
            }                                                                                 \
            float total = lanes_sum(acc0 + acc1);                                             \
            if (offset) {                                                                     \
                const FACTOR *orow = offset + r * groups;                                     \
                for (int64_t g = 0; g < groups; g++) total += (float)orow[g] * xsum[g];       \
            }                                                                                 \
            y[r] = total;                                                                     \
        }                                                                                     \
    }

ROW_KERNEL(rows32_f16, 32, half)
ROW_KERNEL(rows32_f32, 32, float)
ROW_KERNEL(rows16_f16, 16, half)
ROW_KERNEL(rows16_f32, 16, float)

/* Returns 0, or -1 for a group size / factor width this file has no kernel for. */
int loraforge_split_matvec(const int8_t *q, const void *scale, const void *offset, int factor_bytes,
                           const float *x, float *y, int64_t rows, int64_t groups, int64_t group_size,
                           int threads) {
    float xsum[groups > 0 ? groups : 1];
    if (offset) {
        for (int64_t g = 0; g < groups; g++) {
            float t = 0.0f;
            for (int64_t k = 0; k < group_size; k++) t += x[g * group_size + k];
            xsum[g] = t;
        }
    }
    if (group_size == 32 && factor_bytes == 2)
        rows32_f16(q, scale, offset, x, xsum, y, rows, groups, threads);
    else if (group_size == 32 && factor_bytes == 4)
        rows32_f32(q, scale, offset, x, xsum, y, rows, groups, threads);
    else if (group_size == 16 && factor_bytes == 2)
        rows16_f16(q, scale, offset, x, xsum, y, rows, groups, threads);
    else if (group_size == 16 && factor_bytes == 4)
        rows16_f32(q, scale, offset, x, xsum, y, rows, groups, threads);
    else
        return -1;
    return 0;
}

/* Decoding into float32 for the training matmuls: out = q * scale (+ offset), the product rounded to
 * float32 before the offset is added, as ggml's reference decoders and torch's mul_ / add_ do, so
 * the result is bit-identical to theirs: no fused multiply-add below this line. */
#if defined(__clang__)
#define NO_FMA _Pragma("clang fp contract(off)")
#else
#pragma GCC optimize("fp-contract=off")
#define NO_FMA
#endif

#define DECODE_KERNEL(NAME, S, FACTOR)                                                          \
    static void NAME(const int8_t *q, const FACTOR *scale, const FACTOR *offset, float *out,      \
                     int64_t n_groups, int threads) {                                           \
        NO_FMA                                                                                  \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                     \
        for (int64_t g = 0; g < n_groups; g++) {                                              \
            const float s = (float)scale[g];                                                  \
            const int8_t *qg = q + g * S;                                                     \
            float *og = out + g * S;                                                          \
            if (offset) {                                                                     \
                const float o = (float)offset[g];                                             \
                for (int k = 0; k < S; k++) og[k] = (float)qg[k] * s + o;                     \
            } else {                                                                          \
                for (int k = 0; k < S; k++) og[k] = (float)qg[k] * s;                         \
            }                                                                                 \
        }                                                                                     \
    }

DECODE_KERNEL(decode32_f16, 32, half)
DECODE_KERNEL(decode32_f32, 32, float)
DECODE_KERNEL(decode16_f16, 16, half)
DECODE_KERNEL(decode16_f32, 16, float)

/* q (n_groups, S) int8, scale / offset (n_groups) -> out (n_groups, S) float32. Returns 0, or -1
 * for a group size / factor width without a kernel. */
int loraforge_split_decode(const int8_t *q, const void *scale, const void *offset, int factor_bytes, float *out,
                           int64_t n_groups, int64_t group_size, int threads) {
    if (group_size == 32 && factor_bytes == 2)
        decode32_f16(q, scale, offset, out, n_groups, threads);
    else if (group_size == 32 && factor_bytes == 4)
        decode32_f32(q, scale, offset, out, n_groups, threads);
    else if (group_size == 16 && factor_bytes == 2)
        decode16_f16(q, scale, offset, out, n_groups, threads);
    else if (group_size == 16 && factor_bytes == 4)
        decode16_f32(q, scale, offset, out, n_groups, threads);
    else
        return -1;
    return 0;
}
