/* Fused CPU glue of a float32 decode step, loaded by kaito.runtime.cglue (ctypes) for kaito.runtime.fastpath.
 *
 * Why: between a decode step's linears the torch path runs about 60 small ops per layer, each several
 * times slower right after a linear has streamed its weight through the caches; these functions do the
 * same math in one pass each (RMSNorm; RoPE + KV write + attention, or RoPE + KV write alone; SiLU(gate) * up). No threads of
 * their own: built with -fopenmp the attention splits its (row, kv head) items over the calling thread's
 * OpenMP team, which in a torch process is torch's own libgomp and the same team its GEMVs just used (the
 * loader reuses the libgomp.so.1 already mapped). The whole step in one call (kaito_decode_step) and greedy
 * runs of such steps (kaito_decode_run) come last. Plain C, so compiling takes a fraction of a second with the
 * system compiler. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

/* Item `it` = (row r, kv head kh) of one decode step's attention: k/v of row r's head kh written to the cache
   (k rotated), then each query head of its group rotated and attended; mask row r at mask + r * ms; p: W + D
   floats of scratch. */
static void attend_item(int64_t it, const float* q_in, const float* k_in, const float* v_in, int64_t qs, int64_t ks,
                        int64_t vs, const float* cos, const float* sin, int64_t drot, float* kb, float* vb,
                        int64_t rs, int64_t hs, int64_t width, const uint8_t* mask, int64_t ms, float* out,
                        int64_t H, int64_t Hk, int64_t D, float scaling, float* p) {
    int64_t W = width + 1, group = H / Hk, r = it / Hk, kh = it % Hk;
    float* q = p + W;
    const float* c = cos + r * drot;
    const float* s = sin + r * drot;
    const uint8_t* m = mask ? mask + r * ms : NULL;
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
    int64_t W = width + 1, items = n * Hk;
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
            attend_item(it, q_in, k_in, v_in, qs, ks, vs, cos, sin, drot, kb, vb, rs, hs, width, mask, W, out, H,
                        Hk, D, scaling, p);
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

/* ---- The whole decode step of a dense float32 model, one call (kaito.runtime.cstep) ---- */

#ifdef _OPENMP
#include <omp.h>
#define TEAM_ID omp_get_thread_num()
#define TEAM_N omp_get_num_threads()
#define BARRIER _Pragma("omp barrier")
#else
#define TEAM_ID 0
#define TEAM_N 1
#define BARRIER
#endif

/* Pointers per layer in kaito_decode_step's table, in this order (biases may be NULL). */
enum { L_NORM_IN, L_Q, L_K, L_V, L_QB, L_KB, L_VB, L_O, L_OB, L_NORM_POST, L_GATE, L_UP, L_GATEB, L_UPB, L_DOWN,
       L_DOWNB, L_KCACHE, L_VCACHE, L_PTRS };

/* This thread's share [*a, *b) of `total` output rows: contiguous, so each thread streams its own part of a weight. */
static inline void share(int64_t total, int64_t* a, int64_t* b) {
    int t = TEAM_ID, T = TEAM_N;
    *a = total * t / T;
    *b = total * (t + 1) / T;
}

/* s[i * R + r] = W[i] . x[r] for the 4 weight rows W + i * K and the R (compile-time, <= 4) rows x + r * K:
   four weight streams at once (MKL's GEMV keeps several rows in flight too: one stream alone leaves memory
   bandwidth unused), each 16 floats of x loaded once for the four. `next`: the next four weight rows, fetched
   into the cache meanwhile (NULL: already there). Why: the hardware prefetcher stops at each 4 KB page and
   restarts on every new row; prefetching the next group line by line took the 48 weights of the 88M bench
   model's step from 15.3-16.5 to 13.4-15.0 ms at one row, 17.6 to 14.3-14.6 at four (2 threads, standalone,
   three interleaved runs; MKL's GEMV 15.4 there). */
static inline __attribute__((always_inline)) void dot4xR(const float* W, const float* x, int64_t K, float* s,
                                                         const int R, const float* next) {
    int64_t i = 0;
    (void)next;
#if defined(__AVX512F__)
    __m512 a[4][4];
    for (int w = 0; w < 4; w++)
        for (int r = 0; r < R; r++) a[w][r] = _mm512_setzero_ps();
    for (; i + 16 <= K; i += 16) {
        __m512 w0 = _mm512_loadu_ps(W + i), w1 = _mm512_loadu_ps(W + K + i);
        __m512 w2 = _mm512_loadu_ps(W + 2 * K + i), w3 = _mm512_loadu_ps(W + 3 * K + i);
        if (next)
            for (int w = 0; w < 4; w++) __builtin_prefetch(next + w * K + i, 0, 3);
        for (int r = 0; r < R; r++) {
            __m512 xr = _mm512_loadu_ps(x + r * K + i);
            a[0][r] = _mm512_fmadd_ps(w0, xr, a[0][r]);
            a[1][r] = _mm512_fmadd_ps(w1, xr, a[1][r]);
            a[2][r] = _mm512_fmadd_ps(w2, xr, a[2][r]);
            a[3][r] = _mm512_fmadd_ps(w3, xr, a[3][r]);
        }
    }
    for (int w = 0; w < 4; w++)
        for (int r = 0; r < R; r++) s[w * R + r] = _mm512_reduce_add_ps(a[w][r]);
#else
    for (int w = 0; w < 4; w++)
        for (int r = 0; r < R; r++) s[w * R + r] = 0;
#endif
    for (; i < K; i++)
        for (int w = 0; w < 4; w++)
            for (int r = 0; r < R; r++) s[w * R + r] += W[w * K + i] * x[r * K + i];
}

/* s[i * n + r] = W[i] . x[r] for 4 weight rows and all n rows of x [n, K], four rows of x at a time. */
static inline __attribute__((always_inline)) void dot4_all(const float* W, const float* x, int64_t n, int64_t K,
                                                           float* s) {
    float t[16];
    for (int64_t r = 0; r < n; r += 4) {
        int64_t R = n - r < 4 ? n - r : 4;
        const float* next = r ? NULL : W + 4 * K;  /* past a thread's share or the weight: prefetches never fault */
        switch (R) {
            case 4: dot4xR(W, x + r * K, K, t, 4, next); break;
            case 3: dot4xR(W, x + r * K, K, t, 3, next); break;
            case 2: dot4xR(W, x + r * K, K, t, 2, next); break;
            default: dot4xR(W, x + r * K, K, t, 1, next); break;
        }
        for (int w = 0; w < 4; w++)
            for (int64_t q = 0; q < R; q++) s[w * n + r + q] = t[w * R + q];
    }
}

#define STEP_ROWS 64 /* kaito_decode_step's row limit (its per-row dot products sit on the stack) */

/* y[r, j] (+)= x[r] . W[j] + bias[j] for this thread's share of rows j of W [rows, K]; x [n, K], y row stride ys.
   The weight row is read once from memory and its n dot products run from the L1 copy. */
static void gemv(const float* W, const float* bias, int64_t rows, int64_t K, const float* x, int64_t n, float* y,
                 int64_t ys, int add) {
    int64_t a, b;
    float s[4 * STEP_ROWS];
    share(rows, &a, &b);
    for (int64_t j = a; j < b; j += 4) {
        int64_t m = b - j < 4 ? b - j : 4;
        if (m == 4) dot4_all(W + j * K, x, n, K, s);
        else
            for (int64_t i = 0; i < m; i++)
                for (int64_t r = 0; r < n; r++) s[i * n + r] = dot(W + (j + i) * K, x + r * K, K);
        for (int64_t i = 0; i < m; i++) {
            float bj = bias ? bias[j + i] : 0.0f;
            for (int64_t r = 0; r < n; r++) {
                float v = s[i * n + r] + bj;
                y[r * ys + j + i] = add ? y[r * ys + j + i] + v : v;
            }
        }
    }
}

/* One decode step through every layer and the LM head, as run by each thread of the team (see kaito_decode_step):
   qkv, att, act are the team's shared scratch, x [n * d] and p [width + 1 + D] this thread's. No barrier after
   the LM head: the caller syncs before reading the logits. */
static void step_body(float* h, int64_t n, int64_t L, void** table, const float* eps, const float* scaling,
                      int64_t d, int64_t H, int64_t Hk, int64_t D, int64_t I, const float* cos, const float* sin,
                      int64_t drot, int64_t rs, int64_t hs, int64_t width, const uint8_t* mask, int64_t ms,
                      const float* final_norm, const float* lm_head, int64_t V, float* logits, float* qkv,
                      float* att, float* act, float* x, float* p) {
    int64_t qd = H * D, kd = Hk * D, qkvw = qd + 2 * kd;
    for (int64_t l = 0; l < L; l++) {
        void** P = table + l * L_PTRS;
        kaito_rmsnorm(h, (const float*)P[L_NORM_IN], x, n, d, eps[2 * l]);
        gemv((const float*)P[L_Q], (const float*)P[L_QB], qd, d, x, n, qkv, qkvw, 0);
        gemv((const float*)P[L_K], (const float*)P[L_KB], kd, d, x, n, qkv + qd, qkvw, 0);
        gemv((const float*)P[L_V], (const float*)P[L_VB], kd, d, x, n, qkv + qd + kd, qkvw, 0);
        BARRIER
        int64_t a, b;
        share(n * Hk, &a, &b);
        for (int64_t it = a; it < b; it++)
            attend_item(it, qkv, qkv + qd, qkv + qd + kd, qkvw, qkvw, qkvw, cos, sin, drot, (float*)P[L_KCACHE],
                        (float*)P[L_VCACHE], rs, hs, width, mask, ms, att, H, Hk, D, scaling[l], p);
        BARRIER
        gemv((const float*)P[L_O], (const float*)P[L_OB], d, qd, att, n, h, d, 1);
        BARRIER
        kaito_rmsnorm(h, (const float*)P[L_NORM_POST], x, n, d, eps[2 * l + 1]);
        share(I, &a, &b);
        const float *G = (const float*)P[L_GATE], *U = (const float*)P[L_UP];
        const float *gb = (const float*)P[L_GATEB], *ub = (const float*)P[L_UPB];
        for (int64_t j = a; j < b; j += 4) {
            float g[4 * STEP_ROWS], u[4 * STEP_ROWS];
            int64_t m = b - j < 4 ? b - j : 4;
            if (m == 4) {
                dot4_all(G + j * d, x, n, d, g);
                dot4_all(U + j * d, x, n, d, u);
            } else
                for (int64_t i = 0; i < m; i++)
                    for (int64_t r = 0; r < n; r++) {
                        g[i * n + r] = dot(G + (j + i) * d, x + r * d, d);
                        u[i * n + r] = dot(U + (j + i) * d, x + r * d, d);
                    }
            for (int64_t i = 0; i < m; i++)
                for (int64_t r = 0; r < n; r++) {
                    float gr = g[i * n + r] + (gb ? gb[j + i] : 0.0f), ur = u[i * n + r] + (ub ? ub[j + i] : 0.0f);
                    act[r * I + j + i] = ur * (gr / (1.0f + expf(-gr)));
                }
        }
        BARRIER
        gemv((const float*)P[L_DOWN], (const float*)P[L_DOWNB], d, I, act, n, h, d, 1);
        BARRIER
    }
    kaito_rmsnorm(h, final_norm, x, n, d, eps[2 * L]);
    gemv(lm_head, NULL, V, d, x, n, logits, V, 0);
}

/* The whole decode step for n rows (one new token each) through L layers of a Llama-style decoder with dense
   float32 weights: per layer RMSNorm, q/k/v projections, RoPE + KV write + attention (as
   kaito_decode_attention), o projection added to the residual, RMSNorm, SiLU(gate) * up fused into the
   gate/up projections, down projection added to the residual; then the final RMSNorm and the LM head.
   h [n, d]: the embedded tokens, updated in place; table [L * L_PTRS]; eps [L] per norm pair (input, post)
   as eps[2l], eps[2l + 1], eps[2L] the final norm's; scaling [L]; cos/sin [n, drot]; the caches' strides
   rs, hs as kaito_decode_attention's (the same for every layer); mask [n, width + 1] or NULL;
   final_norm [d], lm_head [V, d]; logits [n, V]. One OpenMP parallel region on `threads` threads: each
   projection splits its output rows over the team, the attention its (row, kv head) items, and each thread
   normalizes its own copy of the residual (no barrier for that). Returns 0, -1 out of memory, -2 D > 256, -3 n > STEP_ROWS. */
int kaito_decode_step(float* h, int64_t n, int64_t L, void** table, const float* eps, const float* scaling,
                      int64_t d, int64_t H, int64_t Hk, int64_t D, int64_t I, const float* cos, const float* sin,
                      int64_t drot, int64_t rs, int64_t hs, int64_t width, const uint8_t* mask,
                      const float* final_norm, const float* lm_head, int64_t V, float* logits, int64_t threads) {
    int64_t qd = H * D, kd = Hk * D, qkvw = qd + 2 * kd, W = width + 1;
    (void)threads;
    if (D > 256) return -2;
    if (n > STEP_ROWS) return -3;
    float* shared = (float*)malloc(sizeof(float) * n * (qkvw + qd + I));
    if (!shared) return -1;
    float *qkv = shared, *att = qkv + n * qkvw, *act = att + n * qd;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float* x = (float*)malloc(sizeof(float) * (n * d + W + D));
        if (!x) {
#pragma omp atomic write
            failed = 1;
        }
        BARRIER
        if (!failed)
            step_body(h, n, L, table, eps, scaling, d, H, Hk, D, I, cos, sin, drot, rs, hs, width, mask, W,
                      final_norm, lm_head, V, logits, qkv, att, act, x, x + n * d);
        free(x);
    }
    free(shared);
    return failed ? -1 : 0;
}

/* torch.argmax of one row: the first maximum, a NaN counting as the largest (the sampler's greedy pick). */
static int64_t argmax(const float* v, int64_t V) {
    int64_t best = 0;
    float bv = v[0];
    if (isnan(bv)) return 0;
    for (int64_t i = 1; i < V; i++) {
        if (isnan(v[i])) return i;
        if (v[i] > bv) bv = v[i], best = i;
    }
    return best;
}

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Up to k greedy decode steps in one call (kaito.runtime.cstep.DecodeStep.run_greedy): each step as
   kaito_decode_step, then each row's argmax is its next token, embedded (embed [*, d]) as the next step's
   input. tokens [(k + 1) * n]: tokens[0 .. n) the rows' pending tokens; step j's picks go to tokens[(j + 1) * n ..).
   Step j writes cache column width + j, with cos/sin at cos + j * n * drot and the mask (row stride ms, NULL:
   no padding) read up to that column. The run ends after k steps, or after the step where a row with
   eos_stops[r] picked one of the n_eos ids in eos, or once the next step would end past budget_s seconds from
   the start, or when *interrupt is set (another thread: an arrival, a cancellation). Returns the steps run
   (>= 1), or kaito_decode_step's negative codes. Why: a batch-1 step of the 3.7M bench model takes ~0.35 ms in
   C and as long again in the Python around it (embedding, rotary, views, sampling, output); a run pays that
   once. */
int64_t kaito_decode_run(float* h, int64_t n, int64_t L, void** table, const float* eps, const float* scaling,
                         int64_t d, int64_t H, int64_t Hk, int64_t D, int64_t I, const float* cos, const float* sin,
                         int64_t drot, int64_t rs, int64_t hs, int64_t width, const uint8_t* mask, int64_t ms,
                         const float* final_norm, const float* lm_head, int64_t V, float* logits,
                         const float* embed, int64_t* tokens, int64_t k, const int64_t* eos, int64_t n_eos,
                         const uint8_t* eos_stops, double budget_s, const int* interrupt, int64_t threads) {
    int64_t qd = H * D, kd = Hk * D, qkvw = qd + 2 * kd;
    (void)threads;
    if (D > 256) return -2;
    if (n > STEP_ROWS) return -3;
    if (k < 1) return 0;
    float* shared = (float*)malloc(sizeof(float) * n * (qkvw + qd + I));
    if (!shared) return -1;
    float *qkv = shared, *att = qkv + n * qkvw, *act = att + n * qd;
    int failed = 0, go = 1;
    int64_t done = 0;
    double t0 = seconds();
    for (int64_t r = 0; r < n; r++) memcpy(h + r * d, embed + tokens[r] * d, sizeof(float) * d);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float* x = (float*)malloc(sizeof(float) * (n * d + width + k + D));
        if (!x) {
#pragma omp atomic write
            failed = 1;
        }
        BARRIER
        for (int64_t j = 0; !failed && j < k; j++) {
            step_body(h, n, L, table, eps, scaling, d, H, Hk, D, I, cos + j * n * drot, sin + j * n * drot, drot,
                      rs, hs, width + j, mask, ms, final_norm, lm_head, V, logits, qkv, att, act, x, x + n * d);
            BARRIER
            if (TEAM_ID == 0) {
                int stop = 0;
                int64_t* out = tokens + (j + 1) * n;
                for (int64_t r = 0; r < n; r++) {
                    out[r] = argmax(logits + r * V, V);
                    for (int64_t e = 0; e < n_eos; e++) stop |= eos_stops[r] && out[r] == eos[e];
                    memcpy(h + r * d, embed + out[r] * d, sizeof(float) * d);
                }
                done = j + 1;
                double spent = seconds() - t0;
                if (stop || __atomic_load_n(interrupt, __ATOMIC_RELAXED) || spent * (j + 2) > budget_s * (j + 1))
                    go = 0;
            }
            BARRIER
            if (!go) break;
        }
        free(x);
    }
    free(shared);
    return failed ? -1 : done;
}
