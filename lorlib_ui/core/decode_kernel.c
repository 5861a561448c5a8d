/* One decoding step's routing at G layers that read the same input, after their scores.
 *
 * Called by lorlib_ui/core/decode_kernel.py, which says why this exists and how it is built.
 * For each layer g (its logits a row of E), exactly what TopKRouter.route and
 * LibraryLinear._dispatch do with tensor operations for one token:
 *
 *   top-k      the k largest logits among the usable experts, largest first (NaN counts as the
 *              largest, as in torch.topk); ties keep the lower index first
 *   softmax    w_j = softmax(top_j / T)
 *   A side     z_ji = A_{e_j, i} . h                  (the chosen experts' rows only)
 *   mix        outputs:    c_ji = w_j s_j z_ji
 *              parameters: c_ji = w_j s_j u_i,  u_i = sum_j w_j z_ji
 *   B side     out = sum_ji c_ji Bt_{e_j, i}          (the chosen experts' rows only)
 *
 * Factors are float32 or bfloat16 (widened exactly: a bfloat16 is the top half of a float32).
 * The arithmetic is float32; sums run in another order than the BLAS's, so results agree with
 * the tensor path to float32 rounding, not bit for bit.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    int32_t members;       /* G layers, routed on one input */
    int32_t experts;       /* E per layer */
    int32_t rank;          /* r rows per expert (zero-padded) */
    int32_t d_in;          /* length of h and of a row of A */
    int32_t a_bf16;        /* A stored as bfloat16, else float32 */
    int32_t bt_bf16;       /* Bt likewise */
    const void *a;         /* (G*E*r, d_in): layer g's expert e, row i at ((g*E + e)*r + i) */
    const float *scales;   /* (G*E): each expert's LoRA scale */
    const void *const *bt; /* G pointers, layer g's (E*r, d_out[g]) */
    const int32_t *d_out;  /* (G) */
    float *const *out;     /* G pointers, layer g's result (d_out[g]) */
    int64_t *index;        /* (G, E): the chosen experts, first k of each row */
    float *top;            /* (G, E): their weights */
} Plan;

static inline float widen(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static float dot(const float *h, const void *row, int bf16, int n) {
    float acc = 0.0f;
    if (bf16) {
        const uint16_t *p = row;
#pragma omp simd reduction(+ : acc)
        for (int i = 0; i < n; i++) acc += h[i] * widen(p[i]);
    } else {
        const float *p = row;
#pragma omp simd reduction(+ : acc)
        for (int i = 0; i < n; i++) acc += h[i] * p[i];
    }
    return acc;
}

static void axpy(float *y, float c, const void *row, int bf16, int n) {
    if (bf16) {
        const uint16_t *p = row;
#pragma omp simd
        for (int i = 0; i < n; i++) y[i] += c * widen(p[i]);
    } else {
        const float *p = row;
#pragma omp simd
        for (int i = 0; i < n; i++) y[i] += c * p[i];
    }
}

static inline int greater(float a, float b) { return isnan(a) ? !isnan(b) : a > b; }

/* The k largest of row (usable ones only) into top/index, largest first; how many were found. */
static int top_k(const float *row, const uint8_t *usable, int experts, int k, float *top, int64_t *index) {
    int found = 0;
    for (int e = 0; e < experts; e++) {
        if (usable && !usable[e]) continue;
        float v = row[e];
        if (found == k && !greater(v, top[k - 1])) continue;
        int j = found < k ? found++ : k - 1;
        for (; j > 0 && greater(v, top[j - 1]); j--) {
            top[j] = top[j - 1];
            index[j] = index[j - 1];
        }
        top[j] = v;
        index[j] = e;
    }
    return found;
}

/* Returns 0, or 1 when k < 1 or a layer has fewer than k usable experts (nothing is then trusted). */
int lorlib_route_decode(const Plan *p, const float *h, const float *logits, const uint8_t *usable, int32_t k,
                        float temperature, int32_t parameters) {
    const int E = p->experts, r = p->rank, d = p->d_in;
    const size_t a_item = p->a_bf16 ? 2 : 4, bt_item = p->bt_bf16 ? 2 : 4;
    if (k < 1 || k > E) return 1;
    float z[k * r], c[k * r], u[r];
    for (int g = 0; g < p->members; g++) {
        float *top = p->top + (size_t)g * E;
        int64_t *index = p->index + (size_t)g * E;
        if (top_k(logits + (size_t)g * E, usable ? usable + (size_t)g * E : NULL, E, k, top, index) < k) return 1;
        float sum = 0.0f, largest = temperature != 1.0f ? top[0] / temperature : top[0];
        for (int j = 0; j < k; j++) {
            top[j] = expf((temperature != 1.0f ? top[j] / temperature : top[j]) - largest);
            sum += top[j];
        }
        for (int j = 0; j < k; j++) top[j] /= sum;
        for (int j = 0; j < k; j++) {
            const char *rows = (const char *)p->a + ((size_t)g * E + index[j]) * r * d * a_item;
            for (int i = 0; i < r; i++) z[j * r + i] = dot(h, rows + (size_t)i * d * a_item, p->a_bf16, d);
        }
        const float *scales = p->scales + (size_t)g * E;
        if (parameters) {
            for (int i = 0; i < r; i++) {
                u[i] = 0.0f;
                for (int j = 0; j < k; j++) u[i] += z[j * r + i] * top[j];
            }
        }
        for (int j = 0; j < k; j++) {
            float ws = top[j] * scales[index[j]];
            for (int i = 0; i < r; i++) c[j * r + i] = ws * (parameters ? u[i] : z[j * r + i]);
        }
        const int d_out = p->d_out[g];
        float *out = p->out[g];
        memset(out, 0, (size_t)d_out * sizeof *out);
        for (int j = 0; j < k; j++) {
            const char *rows = (const char *)p->bt[g] + (size_t)index[j] * r * d_out * bt_item;
            for (int i = 0; i < r; i++) axpy(out, c[j * r + i], rows + (size_t)i * d_out * bt_item, p->bt_bf16, d_out);
        }
    }
    return 0;
}
