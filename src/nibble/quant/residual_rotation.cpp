#include "nibble/quant/residual_rotation.h"

#include <cblas.h>

#include <cmath>
#include <numbers>
#include <random>

#include "nibble/core/error.h"
#include "nibble/core/half.h"
#include "nibble/quant/hadamard.h"

extern "C" {
void dgeqrf_(const int* m, const int* n, double* a, const int* lda, double* tau, double* work, const int* lwork,
             int* info);
void dorgqr_(const int* m, const int* n, const int* k, double* a, const int* lda, const double* tau, double* work,
             const int* lwork, int* info);
}

namespace nibble::quant {

namespace {

bool is_prime(int64_t q) {
  if (q < 2) return false;
  for (int64_t d = 2; d * d <= q; ++d)
    if (q % d == 0) return false;
  return true;
}

// n = m·p with p a power of two and m = 1 or q + 1 (q prime ≡ 3 mod 4), the largest p first (the
// smallest Paley factor, as QuaRot pairs its small Hadamards with a Walsh-Hadamard); {0, 0}: none.
std::pair<int64_t, int64_t> hadamard_factors(int64_t n) {
  if (n <= 0) return {0, 0};
  for (int64_t p = n & -n; p >= 1; p /= 2) {
    const int64_t m = n / p;
    if (m == 1 || (m >= 4 && (m - 1) % 4 == 3 && is_prime(m - 1))) return {m, p};
  }
  return {0, 0};
}

// Paley's construction I: a ±1 matrix of order q + 1 with H·Hᵀ = (q + 1)·I, for a prime q ≡ 3 mod 4:
// H = I + S, S = [[0, 1ᵀ], [−1, Q]], Q[i][j] = χ(j − i) with χ the quadratic character mod q.
std::vector<int> paley_matrix(int64_t q) {
  std::vector<int> chi(size_t(q), -1);
  chi[0] = 0;
  for (int64_t x = 1; x < q; ++x) chi[size_t(x * x % q)] = 1;
  const int64_t m = q + 1;
  std::vector<int> h(size_t(m * m));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) {
      const int s = i == 0 ? (j == 0 ? 0 : 1) : j == 0 ? -1 : chi[size_t(((j - i) % q + q) % q)];
      h[size_t(i * m + j)] = (i == j) + s;
    }
  return h;
}

// Uniform in (0, 1] and standard normal draws from a fully specified engine (std's distributions
// differ between standard libraries; the rotation must not).
double uniform(std::mt19937_64& rng) { return double((rng() >> 11) + 1) * 0x1.0p-53; }
double gaussian(std::mt19937_64& rng) {
  const double u = uniform(rng), v = uniform(rng);
  return std::sqrt(-2 * std::log(u)) * std::cos(2 * std::numbers::pi * v);
}

std::vector<double> randomized_hadamard(int64_t n, std::mt19937_64& rng) {
  const auto [m, p] = hadamard_factors(n);
  check(m > 0, "residual rotation", "no Hadamard matrix of order {} here (2^k or (q + 1)·2^k, q prime ≡ 3 mod 4)", n);
  const std::vector<int> paley = m == 1 ? std::vector<int>{1} : paley_matrix(m - 1);
  const double norm = 1 / std::sqrt(double(n));
  std::vector<double> r(size_t(n * n));
  for (int64_t i = 0; i < n; ++i) {
    const double sign = (rng() >> 63) ? -norm : norm;
    for (int64_t j = 0; j < n; ++j) {
      r[size_t(i * n + j)] = sign * paley[size_t((i / p) * m + j / p)] * walsh_sign(i % p, j % p);
    }
  }
  return r;
}

std::vector<double> random_orthogonal(int64_t n, std::mt19937_64& rng) {
  std::vector<double> a(size_t(n * n)), tau(static_cast<size_t>(n)), work(size_t(64 * n));
  for (double& x : a) x = gaussian(rng);
  const int ni = int(n), lwork = int(work.size());
  int info = 0;
  dgeqrf_(&ni, &ni, a.data(), &ni, tau.data(), work.data(), &lwork, &info);
  check(info == 0, "residual rotation", "QR of a {}×{} Gaussian matrix failed (dgeqrf info {})", n, n, info);
  std::vector<double> sign(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) sign[size_t(j)] = a[size_t(j * n + j)] < 0 ? -1.0 : 1.0;
  dorgqr_(&ni, &ni, &ni, a.data(), &ni, tau.data(), work.data(), &lwork, &info);
  check(info == 0, "residual rotation", "forming Q of a {}×{} QR failed (dorgqr info {})", n, n, info);
  // Q·diag(sign(diag R)): the QR with a positive diagonal, whose Q is Haar-distributed.
  std::vector<double> r(size_t(n * n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) r[size_t(i * n + j)] = a[size_t(j * n + i)] * sign[size_t(j)];  // column-major a
  return r;
}

std::vector<float> narrowed(const std::vector<double>& r) { return {r.begin(), r.end()}; }

int64_t order_of(const std::vector<double>& r) {
  const auto n = int64_t(std::llround(std::sqrt(double(r.size()))));
  check(n > 0 && n * n == int64_t(r.size()), "residual rotation", "a rotation of {} values is not square", r.size());
  return n;
}

// W [rows, n] := W·diag(g)·R (g empty: no scale).
void read_rotated(std::vector<float>& w, const std::vector<float>& g, const std::vector<float>& rf, int64_t n,
                  const std::string& what) {
  check(int64_t(w.size()) % n == 0 && (g.empty() || int64_t(g.size()) == n), "residual rotation",
        "{}: {} weights are not rows of the rotation's {} channels", what, w.size(), n);
  const int64_t rows = int64_t(w.size()) / n;
  if (!g.empty())
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t c = 0; c < n; ++c) w[size_t(i * n + c)] *= g[size_t(c)];
  std::vector<float> out(w.size());
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(rows), int(n), int(n), 1.0f, w.data(), int(n), rf.data(),
              int(n), 0.0f, out.data(), int(n));
  w = std::move(out);
}

// W [n, cols] := Rᵀ·W.
void write_rotated(std::vector<float>& w, const std::vector<float>& rf, int64_t n) {
  const int64_t cols = int64_t(w.size()) / n;
  std::vector<float> out(w.size());
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(n), int(cols), int(n), 1.0f, rf.data(), int(n), w.data(),
              int(cols), 0.0f, out.data(), int(cols));
  w = std::move(out);
}

DenseLinear& dense(Linear& l, const std::string& what) {
  auto* d = dynamic_cast<DenseLinear*>(&l);
  check(d != nullptr, "residual rotation", "{} is not full precision: rotate the FP model before quantizing", what);
  return *d;
}

void read_linear(Linear& l, const std::vector<float>& g, const std::vector<float>& rf, int64_t n,
                 const std::string& what) {
  DenseLinear& d = dense(l, what);
  check(d.in_features() == n, "residual rotation", "{} reads {} channels, the rotation has {}", what, d.in_features(), n);
  read_rotated(d.weight(), g, rf, n, what);
}

void write_linear(Linear& l, const std::vector<float>& rf, int64_t n, const std::string& what) {
  DenseLinear& d = dense(l, what);
  check(d.out_features() == n, "residual rotation", "{} writes {} channels, the rotation has {}", what,
        d.out_features(), n);
  write_rotated(d.weight(), rf, n);
  if (!d.bias().empty()) write_rotated(d.bias(), rf, n);
}

// fp16 values, as stored and uploaded; a value past fp16's range is refused rather than made inf.
std::vector<float> fp16_rounded(std::vector<float> v, const char* what) {
  for (float& x : v) {
    const float h = round_fp16(x);
    check(std::isfinite(h), "residual rotation", "the rotated {} has a value {} outside fp16's range", what, x);
    x = h;
  }
  return v;
}

}  // namespace

bool has_hadamard(int64_t n) { return hadamard_factors(n).first > 0; }

std::vector<double> residual_rotation_matrix(ResidualRotation kind, int64_t n, uint64_t seed) {
  // Its own stream of the seed: the rotation does not move when the calibration sampling changes.
  std::mt19937_64 rng(seed ^ 0x5e51d0a1u);
  switch (kind) {
    case ResidualRotation::Hadamard: return randomized_hadamard(n, rng);
    case ResidualRotation::Random: return random_orthogonal(n, rng);
    case ResidualRotation::None: break;
  }
  throw Error("residual rotation", "no rotation to build for --residual-rotation none");
}

void rotate_layer_residual(Layer& layer, const std::vector<double>& r) {
  const int64_t n = order_of(r);
  const std::vector<float> rf = narrowed(r);
  check(int64_t(layer.attn_norm.size()) == n && int64_t(layer.mlp_norm.size()) == n, "residual rotation",
        "the layer's norms have {} and {} channels, the rotation {}", layer.attn_norm.size(), layer.mlp_norm.size(), n);
  read_linear(*layer.qkv, layer.attn_norm, rf, n, "q/k/v");
  if (layer.router) read_linear(*layer.router, layer.mlp_norm, rf, n, "router");
  for (Expert& e : layer.experts) {
    read_linear(*e.gate_up, layer.mlp_norm, rf, n, "gate/up");
    write_linear(*e.down, rf, n, "down_proj");
  }
  write_linear(*layer.o, rf, n, "o_proj");
  std::fill(layer.attn_norm.begin(), layer.attn_norm.end(), 1.0f);
  std::fill(layer.mlp_norm.begin(), layer.mlp_norm.end(), 1.0f);
}

std::vector<float> rotate_embedding(std::vector<float> embedding, const std::vector<double>& r) {
  const int64_t n = order_of(r);
  read_rotated(embedding, {}, narrowed(r), n, "embedding");  // each row eᵀ·R = (Rᵀ·e)ᵀ
  return fp16_rounded(std::move(embedding), "embedding");
}

std::vector<float> rotate_lm_head(std::vector<float> head, const std::vector<float>& final_norm,
                                  const std::vector<double>& r) {
  read_rotated(head, final_norm, narrowed(r), order_of(r), "LM head");
  return fp16_rounded(std::move(head), "LM head");
}

void rotate_model_residual(Model& model, const std::vector<double>& r) {
  for (Layer& layer : model.layers()) rotate_layer_residual(layer, r);
  const DenseLinear& head = dense(model.lm_head(), "the LM head");
  // Stored as fp16 (2 bytes a weight) whatever the checkpoint held.
  auto rotated = std::make_unique<DenseLinear>(head.in_features(), head.out_features(),
                                               rotate_lm_head(head.weight(), model.final_norm(), r), head.bias());
  model.untie_word_embeddings(std::move(rotated));
  model.embedding() = rotate_embedding(std::move(model.embedding()), r);
  std::fill(model.final_norm().begin(), model.final_norm().end(), 1.0f);
}

}  // namespace nibble::quant
