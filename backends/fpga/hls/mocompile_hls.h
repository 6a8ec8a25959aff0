// mocompile_hls.h: the kernels of mocompile's FPGA target that hls4ml has no layer for
// (RMSNorm, rotary attention over a KV cache, the top-k router, sparse expert dispatch),
// written for Vitis HLS with ap_fixed arithmetic. The dense matrix-vector products are
// hls4ml's (nnet::dense, resource strategy); everything here calls them through the
// configs the generated parameters.h declares.
//
// Every integer step here has a twin in backends/fpga/fixed.py and the kernels_*.py
// emulations: conversions round half up and saturate (AP_RND, AP_SAT), tables interpolate
// linearly, reciprocals are integer divisions, so the C simulation is bit-exact against the
// numpy emulation.
#ifndef MOCOMPILE_HLS_H_
#define MOCOMPILE_HLS_H_

#include <stdint.h>

#include "ap_fixed.h"
#include "nnet_utils/nnet_dense.h"

namespace mc {

static const int LUT_FRAC = 16;                  // fraction bits of every table entry
static const int64_t NEG_INF = -(1LL << 62);     // "minus infinity" of integer scores

// Whether a fixed-point type is signed (ap_fixed) or not (ap_ufixed).
template <class T> struct is_signed_fx { static const bool value = true; };
template <int W, int I, ap_q_mode Q, ap_o_mode O, int N> struct is_signed_fx<ap_ufixed<W, I, Q, O, N> > {
    static const bool value = false;
};

// The raw two's-complement code of a fixed-point value, and the value of a code.
template <class T> inline int64_t code_of(const T &x) {
    ap_int<T::width + 1> c = 0;
    c.range(T::width - 1, 0) = x.range(T::width - 1, 0);
    if (is_signed_fx<T>::value && c[T::width - 1]) c.range(T::width, T::width) = 1;
    return c.to_int64();
}
template <class T> inline T from_code(int64_t c) {
    T x;
    x.range(T::width - 1, 0) = ap_uint<T::width>(c);
    return x;
}
template <class T> inline int frac_of() { return T::width - T::iwidth; }

// fixed.py's requant: a code with `frac_from` fraction bits converted to T (AP_RND, AP_SAT).
template <class T> inline T requant(int64_t code, int frac_from) {
    int shift = frac_from - frac_of<T>();
    if (shift > 0) code = (code + (1LL << (shift - 1))) >> shift;
    else if (shift < 0) code = code << -shift;
    const int64_t hi = is_signed_fx<T>::value ? (1LL << (T::width - 1)) - 1 : (1LL << T::width) - 1;
    const int64_t lo = is_signed_fx<T>::value ? -(1LL << (T::width - 1)) : 0;
    return from_code<T>(code > hi ? hi : code < lo ? lo : code);
}

// fixed.py's Lut: table t (size + 2 entries from lo in steps of 2^-step_bits), linear
// interpolation on the input's remaining bits, the ends outside.
inline int64_t lut_eval(int64_t code, int frac, const int32_t *t, int lo, int size, int step_bits) {
    int64_t u = code - ((int64_t)lo << frac);
    int shift = frac - step_bits;
    if (shift >= 0) {
        int64_t top = (int64_t)size << shift;
        u = u < 0 ? 0 : u > top ? top : u;
        int64_t i = u >> shift, r = u & ((1LL << shift) - 1);
        return t[i] + (((int64_t)(t[i + 1] - t[i]) * r) >> shift);
    }
    u = u << -shift;
    u = u < 0 ? 0 : u > size ? size : u;
    return t[u];
}

// floor(sqrt(v)), bit by bit (one subtract-compare per result bit).
inline uint64_t isqrt64(uint64_t v) {
    uint64_t res = 0, bit = 1ULL << 62;
    while (bit > v) bit >>= 2;
    while (bit) {
        #pragma HLS PIPELINE II=1
        if (v >= res + bit) { v -= res + bit; res = (res >> 1) + bit; }
        else res >>= 1;
        bit >>= 2;
    }
    return res;
}

// y = x / sqrt(mean(x^2) + eps) * g. The inverse RMS is sqrt(n) * 2^fx / sqrt(V) with
// V = sum(x^2) + n * eps (integers, 2 fx fraction bits): an integer square root with 8
// extra bits and one division per row; x * inv rounds to NT, then * g to O.
template <class X, class G, class NT, class INV, class O, int N>
void rmsnorm(const X x[N], const G g[N], O out[N], int64_t eps_code, int64_t sqrt_n_code) {
    #pragma HLS INLINE off
    int64_t ss = 0;
    for (int i = 0; i < N; i++) {
        #pragma HLS PIPELINE II=1
        int64_t c = code_of(x[i]);
        ss += c * c;
    }
    uint64_t v = (uint64_t)ss + (uint64_t)N * (uint64_t)eps_code;
    uint64_t s = isqrt64(v << 16);
    if (s == 0) s = 1;
    int sh = frac_of<X>() + frac_of<INV>() + 8 - 16;
    uint64_t num = sh >= 0 ? (uint64_t)sqrt_n_code << sh : (uint64_t)sqrt_n_code >> -sh;
    uint64_t inv_code = num / s;
    const uint64_t inv_max = (1ULL << INV::width) - 1;
    INV inv = from_code<INV>(inv_code > inv_max ? inv_max : inv_code);
    for (int i = 0; i < N; i++) {
        #pragma HLS PIPELINE II=1
        NT y = x[i] * inv;
        out[i] = y * g[i];
    }
}

// silu(a) = a * sigmoid(a), the sigmoid from its table.
template <class A, class O> inline O silu(const A &a, const int32_t *sig, int lo, int size, int step_bits) {
    int64_t s = lut_eval(code_of(a), frac_of<A>(), sig, lo, size, step_bits);
    return requant<O>(code_of(a) * s, frac_of<A>() + LUT_FRAC);
}

// The top-k router's choice: k rounds of "the first largest score not yet taken"
// (sort-free; ties go to the lower expert, as a stable sort does).
template <int E, int K> void topk_rounds(const int64_t choice[E], int idx[K]) {
    bool taken[E];
    for (int e = 0; e < E; e++) taken[e] = false;
    for (int j = 0; j < K; j++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            #pragma HLS PIPELINE II=1
            if (!taken[e] && (best < 0 || choice[e] > choice[best])) best = e;
        }
        taken[best] = true;
        idx[j] = best;
    }
}


// A feed-forward block (a dense layer's, a shared expert's or one routed expert's): hls4ml
// dense products for gate and up, silu(gate) * up rounded to h_t, hls4ml's dense for down.
template <class CFG, class X, class Y>
void ffn(const X x[CFG::hidden], typename CFG::gate_cfg::weight_t *wg, typename CFG::up_cfg::weight_t *wu,
         typename CFG::down_cfg::weight_t *wd, Y y[CFG::hidden], const int32_t *sig) {
    #pragma HLS INLINE off
    typename CFG::g_t g[CFG::ffn];
    typename CFG::u_t u[CFG::ffn];
    typename CFG::h_t h[CFG::ffn];
    typename CFG::up_cfg::bias_t zf[CFG::ffn];
    typename CFG::down_cfg::bias_t zh[CFG::hidden];
    for (int f = 0; f < CFG::ffn; f++) zf[f] = 0;
    for (int i = 0; i < CFG::hidden; i++) zh[i] = 0;
    X xin[CFG::hidden];
    for (int i = 0; i < CFG::hidden; i++) xin[i] = x[i];
    nnet::dense<X, typename CFG::u_t, typename CFG::up_cfg>(xin, u, wu, zf);
    if (CFG::gated) {
        nnet::dense<X, typename CFG::g_t, typename CFG::gate_cfg>(xin, g, wg, zf);
        for (int f = 0; f < CFG::ffn; f++) {
            #pragma HLS PIPELINE II=1
            typename CFG::g_t a = silu<typename CFG::g_t, typename CFG::g_t>(g[f], sig, CFG::sig_lo, CFG::sig_size, CFG::sig_step);
            h[f] = a * u[f];
        }
    } else {
        for (int f = 0; f < CFG::ffn; f++) {
            #pragma HLS PIPELINE II=1
            h[f] = silu<typename CFG::u_t, typename CFG::h_t>(u[f], sig, CFG::sig_lo, CFG::sig_size, CFG::sig_step);
        }
    }
    nnet::dense<typename CFG::h_t, Y, typename CFG::down_cfg>(h, y, wd, zh);
}

// Rotary position embedding (rotate-half) of element i of one head at position pos.
template <class T, class X, class RT>
inline T rope_at(const X *x, int i, int pos, int half, const int16_t *cos_t, const int16_t *sin_t, bool rope) {
    if (!rope) return requant<T>(code_of(x[i]), frac_of<X>());
    int j = i < half ? i : i - half;
    int64_t other = i < half ? -code_of(x[i + half]) : code_of(x[i - half]);
    int64_t v = code_of(x[i]) * cos_t[pos * half + j] + other * sin_t[pos * half + j];
    return requant<T>(v, frac_of<X>() + frac_of<RT>());
}

// The exact dot product of two code vectors, and a query-key dot product scaled by
// 1/sqrt(d) (scale_code, 16 fraction bits) and rounded to the score type.
template <class A, class B> inline int64_t dot(const A *a, const B *b, int n) {
    int64_t acc = 0;
    for (int i = 0; i < n; i++) acc += code_of(a[i]) * code_of(b[i]);
    return acc;
}
template <class CFG, class QR, class KR> inline int64_t scaled_score(int64_t acc) {
    return code_of(requant<typename CFG::score_t>(acc * CFG::scale_code, frac_of<QR>() + frac_of<KR>() + 16));
}

// Softmax over cache rows 0..pos of one head's scores (max m) and the weighted sum of its
// values (row t at vcache[t * stride + offset]): exp from its table of (score - m), one
// integer division per output (8 extra bits), rounded to O.
template <class SC, class V, class O, int CAP, int DV>
void softmax_values(const int64_t sc[CAP], int64_t m, int pos, const V *vcache, int stride, int offset, O *out,
                    const int32_t *exp_t, int exp_lo, int exp_size, int exp_step) {
    int64_t sum = 0, acc[DV];
    for (int i = 0; i < DV; i++) acc[i] = 0;
    for (int t = 0; t <= pos; t++) {
        #pragma HLS PIPELINE II=1
        int64_t e = lut_eval(sc[t] - m, frac_of<SC>(), exp_t, exp_lo, exp_size, exp_step);
        sum += e;
        for (int i = 0; i < DV; i++) acc[i] += e * code_of(vcache[t * stride + offset + i]);
    }
    for (int i = 0; i < DV; i++) out[i] = requant<O>((acc[i] * 256) / sum, frac_of<V>() + 8);
}

// One position of causal grouped-query attention: its rotated key and its value are written
// into the KV cache at `pos`, then each query head scores cache rows 0..pos and takes the
// softmax-weighted sum of their values.
template <class CFG, class Q, class K, class V, class O>
void attention_step(const Q q[CFG::heads * CFG::head_dim], const K k[CFG::kv_heads * CFG::head_dim],
                    const V v[CFG::kv_heads * CFG::head_dim], int pos,
                    typename CFG::kr_t kcache[CFG::capacity * CFG::kv_heads * CFG::head_dim],
                    V vcache[CFG::capacity * CFG::kv_heads * CFG::head_dim], O out[CFG::heads * CFG::head_dim],
                    const int16_t *cos_t, const int16_t *sin_t, const int32_t *exp_t) {
    #pragma HLS INLINE off
    typedef typename CFG::qr_t QR;
    typedef typename CFG::kr_t KR;
    typedef typename CFG::score_t SC;
    typedef typename CFG::rope_t RT;
    const int D = CFG::head_dim, HALF = CFG::head_dim / 2, HKV = CFG::kv_heads, REP = CFG::heads / CFG::kv_heads;
    for (int g = 0; g < HKV; g++) {
        for (int i = 0; i < D; i++) {
            #pragma HLS PIPELINE II=1
            kcache[(pos * HKV + g) * D + i] = rope_at<KR, K, RT>(k + g * D, i, pos, HALF, cos_t, sin_t, CFG::rope);
            vcache[(pos * HKV + g) * D + i] = v[g * D + i];
        }
    }
    for (int h = 0; h < CFG::heads; h++) {
        const int g = h / REP;
        QR qr[CFG::head_dim];
        for (int i = 0; i < D; i++) qr[i] = rope_at<QR, Q, RT>(q + h * D, i, pos, HALF, cos_t, sin_t, CFG::rope);
        int64_t sc[CFG::capacity];
        int64_t m = NEG_INF;
        for (int t = 0; t <= pos; t++) {
            #pragma HLS PIPELINE II=1
            sc[t] = scaled_score<CFG, QR, KR>(dot(qr, kcache + (t * HKV + g) * D, D));
            m = sc[t] > m ? sc[t] : m;
        }
        softmax_values<SC, V, O, CFG::capacity, CFG::head_dim>(sc, m, pos, vcache, HKV * D, g * D, out + h * D, exp_t,
                                                               CFG::exp_lo, CFG::exp_size, CFG::exp_step);
    }
}

// One position of multi-head latent attention: the per-head keys without positions
// (k_nope, rounded to kr_t), the rotary key shared by all heads (rotated, kr_t) and the
// values go into their caches at `pos`; each head's query is [its nope part | its rotated
// rope part], its score the dot product with [k_nope of that head | the shared rope key].
template <class CFG, class Q, class KN, class V, class KR_IN, class O>
void mla_step(const Q q[CFG::heads * (CFG::nope_dim + CFG::rope_dim)], const KN kn[CFG::heads * CFG::nope_dim],
              const V v[CFG::heads * CFG::v_dim], const KR_IN kr[CFG::rope_dim], int pos,
              typename CFG::kr_t kncache[CFG::capacity * CFG::heads * CFG::nope_dim],
              typename CFG::kr_t krcache[CFG::capacity * CFG::rope_dim], V vcache[CFG::capacity * CFG::heads * CFG::v_dim],
              O out[CFG::heads * CFG::v_dim], const int16_t *cos_t, const int16_t *sin_t, const int32_t *exp_t) {
    #pragma HLS INLINE off
    typedef typename CFG::qr_t QR;
    typedef typename CFG::kr_t KR;
    typedef typename CFG::score_t SC;
    typedef typename CFG::rope_t RT;
    const int H = CFG::heads, DN = CFG::nope_dim, DR = CFG::rope_dim, DV = CFG::v_dim, HALF = CFG::rope_dim / 2;
    for (int i = 0; i < DR; i++) krcache[pos * DR + i] = rope_at<KR, KR_IN, RT>(kr, i, pos, HALF, cos_t, sin_t, true);
    for (int i = 0; i < H * DN; i++) kncache[pos * H * DN + i] = requant<KR>(code_of(kn[i]), frac_of<KN>());
    for (int i = 0; i < H * DV; i++) vcache[pos * H * DV + i] = v[i];
    for (int h = 0; h < H; h++) {
        const Q *qh = q + h * (DN + DR);
        QR qr[CFG::nope_dim + CFG::rope_dim];
        for (int i = 0; i < DN; i++) qr[i] = requant<QR>(code_of(qh[i]), frac_of<Q>());
        for (int i = 0; i < DR; i++) qr[DN + i] = rope_at<QR, Q, RT>(qh + DN, i, pos, HALF, cos_t, sin_t, true);
        int64_t sc[CFG::capacity];
        int64_t m = NEG_INF;
        for (int t = 0; t <= pos; t++) {  // [q_nope | q_rope] . [k_nope of head h | the shared rope key]
            #pragma HLS PIPELINE II=1
            sc[t] = scaled_score<CFG, QR, KR>(dot(qr, kncache + (t * H + h) * DN, DN) + dot(qr + DN, krcache + t * DR, DR));
            m = sc[t] > m ? sc[t] : m;
        }
        softmax_values<SC, V, O, CFG::capacity, CFG::v_dim>(sc, m, pos, vcache, H * DV, h * DV, out + h * DV, exp_t,
                                                            CFG::exp_lo, CFG::exp_size, CFG::exp_step);
    }
}

// The router after its logits: scores of the experts lo..hi-1 the token may use (its
// modality's; softmax through the exp table, or sigmoid through its table; LUT_FRAC fraction
// bits; 0 elsewhere), the choice scores (+ score bias), group-limited routing
// (the best topk_group groups by the sum of their top two, or their max), then top_k rounds
// of argmax; the chosen experts' scores, normalised by their sum (an integer division) and
// scaled by routed_scale (scale_code, 12 fraction bits), rounded to WT.
template <class CFG, class LG, class WT>
void route(const LG logits[CFG::experts], const int32_t *bias, const int32_t *exp_t, const int32_t *sig_t, int lo,
           int hi, WT weights[CFG::top_k], int idx[CFG::top_k]) {
    #pragma HLS INLINE off
    const int E = CFG::experts, GS = CFG::experts / CFG::n_group;
    int64_t score[CFG::experts], choice[CFG::experts];
    if (CFG::softmax) {
        int64_t m = NEG_INF, sum = 0;
        for (int e = lo; e < hi; e++) if (code_of(logits[e]) > m) m = code_of(logits[e]);
        for (int e = 0; e < E; e++) {
            score[e] = e < lo || e >= hi ? 0 :
                lut_eval(code_of(logits[e]) - m, frac_of<LG>(), exp_t, CFG::exp_lo, CFG::exp_size, CFG::exp_step);
            sum += score[e];
        }
        for (int e = 0; e < E; e++) score[e] = (score[e] << LUT_FRAC) / sum;
    } else {
        for (int e = 0; e < E; e++)
            score[e] = e < lo || e >= hi ? 0 :
                lut_eval(code_of(logits[e]), frac_of<LG>(), sig_t, CFG::sig_lo, CFG::sig_size, CFG::sig_step);
    }
    for (int e = 0; e < E; e++) choice[e] = score[e] + (CFG::has_bias ? (int64_t)bias[e] : 0);
    if (CFG::n_group > 1) {
        int64_t gscore[CFG::n_group];
        for (int gi = 0; gi < CFG::n_group; gi++) {
            int64_t a = NEG_INF, b = NEG_INF;  // the largest two of the group
            for (int e = gi * GS; e < (gi + 1) * GS; e++) {
                if (choice[e] > a) { b = a; a = choice[e]; }
                else if (choice[e] > b) b = choice[e];
            }
            gscore[gi] = CFG::top2_sum && GS > 1 ? a + b : a;
        }
        int keep[CFG::topk_group];
        topk_rounds<CFG::n_group, CFG::topk_group>(gscore, keep);
        for (int gi = 0; gi < CFG::n_group; gi++) {
            bool kept = false;
            for (int j = 0; j < CFG::topk_group; j++) kept = kept || keep[j] == gi;
            if (!kept)
                for (int e = gi * GS; e < (gi + 1) * GS; e++) choice[e] = CFG::has_bias ? NEG_INF : 0;
        }
    }
    for (int e = 0; e < E; e++) if (e < lo || e >= hi) choice[e] = NEG_INF;  // another modality's experts
    topk_rounds<CFG::experts, CFG::top_k>(choice, idx);
    int64_t den = 0;
    for (int j = 0; j < CFG::top_k; j++) den += score[idx[j]];
    if (den < 1) den = 1;
    for (int j = 0; j < CFG::top_k; j++) {
        int64_t w = score[idx[j]] * CFG::scale_code;
        if (CFG::normalize) w = (w << LUT_FRAC) / den;
        weights[j] = requant<WT>(w, LUT_FRAC + 12);
    }
}

} // namespace mc

#endif
