/* The bodies of the CPU ops, written once over the element type T; included by cpu/ops.c
 * once per type (see there for the macros it expects). No include guard on purpose.
 * Contracts (shapes, what is written and what accumulated) are in cpu/ops.h. */

/* ---- embedding ---------------------------------------------------------------------- */

void FN(cpu_embedding_fwd)(T *out, const int32_t *tokens, const T *wte, int N, int D)
{
    for (int n = 0; n < N; n++)
        memcpy(out + (size_t)n * D, wte + (size_t)tokens[n] * D, (size_t)D * sizeof(T));
}

void FN(cpu_embedding_bwd)(T *dwte, const T *dout, const int32_t *tokens, int N, int D)
{
    for (int n = 0; n < N; n++) {
        const T *dout_n = dout + (size_t)n * D;
        T *dw = dwte + (size_t)tokens[n] * D;
        for (int i = 0; i < D; i++)
            dw[i] += dout_n[i];
    }
}

/* ---- rmsnorm ------------------------------------------------------------------------ */

void FN(cpu_rmsnorm_fwd)(T *out, T *rstd, const T *x, const T *w, int N, int D, T eps)
{
    for (int n = 0; n < N; n++) {
        const T *x_n = x + (size_t)n * D;
        T *out_n = out + (size_t)n * D;
        T ss = 0;
        for (int i = 0; i < D; i++)
            ss += x_n[i] * x_n[i];
        T r = 1 / MF(sqrt)(ss / D + eps);
        for (int i = 0; i < D; i++)
            out_n[i] = w[i] * (x_n[i] * r);
        rstd[n] = r;
    }
}

/* y_i = w_i x_i r with r = (mean(x^2) + eps)^(-1/2), dr/dx_j = -r^3 x_j / D, so
 * dx_j = dy_j w_j r - x_j r^3 / D * sum_i dy_i w_i x_i. */
void FN(cpu_rmsnorm_bwd)(T *dx, T *dw, const T *dout, const T *x, const T *w, const T *rstd,
                         int N, int D)
{
    for (int n = 0; n < N; n++) {
        const T *x_n = x + (size_t)n * D;
        const T *dout_n = dout + (size_t)n * D;
        T *dx_n = dx + (size_t)n * D;
        T r = rstd[n];
        T dot = 0;
        for (int i = 0; i < D; i++)
            dot += dout_n[i] * w[i] * x_n[i];
        T c = dot * r * r * r / D;
        for (int i = 0; i < D; i++) {
            dw[i] += dout_n[i] * x_n[i] * r;
            dx_n[i] += dout_n[i] * w[i] * r - c * x_n[i];
        }
    }
}

/* ---- linear ------------------------------------------------------------------------- */

void FN(cpu_linear_fwd)(T *out, const T *x, const T *w, int N, int IN, int OUT)
{
    if (N == 0)
        return;
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, N, OUT, IN, 1, x, IN, w, IN, 0, out, OUT);
}

void FN(cpu_linear_bwd)(T *dx, T *dw, const T *dout, const T *x, const T *w, int N, int IN,
                        int OUT)
{
    if (N == 0)
        return;
    if (dx) /* dx (N, IN) += dout (N, OUT) W (OUT, IN) */
        GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, IN, OUT, 1, dout, OUT, w, IN, 1,
             dx, IN);
    if (dw) /* dw (OUT, IN) += dout^T (OUT, N) x (N, IN) */
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, OUT, IN, N, 1, dout, OUT, x, IN, 1, dw,
             IN);
}

/* ---- rope --------------------------------------------------------------------------- */

/* Pair (i, i + hd/2) of every head of row n turns by angle pos[n] * theta^(-2i/hd);
 * sign = +1 rotates forward, -1 applies the inverse (the transpose) for backward. */
static void FN(s_rope)(T *out, const T *x, const int32_t *pos, int N, int H, int hd,
                       double theta, T sign, int accumulate)
{
    int half = hd / 2;
    for (int n = 0; n < N; n++) {
        for (int i = 0; i < half; i++) {
            double angle = pos[n] * pow(theta, -2.0 * i / hd);
            T c = (T)cos(angle), s = sign * (T)sin(angle);
            for (int h = 0; h < H; h++) {
                size_t off = ((size_t)n * H + h) * hd;
                T x1 = x[off + i], x2 = x[off + i + half];
                T y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
                if (accumulate) {
                    out[off + i] += y1;
                    out[off + i + half] += y2;
                } else {
                    out[off + i] = y1;
                    out[off + i + half] = y2;
                }
            }
        }
    }
}

void FN(cpu_rope_fwd)(T *out, const T *x, const int32_t *pos, int N, int H, int hd,
                      double theta)
{
    FN(s_rope)(out, x, pos, N, H, hd, theta, 1, 0);
}

void FN(cpu_rope_bwd)(T *dx, const T *dout, const int32_t *pos, int N, int H, int hd,
                      double theta)
{
    FN(s_rope)(dx, dout, pos, N, H, hd, theta, -1, 1);
}

/* ---- causal self-attention (grouped-query) ----------------------------------------- */

/* Per (batch, query head h) with kv head g = h / (H/KVH), all through GEMM on strided
 * views (q, out rows at stride H*hd, k, v rows at stride KVH*hd; no copies):
 * S = scale Q_h K_g^T (T x T, into probs), causal softmax row-wise (0 above the diagonal),
 * out_h = P V_g. The GEMMs run over the full T x T: the masked entries are exact zeros. */
void FN(cpu_attention_fwd)(T *out, T *probs, const T *q, const T *k, const T *v, int B,
                           int Tn, int H, int KVH, int hd)
{
    int rep = H / KVH;
    T scale = 1 / MF(sqrt)((T)hd);
    int ldq = H * hd, ldk = KVH * hd;
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < H; h++) {
            int kh = h / rep;
            const T *q_h = q + (size_t)b * Tn * ldq + (size_t)h * hd;
            const T *k_g = k + (size_t)b * Tn * ldk + (size_t)kh * hd;
            const T *v_g = v + (size_t)b * Tn * ldk + (size_t)kh * hd;
            T *out_h = out + (size_t)b * Tn * ldq + (size_t)h * hd;
            T *P = probs + ((size_t)b * H + h) * Tn * Tn;

            GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, Tn, Tn, hd, scale, q_h, ldq, k_g, ldk,
                 0, P, Tn);
            for (int t = 0; t < Tn; t++) {
                T *p = P + (size_t)t * Tn;
                T maxv = -INFINITY;
                for (int t2 = 0; t2 <= t; t2++)
                    if (p[t2] > maxv)
                        maxv = p[t2];
                T sum = 0;
                for (int t2 = 0; t2 <= t; t2++) {
                    p[t2] = MF(exp)(p[t2] - maxv);
                    sum += p[t2];
                }
                T inv = 1 / sum;
                for (int t2 = 0; t2 <= t; t2++)
                    p[t2] *= inv;
                for (int t2 = t + 1; t2 < Tn; t2++)
                    p[t2] = 0;
            }
            GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, Tn, hd, Tn, 1, P, Tn, v_g, ldk, 0,
                 out_h, ldq);
        }
    }
}

/* With S = scale Q K^T, P = softmax(S), out = P V, per (batch, head): dP = dOut V^T,
 * dS = scale P * (dP - rowsum(dP * P)), dQ += dS K, dK += dS^T Q, dV += P^T dOut (GEMMs,
 * beta = 1 for the accumulations; P is 0 above the diagonal so dS is too). */
void FN(cpu_attention_bwd)(T *dq, T *dk, T *dv, const T *dout, const T *q, const T *k,
                           const T *v, const T *probs, int B, int Tn, int H, int KVH, int hd)
{
    int rep = H / KVH;
    T scale = 1 / MF(sqrt)((T)hd);
    int ldq = H * hd, ldk = KVH * hd;
    T *dS = semoe_xmalloc((size_t)Tn * Tn * sizeof(T));
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < H; h++) {
            int kh = h / rep;
            size_t qoff = (size_t)b * Tn * ldq + (size_t)h * hd;
            size_t kvoff = (size_t)b * Tn * ldk + (size_t)kh * hd;
            const T *P = probs + ((size_t)b * H + h) * Tn * Tn;

            GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, Tn, Tn, hd, 1, dout + qoff, ldq,
                 v + kvoff, ldk, 0, dS, Tn);
            for (int t = 0; t < Tn; t++) {
                const T *p = P + (size_t)t * Tn;
                T *ds = dS + (size_t)t * Tn;
                T pdp = 0;
                for (int t2 = 0; t2 <= t; t2++)
                    pdp += p[t2] * ds[t2];
                for (int t2 = 0; t2 <= t; t2++)
                    ds[t2] = p[t2] * (ds[t2] - pdp) * scale;
                for (int t2 = t + 1; t2 < Tn; t2++)
                    ds[t2] = 0;
            }
            GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, Tn, hd, Tn, 1, dS, Tn, k + kvoff,
                 ldk, 1, dq + qoff, ldq);
            GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, Tn, hd, Tn, 1, dS, Tn, q + qoff, ldq,
                 1, dk + kvoff, ldk);
            GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, Tn, hd, Tn, 1, P, Tn, dout + qoff,
                 ldq, 1, dv + kvoff, ldk);
        }
    }
    free(dS);
}

/* ---- MoE router --------------------------------------------------------------------- */

void FN(cpu_router_fwd)(T *probs, int32_t *idx, T *w, const T *logits, int N, int E, int K)
{
    for (int n = 0; n < N; n++) {
        const T *l = logits + (size_t)n * E;
        T *p = probs + (size_t)n * E;
        int32_t *idx_n = idx + (size_t)n * K;
        T *w_n = w + (size_t)n * K;

        T maxv = l[0];
        for (int e = 1; e < E; e++)
            if (l[e] > maxv)
                maxv = l[e];
        T sum = 0;
        for (int e = 0; e < E; e++) {
            p[e] = MF(exp)(l[e] - maxv);
            sum += p[e];
        }
        T inv = 1 / sum;
        for (int e = 0; e < E; e++)
            p[e] *= inv;

        /* K passes of "largest not yet taken"; strict > keeps the lower index on ties. */
        T wsum = 0;
        for (int j = 0; j < K; j++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int jj = 0; jj < j; jj++)
                    taken |= idx_n[jj] == e;
                if (!taken && (best < 0 || p[e] > p[best]))
                    best = e;
            }
            idx_n[j] = best;
            wsum += p[best];
        }
        for (int j = 0; j < K; j++)
            w_n[j] = p[idx_n[j]] / wsum;
    }
}

/* w_j = p_{i_j} / S, S = sum_j p_{i_j}: dL/dp_{i_j} (through w) = (dw_j - sum_l dw_l w_l) / S.
 * With g = that plus dprobs, softmax backward: dlogits_e = p_e (g_e - sum_f p_f g_f). */
void FN(cpu_router_bwd)(T *dlogits, const T *dw, const T *dprobs, const T *probs,
                        const int32_t *idx, const T *w, int N, int E, int K)
{
    for (int n = 0; n < N; n++) {
        const T *p = probs + (size_t)n * E;
        const int32_t *idx_n = idx + (size_t)n * K;
        const T *w_n = w + (size_t)n * K, *dw_n = dw + (size_t)n * K;
        const T *dp_n = dprobs ? dprobs + (size_t)n * E : NULL;
        T *dl = dlogits + (size_t)n * E;

        T S = 0, wdw = 0;
        for (int j = 0; j < K; j++) {
            S += p[idx_n[j]];
            wdw += w_n[j] * dw_n[j];
        }
        T pg = 0; /* sum_f p_f g_f */
        for (int j = 0; j < K; j++)
            pg += p[idx_n[j]] * (dw_n[j] - wdw) / S;
        if (dp_n)
            for (int e = 0; e < E; e++)
                pg += p[e] * dp_n[e];

        for (int e = 0; e < E; e++)
            dl[e] += p[e] * ((dp_n ? dp_n[e] : 0) - pg);
        for (int j = 0; j < K; j++)
            dl[idx_n[j]] += p[idx_n[j]] * (dw_n[j] - wdw) / S;
    }
}

/* ---- SwiGLU (elementwise part) ------------------------------------------------------ */

void FN(cpu_swiglu_fwd)(T *h, const T *a, const T *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        T s = 1 / (1 + MF(exp)(-a[i]));
        h[i] = a[i] * s * b[i];
    }
}

/* d silu(a)/da = s (1 + a (1 - s)), s = sigmoid(a). */
void FN(cpu_swiglu_bwd)(T *da, T *db, const T *dh, const T *a, const T *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        T s = 1 / (1 + MF(exp)(-a[i]));
        da[i] += dh[i] * b[i] * s * (1 + a[i] * (1 - s));
        db[i] += dh[i] * a[i] * s;
    }
}

/* ---- cross-entropy ------------------------------------------------------------------ */

/* Row max and sum of exp(l - max): softmax = exp(l - max) / sum. */
static void FN(s_softmax_stats)(const T *l, int V, T *maxv, T *sum)
{
    T m = l[0];
    for (int i = 1; i < V; i++)
        if (l[i] > m)
            m = l[i];
    T s = 0;
    for (int i = 0; i < V; i++)
        s += MF(exp)(l[i] - m);
    *maxv = m;
    *sum = s;
}

T FN(cpu_crossentropy_fwd)(T *losses, const T *logits, const int32_t *targets, int N, int V)
{
    double total = 0;
    for (int n = 0; n < N; n++) {
        const T *l = logits + (size_t)n * V;
        T maxv, sum;
        FN(s_softmax_stats)(l, V, &maxv, &sum);
        T loss = maxv + MF(log)(sum) - l[targets[n]];
        if (losses)
            losses[n] = loss;
        total += loss;
    }
    return (T)(total / N);
}

void FN(cpu_crossentropy_bwd)(T *dlogits, const T *logits, const int32_t *targets, T dloss,
                              int N, int V)
{
    T c = dloss / N;
    for (int n = 0; n < N; n++) {
        const T *l = logits + (size_t)n * V;
        T *dl = dlogits + (size_t)n * V;
        T maxv, sum;
        FN(s_softmax_stats)(l, V, &maxv, &sum);
        T inv = 1 / sum;
        for (int i = 0; i < V; i++)
            dl[i] += c * (MF(exp)(l[i] - maxv) * inv - (i == targets[n]));
    }
}

/* ---- load-balancing aux loss -------------------------------------------------------- */

T FN(cpu_auxloss_fwd)(const T *probs, const int32_t *idx, int M, int E, int K)
{
    double *cnt = semoe_xcalloc((size_t)E * 2, sizeof(double)), *psum = cnt + E;
    for (size_t i = 0; i < (size_t)M * K; i++)
        cnt[idx[i]] += 1;
    for (int m = 0; m < M; m++)
        for (int e = 0; e < E; e++)
            psum[e] += probs[(size_t)m * E + e];
    double loss = 0;
    for (int e = 0; e < E; e++)
        loss += (cnt[e] / M) * (psum[e] / M);
    free(cnt);
    return (T)(E * loss);
}

void FN(cpu_auxloss_bwd)(T *dprobs, const int32_t *idx, T dloss, int M, int E, int K)
{
    double *cnt = semoe_xcalloc((size_t)E, sizeof(double));
    for (size_t i = 0; i < (size_t)M * K; i++)
        cnt[idx[i]] += 1;
    for (int e = 0; e < E; e++)
        cnt[e] = (double)dloss * E * (cnt[e] / M) / M;
    for (int m = 0; m < M; m++)
        for (int e = 0; e < E; e++)
            dprobs[(size_t)m * E + e] += (T)cnt[e];
    free(cnt);
}

/* ---- AdamW and the gradient norm ---------------------------------------------------- */

void FN(cpu_adamw)(T *p, const T *g, T *m, T *v, size_t n, double lr, double beta1,
                   double beta2, double eps, double wd, int t, double gscale)
{
    T b1 = (T)beta1, b2 = (T)beta2;
    T b1c = (T)(1 - pow(beta1, t)), b2c = (T)(1 - pow(beta2, t));
    T lr_ = (T)lr, eps_ = (T)eps, wd_ = (T)wd, gs = (T)gscale;
    for (size_t i = 0; i < n; i++) {
        T gi = g[i] * gs;
        m[i] = b1 * m[i] + (1 - b1) * gi;
        v[i] = b2 * v[i] + (1 - b2) * gi * gi;
        T mhat = m[i] / b1c, vhat = v[i] / b2c;
        p[i] -= lr_ * (mhat / (MF(sqrt)(vhat) + eps_) + wd_ * p[i]);
    }
}

double FN(cpu_sumsq)(const T *g, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += (double)g[i] * g[i];
    return s;
}
