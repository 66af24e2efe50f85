/* Paged attention on the CPU: every query reads its own sequence's key/value blocks in place, with grouped-query
 * heads sharing each key/value read (no copy per query head).
 *
 * Built and loaded by server/engine/attention.py (gcc -O3 -march=native -fopenmp, cached per machine).
 *
 * Batch invariance by construction: each (query token, kv head) is computed by the same sequence of floating
 * point operations whatever else is in the step. Its visible keys are visited block by block in slot order
 * (blocks of B slots at fixed logical offsets 0, B, 2B, ...), with an online softmax rescaled once per block; every
 * reduction runs over fixed-width lanes in a fixed order. A query in a prefill chunk, in a decode step of one row or
 * of sixty-four, or recomputed after a preemption, gives the same bits.
 *
 * Layouts (elements, row-major):
 *   q, out      [T, Hq, D]       token and head strides given (q may be a transposed view)
 *   key pool    [NB, Hkv, D, B]  one layer's blocks, each block's keys transposed (slots along the fast axis)
 *   value pool  [NB, Hkv, B, D]
 *   block_table [S, W]           the physical block of each sequence's logical block
 * Per query t: seq (its row of block_table), slot (its own slot), pos (its position), ctx_end, seg_start.
 * Visible: slots [0, ctx_end) and [seg_start, slot]; with a window w > 0 a key is hidden once its position is w or
 * more behind the query's (a context slot holds position == slot, a segment slot position pos - (slot - s)).
 * B must be a multiple of LANES.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));
typedef uint32_t vu __attribute__((vector_size(LANES * 4)));
typedef uint16_t vh __attribute__((vector_size(LANES * 2)));

static inline vf splat(float x) {  /* a broadcast ((vf){0} + x would add a zero: an instruction of its own) */
    return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
}

static inline vf select_f(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

static inline vf load_f32(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }

static inline vf load_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = ((uint32_t)x) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* exp(x) for x <= 0, all lanes at once (Cephes-style polynomial after x = n ln2 + r) */
static inline vf exp_neg(vf x) {
    x = select_f(x < splat(-87.0f), splat(-87.0f), x);
    const vf magic = splat(12582912.0f);              /* 1.5 * 2^23: adding it rounds to an integer */
    vf n = (x * splat(1.44269504088896341f) + magic) - magic;
    vf r = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
    vf p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)e;
}

static inline vf tanh_v(vf x) {
    vi neg = x < splat(0.0f);
    vf a = select_f(neg, -x, x);
    vf e = exp_neg(splat(-2.0f) * a);
    vf t = (splat(1.0f) - e) / (splat(1.0f) + e);
    return select_f(neg, -t, t);
}

static inline float hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < LANES; i++) m = v[i] > m ? v[i] : m;
    return m;
}

static inline float hsum(vf v) {  /* a fixed pairwise tree */
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int i = 0; i < w; i++) v[i] += v[i + w];
    return v[0];
}

typedef struct {
    int32_t T, Hq, Hkv, D, B, W;    /* queries, heads, kv heads, head dim, block size, table width */
    int64_t q_st, q_sh, o_st, o_sh; /* strides of q and out (token, head), in elements */
    int32_t window;                 /* 0: none */
    float scale, softcap;           /* softcap 0: none */
} attn_dims;

#define DEFINE_KERNEL(NAME, TYPE, LOADV, LOAD1, STORE1)                                                            \
    static void NAME##_one(const attn_dims *d, const TYPE *q, const TYPE *kp, const TYPE *vp, TYPE *out,         \
                           int32_t t, int32_t h, int32_t s, int32_t me, int32_t p, int32_t ce, int32_t ss,         \
                           const int32_t *table, float *buf) {                                                     \
        const int32_t G = d->Hq / d->Hkv, D = d->D, B = d->B, NL = B / LANES;                                      \
        float *qf = buf, *acc = qf + G * D, *m = acc + G * D, *l = m + G;                                          \
        vf *sc = (vf *)(((uintptr_t)(l + G) + 63) & ~(uintptr_t)63); /* [G][NL] scores of one block */            \
        for (int g = 0; g < G; g++) {                                                                              \
            const TYPE *qg = q + (int64_t)t * d->q_st + (int64_t)(h * G + g) * d->q_sh;                           \
            for (int i = 0; i < D; i++) qf[g * D + i] = LOAD1(qg, i) * d->scale;                                   \
            memset(acc + g * D, 0, sizeof(float) * D);                                                             \
            m[g] = -INFINITY;                                                                                      \
            l[g] = 0.0f;                                                                                           \
        }                                                                                                          \
        int32_t lo_ctx = 0, lo_seg = ss;                                                                           \
        if (d->window > 0) {                                                                                       \
            if (p - d->window + 1 > lo_ctx) lo_ctx = p - d->window + 1;                                            \
            if (me - d->window + 1 > lo_seg) lo_seg = me - d->window + 1;                                          \
        }                                                                                                          \
        int32_t first = ce > lo_ctx ? lo_ctx : lo_seg;                                                             \
        if (first < 0) first = 0;                                                                                  \
        vi lane;                                                                                                   \
        for (int i = 0; i < LANES; i++) lane[i] = i;                                                               \
        for (int32_t j = first / B; j * B <= me; j++) {                                                            \
            const int64_t blk = table[j];                                                                          \
            const TYPE *kb = kp + (blk * d->Hkv + h) * (int64_t)D * B;   /* [D, B] */                              \
            const TYPE *vb = vp + (blk * d->Hkv + h) * (int64_t)B * D;   /* [B, D] */                              \
            vi vis[NL > 0 ? NL : 1];                                                                               \
            int any = 0;                                                                                           \
            for (int c = 0; c < NL; c++) {                                                                         \
                vi k = lane + (j * B + c * LANES);                                                                 \
                vis[c] = ((k >= lo_ctx) & (k < ce)) | ((k >= lo_seg) & (k <= me));                                 \
                for (int i = 0; i < LANES; i++) any |= vis[c][i];                                                  \
            }                                                                                                      \
            if (!any) continue;                                                                                    \
            for (int c = 0; c < NL; c++) {                                                                         \
                for (int g = 0; g < G; g++) sc[g * NL + c] = splat(0.0f);                                          \
                for (int i = 0; i < D; i++) {                                                                      \
                    const vf kv = LOADV(kb + (int64_t)i * B + c * LANES);                                          \
                    for (int g = 0; g < G; g++) sc[g * NL + c] += splat(qf[g * D + i]) * kv;                      \
                }                                                                                                  \
            }                                                                                                      \
            for (int g = 0; g < G; g++) {                                                                          \
                float mb = -INFINITY;                                                                              \
                for (int c = 0; c < NL; c++) {                                                                     \
                    vf x = sc[g * NL + c];                                                                         \
                    if (d->softcap > 0) x = splat(d->softcap) * tanh_v(x / splat(d->softcap));                     \
                    x = select_f(vis[c], x, splat(-INFINITY));                                                     \
                    sc[g * NL + c] = x;                                                                            \
                    const float cm = hmax(x);                                                                      \
                    mb = cm > mb ? cm : mb;                                                                        \
                }                                                                                                  \
                const float mn = mb > m[g] ? mb : m[g];                                                            \
                const float alpha = m[g] == -INFINITY ? 0.0f : exp_neg(splat(m[g] - mn))[0];                       \
                vf sum = splat(0.0f);                                                                              \
                for (int c = 0; c < NL; c++) {                                                                     \
                    vf e = (vf)((vi)exp_neg(sc[g * NL + c] - splat(mn)) & vis[c]);                                 \
                    sc[g * NL + c] = e;                                                                            \
                    sum += e;                                                                                      \
                }                                                                                                  \
                l[g] = l[g] * alpha + hsum(sum);                                                                   \
                m[g] = mn;                                                                                         \
                float *ag = acc + g * D;                                                                           \
                for (int i = 0; i < D; i++) ag[i] *= alpha;                                                        \
            }                                                                                                      \
            for (int c = 0; c < NL; c++)                                                                           \
                for (int b = 0; b < LANES; b++) {                                                                  \
                    if (!vis[c][b]) continue;                                                                      \
                    const TYPE *vrow = vb + (int64_t)(c * LANES + b) * D;                                          \
                    for (int g = 0; g < G; g++) {                                                                  \
                        const float w = sc[g * NL + c][b];                                                         \
                        float *ag = acc + g * D;                                                                   \
                        for (int i = 0; i < D; i++) ag[i] += w * LOAD1(vrow, i);                                   \
                    }                                                                                              \
                }                                                                                                  \
        }                                                                                                          \
        for (int g = 0; g < G; g++) {                                                                              \
            TYPE *og = out + (int64_t)t * d->o_st + (int64_t)(h * G + g) * d->o_sh;                               \
            const float inv = l[g] > 0 ? 1.0f / l[g] : 0.0f;                                                       \
            for (int i = 0; i < D; i++) STORE1(og, i, acc[g * D + i] * inv);                                       \
        }                                                                                                          \
    }                                                                                                              \
    void NAME(const attn_dims *d, const TYPE *q, const TYPE *kp, const TYPE *vp, TYPE *out, const int32_t *seq,   \
              const int32_t *slot, const int32_t *pos, const int32_t *ctx_end, const int32_t *seg_start,           \
              const int32_t *block_table) {                                                                        \
        const int64_t pairs = (int64_t)d->T * d->Hkv;                                                              \
        const int32_t G = d->Hq / d->Hkv;                                                                          \
        const size_t nbuf = (size_t)(2 * G * d->D + 2 * G + 16 + G * d->B);                                        \
        _Pragma("omp parallel")                                                                                    \
        {                                                                                                          \
            float *buf = (float *)malloc(nbuf * sizeof(float) + 64);                                               \
            _Pragma("omp for schedule(dynamic, 1)")                                                                \
            for (int64_t pr = 0; pr < pairs; pr++) {                                                               \
                const int32_t t = (int32_t)(pr / d->Hkv), h = (int32_t)(pr % d->Hkv);                              \
                NAME##_one(d, q, kp, vp, out, t, h, seq[t], slot[t], pos[t], ctx_end[t], seg_start[t],            \
                           block_table + (int64_t)seq[t] * d->W, buf);                                             \
            }                                                                                                      \
            free(buf);                                                                                             \
        }                                                                                                          \
    }

#define LD1_BF16(ptr, i) bf16_to_f32((ptr)[i])
#define LD1_F32(ptr, i) ((ptr)[i])
#define ST1_BF16(ptr, i, v) ((ptr)[i] = f32_to_bf16(v))
#define ST1_F32(ptr, i, v) ((ptr)[i] = (v))

DEFINE_KERNEL(paged_attention_bf16, uint16_t, load_bf16, LD1_BF16, ST1_BF16)
DEFINE_KERNEL(paged_attention_f32, float, load_f32, LD1_F32, ST1_F32)

int32_t paged_attention_abi(void) { return 2; }
