/* Fused CPU kernels for the tiny-model hot paths (fp32, contiguous rows). See __init__.py. */
#include <math.h>
#include <omp.h>
#include <string.h>

/* exp(x) for the softmaxes: Cody-Waite range reduction and a degree-6 polynomial (about 1 ulp on
 * [-87, 88]); written branch-free so the compiler vectorises the loops that call it. Below -87.3 the
 * result is 0 (exp(-inf) = 0 for masked scores). */
static inline float exp_f32(float x) {
    const float hi = 88.3762626647949f, lo = -87.3365447504f;
    float xc = x > hi ? hi : x;
    xc = xc < lo ? lo : xc;
    float n = __builtin_floorf(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int bits = ((int)n + 127) << 23;
    float scale;
    __builtin_memcpy(&scale, &bits, sizeof scale);  /* 2^n, a bit cast the vectoriser understands */
    float y = p * scale;
    return x < lo ? 0.0f : y;
}

/* One decode step's attention for every row, from the fused q/k/v projection:
 *   qkv  [B, qkv_stride]: Hq query heads, Hkv key heads, Hkv value heads of D each;
 *   cosv, sinv [B, (Hq + Hkv) * D]: x_rot = x * cos + halves_swapped(x) * sin per head (the query
 *     rows carry the attention scale, the sin its sign: LeanDecoder._rope's tables);
 *   kt [B, Hkv, D, cap] (keys transposed), v [B, Hkv, cap, D]: the cache; this step's rotated key
 *     and value are written at position pos, and attention reads positions 0 .. pos;
 *   mask [B, mask_stride] additive key mask, or NULL;
 *   out [B, Hq * D]; scratch: max_threads * cap floats. */
static inline __attribute__((always_inline)) void
decode_attention_impl(const float *qkv, long qkv_stride, const float *cosv, const float *sinv,
                      float *kt, float *v, const float *mask, long mask_stride, float *out,
                      int B, int Hq, int Hkv, const int D, int pos, int cap, float *scratch, int max_threads) {
    const int group = Hq / Hkv, half = D / 2, L = pos + 1;
    const long tab = (long)(Hq + Hkv) * D;
#pragma omp parallel for schedule(static) if (B * Hkv >= 4) num_threads(max_threads)
    for (long item = 0; item < (long)B * Hkv; item++) {
        const long b = item / Hkv;
        const int h = (int)(item % Hkv);
        const float *row = qkv + b * qkv_stride, *c = cosv + b * tab, *s = sinv + b * tab;
        float *ktb = kt + (b * Hkv + h) * (long)D * cap, *vb = v + (b * Hkv + h) * (long)cap * D;
        const float *k = row + (long)(Hq + h) * D, *vn = row + (long)(Hq + Hkv + h) * D;
        const float *ck = c + (long)(Hq + h) * D, *sk = s + (long)(Hq + h) * D;
        for (int d = 0; d < D; d++) {
            float sw = d < half ? k[d + half] : k[d - half];
            ktb[(long)d * cap + pos] = k[d] * ck[d] + sw * sk[d];
            vb[(long)pos * D + d] = vn[d];
        }
        float *scores = scratch + (long)omp_get_thread_num() * cap, q[D], acc[D];
        const float *m = mask ? mask + b * mask_stride : 0;
        for (int g = 0; g < group; g++) {
            const int qh = h * group + g;
            const float *qs = row + (long)qh * D, *cq = c + (long)qh * D, *sq = s + (long)qh * D;
            for (int d = 0; d < D; d++) {
                float sw = d < half ? qs[d + half] : qs[d - half];
                q[d] = qs[d] * cq[d] + sw * sq[d];
            }
            for (int l = 0; l < L; l++) scores[l] = m ? m[l] : 0.0f;
            for (int d = 0; d < D; d++) {
                const float qd = q[d], *kr = ktb + (long)d * cap;
                for (int l = 0; l < L; l++) scores[l] += qd * kr[l];
            }
            float mx = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : mx)
            for (int l = 0; l < L; l++) mx = scores[l] > mx ? scores[l] : mx;
#pragma omp simd reduction(+ : sum)
            for (int l = 0; l < L; l++) { scores[l] = exp_f32(scores[l] - mx); sum += scores[l]; }
            const float inv = 1.0f / sum;
            for (int d = 0; d < D; d++) acc[d] = 0.0f;
            for (int l = 0; l < L; l++) {
                const float p = scores[l] * inv, *vr = vb + (long)l * D;
                for (int d = 0; d < D; d++) acc[d] += p * vr[d];
            }
            float *o = out + b * (long)Hq * D + (long)qh * D;
            for (int d = 0; d < D; d++) o[d] = acc[d];
        }
    }
}

void decode_attention(const float *qkv, long qkv_stride, const float *cosv, const float *sinv,
                      float *kt, float *v, const float *mask, long mask_stride, float *out,
                      int B, int Hq, int Hkv, int D, int pos, int cap, float *scratch, int max_threads) {
    if (D == 32)
        decode_attention_impl(qkv, qkv_stride, cosv, sinv, kt, v, mask, mask_stride, out, B, Hq, Hkv, 32, pos, cap, scratch,
                              max_threads);
    else if (D == 64)
        decode_attention_impl(qkv, qkv_stride, cosv, sinv, kt, v, mask, mask_stride, out, B, Hq, Hkv, 64, pos, cap, scratch,
                              max_threads);
    else if (D == 128)
        decode_attention_impl(qkv, qkv_stride, cosv, sinv, kt, v, mask, mask_stride, out, B, Hq, Hkv, 128, pos, cap, scratch,
                              max_threads);
    else
        decode_attention_impl(qkv, qkv_stride, cosv, sinv, kt, v, mask, mask_stride, out, B, Hq, Hkv, D, pos, cap, scratch,
                              max_threads);
}


/* Threads only above torch's own grain size for elementwise work (32 k elements): below it a parallel
 * region costs more than it saves (the decode step's [rows, hidden] tensors). */
#define PAR_GRAIN 32768L

/* RMSNorm forward over rows: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps); x, y [N, H]; rstd [N]
 * is stored for the backward unless NULL (inference). */
void rms_norm_forward(const float *x, const float *w, float eps, float *y, float *rstd, long N, int H) {
#pragma omp parallel for schedule(static) if (N * H >= PAR_GRAIN)
    for (long i = 0; i < N; i++) {
        const float *xr = x + i * H;
        float *yr = y + i * H;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int j = 0; j < H; j++) ss += xr[j] * xr[j];
        const float r = 1.0f / sqrtf(ss / H + eps);
        if (rstd) rstd[i] = r;
#pragma omp simd
        for (int j = 0; j < H; j++) yr[j] = xr[j] * r * w[j];
    }
}

/* RMSNorm backward: with xhat = x * rstd and gw = grad * w,
 *   dx = (gw - xhat * mean(gw * xhat)) * rstd,   dw = sum over rows of grad * xhat.
 * dw is summed per thread over a static share of the rows into scratch [threads, H], then the
 * shares in thread order: deterministic for a given thread count. scratch holds max_threads * H. */
void rms_norm_backward(const float *grad, const float *x, const float *rstd, const float *w, float *dx,
                       float *dw, float *scratch, int max_threads, long N, int H) {
    int used = 1;
#pragma omp parallel if (N * H >= PAR_GRAIN) num_threads(max_threads)
    {
        const int t = omp_get_thread_num();
#pragma omp single
        used = omp_get_num_threads();
        float *acc = scratch + (long)t * H;
        for (int j = 0; j < H; j++) acc[j] = 0.0f;
#pragma omp for schedule(static)
        for (long i = 0; i < N; i++) {
            const float *g = grad + i * H, *xr = x + i * H;
            float *d = dx + i * H;
            const float r = rstd[i];
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int j = 0; j < H; j++) dot += g[j] * w[j] * xr[j] * r;
            const float mean = dot / H;
#pragma omp simd
            for (int j = 0; j < H; j++) {
                const float xh = xr[j] * r;
                acc[j] += g[j] * xh;
                d[j] = (g[j] * w[j] - xh * mean) * r;
            }
        }
    }
    for (int j = 0; j < H; j++) dw[j] = 0.0f;
    for (int t = 0; t < used; t++)
        for (int j = 0; j < H; j++) dw[j] += scratch[(long)t * H + j];
}

static inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

/* SwiGLU forward: out [N, F] = silu(gate) * up for fc1 [N, 2F] = [gate | up] per row. */
void swiglu_forward(const float *fc1, float *out, long N, int F) {
#pragma omp parallel for schedule(static) if (N * F >= PAR_GRAIN)
    for (long i = 0; i < N; i++) {
        const float *g = fc1 + i * 2 * F, *u = g + F;
        float *o = out + i * F;
#pragma omp simd
        for (int j = 0; j < F; j++) o[j] = g[j] * sigmoid_f32(g[j]) * u[j];
    }
}

/* SwiGLU backward: d [N, 2F] = [grad * up * silu'(gate) | grad * silu(gate)],
 * silu'(x) = s * (1 + x * (1 - s)) with s = sigmoid(x). */
void swiglu_backward(const float *grad, const float *fc1, float *d, long N, int F) {
#pragma omp parallel for schedule(static) if (N * F >= PAR_GRAIN)
    for (long i = 0; i < N; i++) {
        const float *g = fc1 + i * 2 * F, *u = g + F, *gr = grad + i * F;
        float *dg = d + i * 2 * F, *du = dg + F;
#pragma omp simd
        for (int j = 0; j < F; j++) {
            const float s = sigmoid_f32(g[j]), act = g[j] * s;
            dg[j] = gr[j] * u[j] * (s * (1.0f + g[j] * (1.0f - s)));
            du[j] = gr[j] * act;
        }
    }
}

/* RoPE on fused q/k/v rows: out = src * C + sign * halves_swapped(src) * S per head of D, with
 * C, S [N, F] (lean_forward.rope_tables); src, out [N, F] with row strides. */
void rope_rotate(const float *src, long src_stride, const float *C, const float *S, float sign, float *out,
                 long out_stride, long N, int F, int D) {
    const int half = D / 2;
#pragma omp parallel for schedule(static) if (N * F >= PAR_GRAIN)
    for (long i = 0; i < N; i++) {
        const float *s = src + i * src_stride, *c = C + i * F, *sn = S + i * F;
        float *o = out + i * out_stride;
        for (int h = 0; h < F; h += D) {
#pragma omp simd
            for (int j = 0; j < half; j++) o[h + j] = s[h + j] * c[h + j] + sign * s[h + j + half] * sn[h + j];
#pragma omp simd
            for (int j = half; j < D; j++) o[h + j] = s[h + j] * c[h + j] + sign * s[h + j - half] * sn[h + j];
        }
    }
}

/* Causal attention within the slots of a packed row (lean_forward._SlotAttention), forward.
 *   rows [N, row_stride]: the rotated fused q/k/v rows, per key/value group g: R query heads, its
 *     key, its value (D each): query head r of g at (g * (R + 2) + r) * D, key at (g * (R + 2) + R) * D;
 *   slots [S, W] row positions of each slot in order (slot_len[s] real ones first); owner [S, W]:
 *     1 where this slot computes that position's output (a shared prompt's positions are in several
 *     slots, with the same output in each);
 *   seg [n_seg + 1]: slots seg[i] .. seg[i+1]-1 form segment i, whose slots share no row position
 *     with any other segment's (packing.py's segments: a prompt and its responses);
 *   out [N, G * R * D] (owned positions written), lse [N, G * R]: log-sum-exp of each query's scaled
 *     scores, for the backward;
 *   scratch: max_threads * slot_scratch_floats(W, D) floats.
 * One work item is a (segment, group): its slots one after another, so a shared position is only
 * ever touched by one thread. Keys (and values) are copied transposed into a [D, Wp] block, Wp = W
 * rounded up to 16 with zero columns, so the score loops run in whole 16-wide vectors whatever the
 * slot length; scores past the query (causal) are dropped after the exp. */
#define VB 16
static inline int round_vb(int n) { return (n + VB - 1) / VB * VB; }

long slot_scratch_floats(int W, int D) { return 4L * D * round_vb(W) + 2L * round_vb(W); }

static inline void gather_t(const float *rows, long row_stride, const int *pos, int L, long off, int D, int Wp,
                            float *dst) {
    const int Lp = round_vb(L);
    for (int j = 0; j < L; j++) {
        const float *src = rows + pos[j] * row_stride + off;
        for (int d = 0; d < D; d++) dst[(long)d * Wp + j] = src[d];
    }
    for (int d = 0; d < D; d++)
        for (int j = L; j < Lp; j++) dst[(long)d * Wp + j] = 0.0f;
}

/* p[0 .. round_vb(n)) = scale * q . k_j from kt [D, Wp] */
static inline void scores_t(const float *q, const float *kt, int D, int Wp, int n, float scale, float *p) {
    const int np = round_vb(n);
    for (int jb = 0; jb < np; jb += VB) {
        float acc[VB] = {0};
        for (int d = 0; d < D; d++) {
            const float qd = q[d] * scale, *k = kt + (long)d * Wp + jb;
#pragma omp simd
            for (int t = 0; t < VB; t++) acc[t] += qd * k[t];
        }
        for (int t = 0; t < VB; t++) p[jb + t] = acc[t];
    }
}

static inline __attribute__((always_inline)) void
slot_attention_forward_impl(const float *rows, long row_stride, const int *slots, const int *slot_len,
                            const unsigned char *owner, const int *seg, int n_seg, int W, int G, int R,
                            const int D, float scale, float *out, float *lse, float *scratch, int max_threads) {
    const long out_stride = (long)G * R * D;
    const int Wp = round_vb(W);
#pragma omp parallel num_threads(max_threads)
    {
        float *kt = scratch + (long)omp_get_thread_num() * slot_scratch_floats(W, D), *v = kt + (long)D * Wp,
              *p = v + (long)D * Wp;
#pragma omp for schedule(dynamic, 1)
        for (long item = 0; item < (long)n_seg * G; item++) {
            const int sg = (int)(item / G), g = (int)(item % G);
            const long koff = (long)(g * (R + 2) + R) * D, voff = koff + D;
            for (int s = seg[sg]; s < seg[sg + 1]; s++) {
                const int L = slot_len[s], *pos = slots + (long)s * W;
                const unsigned char *own = owner + (long)s * W;
                gather_t(rows, row_stride, pos, L, koff, D, Wp, kt);
                for (int j = 0; j < L; j++) {
                    const float *vr = rows + pos[j] * row_stride + voff;
                    for (int d = 0; d < D; d++) v[(long)j * D + d] = vr[d];
                }
                for (int i = 0; i < L; i++) {
                    if (!own[i]) continue;
                    const float *qrow = rows + pos[i] * row_stride + (long)g * (R + 2) * D;
                    const int n = i + 1;
                    for (int r = 0; r < R; r++) {
                        scores_t(qrow + (long)r * D, kt, D, Wp, n, scale, p);
                        float mx = -INFINITY, sum = 0.0f;
                        for (int j = 0; j < n; j++) mx = p[j] > mx ? p[j] : mx;
#pragma omp simd reduction(+ : sum)
                        for (int j = 0; j < n; j++) { p[j] = exp_f32(p[j] - mx); sum += p[j]; }
                        const float inv = 1.0f / sum;
                        float o[D];
                        for (int d = 0; d < D; d++) o[d] = 0.0f;
                        for (int j = 0; j < n; j++) {
                            const float pj = p[j], *vr = v + (long)j * D;
#pragma omp simd
                            for (int d = 0; d < D; d++) o[d] += pj * vr[d];
                        }
                        float *dst = out + pos[i] * out_stride + (long)(g * R + r) * D;
                        for (int d = 0; d < D; d++) dst[d] = o[d] * inv;
                        lse[pos[i] * (long)G * R + g * R + r] = mx + logf(sum);
                    }
                }
            }
        }
    }
}

/* The backward of slot_attention_forward. grad, out [N, G * R * D]; lse from the forward; dvec
 * [N, row_stride] zero on entry: receives dq at the query heads, dk and dv at the key and value
 * (summed over every slot holding the position, in slot order). With P = softmax(scale * q k^T)
 * and dO the output gradient of an owned query (the others' outputs are never read):
 *   dv_j += P_j dO,  dS_j = P_j (dO . v_j - dO . O),  dq = scale * sum_j dS_j k_j,  dk_j += scale * dS_j q. */
static inline __attribute__((always_inline)) void
slot_attention_backward_impl(const float *rows, long row_stride, const int *slots, const int *slot_len,
                             const unsigned char *owner, const int *seg, int n_seg, int W, int G, int R,
                             const int D, float scale, const float *grad, const float *out, const float *lse,
                             float *dvec, float *scratch, int max_threads) {
    const long out_stride = (long)G * R * D;
    const int Wp = round_vb(W);
#pragma omp parallel num_threads(max_threads)
    {
        float *kt = scratch + (long)omp_get_thread_num() * slot_scratch_floats(W, D), *vt = kt + (long)D * Wp,
              *dk = vt + (long)D * Wp, *dv = dk + (long)D * Wp, *p = dv + (long)D * Wp, *dp = p + Wp;
#pragma omp for schedule(dynamic, 1)
        for (long item = 0; item < (long)n_seg * G; item++) {
            const int sg = (int)(item / G), g = (int)(item % G);
            const long koff = (long)(g * (R + 2) + R) * D, voff = koff + D;
            for (int s = seg[sg]; s < seg[sg + 1]; s++) {
                const int L = slot_len[s], *pos = slots + (long)s * W;
                const unsigned char *own = owner + (long)s * W;
                gather_t(rows, row_stride, pos, L, koff, D, Wp, kt);
                gather_t(rows, row_stride, pos, L, voff, D, Wp, vt);
                for (long x = 0; x < (long)L * D; x++) dk[x] = dv[x] = 0.0f;
                for (int i = 0; i < L; i++) {
                    if (!own[i]) continue;
                    const float *qrow = rows + pos[i] * row_stride + (long)g * (R + 2) * D;
                    float *dqrow = dvec + pos[i] * row_stride + (long)g * (R + 2) * D;
                    const int n = i + 1;
                    for (int r = 0; r < R; r++) {
                        const float *q = qrow + (long)r * D;
                        const float *go = grad + pos[i] * out_stride + (long)(g * R + r) * D;
                        const float *o = out + pos[i] * out_stride + (long)(g * R + r) * D;
                        const float m = lse[pos[i] * (long)G * R + g * R + r];
                        float delta = 0.0f;
#pragma omp simd reduction(+ : delta)
                        for (int d = 0; d < D; d++) delta += go[d] * o[d];
                        scores_t(q, kt, D, Wp, n, scale, p);
                        scores_t(go, vt, D, Wp, n, 1.0f, dp);
#pragma omp simd
                        for (int j = 0; j < n; j++) {
                            p[j] = exp_f32(p[j] - m);
                            dp[j] = p[j] * (dp[j] - delta) * scale; /* scale * dS_j */
                        }
                        float dq[D];
                        for (int d = 0; d < D; d++) dq[d] = 0.0f;
                        for (int j = 0; j < n; j++) {
                            const float pj = p[j], dsj = dp[j];
                            float *dkj = dk + (long)j * D, *dvj = dv + (long)j * D;
                            const float *kj = rows + pos[j] * row_stride + koff;
#pragma omp simd
                            for (int d = 0; d < D; d++) {
                                dq[d] += dsj * kj[d];
                                dkj[d] += dsj * q[d];
                                dvj[d] += pj * go[d];
                            }
                        }
                        float *dqr = dqrow + (long)r * D;
                        for (int d = 0; d < D; d++) dqr[d] = dq[d];
                    }
                }
                for (int j = 0; j < L; j++) {
                    float *dkr = dvec + pos[j] * row_stride + koff, *dvr = dvec + pos[j] * row_stride + voff;
#pragma omp simd
                    for (int d = 0; d < D; d++) {
                        dkr[d] += dk[(long)j * D + d];
                        dvr[d] += dv[(long)j * D + d];
                    }
                }
            }
        }
    }
}

#define SLOT_ARGS_F rows, row_stride, slots, slot_len, owner, seg, n_seg, W, G, R
void slot_attention_forward(const float *rows, long row_stride, const int *slots, const int *slot_len,
                            const unsigned char *owner, const int *seg, int n_seg, int W, int G, int R, int D,
                            float scale, float *out, float *lse, float *scratch, int max_threads) {
    if (D == 32)
        slot_attention_forward_impl(SLOT_ARGS_F, 32, scale, out, lse, scratch, max_threads);
    else if (D == 64)
        slot_attention_forward_impl(SLOT_ARGS_F, 64, scale, out, lse, scratch, max_threads);
    else if (D == 128)
        slot_attention_forward_impl(SLOT_ARGS_F, 128, scale, out, lse, scratch, max_threads);
    else
        slot_attention_forward_impl(SLOT_ARGS_F, D, scale, out, lse, scratch, max_threads);
}

void slot_attention_backward(const float *rows, long row_stride, const int *slots, const int *slot_len,
                             const unsigned char *owner, const int *seg, int n_seg, int W, int G, int R, int D,
                             float scale, const float *grad, const float *out, const float *lse, float *dvec,
                             float *scratch, int max_threads) {
    if (D == 32)
        slot_attention_backward_impl(SLOT_ARGS_F, 32, scale, grad, out, lse, dvec, scratch, max_threads);
    else if (D == 64)
        slot_attention_backward_impl(SLOT_ARGS_F, 64, scale, grad, out, lse, dvec, scratch, max_threads);
    else if (D == 128)
        slot_attention_backward_impl(SLOT_ARGS_F, 128, scale, grad, out, lse, dvec, scratch, max_threads);
    else
        slot_attention_backward_impl(SLOT_ARGS_F, D, scale, grad, out, lse, dvec, scratch, max_threads);
}
