#include "nibble/quant/calibrate.h"

#include <unistd.h>

#include <cmath>
#include <random>
#include <string>

#include "nibble/backend/cpu/ops.h"
#include "nibble/core/error.h"
#include "nibble/core/parallel.h"
#include "nibble/quant/device_math.h"

namespace nibble::quant {

void check_fits_in_memory(double bytes, const std::string& what, const std::string& where) {
  const double physical = double(sysconf(_SC_PHYS_PAGES)) * double(sysconf(_SC_PAGESIZE));
  check(bytes <= physical, where, "{} would take {:.1f} GB, more than this machine's {:.1f} GB of memory", what,
        bytes / 1e9, physical / 1e9);
}

std::vector<std::vector<int32_t>> sample_calibration_windows(std::span<const int32_t> tokens, int64_t count,
                                                             int64_t ctx, uint64_t seed, const std::string& where) {
  check(count > 0 && ctx > 1, where, "need at least one calibration window of at least 2 tokens");
  check(int64_t(tokens.size()) > ctx, where,
        "calibration text has {} tokens, too short for one window of {} tokens (give a longer text or a smaller "
        "--calib-ctx)",
        tokens.size(), ctx);
  check_fits_in_memory(double(count) * double(ctx) * sizeof(int32_t),
                       fmt::format("{} calibration windows of {} tokens", count, ctx), where);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> start(0, int64_t(tokens.size()) - ctx - 1);
  std::vector<std::vector<int32_t>> windows;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t s = start(rng);
    windows.emplace_back(tokens.begin() + s, tokens.begin() + s + ctx);
  }
  return windows;
}

InputStats::InputStats(int64_t dim, bool with_xtx, bool on_device)
    : dim_(dim), with_xtx_(with_xtx), sum_sq_(size_t(dim)), sum_abs_(size_t(dim)) {
  if (on_device) device_ = make_device_stats(dim, with_xtx);
  else if (with_xtx) xtx_.assign(size_t(dim * dim), 0.0);
}

void InputStats::add(const float* x, int64_t rows) {
  count_ += rows;
  if (device_) {
    device_->add(x, rows);
    read_ = false;
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < dim_; ++c) {
      const double v = x[r * dim_ + c];
      sum_sq_[size_t(c)] += v * v;
      sum_abs_[size_t(c)] += std::abs(v);
    }
  if (xtx_.empty()) return;
  // One window's product in fp32 through BLAS (exact enough over ~1k rows), summed in float64.
  std::vector<float> part(size_t(dim_ * dim_));
  cpu::gram_upper(x, rows, dim_, part.data());
  for (int64_t i = 0; i < dim_; ++i)
    for (int64_t j = i; j < dim_; ++j) xtx_[size_t(i * dim_ + j)] += part[size_t(i * dim_ + j)];
}

void InputStats::add_device_f16(const void* x, int64_t rows, void* stream) {
  check(device_ != nullptr, "calibration", "device rows given to statistics kept on the host");
  count_ += rows;
  device_->add_device_f16(x, rows, stream);
  read_ = false;
}

const InputStats& InputStats::read() const {
  if (!read_) {
    device_->read(sum_sq_, sum_abs_, with_xtx_ ? &xtx_ : nullptr);
    read_ = true;
  }
  return *this;
}

void InputStats::scale_channels(const std::vector<double>& d) {
  check(int64_t(d.size()) == dim_, "InputStats", "{} scales for {} channels", d.size(), dim_);
  read();
  for (int64_t c = 0; c < dim_; ++c) {
    sum_sq_[size_t(c)] *= d[size_t(c)] * d[size_t(c)];
    sum_abs_[size_t(c)] *= std::abs(d[size_t(c)]);
  }
  for (int64_t i = 0; i < dim_ && !xtx_.empty(); ++i)
    for (int64_t j = i; j < dim_; ++j) xtx_[size_t(i * dim_ + j)] *= d[size_t(i)] * d[size_t(j)];
}

std::vector<double> InputStats::xtx() const {
  std::vector<double> full(read().xtx_);
  parallel_for(dim_, [&](int64_t i) {  // row-parallel: a 7B's down_proj has 121 M entries
    for (int64_t j = 0; j < i; ++j) full[size_t(i * dim_ + j)] = full[size_t(j * dim_ + i)];
  }, true, Schedule::Dynamic);  // row i copies i values
  return full;
}

}  // namespace nibble::quant
