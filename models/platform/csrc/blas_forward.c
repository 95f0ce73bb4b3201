/* cblas_sgemm for MLX (models/platform/blas_forward.py).
 * 1. A product whose alpha is QUANTIZED_ALPHA multiplies by a registered quantized weight, read here from
 *    its packed bytes (models/decode/cpu_quantized.py): B's pointer names the weight, its bytes are never
 *    read as floats.
 * 2. Up to MAX_ROWS rows: one sgemv per row (OpenBLAS's sgemm packs the whole weight first).
 * 3. The rest: the wheel's own sgemm, SGEMM_IMPL. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
enum { SCALE_F32 = 0, SCALE_F16 = 1, SCALE_BF16 = 2 };
void SGEMM_IMPL(int, int, int, int, int, int, float, const float *, int, const float *, int, float, float *, int);
void scipy_cblas_sgemv(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);
int openblas_get_num_threads(void);

/* ---- the registry of quantized weights, keyed by the packed bytes' address ---- */
typedef struct {
    const void *packed, *scales, *biases;
    int scale_type, bits, group, out_dims, in_dims;
} qweight;

#define SLOTS 16384
#define TOMBSTONE ((const void *)1)
static qweight table[SLOTS];
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;

static size_t slot_of(const void *p) {
    uint64_t h = (uint64_t)(uintptr_t)p;
    h ^= h >> 29;
    h *= 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 40) & (SLOTS - 1);
}

float dtype_serve_quantized_alpha(void) { return QUANTIZED_ALPHA; }

int dtype_serve_quantized_supported(int bits, int group, int in_dims) {
    int per16 = 128 / bits; /* inputs held by 16 packed bytes */
    return (bits == 8 || bits == 4 || bits == 2) && group % per16 == 0 && group <= 128 && in_dims % group == 0
           && in_dims <= MAX_IN_DIMS;
}

int dtype_serve_quantized_register(const void *packed, const void *scales, const void *biases, int scale_type,
                                   int bits, int group, int out_dims, int in_dims) {
    if (!packed || !scales || scale_type < 0 || scale_type > 2 || out_dims < 1
        || !dtype_serve_quantized_supported(bits, group, in_dims))
        return -1;
    qweight entry = {packed, scales, biases, scale_type, bits, group, out_dims, in_dims};
    int done = -1;
    pthread_mutex_lock(&table_lock);
    size_t s = slot_of(packed), free_slot = SLOTS;
    for (size_t i = 0; i < SLOTS; i++, s = (s + 1) & (SLOTS - 1)) {
        if (table[s].packed == packed) { table[s] = entry; done = 0; break; }
        if (table[s].packed == TOMBSTONE && free_slot == SLOTS) free_slot = s;
        if (table[s].packed == NULL) { table[free_slot == SLOTS ? s : free_slot] = entry; done = 0; break; }
    }
    if (done != 0 && free_slot != SLOTS) { table[free_slot] = entry; done = 0; }
    pthread_mutex_unlock(&table_lock);
    return done;
}

void dtype_serve_quantized_forget(const void *packed) {
    pthread_mutex_lock(&table_lock);
    size_t s = slot_of(packed);
    for (size_t i = 0; i < SLOTS && table[s].packed != NULL; i++, s = (s + 1) & (SLOTS - 1))
        if (table[s].packed == packed) { table[s].packed = TOMBSTONE; break; }
    pthread_mutex_unlock(&table_lock);
}

static int lookup(const void *packed, qweight *out) {
    int found = 0;
    pthread_mutex_lock(&table_lock);
    size_t s = slot_of(packed);
    for (size_t i = 0; i < SLOTS && table[s].packed != NULL; i++, s = (s + 1) & (SLOTS - 1))
        if (table[s].packed == packed) { *out = table[s]; found = 1; break; }
    pthread_mutex_unlock(&table_lock);
    return found;
}

/* ---- the product ---- */
typedef float vf __attribute__((vector_size(64)));
typedef uint8_t vb __attribute__((vector_size(16)));
typedef int32_t vi __attribute__((vector_size(64)));

static inline vf load_f(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline vb load_b(const uint8_t *p) { vb v; memcpy(&v, p, sizeof v); return v; }
static inline float sum_lanes(vf v) {
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}

/* 16 bytes to 16 floats (GCC's generic widening goes through scalar registers) */
static inline vf widen(vb b) {
#if defined(__AVX512F__)
    __m128i v;
    memcpy(&v, &b, sizeof v);
    __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
    vf r;
    memcpy(&r, &f, sizeof r);
    return r;
#elif defined(__AVX2__)
    __m128i v;
    memcpy(&v, &b, sizeof v);
    __m256 halves[2] = {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)),
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)))};
    vf r;
    memcpy(&r, halves, sizeof r);
    return r;
#else
    return __builtin_convertvector(__builtin_convertvector(b, vi), vf);
#endif
}

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) bits = sign | 0x7f800000 | (man << 13);
    else if (exp != 0) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (man == 0) bits = sign;
    else { /* subnormal: normalize */
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void row_as_floats(const void *src, int type, size_t offset, int count, float *dst) {
    if (type == SCALE_F32) { memcpy(dst, (const float *)src + offset, sizeof(float) * (size_t)count); return; }
    const uint16_t *h = (const uint16_t *)src + offset;
    for (int i = 0; i < count; i++) {
        if (type == SCALE_BF16) { uint32_t b = (uint32_t)h[i] << 16; memcpy(dst + i, &b, sizeof(float)); }
        else dst[i] = half_to_float(h[i]);
    }
}

/* One output column n for ROWS rows of x: x is in plane order (per 16 packed bytes, the inputs of each bit
 * plane together), so each plane of 16 bytes meets 16 consecutive floats. */
#define DEFINE_DOT(BITS, ROWS)                                                                                  \
    static void dot_##BITS##_##ROWS(const uint8_t *q, const float *scales, const float *biases, int groups,     \
                                    int group, const float *xp, const float *xsum, size_t ld, float *y,          \
                                    size_t ldy) {                                                               \
        enum { PLANES = 8 / BITS, MASK = (1 << BITS) - 1 };                                                     \
        vf acc[ROWS];                                                                                           \
        float bias_acc[ROWS];                                                                                   \
        for (int m = 0; m < ROWS; m++) { acc[m] = (vf){0}; bias_acc[m] = 0.0f; }                                \
        size_t j = 0;                                                                                           \
        for (int g = 0; g < groups; g++) {                                                                      \
            vf s = (vf){0} + scales[g];                                                                         \
            for (int end = (g + 1) * group; (int)j < end; j += 16 * PLANES, q += 16) {                          \
                vb b = load_b(q);                                                                               \
                for (int p = 0; p < PLANES; p++) {                                                              \
                    vf w = widen(PLANES == 1 ? b : (vb)((b >> (p * BITS)) & MASK)) * s;                         \
                    for (int m = 0; m < ROWS; m++) acc[m] += w * load_f(xp + m * ld + j + 16 * p);              \
                }                                                                                               \
            }                                                                                                   \
            if (biases)                                                                                         \
                for (int m = 0; m < ROWS; m++) bias_acc[m] += biases[g] * xsum[m * groups + g];                 \
        }                                                                                                       \
        for (int m = 0; m < ROWS; m++) y[m * ldy] = sum_lanes(acc[m]) + bias_acc[m];                            \
    }
#define DEFINE_DOTS(BITS)                                                                                      \
    DEFINE_DOT(BITS, 1) DEFINE_DOT(BITS, 2) DEFINE_DOT(BITS, 3) DEFINE_DOT(BITS, 4) DEFINE_DOT(BITS, 5)         \
    DEFINE_DOT(BITS, 6) DEFINE_DOT(BITS, 7) DEFINE_DOT(BITS, 8)
DEFINE_DOTS(8)
DEFINE_DOTS(4)
DEFINE_DOTS(2)

/* rows per pass over a weight row: as many accumulators as the vector registers hold (32 with AVX-512) */
#if defined(__AVX512F__)
#define ROW_BLOCK 8
#else
#define ROW_BLOCK 4
#endif
typedef void (*dot_fn)(const uint8_t *, const float *, const float *, int, int, const float *, const float *,
                       size_t, float *, size_t);
#define DOT_ROW(BITS) {dot_##BITS##_1, dot_##BITS##_2, dot_##BITS##_3, dot_##BITS##_4, dot_##BITS##_5,          \
                       dot_##BITS##_6, dot_##BITS##_7, dot_##BITS##_8}
static const dot_fn DOTS[3][8] = {DOT_ROW(8), DOT_ROW(4), DOT_ROW(2)};

static void fill_nan(int m, int n, float *c, int ldc) {
    uint32_t nan_bits = 0x7fc00000u;
    float nan;
    memcpy(&nan, &nan_bits, sizeof nan);
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) c[(size_t)i * ldc + j] = nan;
}

/* C (m x n) = op(A) (m x k) @ dequantize(w).T, w being out_dims x in_dims = n x k; B only names w. */
static void quantized_product(int trans_a, int trans_b, int m, int n, int k, const float *a, int lda,
                              const void *b, float *c, int ldc) {
    qweight w;
    if (!lookup(b, &w) || trans_b != TRANS || n != w.out_dims || k != w.in_dims) {
        fill_nan(m, n, c, ldc); /* loud, never silent: a caller bug */
        return;
    }
    int planes = 8 / w.bits, groups = k / w.group, step = 16 * planes;
    float *xp = malloc(sizeof(float) * ((size_t)m * k + (size_t)m * groups));
    if (!xp) { fill_nan(m, n, c, ldc); return; }
    float *xsum = xp + (size_t)m * k;
    /* x's element (i, j): A is m x k (row i, step 1) or, transposed, k x m (column i, step lda) */
    size_t row_step = trans_a == NO_TRANS ? (size_t)lda : 1, col_step = trans_a == NO_TRANS ? 1 : (size_t)lda;
    for (int i = 0; i < m; i++) {
        const float *x = a + (size_t)i * row_step;
        float *row = xp + (size_t)i * k;
        for (int j = 0; j < k; j += step)
            for (int l = 0; l < 16; l++)
                for (int p = 0; p < planes; p++) row[j + 16 * p + l] = x[(size_t)(j + planes * l + p) * col_step];
        for (int g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int l = 0; l < w.group; l++) s += x[(size_t)(g * w.group + l) * col_step];
            xsum[(size_t)i * groups + g] = s;
        }
    }
    const dot_fn *dots = DOTS[w.bits == 8 ? 0 : w.bits == 4 ? 1 : 2];
    size_t row_bytes = (size_t)k * w.bits / 8;
    int threads = openblas_get_num_threads();
    if (threads < 1) threads = 1;
    if ((size_t)n * row_bytes * m < 4096 * 64) threads = 1; /* a tiny product is not worth waking threads */
#pragma omp parallel num_threads(threads)
    {
        float scales[MAX_IN_DIMS / 16], biases[MAX_IN_DIMS / 16];
#pragma omp for schedule(static)
        for (int col = 0; col < n; col++) {
            row_as_floats(w.scales, w.scale_type, (size_t)col * groups, groups, scales);
            if (w.biases) row_as_floats(w.biases, w.scale_type, (size_t)col * groups, groups, biases);
            const uint8_t *q = (const uint8_t *)w.packed + (size_t)col * row_bytes;
            for (int i = 0; i < m; i += ROW_BLOCK) {
                int rows = m - i < ROW_BLOCK ? m - i : ROW_BLOCK;
                dots[rows - 1](q, scales, w.biases ? biases : NULL, groups, w.group, xp + (size_t)i * k,
                               xsum + (size_t)i * groups, (size_t)k, c + (size_t)i * ldc + col, (size_t)ldc);
            }
        }
    }
    free(xp);
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
    if (alpha == QUANTIZED_ALPHA && order == ROW_MAJOR) {
        quantized_product(trans_a, trans_b, m, n, k, a, lda, b, c, ldc);
        return;
    }
    if (order != ROW_MAJOR || m < 1 || m > MAX_ROWS || n < 1 || k < 1) {
        SGEMM_IMPL(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    for (int i = 0; i < m; i++) {
        /* row i of op(A): A is m x k (row i, step 1) or, transposed, k x m (column i, step lda) */
        const float *x = trans_a == NO_TRANS ? a + (long)i * lda : a + i;
        int incx = trans_a == NO_TRANS ? 1 : lda;
        float *y = c + (long)i * ldc;
        if (beta == 0.0f)
            memset(y, 0, sizeof(float) * (size_t)n); /* never scale uninitialized memory (0 * NaN) */
        if (trans_b == NO_TRANS) /* B is k x n: y = B^T x */
            scipy_cblas_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, x, incx, beta, y, 1);
        else /* B is n x k: y = B x */
            scipy_cblas_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, x, incx, beta, y, 1);
    }
}
