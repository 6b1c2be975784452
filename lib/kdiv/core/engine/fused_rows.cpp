// kdiv's native row kernel: the fast path of the token-level divergences, fused, for float32 / bfloat16 logits on
// the CPU. Built on first use by kdiv.core.engine.native (a C ABI, no torch headers) and called through ctypes,
// which releases the GIL: the engine's worker threads run it concurrently, one block of rows each.
//
// One row at a time, in at most four passes over the vocabulary, the row's exponentials kept in two rows of
// scratch (in the cache at V = 32k; for a float32 gradient the gradient row itself is one of them):
//   1. max of both logits;
//   2. e_s = exp((s - max s) / T), e_t likewise, stored; their sums and sum e * (a_s - a_t) in float blocks
//      accumulated in double (a NaN or infinite logit makes one of them NaN or inf: the row is handed back).
//      Normalising by the sum of the stored values (q = e_s / sum e_s) makes sum q = 1 to double precision, so the
//      row constant lse_s - lse_t (<= log V) can be added after a sum without the rounding of sum q multiplying it;
//   3. (TVD, AKL and the mixture divergences) sums over the normalised probabilities;
//   4. the gradient, scale * d loss / d (s / T), written once.
// The formulas are those of kdiv.core.kernels (the eager row kernels), written per element. A row whose logits hold
// NaN or +-inf, or where a probability the kernel divides by underflows, gets a NaN loss (and an unwritten
// gradient): the engine recomputes exactly those rows on its eager floored path, as it does for its own fast path.
// Also here, for AKL's head (kdiv.core.head_selection): the teacher's softmax, the bisection for a cutoff above mu,
// and headtail.threshold's arithmetic on the probabilities above it.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

namespace {

enum Kind { FKL = 0, RKL = 1, SKL = 2, JS = 3, TVD = 4, SKEW_KL = 5, SKEW_RKL = 6, AKL = 7 };
enum DType { F32 = 0, BF16 = 1 };

constexpr long BLOCK = 1024;  // elements per float partial sum (each SIMD lane then adds ~64 terms)

inline float from_bits(uint32_t u) { return __builtin_bit_cast(float, u); }
inline uint32_t to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

inline float load(const float* x, long i) { return x[i]; }
inline float load(const uint16_t* x, long i) { return from_bits(uint32_t(x[i]) << 16); }

// exp(x) for x <= 0 (a shifted logit); 0 below log(float32 tiny), so that no denormal is ever produced. Cody-Waite
// reduction x = n ln2 + r, |r| <= ln2 / 2, and exp(r) = 1 + r + r^2 P(r), P of degree 4 fitted for relative error
// (minimax-like, 3e-9 in exact arithmetic): relative error < 7e-8 in float32, against exp in double.
inline float kexp(float x) {
    // below lo the result is 0, selected at the end: whatever the lanes compute there (no clamp) is discarded
    const float lo = -87.33654f;
    // n = round(x / ln 2) by adding 1.5 * 2^23: the sum's low fraction bits are then n itself (two's complement),
    // which 2^n below reads from them (one integer add and shift instead of a floor and a conversion)
    const float shifted = std::fma(x, 1.44269504088896341f, 12582912.0f);
    const float n = shifted - 12582912.0f;
    float r = std::fma(n, -0.693359375f, x);
    r = std::fma(n, 2.12194440e-4f, r);
    // Estrin's scheme: a dependency chain of 3 FMAs instead of 5, so that more elements are in flight at once
    const float r2 = r * r;
    const float lo2 = std::fma(0.1666652113199234f, r, 0.4999999403953552f);
    const float hi2 = std::fma(0.0013814611593261361f, r2, std::fma(0.008368710055947304f, r, 0.04166838899254799f));
    float p = std::fma(hi2, r2, lo2);
    p = std::fma(p, r2, r) + 1.0f;
    const float two_n = from_bits((to_bits(shifted) + 127u) << 23);
    return x < lo ? 0.0f : p * two_n;
}

// log(x) for a positive normal x: x = 2^e m with m in [sqrt(1/2), sqrt(2)), f = m - 1, and
// log(1 + f) = f - f^2 / 2 + f^3 P(f), P of degree 7 fitted for relative error (6e-9 in exact arithmetic; no
// division): relative error ~2e-7 in float32, absolute < 3e-8 near x = 1.
inline float klog(float x) {
    // in integer arithmetic: the bits of x less those of sqrt(1/2) hold e in their exponent field and, in their
    // fraction field, what m's fraction is once sqrt(1/2)'s is added back
    const int32_t k = int32_t(to_bits(x)) - 0x3f3504f3;
    const int32_t e = k >> 23;
    const float m = from_bits(uint32_t((k & 0x7fffff) + 0x3f3504f3));
    float f = m - 1.0f;
    float z = f * f;
    // P by Estrin's scheme (a chain of 3 FMAs instead of 7)
    const float z2 = z * z;
    const float a01 = std::fma(-0.2500081956386566f, f, 0.3333333134651184f);
    const float a23 = std::fma(-0.16623356938362122f, f, 0.20001226663589478f);
    const float a45 = std::fma(-0.13160191476345062f, f, 0.14201760292053223f);
    const float a67 = std::fma(-0.07634464651346207f, f, 0.12761569023132324f);
    const float p = std::fma(std::fma(a67, z, a45), z2, std::fma(a23, z, a01));
    float r = std::fma(f * z, p, std::fma(-0.5f, z, f));
    float ef = float(e);
    return std::fma(ef, 0.693359375f, std::fma(ef, -2.12194440e-4f, r));
}

// The mixture m = w a + (1 - w) b of two probabilities, relative to b: u = m / b = 1 + x with x = w (a - b) / b.
// log u = log1p(x) is formed as log(1 + x) plus the rounding of 1 + x, so that it is exact to float32 where a ~ b
// (and 0 where a == b); t = 1 / u - 1 = -x / u likewise. Where u < 1/2 (a << b with w near 1), 1 + x cancels:
// there u = w a / b + (1 - w) directly (u_direct: a sum of two non-negative terms, accurate for any a, b, w). The
// divisions are w / b and 1 / u_direct, the latter off the path through the select of u (1 + x and u_direct differ
// by an ulp or two where it matters): with that select before it, the skew divergences took 15-22 % longer.
// b = 0 gives inf / NaN (the row is then recomputed on the floored path).
struct Mix {
    float log_u, t;
};

template <bool WANT_T = true>
inline Mix mix(float a, float b, float w, float omw) {
    const float wib = w / b;
    const float u_direct = std::fma(a, wib, omw);
    const float x = (a - b) * wib;
    const bool far = u_direct < 0.5f;
    const float u = far ? u_direct : 1.0f + x;
    float inv_u;
    if (WANT_T) {
        inv_u = 1.0f / u_direct;
    } else {
        // only the rounding term needs 1/u, and only to a few digits (the term is < 1 ulp of u): a bit-trick
        // estimate (12 %) and one Newton step (1.5 %) instead of a division
        inv_u = from_bits(0x7ef311c3u - to_bits(u_direct));
        inv_u = inv_u * std::fma(-u_direct, inv_u, 2.0f);
    }
    const float rounding = far ? 0.0f : (x - (u - 1.0f)) * inv_u;
    return {klog(u) + rounding, -x * inv_u};
}

inline float sign(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }

// float32 -> bfloat16, round to nearest even (the values are finite)
inline uint16_t to_bf16(float f) {
    uint32_t u = to_bits(f);
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

struct Sums3 {
    float pl, ql, qt;
};

// The mixture passes over elements [b0, b1): sums over the block, and in ep, in place of e_t, what the gradient
// pass needs. Their own functions, with restrict pointers, so that the loops are vectorised.
// JS's pass: log(m/q) from the mixture, log(p/m) = log(p/q) - log(m/q) with log(p/q) = (a_t - a_s) + k per element;
// sums of p log(p/m) and q log(m/q)
template <class TS, class TT>
Sums3 js_pass(const TS* s, const TT* t, const float* __restrict eq, float* __restrict ep, long b0, long b1,
              float inv_s, float inv_p, float w, float omw, float ms, float mt, float inv_t, float k_hi, float k_lo) {
    float pl = 0.0f, ql = 0.0f;
#pragma omp simd reduction(+ : pl, ql)
    for (long i = b0; i < b1; ++i) {
        const float q = eq[i] * inv_s, p = ep[i] * inv_p;
        const float lu = mix<false>(p, q, w, omw).log_u;
        const float as = (load(s, i) - ms) * inv_t, at = (load(t, i) - mt) * inv_t;
        const float log_pq = ((at - as) + k_hi) + k_lo;
        pl += p * (log_pq - lu);
        ql += q * lu;
        ep[i] = lu;
    }
    return {pl, ql, 0.0f};
}

// The skew divergences' pass (see mix): sums of p log u and q t (skew KL: m over p), or of q log u and q h (skew
// reverse KL: m over q, h = -alpha t - log u, the gradient's per-element term)
template <int KIND>
Sums3 mix_pass(const float* __restrict eq, float* __restrict ep, long b0, long b1, float inv_s, float inv_p, float w,
               float omw) {
    float pl = 0.0f, ql = 0.0f, qt = 0.0f;
#pragma omp simd reduction(+ : pl, ql, qt)
    for (long i = b0; i < b1; ++i) {
        const float q = eq[i] * inv_s, p = ep[i] * inv_p;
        if (KIND == SKEW_KL) {
            const Mix mx = mix(q, p, w, omw);
            pl += p * mx.log_u;
            qt += q * mx.t;
            ep[i] = mx.t;
        } else {
            const Mix mx = mix(p, q, w, omw);
            const float h = -omw * mx.t - mx.log_u;
            ql += q * mx.log_u;
            qt += q * h;
            ep[i] = h;
        }
    }
    return {pl, ql, qt};
}

struct Args {
    int kind;
    long vocab;
    float inv_t, w, omw, scale;
    // AKL: the teacher's probabilities as the caller computed them (rows of head_stride) and each row's head
    // threshold on them, so that the head is exactly the caller's set {p >= tau}
    const float* head_p;
    long head_stride;
    const float* tau;
};

// One row: returns its loss; writes the gradient into g (float32, which may alias eq) when g is not null.
// eq, ep: scratch rows of vocab floats.
template <class TS, class TT>
float row(const TS* s, const TT* t, float* g, float* eq, float* ep, const Args& a, long r) {
    const long V = a.vocab;
    const float inv_t = a.inv_t;

    // 1. maxima
    float ms = -INFINITY, mt = -INFINITY;
#pragma omp simd reduction(max : ms, mt)
    for (long i = 0; i < V; ++i) {
        float x = load(s, i), y = load(t, i);
        ms = x > ms ? x : ms;
        mt = y > mt ? y : mt;
    }

    // 2. exponentials, their sums, and sum e_s (a_s - a_t), sum e_t (a_t - a_s), a = shifted scaled logit
    double sum_s = 0.0, sum_t = 0.0, dot_s = 0.0, dot_t = 0.0;
    for (long b0 = 0; b0 < V; b0 += BLOCK) {
        const long b1 = b0 + BLOCK < V ? b0 + BLOCK : V;
        float ss = 0.0f, st = 0.0f, ds = 0.0f, dt = 0.0f;
#pragma omp simd reduction(+ : ss, st, ds, dt)
        for (long i = b0; i < b1; ++i) {
            float as = (load(s, i) - ms) * inv_t, at = (load(t, i) - mt) * inv_t;
            float es = kexp(as), et = kexp(at);
            eq[i] = es;
            ep[i] = et;
            ss += es;
            st += et;
            float d = as - at;
            ds += es * d;
            dt += et * -d;
        }
        sum_s += ss;
        sum_t += st;
        dot_s += ds;
        dot_t += dt;
    }
    // NaN or +-inf among the logits (or a spread beyond float32's range) makes one of these sums NaN or inf: a NaN
    // logit propagates, +inf makes its max inf and x - max NaN, -inf makes e * (a_s - a_t) = 0 * inf = NaN
    if (!std::isfinite(sum_s + sum_t + dot_s + dot_t)) return NAN;
    const double k = std::log(sum_s) - std::log(sum_t);  // lse_s - lse_t: log q / p = (a_s - a_t) - k
    const float inv_s = float(1.0 / sum_s), inv_p = float(1.0 / sum_t);
    // q - p = (e_s - e_t sum_s / sum_t) / sum_s, formed as e_s - e_t * ratio in one fma: exactly 0 where the two
    // rows are equal (q - e_t * inv_p, which the compiler contracts to an fma, is the rounding of p there)
    const float ratio = float(sum_s / sum_t);
    const double rkl = dot_s / sum_s - k, fkl = dot_t / sum_t + k;
    const float sc = a.scale;

    switch (a.kind) {
        case FKL: {
            if (g) {
                const float c = sc * inv_s;
#pragma omp simd
                for (long i = 0; i < V; ++i) g[i] = c * std::fma(-ep[i], ratio, eq[i]);
            }
            return float(fkl);
        }
        case RKL: {
            if (g) {
                // q (log q/p - rkl), log q/p = (a_s - a_t) - k
                const float c = float(k + rkl);
#pragma omp simd
                for (long i = 0; i < V; ++i) {
                    float d = ((load(s, i) - ms) * inv_t - (load(t, i) - mt) * inv_t) - c;
                    g[i] = sc * (eq[i] * inv_s) * d;
                }
            }
            return float(rkl);
        }
        case SKL:
        case AKL: {
            double w_rkl = a.w, w_fkl = a.omw;
            if (a.kind == AKL) {
                // AKL: forward KL weighted by the head's share of sum |p - q| (1/2 where q == p), reverse KL by the
                // tail's; the head is {p >= tau} on the caller's p
                const float* ph = a.head_p + r * a.head_stride;
                const float tau = a.tau[r];
                double total = 0.0, head = 0.0;
                for (long b0 = 0; b0 < V; b0 += BLOCK) {
                    const long b1 = b0 + BLOCK < V ? b0 + BLOCK : V;
                    float l = 0.0f, h = 0.0f;
#pragma omp simd reduction(+ : l, h)
                    for (long i = b0; i < b1; ++i) {
                        float err = std::fabs(std::fma(-ep[i], ratio, eq[i]));  // |q - p| sum_s
                        l += err;
                        h += ph[i] >= tau ? err : 0.0f;
                    }
                    total += l;
                    head += h;
                }
                w_fkl = total == 0.0 ? 0.5 : head / total;
                w_rkl = 1.0 - w_fkl;
            }
            const double loss = w_fkl * fkl + w_rkl * rkl;
            if (g) {
                // w_fkl (q - p) + w_rkl q (log q/p - rkl), log q/p = (a_s - a_t) - k
                const float c = float(k + rkl), wfs = float(sc * w_fkl * inv_s), wr = float(sc * w_rkl);
#pragma omp simd
                for (long i = 0; i < V; ++i) {
                    float d = ((load(s, i) - ms) * inv_t - (load(t, i) - mt) * inv_t) - c;
                    float q = eq[i] * inv_s;
                    g[i] = std::fma(wfs, std::fma(-ep[i], ratio, eq[i]), wr * q * d);
                }
            }
            return float(loss);
        }
        case TVD: {
            double total = 0.0, kq = 0.0;
            for (long b0 = 0; b0 < V; b0 += BLOCK) {
                const long b1 = b0 + BLOCK < V ? b0 + BLOCK : V;
                float l = 0.0f, m = 0.0f;
#pragma omp simd reduction(+ : l, m)
                for (long i = b0; i < b1; ++i) {
                    float diff = std::fma(-ep[i], ratio, eq[i]);  // (q - p) sum_s
                    l += std::fabs(diff);
                    m += eq[i] * inv_s * sign(diff);
                }
                total += l;
                kq += m;
            }
            if (g) {
                const float kf = float(kq), h = 0.5f * sc;
#pragma omp simd
                for (long i = 0; i < V; ++i) {
                    float q = eq[i] * inv_s;
                    g[i] = h * q * (sign(std::fma(-ep[i], ratio, eq[i])) - kf);
                }
            }
            return float(0.5 * total / sum_s);
        }
        case JS:
        case SKEW_KL:
        case SKEW_RKL: {
            // JS: m = beta p + (1 - beta) q over q; skew KL: m = alpha p + (1 - alpha) q over p; skew reverse KL:
            // m = (1 - alpha) p + alpha q over q (kdiv.core.kernels' conventions; w, omw = 1 - w from the caller)
            const int kind = a.kind;
            const float w = a.w, omw = a.omw;
            const float k_hi = float(k), k_lo = float(k - double(k_hi));
            double sum_pl = 0.0, sum_ql = 0.0, sum_qt = 0.0;
            for (long b0 = 0; b0 < V; b0 += BLOCK) {
                const long b1 = b0 + BLOCK < V ? b0 + BLOCK : V;
                Sums3 part = kind == JS ? js_pass(s, t, eq, ep, b0, b1, inv_s, inv_p, w, omw, ms, mt, inv_t, k_hi, k_lo)
                             : kind == SKEW_KL ? mix_pass<SKEW_KL>(eq, ep, b0, b1, inv_s, inv_p, w, omw)
                                               : mix_pass<SKEW_RKL>(eq, ep, b0, b1, inv_s, inv_p, w, omw);
                sum_pl += part.pl;
                sum_ql += part.ql;
                sum_qt += part.qt;
            }
            double loss;
            if (a.kind == JS) {
                const double kl_qm = -sum_ql;
                loss = w * sum_pl + double(omw) * kl_qm;
                if (g) {
                    // (1 - beta) q (log q/m - kl_qm) = -(1 - beta) q (log m/q + kl_qm)
                    const float s1 = -omw * sc, kf = float(kl_qm);
#pragma omp simd
                    for (long i = 0; i < V; ++i) g[i] = s1 * (eq[i] * inv_s) * (ep[i] + kf);
                }
            } else if (a.kind == SKEW_KL) {
                loss = -sum_pl;
                if (g) {
                    // (1 - alpha) q (sum q t - t), t = p/m - 1
                    const float s1 = w * sc, kf = float(sum_qt);
#pragma omp simd
                    for (long i = 0; i < V; ++i) g[i] = s1 * (eq[i] * inv_s) * (kf - ep[i]);
                }
            } else {
                loss = -sum_ql;
                if (g) {
                    // q (h - sum q h), h = -alpha (q/m - 1) - log m/q (stored in ep, its sum in sum_qt)
                    const float kf = float(sum_qt);
#pragma omp simd
                    for (long i = 0; i < V; ++i) g[i] = sc * (eq[i] * inv_s) * (ep[i] - kf);
                }
            }
            return float(loss);
        }
    }
    return NAN;
}

template <class TS, class TT>
void rows(long n, const TS* s, long s_stride, const TT* t, long t_stride, void* g, long g_stride, int g_dtype,
          float* eq, float* ep, float* loss, const Args& a) {
    for (long r = 0; r < n; ++r) {
        float* gf = nullptr;
        if (g != nullptr) gf = g_dtype == F32 ? static_cast<float*>(g) + r * g_stride : eq;
        // a float32 gradient row holds e_s until the gradient overwrites it, element by element
        float* e_s = gf != nullptr ? gf : eq;
        float value = row(s + r * s_stride, t + r * t_stride, gf, e_s, ep, a, r);
        loss[r] = value;
        if (g != nullptr && g_dtype == BF16 && value == value) {
            uint16_t* gb = static_cast<uint16_t*>(g) + r * g_stride;
#pragma omp simd
            for (long i = 0; i < a.vocab; ++i) gb[i] = to_bf16(eq[i]);
        }
    }
}

template <class TS>
void rows_teacher(int t_dtype, long n, const TS* s, long s_stride, const void* t, long t_stride, void* g,
                  long g_stride, int g_dtype, float* eq, float* ep, float* loss, const Args& a) {
    if (t_dtype == F32)
        rows(n, s, s_stride, static_cast<const float*>(t), t_stride, g, g_stride, g_dtype, eq, ep, loss, a);
    else
        rows(n, s, s_stride, static_cast<const uint16_t*>(t), t_stride, g, g_stride, g_dtype, eq, ep, loss, a);
}

// softmax(x / T) of one row into out, normalised by the double-accumulated sum of its exponentials
template <class T>
void softmax_row(const T* x, long V, float inv_t, float* out) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (long i = 0; i < V; ++i) {
        float v = load(x, i);
        m = v > m ? v : m;
    }
    double total = 0.0;
    for (long b0 = 0; b0 < V; b0 += BLOCK) {
        const long b1 = b0 + BLOCK < V ? b0 + BLOCK : V;
        float part = 0.0f;
#pragma omp simd reduction(+ : part)
        for (long i = b0; i < b1; ++i) {
            float e = kexp((load(x, i) - m) * inv_t);
            out[i] = e;
            part += e;
        }
        total += part;
    }
    const float inv = float(1.0 / total);
#pragma omp simd
    for (long i = 0; i < V; ++i) out[i] *= inv;
}

// AKL's bisection for a probability cutoff with more than mu of the row's mass at or above it (see
// kdiv.core.head_selection._cutoff_above_mu, whose rule this is, row by row): on log c between (1 - mu) / V and hi,
// stopping once the mass above exceeds mu by at most slack (1 - mu) or at most few tokens are above.
float head_cutoff_row(const float* p, long V, float mu, float hi, float slack, long few, int max_passes) {
    float best = (1.0f - mu) / float(V);
    float log_lo = std::log(best), log_hi = std::log(hi);
    for (int pass = 0; pass < max_passes; ++pass) {
        const float mid = (log_lo + log_hi) / 2.0f, cutoff = std::exp(mid);
        double mass = 0.0;
        long count = 0;
        for (long b0 = 0; b0 < V; b0 += BLOCK) {
            const long b1 = b0 + BLOCK < V ? b0 + BLOCK : V;
            float m = 0.0f;
            int c = 0;
#pragma omp simd reduction(+ : m, c)
            for (long i = b0; i < b1; ++i) {
                const bool above = p[i] >= cutoff;
                m += above ? p[i] : 0.0f;
                c += above ? 1 : 0;
            }
            mass += m;
            count += c;
        }
        if (mass > mu) {
            best = cutoff > best ? cutoff : best;
            log_lo = mid;
            if (mass <= mu + slack * (1.0f - mu) || count <= few) break;
        } else {
            log_hi = mid;
        }
    }
    return best;
}

// Sorts k positive floats (no NaN) in descending order. Past a few hundred values by an LSD radix sort on their bits
// (whose order is the floats' for positive floats): three passes of 11 bits, a pass skipped where every key has the
// same digit (the exponent bits of probabilities in a narrow range). AKL's large heads sort thousands to tens of
// thousands of candidates per row, where std::sort took 50 ns per value and most of AKL's time on flat teachers.
void sort_descending(float* a, long k) {
    if (k < 512) {
        std::sort(a, a + k, std::greater<float>());
        return;
    }
    constexpr int BITS = 11, RADIX = 1 << BITS, PASSES = 3;
    thread_local std::vector<uint32_t> keys, other;
    keys.resize(k);
    other.resize(k);
    // descending values = ascending complemented keys
    for (long i = 0; i < k; ++i) keys[i] = ~to_bits(a[i]);
    uint32_t count[PASSES][RADIX] = {};
    for (long i = 0; i < k; ++i) {
        const uint32_t key = keys[i];
        for (int d = 0; d < PASSES; ++d) ++count[d][(key >> (d * BITS)) & (RADIX - 1)];
    }
    for (int d = 0; d < PASSES; ++d) {
        uint32_t* c = count[d];
        if (c[(keys[0] >> (d * BITS)) & (RADIX - 1)] == uint32_t(k)) continue;  // one digit for all: in order
        uint32_t start = 0;
        for (int b = 0; b < RADIX; ++b) {
            const uint32_t n = c[b];
            c[b] = start;
            start += n;
        }
        const uint32_t* from = keys.data();
        uint32_t* to = other.data();
        for (long i = 0; i < k; ++i) {
            const uint32_t key = from[i];
            to[c[(key >> (d * BITS)) & (RADIX - 1)]++] = key;
        }
        keys.swap(other);
    }
    for (long i = 0; i < k; ++i) a[i] = from_bits(~keys[i]);
}

// kdiv.core.headtail.threshold's arithmetic on the probabilities >= cutoff of one row (its sorted prefix, if the
// cutoff has more than mu above it): sorted in descending order, cumulative sums accumulated in double and rounded
// to float32 at every position (as torch's cumsum does on the CPU), a tie group's mass read at its last member,
// compared with mu in float32. Returns the threshold, and whether the prefix's total exceeds mu (else the caller
// sorts the whole row). buf: vocab floats.
float head_threshold_row(const float* p, long V, float mu, float cutoff, float* buf, bool& settled) {
    long k = 0;
    // blocks of 32 with no candidate skipped on their (vectorised) maximum; within a block, no branch (a flat row
    // keeps a random sixth of its tokens)
    constexpr long W = 32;
    long b = 0;
    for (; b + W <= V; b += W) {
        float m = 0.0f;
#pragma omp simd reduction(max : m)
        for (long j = b; j < b + W; ++j) m = p[j] > m ? p[j] : m;
        if (!(m >= cutoff)) continue;
        for (long j = b; j < b + W; ++j) {
            buf[k] = p[j];
            k += p[j] >= cutoff ? 1 : 0;
        }
    }
    for (long j = b; j < V; ++j) {
        buf[k] = p[j];
        k += p[j] >= cutoff ? 1 : 0;
    }
    sort_descending(buf, k);
    long n_head = 0;
    double cum = 0.0;
    float mass = 0.0f;
    for (long i = 0; i < k;) {
        long j = i;  // the tie group buf[i..j]
        while (j + 1 < k && buf[j + 1] == buf[i]) ++j;
        for (long m = i; m <= j; ++m) cum += buf[m];
        mass = float(cum);  // the cumsum at the group's last member
        if (!(mass <= mu)) break;
        n_head = j + 1;
        i = j + 1;
    }
    settled = float(cum) > mu;  // (cum: the whole prefix's sum, or already more than mu where the loop stopped)
    return k == 0 ? 0.0f : buf[(n_head > 1 ? n_head : 1) - 1];
}

}  // namespace

extern "C" {

// The interface version kdiv.core.engine.native checks.
int kdiv_rows_version() { return 2; }

// head_cutoff_row for n rows of p (float32, row stride p_stride), hi[r] a probability at or above the row's
// threshold: cutoffs into out[r].
void kdiv_head_cutoff(long n, long vocab, const float* p, long p_stride, float mu, const float* hi, float slack,
                      long few, int max_passes, float* out) {
    for (long r = 0; r < n; ++r) out[r] = head_cutoff_row(p + r * p_stride, vocab, mu, hi[r], slack, few, max_passes);
}

// head_threshold_row for n rows: thresholds into tau[r], settled[r] = 1 where the prefix decided it (0: the caller
// sorts that row whole). buf: vocab floats.
void kdiv_head_threshold(long n, long vocab, const float* p, long p_stride, float mu, const float* cutoff,
                         float* buf, float* tau, uint8_t* settled) {
    for (long r = 0; r < n; ++r) {
        bool ok = false;
        tau[r] = head_threshold_row(p + r * p_stride, vocab, mu, cutoff[r], buf, ok);
        settled[r] = ok ? 1 : 0;
    }
}

// softmax(x / T) of n rows (row stride x_stride, dtype x_dtype) into out (float32, row stride out_stride): AKL's
// teacher probabilities, on which the caller finds the head. Rows with NaN or inf come out NaN (the caller's
// engine recomputes them). Returns 0, or -1 for an unknown dtype.
int kdiv_softmax_rows(long n, long vocab, const void* x, long x_stride, int x_dtype, float inv_t, float* out,
                      long out_stride) {
    if (x_dtype != F32 && x_dtype != BF16) return -1;
    for (long r = 0; r < n; ++r) {
        if (x_dtype == F32)
            softmax_row(static_cast<const float*>(x) + r * x_stride, vocab, inv_t, out + r * out_stride);
        else
            softmax_row(static_cast<const uint16_t*>(x) + r * x_stride, vocab, inv_t, out + r * out_stride);
    }
    return 0;
}

// n rows of both logits (row strides in elements; dtypes 0 float32, 1 bfloat16): loss[r] (float32) and, when g is
// not null, the gradient rows (dtype g_dtype, row stride g_stride). eq, ep: vocab floats each, this caller's.
// w, omw: the kind's weight and 1 - w (computed in double by the caller); scale multiplies the gradient. AKL only:
// head_p, head_stride, tau (see Args); null otherwise.
// Returns 0, or -1 for an unknown kind or dtype.
int kdiv_rows(int kind, long n, long vocab, const void* s, long s_stride, int s_dtype, const void* t, long t_stride,
              int t_dtype, void* g, long g_stride, int g_dtype, float* eq, float* ep, float* loss, float inv_t, float w,
              float omw, float scale, const float* head_p, long head_stride, const float* tau) {
    if (kind < FKL || kind > AKL || s_dtype < F32 || s_dtype > BF16 || t_dtype < F32 || t_dtype > BF16 ||
        g_dtype < F32 || g_dtype > BF16)
        return -1;
    if (kind == AKL && (head_p == nullptr || tau == nullptr)) return -1;
    const Args a{kind, vocab, inv_t, w, omw, scale, head_p, head_stride, tau};
    if (s_dtype == F32)
        rows_teacher(t_dtype, n, static_cast<const float*>(s), s_stride, t, t_stride, g, g_stride, g_dtype, eq, ep,
                     loss, a);
    else
        rows_teacher(t_dtype, n, static_cast<const uint16_t*>(s), s_stride, t, t_stride, g, g_stride, g_dtype, eq,
                     ep, loss, a);
    return 0;
}
}
