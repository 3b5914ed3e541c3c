#include "nibble/quant/kv_rotation.h"

#include <cblas.h>

#include <cmath>
#include <numbers>

#include "nibble/core/error.h"
#include "nibble/quant/hadamard.h"

extern "C" {
void dgesv_(const int* n, const int* nrhs, double* a, const int* lda, int* ipiv, double* b, const int* ldb, int* info);
}

namespace nibble::quant {

namespace {

using Matrix = std::vector<double>;  // row-major, square dim × dim unless said

// The orthonormal Walsh-Hadamard matrix in hadamard_transform's (Sylvester) order.
Matrix hadamard_matrix(int64_t d) {
  Matrix h(size_t(d * d));
  const double norm = 1 / std::sqrt(double(d));
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) h[size_t(i * d + j)] = walsh_sign(i, j) * norm;
  return h;
}

// C = op(A)·op(B) for row-major A [m, k] and B [k, n] (op: transposed when asked).
Matrix product(const double* a, bool ta, const double* b, bool tb, int64_t m, int64_t k, int64_t n) {
  Matrix c(size_t(m * n));
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(m), int(n), int(k),
              1.0, a, int(ta ? m : k), b, int(tb ? k : n), 0.0, c.data(), int(n));
  return c;
}

std::vector<double> widen(const std::vector<float>& x) { return {x.begin(), x.end()}; }

void check_problem(const RotationProblem& p, const std::vector<float>& x, const std::vector<double>& r) {
  const int64_t d = p.dim;
  check(d > 0 && (d & (d - 1)) == 0 && int64_t(p.metric.size()) == d * d && int64_t(r.size()) == d * d &&
            !x.empty() && int64_t(x.size()) % d == 0 && p.spec.group == d,
        "KV rotation", "a problem of dim {} needs [n, dim] samples, a [dim, dim] metric and rotation and a "
        "quantizer group of dim (got {} samples, {} metric, {} rotation, group {})",
        d, x.size(), p.metric.size(), r.size(), p.spec.group);
}

// Y = X·(H·R)ᵀ: the rows the cache's quantizer sees.
Matrix quantizer_inputs(const RotationProblem& p, const std::vector<double>& x, const Matrix& u) {
  return product(x.data(), false, u.data(), true, int64_t(x.size()) / p.dim, p.dim, p.dim);
}

}  // namespace

FrozenQuantizer freeze_quantizer(const RotationProblem& p, const std::vector<float>& x, const std::vector<double>& at) {
  check_problem(p, x, at);
  const int64_t d = p.dim, n = int64_t(x.size()) / d;
  const Matrix u = product(hadamard_matrix(d).data(), false, at.data(), false, d, d, d);
  const Matrix y = quantizer_inputs(p, widen(x), u);
  FrozenQuantizer f{std::vector<float>(size_t(n * d)), std::vector<uint8_t>(size_t(n * d))};
  std::vector<float> row(static_cast<size_t>(d)), deq(static_cast<size_t>(d));
  std::vector<uint8_t> codes(static_cast<size_t>(d));
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < d; ++i) row[size_t(i)] = float(y[size_t(t * d + i)]);
    const GroupScale g = encode_group(p.spec, row.data(), d, codes.data());
    decode_group(p.spec.format, codes.data(), d, g, deq.data());
    for (int64_t i = 0; i < d; ++i) {
      const size_t k = size_t(t * d + i);
      // Rounded, not clamped: within half a step of its value (the straight-through estimator's
      // identity); a clamped element is a constant of the frozen scale and zero.
      const bool passes = std::abs(double(deq[size_t(i)]) - y[k]) <= 0.5 * double(g.scale) * (1 + 1e-4);
      f.passes[k] = passes;
      f.offset[k] = passes ? float(double(deq[size_t(i)]) - y[k]) : deq[size_t(i)];
    }
  }
  return f;
}

double surrogate_loss(const RotationProblem& p, const std::vector<float>& xf, const FrozenQuantizer& frozen,
                      const std::vector<double>& rotation, std::vector<double>* gradient) {
  check_problem(p, xf, rotation);
  const int64_t d = p.dim, n = int64_t(xf.size()) / d;
  const Matrix h = hadamard_matrix(d);
  const Matrix u = product(h.data(), false, rotation.data(), false, d, d, d);
  const std::vector<double> x = widen(xf);
  Matrix yq = quantizer_inputs(p, x, u);
  for (size_t k = 0; k < yq.size(); ++k) yq[k] = frozen.passes[k] ? yq[k] + frozen.offset[k] : frozen.offset[k];
  // e_t = Uᵀ·ŷ_t − x_t (rows), g_t = M·e_t.
  Matrix e = product(yq.data(), false, u.data(), false, n, d, d);
  for (size_t k = 0; k < e.size(); ++k) e[k] -= x[k];
  const Matrix g = product(e.data(), false, p.metric.data(), false, n, d, d);
  double loss = 0;
  for (size_t k = 0; k < e.size(); ++k) loss += e[k] * g[k];
  loss /= double(n);
  if (!gradient) return loss;
  // dL/dU = (2/n)·Σ_t [ŷ_t·g_tᵀ + (passes_t ⊙ U·g_t)·x_tᵀ]; U = H·R, so dL/dR = Hᵀ·dL/dU.
  Matrix ug = product(g.data(), false, u.data(), true, n, d, d);
  for (size_t k = 0; k < ug.size(); ++k) ug[k] = frozen.passes[k] ? ug[k] : 0;
  Matrix du = product(yq.data(), true, g.data(), false, d, n, d);
  const Matrix du2 = product(ug.data(), true, x.data(), false, d, n, d);
  for (size_t k = 0; k < du.size(); ++k) du[k] = 2 * (du[k] + du2[k]) / double(n);
  *gradient = product(h.data(), true, du.data(), false, d, d, d);
  return loss;
}

double rotation_loss(const RotationProblem& p, const std::vector<float>& x, const std::vector<double>& rotation) {
  return surrogate_loss(p, x, freeze_quantizer(p, x, rotation), rotation, nullptr);
}

LearnedRotation learn_rotation(const RotationProblem& p, const RotationOptions& opt) {
  const int64_t d = p.dim;
  const int n = int(d);
  Matrix r(size_t(d * d), 0.0);
  for (int64_t i = 0; i < d; ++i) r[size_t(i * d + i)] = 1;
  LearnedRotation out;
  out.rotation = r;
  out.train_hadamard = out.train_learned = rotation_loss(p, p.train, r);
  for (int s = 0; s < opt.steps; ++s) {
    std::vector<double> grad;
    const double loss = surrogate_loss(p, p.train, freeze_quantizer(p, p.train, r), r, &grad);  // = the true loss at r
    if (loss < out.train_learned) {
      out.train_learned = loss;
      out.rotation = r;
    }
    // The Riemannian direction on the orthogonal group: A = G·Rᵀ − R·Gᵀ (skew); R ← cayley(ηA)·R
    // with cayley(ηA) = (I + ηA/2)⁻¹·(I − ηA/2), orthogonal for any η.
    Matrix a = product(grad.data(), false, r.data(), true, d, d, d);
    const Matrix at = product(r.data(), false, grad.data(), true, d, d, d);
    double norm = 0;
    for (size_t k = 0; k < a.size(); ++k) {
      a[k] -= at[k];
      norm += a[k] * a[k];
    }
    if (norm == 0) break;
    const double eta = opt.step * 0.5 * (1 + std::cos(std::numbers::pi * s / opt.steps)) / std::sqrt(norm);
    Matrix plus(size_t(d * d)), minus(size_t(d * d));
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j) {
        const double id = i == j ? 1 : 0, v = eta / 2 * a[size_t(i * d + j)];
        plus[size_t(i * d + j)] = id + v;
        minus[size_t(i * d + j)] = id - v;
      }
    // LAPACK reads the row-major buffers as their transposes: (I − ηA/2)·X = (I + ηA/2) gives
    // X = cayley⁻¹ = cayleyᵀ column-major, i.e. cayley row-major in `minus`.
    std::vector<int> pivots(static_cast<size_t>(d));
    int info = 0;
    dgesv_(&n, &n, plus.data(), &n, pivots.data(), minus.data(), &n, &info);
    check(info == 0, "KV rotation", "the Cayley step's solve failed (LAPACK dgesv info {})", info);
    r = product(minus.data(), false, r.data(), false, d, d, d);
  }
  const double last = rotation_loss(p, p.train, r);
  if (last < out.train_learned) {
    out.train_learned = last;
    out.rotation = r;
  }
  if (!p.heldout.empty()) {
    Matrix id(size_t(d * d), 0.0);
    for (int64_t i = 0; i < d; ++i) id[size_t(i * d + i)] = 1;
    out.heldout_hadamard = rotation_loss(p, p.heldout, id);
    out.heldout_learned = rotation_loss(p, p.heldout, out.rotation);
  }
  return out;
}

void fold_value_rotation(Layer& layer, const ModelConfig& c, const std::vector<double>& rotations) {
  auto* qkv = dynamic_cast<DenseLinear*>(layer.qkv.get());
  auto* o = dynamic_cast<DenseLinear*>(layer.o.get());
  check(qkv && o, "KV rotation", "V's rotation folds into full-precision q/k/v and o_proj only");
  const int64_t d = c.head_dim, H = qkv->in_features(), per_group = c.num_heads / c.num_kv_heads,
                first_v = c.q_dim() + c.kv_dim(), out = o->out_features(), qd = c.q_dim();
  check(int64_t(rotations.size()) == c.num_kv_heads * d * d, "KV rotation", "{} values for {} heads of {}²",
        rotations.size(), c.num_kv_heads, d);
  for (int64_t g = 0; g < c.num_kv_heads; ++g) {
    const double* r = rotations.data() + g * d * d;
    // v rows: W_v' = R·W_v (and the bias).
    const int64_t row0 = first_v + g * d;
    std::vector<double> rows(size_t(d * H));
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j)
        for (int64_t k = 0; k < H; ++k) rows[size_t(i * H + k)] += r[i * d + j] * qkv->weight()[size_t((row0 + j) * H + k)];
    for (int64_t k = 0; k < d * H; ++k) qkv->weight()[size_t(row0 * H + k)] = float(rows[size_t(k)]);
    if (!qkv->bias().empty()) {
      std::vector<double> b(static_cast<size_t>(d));
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j) b[size_t(i)] += r[i * d + j] * qkv->bias()[size_t(row0 + j)];
      for (int64_t i = 0; i < d; ++i) qkv->bias()[size_t(row0 + i)] = float(b[size_t(i)]);
    }
    // o_proj columns of each query head of the group: W_o' = W_o·Rᵀ, i.e. W_o'[n, j] = Σ_i W_o[n, i]·R[j, i].
    for (int64_t h = g * per_group; h < (g + 1) * per_group; ++h)
      for (int64_t row = 0; row < out; ++row) {
        float* w = o->weight().data() + row * qd + h * d;
        std::vector<double> col(static_cast<size_t>(d));
        for (int64_t j = 0; j < d; ++j)
          for (int64_t i = 0; i < d; ++i) col[size_t(j)] += double(w[i]) * r[j * d + i];
        for (int64_t j = 0; j < d; ++j) w[j] = float(col[size_t(j)]);
      }
  }
}

}  // namespace nibble::quant
