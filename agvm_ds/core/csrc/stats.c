/* Fused CPU kernels for the AGVM statistics pass (agvm_ds/core/native.py builds and loads
 * this file; agvm_ds/core/statistics.py holds the same math in eager torch and the
 * derivation).
 *
 * One pass over the slice reads G, S (and Adam's v) once and returns three float64 sums;
 * the eager version needs ~10 element-wise passes with fp32 temporaries for the same job.
 * Per element the halves and their preconditioning run in fp32, as in the eager path;
 * products and sums run in float64, each block's vector lanes added into running totals.
 * Single-threaded on purpose: a second OpenMP runtime beside torch's would fight it for the
 * cores, and a data-parallel rank usually runs one or two threads anyway. Non-finite
 * inputs propagate into the sums (no fast-math), which is how the caller detects them.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define AGVM_BLOCK 16384

/* out[0..2] = sum g*g, sum g*s, sum s*s */
static void gram_block(const float *g, const float *s, int64_t n, double *out) {
    double gg = 0.0, gs = 0.0, ss = 0.0;
#pragma omp simd reduction(+ : gg, gs, ss)
    for (int64_t i = 0; i < n; ++i) {
        double x = g[i], y = s[i];
        gg += x * x;
        gs += x * y;
        ss += y * y;
    }
    out[0] = gg;
    out[1] = gs;
    out[2] = ss;
}

/* x_k = a_k*g + b_k*s, h_k = x_k / (sqrt(v + c*x_k^2) + eps) in fp32 (v = 0 when absent:
 * a parameter without Adam state yet); out[0..2] = sum h1*h2, sum h1*h1, sum h2*h2. The
 * loop body is a macro so that both variants vectorize (a branch on v inside would not). */
#define AGVM_PRECOND_LOOP(V_I)                                                                \
    _Pragma("omp simd reduction(+ : p12, p11, p22)") for (int64_t i = 0; i < n; ++i) {        \
        float x1 = a1 * g[i] + b1 * s[i];                                                    \
        float x2 = a2 * g[i] + b2 * s[i];                                                    \
        float h1 = x1 / (sqrtf((V_I) + c * (x1 * x1)) + eps);                                \
        float h2 = x2 / (sqrtf((V_I) + c * (x2 * x2)) + eps);                                \
        double d1 = h1, d2 = h2;                                                             \
        p12 += d1 * d2;                                                                      \
        p11 += d1 * d1;                                                                      \
        p22 += d2 * d2;                                                                      \
    }

static void precond_block(const float *g, const float *s, const float *v, int64_t n, float a1, float b1,
                          float a2, float b2, float c, float eps, double *out) {
    double p12 = 0.0, p11 = 0.0, p22 = 0.0;
    if (v) {
        AGVM_PRECOND_LOOP(v[i])
    } else {
        AGVM_PRECOND_LOOP(0.0f)
    }
    out[0] = p12;
    out[1] = p11;
    out[2] = p22;
}

static void add3(double *total, const double *part) {
    total[0] += part[0];
    total[1] += part[1];
    total[2] += part[2];
}

void agvm_gram(const float *g, const float *s, int64_t n, double *out) {
    double part[3];
    out[0] = out[1] = out[2] = 0.0;
    for (int64_t lo = 0; lo < n; lo += AGVM_BLOCK) {
        int64_t m = n - lo < AGVM_BLOCK ? n - lo : AGVM_BLOCK;
        gram_block(g + lo, s + lo, m, part);
        add3(out, part);
    }
}

void agvm_preconditioned(const float *g, const float *s, const float *v, int64_t n, float a1, float b1, float a2,
                         float b2, float c, float eps, double *out) {
    double part[3];
    out[0] = out[1] = out[2] = 0.0;
    for (int64_t lo = 0; lo < n; lo += AGVM_BLOCK) {
        int64_t m = n - lo < AGVM_BLOCK ? n - lo : AGVM_BLOCK;
        precond_block(g + lo, s + lo, v ? v + lo : NULL, m, a1, b1, a2, b2, c, eps, part);
        add3(out, part);
    }
}
