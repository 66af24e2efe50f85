/* Batch-invariant linear layers on the CPU: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
 *
 * Built and loaded by prompt_core/kernels.py (gcc -O3 -march=native -fopenmp, cached per machine); used by
 * prompt_core/invariant.py.
 *
 * Invariance by construction: every output element is one chain of fused multiply-adds over k = 0 .. K-1 in order,
 * starting from zero, then the bias added once (and, for bf16, one rounding at the end). The blocking only decides
 * which elements are computed together (ROWS rows by LANES columns in registers, columns split across threads),
 * never the order of an element's sum, so a row gets the same bits in a call of one row or of a thousand, wherever
 * it sits in the call, and whatever the other rows hold. A missing row of the last tile repeats a real row and is
 * not stored.
 *
 * Layouts (elements, row-major):
 *   x     [M, K] float32, row stride xs (bf16 activations are widened by the caller, exactly)
 *   pack  [P, K, LANES] the weight [N, K] cut into P = ceil(N / LANES) panels of LANES output columns, each stored
 *         k-major so a panel streams in order; columns past N are zero.  float32 or bf16 (row_linear.pack)
 *   bias  [N] float32 or NULL
 *   out   [M, N] float32 or bf16, row stride os
 * `threads` splits the panels (torch's thread count, passed by the caller: OpenMP's default is per thread).
 */
#include <stdint.h>
#include <string.h>

#define LANES 16        /* output columns per panel (the pack's layout: the same on every machine) */
#if defined(__AVX512F__)
#define VL 16           /* floats per native vector */
#define ROWS 8          /* rows per register tile: ROWS x LANES accumulators */
#else
#define VL 8
#define ROWS 6
#endif
#define NV (LANES / VL)
#define MBLOCK 240      /* rows whose activations stay in cache while every panel passes over them */

typedef float vf __attribute__((vector_size(VL * 4)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));
typedef uint16_t vh __attribute__((vector_size(VL * 2)));

static inline vf splat(float x) {  /* a broadcast ((vf){0} + x would add a zero: an instruction of its own) */
#if VL == 16
    return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
#else
    return (vf){x, x, x, x, x, x, x, x};
#endif
}

static inline vf load_f32(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }

static inline vf load_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* One register tile: R rows by one panel. Every row runs the same statement, so each element is the same chain of
 * multiply-adds whichever slot of the tile its row has, and whichever R (ROWS, or 1 for a row on its own: reading
 * the weights with a sixth of the multiplies). */
#define TILE(NAME, WTYPE, LOADW, R)                                                                               \
    static inline void NAME(const float *const xr[ROWS], const WTYPE *panel, int32_t K, float out[ROWS][LANES]) { \
        vf acc[R][NV];                                                                                           \
        _Pragma("GCC unroll 16") for (int i = 0; i < R; i++)                                                     \
            _Pragma("GCC unroll 4") for (int j = 0; j < NV; j++) acc[i][j] = splat(0.0f);                       \
        _Pragma("GCC unroll 4") for (int32_t k = 0; k < K; k++) {                                              \
            vf w[NV];                                                                                            \
            _Pragma("GCC unroll 4") for (int j = 0; j < NV; j++) w[j] = LOADW(panel + (int64_t)k * LANES + j * VL); \
            _Pragma("GCC unroll 16") for (int i = 0; i < R; i++) {                                               \
                const vf xi = splat(xr[i][k]);                                                                   \
                _Pragma("GCC unroll 4") for (int j = 0; j < NV; j++) acc[i][j] += xi * w[j];                    \
            }                                                                                                    \
        }                                                                                                        \
        _Pragma("GCC unroll 16") for (int i = 0; i < R; i++)                                                     \
            _Pragma("GCC unroll 4") for (int j = 0; j < NV; j++) memcpy(&out[i][j * VL], &acc[i][j], sizeof(vf)); \
    }

TILE(tile_f32, float, load_f32, ROWS)
TILE(tile_bf16, uint16_t, load_bf16, ROWS)
TILE(tile1_f32, float, load_f32, 1)
TILE(tile1_bf16, uint16_t, load_bf16, 1)

#define STORE_F32(ptr, v) (*(ptr) = (v))
#define STORE_BF16(ptr, v) (*(ptr) = f32_to_bf16(v))

#define DEFINE_LINEAR(NAME, WTYPE, OTYPE, TILEFN, TILE1FN, STORE)                                                      \
    void NAME(const float *x, int64_t xs, const WTYPE *pack, const float *bias, OTYPE *out, int64_t os,         \
              int32_t M, int32_t N, int32_t K, int32_t threads) {                                               \
        const int32_t P = (N + LANES - 1) / LANES;                                                               \
        for (int32_t m0 = 0; m0 < M; m0 += MBLOCK) {                                                             \
            const int32_t m1 = m0 + MBLOCK < M ? m0 + MBLOCK : M;                                                \
            _Pragma("omp parallel for schedule(static) num_threads(threads)")                                    \
            for (int32_t p = 0; p < P; p++) {                                                                    \
                const WTYPE *panel = pack + (int64_t)p * K * LANES;                                              \
                const int32_t n0 = p * LANES, width = N - n0 < LANES ? N - n0 : LANES;                           \
                for (int32_t r = m0; r < m1; r += ROWS) {                                                        \
                    const float *xr[ROWS];                                                                       \
                    for (int32_t i = 0; i < ROWS; i++) xr[i] = x + (int64_t)(r + i < m1 ? r + i : m1 - 1) * xs;  \
                    float acc[ROWS][LANES];                                                                      \
                    if (m1 - r == 1) TILE1FN(xr, panel, K, acc);                                                 \
                    else TILEFN(xr, panel, K, acc);                                                              \
                    for (int32_t i = 0; i < ROWS && r + i < m1; i++) {                                           \
                        OTYPE *o = out + (int64_t)(r + i) * os + n0;                                             \
                        for (int32_t l = 0; l < width; l++)                                                      \
                            STORE(o + l, bias ? acc[i][l] + bias[n0 + l] : acc[i][l]);                           \
                    }                                                                                            \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
    }

DEFINE_LINEAR(row_linear_f32, float, float, tile_f32, tile1_f32, STORE_F32)
DEFINE_LINEAR(row_linear_bf16, uint16_t, uint16_t, tile_bf16, tile1_bf16, STORE_BF16)

int32_t row_linear_abi(void) { return 1; }
