// Trust-GRPO reward aggregation (SophiaVL-R1, arXiv 2505.17018) and GRPO group advantages.
//
//   R_i = R^o_i + gamma_g * alpha * exp(-step / T) * R^t_i
//   gamma_g = 1 if mu_c >= mu_w else exp(mu_c - mu_w)
//
// mu_c / mu_w are the mean thinking scores of the correct / wrong members of group g
// (correct iff outcome >= correct_threshold); missing thinking scores (NaN) are left out
// of the means and contribute 0 to the reward. A group without a scored correct member or
// without a scored wrong member gets gamma = unpaired_gamma.
#include <cmath>
#include <limits>
#include <tuple>

#include "common.h"

namespace sophiavl {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Throws when group_ids[i] is outside [0, num_groups).
void check_group_ids(const std::int64_t* ids, py::ssize_t n, std::int64_t num_groups) {
  if (num_groups < 0) {
    throw std::invalid_argument("num_groups must be >= 0, got " + std::to_string(num_groups));
  }
  for (py::ssize_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= num_groups) {
      throw std::invalid_argument("group_ids[" + std::to_string(i) + "] is " +
                                  std::to_string(ids[i]) + "; group ids must lie in [0, " +
                                  std::to_string(num_groups) + ")");
    }
  }
}

void check_finite_array(const double* x, py::ssize_t n, const char* name, const char* what) {
  for (py::ssize_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) {
      throw std::invalid_argument(std::string(name) + "[" + std::to_string(i) + "] is " +
                                  format_double(x[i]) + "; " + what + " must be finite");
    }
  }
}

void check_scalar(bool ok, const char* name, const std::string& expected, double value) {
  if (!ok) {
    throw std::invalid_argument(std::string(name) + " must be " + expected + ", got " +
                                format_double(value));
  }
}

py::tuple trust_grpo(const py::array& outcome_arr, const py::array& thinking_arr,
                     const py::array& ids_arr, std::int64_t num_groups,
                     double correct_threshold, double alpha, std::int64_t step,
                     std::int64_t total_steps, bool use_trust, bool use_annealing,
                     bool use_thinking, double unpaired_gamma) {
  const py::ssize_t n = check_1d<double>(outcome_arr, "outcome", "float64");
  const py::ssize_t n_t = check_1d<double>(thinking_arr, "thinking", "float64");
  const py::ssize_t n_g = check_1d<std::int64_t>(ids_arr, "group_ids", "int64");
  if (n_t != n || n_g != n) {
    throw std::invalid_argument("outcome, thinking and group_ids must have the same length, got " +
                                std::to_string(n) + ", " + std::to_string(n_t) + " and " +
                                std::to_string(n_g));
  }
  check_scalar(std::isfinite(correct_threshold), "correct_threshold", "finite",
               correct_threshold);
  check_scalar(std::isfinite(alpha) && alpha >= 0.0, "alpha", "finite and >= 0", alpha);
  check_scalar(std::isfinite(unpaired_gamma) && unpaired_gamma >= 0.0, "unpaired_gamma",
               "finite and >= 0", unpaired_gamma);
  if (total_steps <= 0) {
    throw std::invalid_argument("total_steps must be > 0, got " + std::to_string(total_steps));
  }
  if (step < 0) throw std::invalid_argument("step must be >= 0, got " + std::to_string(step));

  const double* outcome = static_cast<const double*>(outcome_arr.data());
  const double* thinking = static_cast<const double*>(thinking_arr.data());
  const std::int64_t* ids = static_cast<const std::int64_t*>(ids_arr.data());
  check_finite_array(outcome, n, "outcome", "outcome rewards");
  for (py::ssize_t i = 0; i < n; ++i) {
    if (std::isinf(thinking[i])) {
      throw std::invalid_argument("thinking[" + std::to_string(i) + "] is " +
                                  format_double(thinking[i]) +
                                  "; thinking scores must be finite (NaN marks a missing score)");
    }
  }
  check_group_ids(ids, n, num_groups);

  py::array_t<double> reward(n);
  py::array_t<double> gamma(num_groups);
  py::array_t<double> mu_c(num_groups);
  py::array_t<double> mu_w(num_groups);
  double* r = reward.mutable_data();
  double* g = gamma.mutable_data();
  double* mc = mu_c.mutable_data();
  double* mw = mu_w.mutable_data();
  const double annealing =
      use_annealing ? std::exp(-static_cast<double>(step) / static_cast<double>(total_steps))
                    : 1.0;
  {
    py::gil_scoped_release release;
    std::vector<double> sum_c(num_groups, 0.0), sum_w(num_groups, 0.0);
    std::vector<std::int64_t> cnt_c(num_groups, 0), cnt_w(num_groups, 0);
    for (py::ssize_t i = 0; i < n; ++i) {  // O(N), in index order (deterministic sums)
      if (std::isnan(thinking[i])) continue;
      if (outcome[i] >= correct_threshold) {
        sum_c[ids[i]] += thinking[i];
        ++cnt_c[ids[i]];
      } else {
        sum_w[ids[i]] += thinking[i];
        ++cnt_w[ids[i]];
      }
    }
    for (std::int64_t k = 0; k < num_groups; ++k) {
      mc[k] = cnt_c[k] > 0 ? sum_c[k] / static_cast<double>(cnt_c[k]) : kNaN;
      mw[k] = cnt_w[k] > 0 ? sum_w[k] / static_cast<double>(cnt_w[k]) : kNaN;
      if (!use_trust) {
        g[k] = 1.0;
      } else if (cnt_c[k] == 0 || cnt_w[k] == 0) {
        g[k] = unpaired_gamma;
      } else {
        g[k] = mc[k] >= mw[k] ? 1.0 : std::exp(mc[k] - mw[k]);
      }
    }
    const double scale = alpha * annealing;
#ifdef SOPHIAVL_HAVE_OPENMP
#pragma omp parallel for schedule(static) if (n > 65536)
#endif
    for (py::ssize_t i = 0; i < n; ++i) {
      const double t = thinking[i];
      r[i] = (use_thinking && !std::isnan(t)) ? outcome[i] + g[ids[i]] * scale * t : outcome[i];
    }
  }
  return py::make_tuple(reward, gamma, mu_c, mu_w, annealing);
}

py::array_t<double> group_advantages(const py::array& rewards_arr, const py::array& ids_arr,
                                     std::int64_t num_groups, double eps, bool scale_by_std,
                                     std::int64_t std_ddof) {
  const py::ssize_t n = check_1d<double>(rewards_arr, "rewards", "float64");
  const py::ssize_t n_g = check_1d<std::int64_t>(ids_arr, "group_ids", "int64");
  if (n_g != n) {
    throw std::invalid_argument("rewards and group_ids must have the same length, got " +
                                std::to_string(n) + " and " + std::to_string(n_g));
  }
  check_scalar(std::isfinite(eps) && eps >= 0.0, "eps", "finite and >= 0", eps);
  if (std_ddof != 0 && std_ddof != 1) {
    throw std::invalid_argument("std_ddof must be 0 or 1, got " + std::to_string(std_ddof));
  }
  const double* x = static_cast<const double*>(rewards_arr.data());
  const std::int64_t* ids = static_cast<const std::int64_t*>(ids_arr.data());
  check_finite_array(x, n, "rewards", "rewards");
  check_group_ids(ids, n, num_groups);

  py::array_t<double> out(n);
  double* adv = out.mutable_data();
  {
    py::gil_scoped_release release;
    const double inf = std::numeric_limits<double>::infinity();
    std::vector<double> sum(num_groups, 0.0), sq(num_groups, 0.0);
    std::vector<double> lo(num_groups, inf), hi(num_groups, -inf);
    std::vector<std::int64_t> cnt(num_groups, 0);
    for (py::ssize_t i = 0; i < n; ++i) {
      const std::int64_t k = ids[i];
      sum[k] += x[i];
      ++cnt[k];
      lo[k] = std::min(lo[k], x[i]);
      hi[k] = std::max(hi[k], x[i]);
    }
    std::vector<double> mean(num_groups, 0.0);
    for (std::int64_t k = 0; k < num_groups; ++k) {
      if (cnt[k] > 0) mean[k] = sum[k] / static_cast<double>(cnt[k]);
    }
    for (py::ssize_t i = 0; i < n; ++i) {  // two-pass variance
      const double d = x[i] - mean[ids[i]];
      sq[ids[i]] += d * d;
    }
    std::vector<double> denom(num_groups, 1.0);
    for (std::int64_t k = 0; k < num_groups; ++k) {
      if (scale_by_std && cnt[k] > 1) {
        denom[k] = std::sqrt(sq[k] / static_cast<double>(cnt[k] - std_ddof)) + eps;
      }
    }
    for (py::ssize_t i = 0; i < n; ++i) {
      const std::int64_t k = ids[i];
      // A one-member or all-equal group carries no preference signal: advantage 0.
      if (cnt[k] <= 1 || lo[k] == hi[k]) {
        adv[i] = 0.0;
      } else {
        adv[i] = (x[i] - mean[k]) / denom[k];
      }
    }
  }
  return out;
}

}  // namespace

void register_trust_grpo(py::module_& m) {
  m.def("trust_grpo", &trust_grpo, py::arg("outcome"), py::arg("thinking"),
        py::arg("group_ids"), py::arg("num_groups"), py::arg("correct_threshold"),
        py::arg("alpha"), py::arg("step"), py::arg("total_steps"), py::arg("use_trust"),
        py::arg("use_annealing"), py::arg("use_thinking"), py::arg("unpaired_gamma"),
        R"doc(Trust-GRPO rewards.

outcome f64[N], thinking f64[N] (NaN = missing TRM score), group_ids i64[N] in [0, G).
Returns (reward f64[N], gamma f64[G], mu_correct f64[G], mu_wrong f64[G], annealing).)doc");
  m.def("group_advantages", &group_advantages, py::arg("rewards"), py::arg("group_ids"),
        py::arg("num_groups"), py::arg("eps"), py::arg("scale_by_std"), py::arg("std_ddof"),
        R"doc(GRPO advantages f64[N]: (R - mean_g) / (std_g + eps), or R - mean_g
(scale_by_std=False, Dr.GRPO). One-member and all-equal groups get 0.)doc");
}

}  // namespace sophiavl
