/* cblas_sgemm for MLX (models/platform/blas_forward.py).
 * 1. A product whose alpha is QUANTIZED_ALPHA multiplies by a registered quantized weight, read here from
 *    its packed bytes (models/decode/cpu_quantized.py): B's pointer names the weight, its bytes are never
 *    read as floats.
 * 2. Up to FEW_ROWS rows times a row-major weight (B transposed, at least FEW_MIN_SIZE elements), alpha 1 and
 *    beta 0: a product of our own that streams the weight once per block of rows (OpenBLAS's sgemm packs all
 *    of it first, and its sgemv reads it once per row).
 * 3. Up to ROWS_MAX_M rows times a k x n row-major B of a head's width (attention's values), alpha 1 and beta 0:
 *    B's positions cut into chunks that the threads share, their partial sums added in order.
 * 4. Other products up to MAX_ROWS rows: one sgemv per row.
 * 5. The rest: the wheel's own sgemm, SGEMM_IMPL. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
/* how a weight is stored: MLX's quantization modes (affine: integers with a scale and a bias per group) */
enum { MODE_AFFINE = 0, MODE_MXFP4 = 1, MODE_NVFP4 = 2, MODE_MXFP8 = 3 };
/* the dtype of the scales (and affine biases) */
enum { SCALE_F32 = 0, SCALE_F16 = 1, SCALE_BF16 = 2, SCALE_E8M0 = 3, SCALE_E4M3 = 4 };
void SGEMM_IMPL(int, int, int, int, int, int, float, const float *, int, const float *, int, float, float *, int);
void scipy_cblas_sgemv(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);
int openblas_get_num_threads(void);

/* ---- the registry of quantized weights, keyed by the packed bytes' address ---- */
typedef struct {
    const void *packed, *scales, *biases;
    int mode, scale_type, bits, group, out_dims, in_dims;
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

/* The layouts the product reads: 16 packed bytes hold whole groups (or, nvfp4, exactly two). */
int dtype_serve_quantized_supported(int mode, int bits, int group, int in_dims) {
    if (in_dims < 1 || in_dims > MAX_IN_DIMS || group < 1 || in_dims % group != 0) return 0;
    switch (mode) {
    case MODE_AFFINE: return (bits == 8 || bits == 4 || bits == 2) && group % (128 / bits) == 0 && group <= 128;
    case MODE_MXFP4: return bits == 4 && group == 32;
    case MODE_NVFP4: return bits == 4 && group == 16;
    case MODE_MXFP8: return bits == 8 && group == 32;
    default: return 0;
    }
}

int dtype_serve_quantized_register(const void *packed, const void *scales, const void *biases, int mode,
                                   int scale_type, int bits, int group, int out_dims, int in_dims) {
    int fp_scales = mode == MODE_NVFP4 ? SCALE_E4M3 : SCALE_E8M0;
    if (!packed || !scales || out_dims < 1 || !dtype_serve_quantized_supported(mode, bits, group, in_dims)
        || (mode == MODE_AFFINE ? scale_type < SCALE_F32 || scale_type > SCALE_BF16 : scale_type != fp_scales)
        || (mode != MODE_AFFINE && biases))
        return -1;
    qweight entry = {packed, scales, biases, mode, scale_type, bits, group, out_dims, in_dims};
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
/* every lane v ((vf){0} + v would add 0.0 in a scalar register first: a sign rule of -0.0) */
static inline vf splat(float v) {
#if defined(__AVX512F__)
    return (vf)_mm512_set1_ps(v);
#elif defined(__AVX2__)
    __m256 half = _mm256_set1_ps(v), halves[2] = {half, half};
    vf r;
    memcpy(&r, halves, sizeof r);
    return r;
#else
    vf r;
    for (int i = 0; i < 16; i++) r[i] = v;
    return r;
#endif
}
static inline float sum_lanes(vf v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
#endif
}

/* 16 bytes to 16 int32 lanes (GCC's generic widening goes through scalar registers) */
static inline vi widen(vb b) {
    vi r;
#if defined(__AVX512F__)
    __m128i v;
    memcpy(&v, &b, sizeof v);
    __m512i w = _mm512_cvtepu8_epi32(v);
    memcpy(&r, &w, sizeof r);
#elif defined(__AVX2__)
    __m128i v;
    memcpy(&v, &b, sizeof v);
    __m256i halves[2] = {_mm256_cvtepu8_epi32(v), _mm256_cvtepu8_epi32(_mm_srli_si128(v, 8))};
    memcpy(&r, halves, sizeof r);
#else
    r = __builtin_convertvector(b, vi);
#endif
    return r;
}

static inline vf select_bits(vi mask, vi yes, vi no) { return (vf)((yes & mask) | (no & ~mask)); }

/* FP4 E2M1 codes (0-15) to floats: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives */
static inline vf e2m1(vi n) {
    vi exp = (n >> 1) & 3, man = n & 1;
    vf magnitude = select_bits(exp != 0, ((exp + 126) << 23) | (man << 22), man * 0x3f000000);
    return (vf)((vi)magnitude | ((n & 8) << 28));
}

/* FP8 E4M3 (bias 7, no infinities, 0x7f and 0xff NaN) to floats */
static inline vf e4m3(vi b) {
    vi exp = (b >> 3) & 15, man = b & 7;
    vf subnormal = __builtin_convertvector(man, vf) * (1.0f / 512.0f);
    vf magnitude = select_bits(exp != 0, ((exp + 120) << 23) | (man << 20), (vi)subnormal);
    magnitude = select_bits((b & 0x7f) == 0x7f, (vi){0} + 0x7fc00000, (vi)magnitude);
    return (vf)((vi)magnitude | ((b & 0x80) << 24));
}

#define DECODE_INT8(b, p) __builtin_convertvector(widen(b), vf)
#define DECODE_INT4(b, p) __builtin_convertvector(widen((vb)((b >> (4 * p)) & 15)), vf)
#define DECODE_INT2(b, p) __builtin_convertvector(widen((vb)((b >> (2 * p)) & 3)), vf)
#define DECODE_E2M1(b, p) e2m1(widen((vb)((b >> (4 * p)) & 15)))
#define DECODE_E4M3(b, p) e4m3(widen(b))

/* One output column for ROWS rows of x. x is in plane order (per 16 packed bytes, the inputs of each bit plane
 * together), so each plane of 16 bytes meets 16 consecutive floats. A block of 16 bytes holds whole groups
 * (scale broadcast), or with SPLIT exactly two (nvfp4: lanes 0-7 the first group's, 8-15 the second's).
 * Few rows spread their sums over CHAINS accumulators a row (planes and pairs of blocks take turns): one
 * accumulator made each addition wait on the one before (q4, one row: 3.6 GB/s of packed weight). */
#define CHAINS(ROWS) ((ROWS) <= 2 ? 4 : (ROWS) <= 4 ? 2 : 1)
#define DOT_BLOCK(FMT, PLANES, ROWS, SLOT)                                                                      \
    {                                                                                                           \
        vb b = load_b(q);                                                                                       \
        for (int p = 0; p < PLANES; p++) {                                                                      \
            vf w = DECODE_##FMT(b, p) * s;                                                                      \
            int chain = ((SLOT) * PLANES + p) % CHAINS(ROWS);                                                   \
            for (int m = 0; m < ROWS; m++) acc[m][chain] += w * load_f(xp + m * ld + j + 16 * p);              \
        }                                                                                                       \
        j += 16 * PLANES, q += 16;                                                                              \
    }
#define DEFINE_DOT(FMT, PLANES, SPLIT, ROWS)                                                                    \
    static void dot_##FMT##_##ROWS(const uint8_t *q, const float *scales, const float *biases, int groups,     \
                                   int group, const float *xp, const float *xsum, size_t ld, float *y,           \
                                   size_t ldy) {                                                                \
        vf acc[ROWS][CHAINS(ROWS)];                                                                             \
        float bias_acc[ROWS];                                                                                   \
        for (int m = 0; m < ROWS; m++) {                                                                        \
            for (int c = 0; c < CHAINS(ROWS); c++) acc[m][c] = (vf){0};                                         \
            bias_acc[m] = 0.0f;                                                                                 \
        }                                                                                                       \
        size_t j = 0;                                                                                           \
        for (int g = 0; g < groups; g += SPLIT ? 2 : 1) {                                                       \
            vf s = splat(scales[g]);                                                                            \
            if (SPLIT)                                                                                          \
                for (int l = 8; l < 16; l++) s[l] = scales[g + 1];                                              \
            size_t end = SPLIT ? j + 16 * PLANES : (size_t)(g + 1) * group;                                     \
            while (j + 32 * PLANES <= end) {                                                                    \
                DOT_BLOCK(FMT, PLANES, ROWS, 0)                                                                 \
                DOT_BLOCK(FMT, PLANES, ROWS, 1)                                                                 \
            }                                                                                                   \
            if (j < end) DOT_BLOCK(FMT, PLANES, ROWS, 0)                                                        \
        }                                                                                                       \
        if (biases)                                                                                             \
            for (int g = 0; g < groups; g++)                                                                    \
                for (int m = 0; m < ROWS; m++) bias_acc[m] += biases[g] * xsum[m * groups + g];                 \
        for (int m = 0; m < ROWS; m++) {                                                                        \
            vf total = acc[m][0];                                                                               \
            for (int c = 1; c < CHAINS(ROWS); c++) total += acc[m][c];                                          \
            y[m * ldy] = sum_lanes(total) + bias_acc[m];                                                        \
        }                                                                                                       \
    }
#define DEFINE_DOTS(FMT, PLANES, SPLIT)                                                                         \
    DEFINE_DOT(FMT, PLANES, SPLIT, 1) DEFINE_DOT(FMT, PLANES, SPLIT, 2) DEFINE_DOT(FMT, PLANES, SPLIT, 3)       \
    DEFINE_DOT(FMT, PLANES, SPLIT, 4) DEFINE_DOT(FMT, PLANES, SPLIT, 5) DEFINE_DOT(FMT, PLANES, SPLIT, 6)       \
    DEFINE_DOT(FMT, PLANES, SPLIT, 7) DEFINE_DOT(FMT, PLANES, SPLIT, 8)
#define DECODE_E2M1_SPLIT DECODE_E2M1
DEFINE_DOTS(INT8, 1, 0)
DEFINE_DOTS(INT4, 2, 0)
DEFINE_DOTS(INT2, 4, 0)
DEFINE_DOTS(E2M1, 2, 0)
DEFINE_DOTS(E2M1_SPLIT, 2, 1)
DEFINE_DOTS(E4M3, 1, 0)

/* rows per pass over a weight row: as many accumulators as the vector registers hold (32 with AVX-512) */
#if defined(__AVX512F__)
#define ROW_BLOCK 8
#else
#define ROW_BLOCK 4
#endif
typedef void (*dot_fn)(const uint8_t *, const float *, const float *, int, int, const float *, const float *,
                       size_t, float *, size_t);
#define DOT_ROW(FMT) {dot_##FMT##_1, dot_##FMT##_2, dot_##FMT##_3, dot_##FMT##_4, dot_##FMT##_5, dot_##FMT##_6,   \
                      dot_##FMT##_7, dot_##FMT##_8}
enum { FMT_INT8, FMT_INT4, FMT_INT2, FMT_E2M1, FMT_E2M1_SPLIT, FMT_E4M3 };
static const dot_fn DOTS[6][8] = {DOT_ROW(INT8), DOT_ROW(INT4), DOT_ROW(INT2), DOT_ROW(E2M1), DOT_ROW(E2M1_SPLIT),
                                  DOT_ROW(E4M3)};

static int format_of(const qweight *w) {
    switch (w->mode) {
    case MODE_MXFP4: return FMT_E2M1;
    case MODE_NVFP4: return FMT_E2M1_SPLIT;
    case MODE_MXFP8: return FMT_E4M3;
    default: return w->bits == 8 ? FMT_INT8 : w->bits == 4 ? FMT_INT4 : FMT_INT2;
    }
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

static float scale_to_float(const void *src, int type, size_t i) {
    uint32_t bits;
    float f;
    switch (type) {
    case SCALE_F32: return ((const float *)src)[i];
    case SCALE_F16: return half_to_float(((const uint16_t *)src)[i]);
    case SCALE_BF16: bits = (uint32_t)((const uint16_t *)src)[i] << 16; break;
    case SCALE_E8M0: { /* 2^(s - 127); 255 is NaN */
        uint8_t s = ((const uint8_t *)src)[i];
        if (s == 255) bits = 0x7fc00000;
        else if (s == 0) bits = 0x00400000; /* 2^-127: a float32 subnormal */
        else bits = (uint32_t)s << 23;
        break;
    }
    default: { /* SCALE_E4M3 */
        vi b = (vi){0} + ((const uint8_t *)src)[i];
        return e4m3(b)[0];
    }
    }
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void row_as_floats(const void *src, int type, size_t offset, int count, float *dst) {
    if (type == SCALE_F32) { memcpy(dst, (const float *)src + offset, sizeof(float) * (size_t)count); return; }
    for (int i = 0; i < count; i++) dst[i] = scale_to_float(src, type, offset + (size_t)i);
}

static void fill_nan(int m, int n, float *c, int ldc) {
    uint32_t nan_bits = 0x7fc00000u;
    float nan;
    memcpy(&nan, &nan_bits, sizeof nan);
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) c[(size_t)i * ldc + j] = nan;
}

/* ---- helper threads that share a product's columns, never waited for unless they took work ----
 * A product is cut into chunks of output columns. The calling thread takes chunks until none is left, then waits
 * only for chunks that helpers took and have not finished. A helper that is not running (another process's or
 * OpenBLAS's spinning thread has its core) is never waited for, so a busy machine costs parallelism, not stalls. */
typedef struct {
    void (*run)(const void *ctx, int chunk);
    const void *ctx;
    int chunks;
} job_t;

typedef struct {
    const qweight *w;
    int m, groups, chunk;
    const float *xp, *xsum;
    float *c;
    int ldc;
} quantized_job;

static void run_quantized_chunk(const void *ctx, int chunk) {
    const quantized_job *job = ctx;
    const qweight *w = job->w;
    float scales[MAX_IN_DIMS / 16], biases[MAX_IN_DIMS / 16];
    const dot_fn *dots = DOTS[format_of(w)];
    size_t row_bytes = (size_t)w->in_dims * w->bits / 8, k = (size_t)w->in_dims;
    int end = (chunk + 1) * job->chunk < w->out_dims ? (chunk + 1) * job->chunk : w->out_dims;
    for (int col = chunk * job->chunk; col < end; col++) {
        row_as_floats(w->scales, w->scale_type, (size_t)col * job->groups, job->groups, scales);
        if (w->biases) row_as_floats(w->biases, w->scale_type, (size_t)col * job->groups, job->groups, biases);
        const uint8_t *q = (const uint8_t *)w->packed + (size_t)col * row_bytes;
        for (int i = 0; i < job->m; i += ROW_BLOCK) {
            int rows = job->m - i < ROW_BLOCK ? job->m - i : ROW_BLOCK;
            dots[rows - 1](q, scales, w->biases ? biases : NULL, job->groups, w->group, job->xp + (size_t)i * k,
                           job->xsum + (size_t)i * job->groups, k, job->c + (size_t)i * job->ldc + col,
                           (size_t)job->ldc);
        }
    }
}

#define MAX_HELPERS 63
/* how long a helper keeps looking for the next product before it sleeps: a step's products come tens of
 * microseconds apart. It yields the core while it looks, but a longer look (2 ms) still took the cores of other
 * processes (the test suite, with a server beside it, ran 1.1x longer) */
#define AWAKE_NS 200000L
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;   /* one product at a time uses the helpers */
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static int helpers_started, helpers_wanted;
static job_t current;
/* (generation << 32) | next chunk: a helper takes a chunk only of the job whose generation it read */
static _Atomic uint64_t ticket;
static _Atomic int finished;

static int take(uint32_t generation, int chunks) {
    uint64_t t = atomic_load(&ticket);
    while ((uint32_t)(t >> 32) == generation && (int)(uint32_t)t < chunks)
        if (atomic_compare_exchange_weak(&ticket, &t, t + 1)) return (int)(uint32_t)t;
    return -1;
}

static void *helper(void *arg) {
    int index = (int)(intptr_t)arg;
    uint32_t seen = 0;
    for (;;) {
        uint32_t generation = (uint32_t)(atomic_load(&ticket) >> 32);
        struct timespec start, now;
        clock_gettime(CLOCK_MONOTONIC, &start);
        while (generation == seen) {
            sched_yield();
            generation = (uint32_t)(atomic_load(&ticket) >> 32);
            clock_gettime(CLOCK_MONOTONIC, &now);
            if ((now.tv_sec - start.tv_sec) * 1000000000L + (now.tv_nsec - start.tv_nsec) > AWAKE_NS) break;
        }
        if (generation == seen) {
            pthread_mutex_lock(&sleep_lock);
            while ((uint32_t)(atomic_load(&ticket) >> 32) == seen) pthread_cond_wait(&wake, &sleep_lock);
            pthread_mutex_unlock(&sleep_lock);
            continue;
        }
        seen = generation;
        if (index >= helpers_wanted) continue;
        job_t job = current; /* published before the generation (release), read after it (acquire) */
        for (int chunk; (chunk = take(generation, job.chunks)) >= 0;) {
            job.run(job.ctx, chunk);
            atomic_fetch_add(&finished, 1);
        }
    }
    return NULL;
}

static void run_job(job_t *job, int threads) {
    if (threads <= 1 || pthread_mutex_trylock(&pool_lock) != 0) { /* alone, or the helpers are busy */
        for (int chunk = 0; chunk < job->chunks; chunk++) job->run(job->ctx, chunk);
        return;
    }
    int wanted = threads - 1 < MAX_HELPERS ? threads - 1 : MAX_HELPERS;
    for (; helpers_started < wanted; helpers_started++) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 1 << 20);
        int failed = pthread_create(&thread, &attr, helper, (void *)(intptr_t)helpers_started);
        pthread_attr_destroy(&attr);
        if (failed) break;
    }
    helpers_wanted = wanted;
    current = *job;
    atomic_store(&finished, 0);
    uint32_t generation = (uint32_t)(atomic_load(&ticket) >> 32) + 1;
    pthread_mutex_lock(&sleep_lock);
    atomic_store(&ticket, (uint64_t)generation << 32);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&sleep_lock);
    int mine = 0;
    for (int chunk; (chunk = take(generation, job->chunks)) >= 0; mine++) job->run(job->ctx, chunk);
    while (atomic_load(&finished) < job->chunks - mine) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
    }
    pthread_mutex_unlock(&pool_lock);
}

/* How a product of n output columns is shared: its threads (one where it is too small to wake helpers for) and
 * its chunk of columns, a whole number of `align` columns, several chunks a thread so that the fast ones take more. */
static int product_threads(int worth_sharing) {
    int threads = worth_sharing ? openblas_get_num_threads() : 1;
    return threads < 1 ? 1 : threads;
}
static int column_chunk(int n, int threads, int align) {
    int chunk = (n + threads * 8 - 1) / (threads * 8);
    chunk = chunk < 16 ? 16 : chunk;
    return (chunk + align - 1) / align * align;
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
    int threads = product_threads((size_t)n * k * w.bits / 8 * m >= (1u << 18)), chunk = column_chunk(n, threads, 1);
    quantized_job ctx = {&w, m, groups, chunk, xp, xsum, c, ldc};
    job_t job = {run_quantized_chunk, &ctx, (n + chunk - 1) / chunk};
    run_job(&job, threads);
    free(xp);
}

/* ---- few rows times a float32 weight ----
 * C (m x n) = op(A) @ B.T for B an n x k row-major weight (TRANS: MLX's x @ w.T with w as stored). Each output
 * column is one contiguous row of B, read from memory once per ROW_BLOCK rows of A; COLS rows of B are streamed
 * side by side (more reads in flight), each prefetched PREFETCH_AHEAD floats ahead (8 rows: 1.5x faster with it
 * on llama-25m's weights read from memory) and, into L2, PREFETCH_FAR ahead (8 rows: 1.03-1.07x more, the MLP's and
 * output's weights). OpenBLAS's sgemm packs all of B first; sgemv reads it once per row. */
#define PREFETCH_AHEAD 512
#define PREFETCH_FAR 2048
#define DEFINE_DOT_FLOAT(ROWS, COLS)                                                                           \
    static void dot_float_##ROWS##_##COLS(const float *a, size_t lda, const float *b, size_t ldb, int k,      \
                                          float *c, size_t ldc) {                                              \
        vf acc[COLS][ROWS];                                                                                   \
        for (int q = 0; q < COLS; q++)                                                                        \
            for (int r = 0; r < ROWS; r++) acc[q][r] = (vf){0};                                               \
        int j = 0;                                                                                            \
        for (; j + 16 <= k; j += 16) {                                                                        \
            vf w[COLS];                                                                                       \
            for (int q = 0; q < COLS; q++) {                                                                  \
                __builtin_prefetch(b + q * ldb + j + PREFETCH_FAR, 0, 2);                                     \
                __builtin_prefetch(b + q * ldb + j + PREFETCH_AHEAD);                                         \
                w[q] = load_f(b + q * ldb + j);                                                               \
            }                                                                                                 \
            for (int r = 0; r < ROWS; r++) {                                                                  \
                vf x = load_f(a + r * lda + j);                                                               \
                for (int q = 0; q < COLS; q++) acc[q][r] += w[q] * x;                                         \
            }                                                                                                 \
        }                                                                                                     \
        for (int q = 0; q < COLS; q++)                                                                        \
            for (int r = 0; r < ROWS; r++) {                                                                  \
                float s = sum_lanes(acc[q][r]);                                                               \
                for (int t = j; t < k; t++) s += b[q * ldb + t] * a[r * lda + t];                             \
                c[r * ldc + q] = s;                                                                           \
            }                                                                                                 \
    }
#define DEFINE_DOTS_FLOAT_TO_4(COLS)                                                                           \
    DEFINE_DOT_FLOAT(1, COLS) DEFINE_DOT_FLOAT(2, COLS) DEFINE_DOT_FLOAT(3, COLS) DEFINE_DOT_FLOAT(4, COLS)
#define DEFINE_DOTS_FLOAT(COLS)                                                                                \
    DEFINE_DOTS_FLOAT_TO_4(COLS) DEFINE_DOT_FLOAT(5, COLS) DEFINE_DOT_FLOAT(6, COLS) DEFINE_DOT_FLOAT(7, COLS) \
    DEFINE_DOT_FLOAT(8, COLS)
DEFINE_DOTS_FLOAT(1) DEFINE_DOTS_FLOAT(2) DEFINE_DOTS_FLOAT_TO_4(4)
typedef void (*dot_float_fn)(const float *, size_t, const float *, size_t, int, float *, size_t);
#define DOT_FLOAT_TO_4(COLS) dot_float_1_##COLS, dot_float_2_##COLS, dot_float_3_##COLS, dot_float_4_##COLS
/* by columns at once (1, 2, 4), then rows; 4 columns need 4 accumulators a row: up to 4 rows (32 registers) */
static const dot_float_fn DOTS_FLOAT[3][8] = {
    {DOT_FLOAT_TO_4(1), dot_float_5_1, dot_float_6_1, dot_float_7_1, dot_float_8_1},
    {DOT_FLOAT_TO_4(2), dot_float_5_2, dot_float_6_2, dot_float_7_2, dot_float_8_2},
    {DOT_FLOAT_TO_4(4)}};

typedef struct {
    int m, n, k, chunk;
    const float *a; /* m rows of k floats, lda apart */
    size_t lda;
    const float *b;
    size_t ldb;
    float *c;
    size_t ldc;
} float_job;

static void run_float_chunk(const void *ctx, int chunk) {
    const float_job *job = ctx;
    int start = chunk * job->chunk, end = start + job->chunk < job->n ? start + job->chunk : job->n;
    int wide = job->m <= 4 ? 4 : 2;
    for (int col = start, width; col < end; col += width) {
        width = end - col >= wide ? wide : 1;
        const dot_float_fn *dots = DOTS_FLOAT[width == 4 ? 2 : width == 2 ? 1 : 0];
        for (int i = 0; i < job->m; i += ROW_BLOCK) {
            int rows = job->m - i < ROW_BLOCK ? job->m - i : ROW_BLOCK;
            dots[rows - 1](job->a + (size_t)i * job->lda, job->lda, job->b + (size_t)col * job->ldb, job->ldb,
                           job->k, job->c + (size_t)i * job->ldc + col, job->ldc);
        }
    }
}

/* C = op(A) @ B.T (alpha 1, beta 0); 0 where it could not allocate (the caller falls back) */
static int few_row_product(int trans_a, int m, int n, int k, const float *a, int lda, const float *b, int ldb,
                           float *c, int ldc) {
    float *rows = NULL;
    size_t row_step = (size_t)lda;
    if (trans_a != NO_TRANS) { /* A is k x m: gather its columns into rows */
        if (!(rows = malloc(sizeof(float) * (size_t)m * k))) return 0;
        for (int i = 0; i < m; i++)
            for (int j = 0; j < k; j++) rows[(size_t)i * k + j] = a[(size_t)j * lda + i];
        a = rows;
        row_step = (size_t)k;
    }
    /* from 256 KB (attention's keys at 1,024 positions of 64); groups of 4 columns, the widest a few rows take */
    int threads = product_threads((size_t)n * k >= (1u << 16)), chunk = column_chunk(n, threads, 4);
    float_job ctx = {m, n, k, chunk, a, row_step, b, (size_t)ldb, c, (size_t)ldc};
    job_t job = {run_float_chunk, &ctx, (n + chunk - 1) / chunk};
    run_job(&job, threads);
    free(rows);
    return 1;
}

/* ---- few rows times a k x n row-major B: attention's values (k positions, n a head's width) ----
 * C (m x n) = A (m x k) @ B. B's rows are cut into chunks of POSITION_CHUNK, each summed into a partial of its own
 * (shared among the threads), the partials then added in order: the sums depend on k only, not on the threads. */
#define POSITION_CHUNK 256
#define ROWS_MAX_M 8
#define ROWS_MAX_N 256
typedef struct {
    int m, n, k;
    const float *a;
    size_t lda;
    const float *b;
    size_t ldb;
    float *partials; /* a chunk's m x n sums, chunk after chunk */
} rows_job;

static void run_rows_chunk(const void *ctx, int chunk) {
    const rows_job *job = ctx;
    int start = chunk * POSITION_CHUNK, end = start + POSITION_CHUNK < job->k ? start + POSITION_CHUNK : job->k;
    int vectors = job->n / 16;
    vf acc[ROWS_MAX_M][ROWS_MAX_N / 16];
    for (int r = 0; r < job->m; r++)
        for (int v = 0; v < vectors; v++) acc[r][v] = (vf){0};
    for (int t = start; t < end; t++) {
        const float *row = job->b + (size_t)t * job->ldb;
        vf weight[ROWS_MAX_M]; /* each row's weight of position t (attention's probabilities) */
        for (int r = 0; r < job->m; r++) weight[r] = splat(job->a[(size_t)r * job->lda + t]);
        for (int v = 0; v < vectors; v++) {
            vf value = load_f(row + 16 * v);
            for (int r = 0; r < job->m; r++) acc[r][v] += weight[r] * value;
        }
    }
    float *out = job->partials + (size_t)chunk * job->m * job->n;
    for (int r = 0; r < job->m; r++) memcpy(out + (size_t)r * job->n, acc[r], sizeof(float) * (size_t)job->n);
}

/* 0 where it does not apply or could not allocate (the caller goes on) */
static int rows_product(int m, int n, int k, const float *a, int lda, const float *b, int ldb, float *c, int ldc) {
    /* below 256 KB, one thread: OpenBLAS's sgemv is as fast */
    int threads = product_threads(1);
    if (m > ROWS_MAX_M || n % 16 || n > ROWS_MAX_N || (size_t)n * k < (1u << 16) || threads < 2) return 0;
    int chunks = (k + POSITION_CHUNK - 1) / POSITION_CHUNK;
    float *partials = malloc(sizeof(float) * (size_t)chunks * m * n);
    if (!partials) return 0;
    rows_job ctx = {m, n, k, a, (size_t)lda, b, (size_t)ldb, partials};
    job_t job = {run_rows_chunk, &ctx, chunks};
    run_job(&job, threads);
    for (int r = 0; r < m; r++)
        for (int j = 0; j < n; j++) {
            float sum = 0.0f;
            for (int q = 0; q < chunks; q++) sum += partials[((size_t)q * m + r) * n + j];
            c[(size_t)r * ldc + j] = sum;
        }
    free(partials);
    return 1;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
    if (alpha == QUANTIZED_ALPHA && order == ROW_MAJOR) {
        quantized_product(trans_a, trans_b, m, n, k, a, lda, b, c, ldc);
        return;
    }
    if (order == ROW_MAJOR && trans_b == TRANS && m >= 1 && m <= FEW_ROWS && alpha == 1.0f && beta == 0.0f
        && (size_t)n * k >= FEW_MIN_SIZE && few_row_product(trans_a, m, n, k, a, lda, b, ldb, c, ldc))
        return;
    if (order == ROW_MAJOR && trans_a == NO_TRANS && trans_b == NO_TRANS && m >= 1 && alpha == 1.0f && beta == 0.0f
        && rows_product(m, n, k, a, lda, b, ldb, c, ldc))
        return;
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
