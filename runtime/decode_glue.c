/* Fused CPU glue of a float32 decode step, loaded by kaito.runtime.cglue (ctypes) for kaito.runtime.fastpath.
 *
 * Why: between a decode step's linears the torch path runs about 60 small ops per layer, each several
 * times slower right after a linear has streamed its weight through the caches; these functions do the
 * same math in one pass each (RMSNorm; RoPE + KV write + attention, or RoPE + KV write alone; SiLU(gate) * up). No threads of
 * their own: built with -fopenmp the attention splits its (row, kv head) items over the calling thread's
 * OpenMP team, which in a torch process is torch's own libgomp and the same team its GEMVs just used (the
 * loader reuses the libgomp.so.1 already mapped). No allocation but attention's score rows. Plain C, so
 * compiling takes a fraction of a second with the system compiler. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* out[r, i] = up[r, i] * silu(gate[r, i]) */
void kaito_silu_mul(const float* gate, const float* up, int64_t row_stride, float* out, int64_t n, int64_t m) {
    for (int64_t r = 0; r < n; r++) {
        const float* g = gate + r * row_stride;
        const float* u = up + r * row_stride;
        float* o = out + r * m;
        for (int64_t i = 0; i < m; i++) o[i] = u[i] * (g[i] / (1.0f + expf(-g[i])));
    }
}

static inline void rope(const float* x, const float* cos, const float* sin, int64_t d, int64_t drot, float* y) {
    int64_t half = drot / 2;
    for (int64_t i = 0; i < half; i++) y[i] = x[i] * cos[i] - x[i + half] * sin[i];
    for (int64_t i = half; i < drot; i++) y[i] = x[i] * cos[i] + x[i - half] * sin[i];
    for (int64_t i = drot; i < d; i++) y[i] = x[i];
}

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float dot(const float* a, const float* b, int64_t d) {
    int64_t full = d - d % 16, i;
    float s = 0;
#if defined(__AVX512F__)
    __m512 v = _mm512_setzero_ps();
    for (i = 0; i < full; i += 16) v = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), v);
    s = _mm512_reduce_add_ps(v);
#else
    float acc[16] = {0};
    for (i = 0; i < full; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    for (int j = 0; j < 16; j++) s += acc[j];
#endif
    for (i = full; i < d; i++) s += a[i] * b[i];
    return s;
}

/* out[r] = w * (x[r] * rsqrt(mean(x[r]^2) + eps)), rows of d floats */
void kaito_rmsnorm(const float* x, const float* w, float* out, int64_t n, int64_t d, float eps) {
    for (int64_t r = 0; r < n; r++) {
        const float* xr = x + r * d;
        float s = 1.0f / sqrtf(dot(xr, xr, d) / (float)d + eps);
        float* o = out + r * d;
        for (int64_t i = 0; i < d; i++) o[i] = w[i] * (xr[i] * s);
    }
}

/* Row r's kv head h: its rotated k and its v written at column `width` of the cache. */
static inline void put_kv(const float* k_in, const float* v_in, int64_t ks, int64_t vs, const float* c,
                          const float* s, int64_t drot, float* kb, float* vb, int64_t rs, int64_t hs, int64_t width,
                          int64_t r, int64_t h, int64_t D) {
    rope(k_in + r * ks + h * D, c, s, D, drot, kb + r * rs + h * hs + width * D);
    memcpy(vb + r * rs + h * hs + width * D, v_in + r * vs + h * D, sizeof(float) * D);
}

/* One query head over its kv head's columns 0..W-1 (mask: 0 = skip); p: W floats of scratch. D is a
   compile-time constant at the call sites for the common head sizes, so the accumulator stays in registers. */
static inline __attribute__((always_inline)) void attend_head(const float* q, const float* kc, const float* vc,
                                                             const uint8_t* m, int64_t W, int64_t D,
                                                             float scaling, float* p, float* o) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < W; j++) {
        if (m && !m[j]) { p[j] = -INFINITY; continue; }
        p[j] = dot(q, kc + j * D, D) * scaling;
        if (p[j] > mx) mx = p[j];
    }
    float sum = 0;
    for (int64_t j = 0; j < W; j++) {
        p[j] = (m && !m[j]) ? 0.0f : expf(p[j] - mx);
        sum += p[j];
    }
    float acc[256];
    for (int64_t i = 0; i < D; i++) acc[i] = 0;
    for (int64_t j = 0; j < W; j++) {
        if (m && !m[j]) continue;
        const float* vj = vc + j * D;
        float pj = p[j];
        for (int64_t i = 0; i < D; i++) acc[i] += pj * vj[i];
    }
    float inv = 1.0f / sum;
    for (int64_t i = 0; i < D; i++) o[i] = acc[i] * inv;
}

/* 1 when built with OpenMP (the attention then runs on `threads` threads), else 0. */
int kaito_glue_threaded(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* One decode step's attention for n rows, each with one new token:
   q [n, H*D], k and v [n, Hk*D] (row strides qs, ks, vs: views into one fused projection or three);
   cos/sin [n, drot] (drot <= D: partial rotary leaves the rest of each head as it is);
   kb/vb: the cache, element (r, h, c, :) at base + r*rs + h*hs + c*D; columns 0..width-1 hold the context
   and the new rotated k and its v are written at column `width`; mask [n, width+1] bytes, 0 = padding
   (NULL: every column is real); out [n, H*D]. Grouped-query heads share kv head h / (H / Hk).
   The n * Hk (row, kv head) items are split over `threads` OpenMP threads when built with OpenMP.
   Returns 0; -1 when a score row cannot be allocated, -2 when D is over 256 (the accumulator). */
int kaito_decode_attention(const float* q_in, const float* k_in, const float* v_in, int64_t qs, int64_t ks,
                           int64_t vs, const float* cos, const float* sin, int64_t drot, float* kb, float* vb,
                           int64_t rs, int64_t hs, int64_t width, const uint8_t* mask, float* out, int64_t n,
                           int64_t H, int64_t Hk, int64_t D, float scaling, int64_t threads) {
    int64_t W = width + 1, group = H / Hk, items = n * Hk;
    (void)threads;  /* used by the OpenMP pragma only */
    if (D > 256) return -2;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1 && items > 1)
    {
        float* p = (float*)malloc(sizeof(float) * (W + D));
        if (!p) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            if (!p) continue;
            int64_t r = it / Hk, kh = it % Hk;
            float* q = p + W;
            const float* c = cos + r * drot;
            const float* s = sin + r * drot;
            const uint8_t* m = mask ? mask + r * W : NULL;
            const float* kc = kb + r * rs + kh * hs;
            const float* vc = vb + r * rs + kh * hs;
            put_kv(k_in, v_in, ks, vs, c, s, drot, kb, vb, rs, hs, width, r, kh, D);
            for (int64_t h = kh * group; h < (kh + 1) * group; h++) {
                rope(q_in + r * qs + h * D, c, s, D, drot, q);
                float* o = out + r * H * D + h * D;
                if (D == 64) attend_head(q, kc, vc, m, W, 64, scaling, p, o);
                else if (D == 128) attend_head(q, kc, vc, m, W, 128, scaling, p, o);
                else attend_head(q, kc, vc, m, W, D, scaling, p, o);
            }
        }
        free(p);
    }
    return failed ? -1 : 0;
}

/* The first half of kaito_decode_attention alone, for long contexts where torch's threaded attention reads
   the cache faster than this single thread: k and v written to column `width` (k rotated), the rotated
   queries to q_out [n, H*D]. */
void kaito_rope_kv(const float* q_in, const float* k_in, const float* v_in, int64_t qs, int64_t ks, int64_t vs,
                   const float* cos, const float* sin, int64_t drot, float* kb, float* vb, int64_t rs, int64_t hs,
                   int64_t width, float* q_out, int64_t n, int64_t H, int64_t Hk, int64_t D) {
    for (int64_t r = 0; r < n; r++) {
        const float* c = cos + r * drot;
        const float* s = sin + r * drot;
        for (int64_t h = 0; h < Hk; h++) put_kv(k_in, v_in, ks, vs, c, s, drot, kb, vb, rs, hs, width, r, h, D);
        for (int64_t h = 0; h < H; h++) rope(q_in + r * qs + h * D, c, s, D, drot, q_out + r * H * D + h * D);
    }
}
