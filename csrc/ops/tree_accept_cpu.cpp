// CPU implementation of specmoe::tree_accept. Same arithmetic as the CUDA
// kernels (keys, fixed-point weights, Philox: csrc/kernels/tree_accept.h) but a different selection
// algorithm (nth_element / sort instead of radix select), so the two cross-check each other.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "tree_accept_common.h"

namespace specmoe {
namespace {

namespace ta = tree_accept;

template <typename T> void load_row(const T* row, int64_t V, float* v, uint32_t* k);
template <> void load_row<float>(const float* row, int64_t V, float* v, uint32_t* k) {
  for (int64_t i = 0; i < V; ++i) {
    uint32_t b;
    std::memcpy(&b, &row[i], 4);
    v[i] = row[i];
    k[i] = ta::key_f32(b);
  }
}
template <> void load_row<at::BFloat16>(const at::BFloat16* row, int64_t V, float* v, uint32_t* k) {
  for (int64_t i = 0; i < V; ++i) {
    v[i] = static_cast<float>(row[i]);
    k[i] = ta::key_bf16(row[i].x);
  }
}
template <> void load_row<at::Half>(const at::Half* row, int64_t V, float* v, uint32_t* k) {
  for (int64_t i = 0; i < V; ++i) {
    v[i] = static_cast<float>(row[i]);
    k[i] = ta::key_f16(row[i].x);
  }
}

struct NodeCfg {
  bool greedy;
  float scale;
  double top_p;
  int64_t top_k;
};

// y of one node: the argmax (greedy or no positive mass) or the inverse-CDF draw of the kept set.
int64_t node_token(const float* v, const uint32_t* k, int64_t V, const NodeCfg& c, uint32_t bits24) {
  int64_t amax = 0;
  for (int64_t i = 1; i < V; ++i)
    if (k[i] > k[amax]) amax = i;
  if (c.greedy) return amax;
  const float m = std::isnan(v[amax]) ? -INFINITY : v[amax];
  uint32_t kept = 0;
  if (c.top_k > 0 && c.top_k < V) {
    std::vector<uint32_t> ks(k, k + V);
    std::nth_element(ks.begin(), ks.begin() + (c.top_k - 1), ks.end(), std::greater<uint32_t>());
    kept = ks[size_t(c.top_k - 1)];
  }
  std::vector<uint64_t> w(size_t(V), 0);
  for (int64_t i = 0; i < V; ++i) w[size_t(i)] = k[i] >= kept ? ta::fixed_weight(v[i], m, c.scale) : 0;
  if (c.top_p < 1.0) {
    std::vector<std::pair<uint32_t, uint64_t>> kw;
    uint64_t wk = 0;
    for (int64_t i = 0; i < V; ++i)
      if (k[i] >= kept) {
        kw.emplace_back(k[i], w[size_t(i)]);
        wk += w[size_t(i)];
      }
    if (wk > 0) {
      std::sort(kw.begin(), kw.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
      const double thr = c.top_p * double(wk);
      uint64_t cum = 0;
      uint32_t kp = kept;
      for (size_t i = 0; i < kw.size();) {
        size_t j = i;
        uint64_t gm = 0;
        while (j < kw.size() && kw[j].first == kw[i].first) gm += kw[j++].second;
        if (double(cum + gm) >= thr) {
          kp = kw[i].first;
          break;
        }
        cum += gm;
        i = j;
      }
      if (kp > kept) {
        kept = kp;
        for (int64_t i = 0; i < V; ++i)
          if (k[i] < kept) w[size_t(i)] = 0;
      }
    }
  }
  uint64_t W = 0;
  for (int64_t i = 0; i < V; ++i) W += w[size_t(i)];
  if (W == 0) return amax;
  const uint64_t t = ta::scaled_threshold(bits24, W);
  uint64_t cum = 0;
  for (int64_t i = 0; i < V; ++i) {
    cum += w[size_t(i)];
    if (cum > t) return i;
  }
  return amax;  // unreachable: t < W
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_accept_cpu(
    const at::Tensor& logits, const at::Tensor& tokens, const at::Tensor& parent, const at::Tensor& valid,
    double temperature, double top_p, int64_t top_k, const at::Tensor& seed, const at::Tensor& offset) {
  const AcceptArgs a = check_tree_accept_args(logits, tokens, parent, valid, temperature, top_p, top_k, seed,
                                              offset);
  const auto i64 = tokens.options();
  at::Tensor path = at::full({a.bs, a.T}, -1, i64);
  at::Tensor nacc = at::zeros({a.bs}, i64);
  at::Tensor bonus = at::zeros({a.bs}, i64);
  const NodeCfg cfg{temperature == 0.0, temperature > 0.0 ? float(ta::kLog2e / temperature) : 1.0f, top_p,
                    top_k};
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t* par = parent.data_ptr<int64_t>();
  const bool* val = valid.data_ptr<bool>();
  const int64_t* sd = seed.data_ptr<int64_t>();
  int64_t* off = offset.data_ptr<int64_t>();
  std::vector<int64_t> y(size_t(a.bs * a.T), -1);
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* base = logits.data_ptr<scalar_t>();
    at::parallel_for(0, a.bs * a.T, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> v(static_cast<size_t>(a.V));
      std::vector<uint32_t> k(static_cast<size_t>(a.V));
      for (int64_t nid = lo; nid < hi; ++nid) {
        const int64_t b = nid / a.T, node = nid % a.T;
        if (node > 0 && !val[nid]) continue;
        load_row<scalar_t>(base + nid * a.V, a.V, v.data(), k.data());
        const uint32_t bits = philox::node_bits24(uint64_t(sd[b]), uint64_t(off[b]), uint32_t(node));
        y[size_t(nid)] = node_token(v.data(), k.data(), a.V, cfg, bits);
      }
    });
  };
  switch (logits.scalar_type()) {
    case at::kBFloat16: run(at::BFloat16()); break;
    case at::kHalf: run(at::Half()); break;
    default: run(float()); break;
  }
  // the walk (same rules as tree_accept.cuh's walk_kernel)
  int64_t* pp = path.data_ptr<int64_t>();
  int64_t* np = nacc.data_ptr<int64_t>();
  int64_t* bp = bonus.data_ptr<int64_t>();
  const int64_t T = a.T;
  std::vector<int64_t> pr(static_cast<size_t>(T));
  std::vector<char> ok(static_cast<size_t>(T));
  std::vector<int64_t> dep(static_cast<size_t>(T));
  for (int64_t b = 0; b < a.bs; ++b) {
    const int64_t* yb = y.data() + b * T;
    for (int64_t i = 0; i < T; ++i) {
      const int64_t q = par[b * T + i];
      pr[size_t(i)] = (i > 0 && q >= 0 && q < i) ? q : -1;
      ok[size_t(i)] = i == 0 || (val[b * T + i] && pr[size_t(i)] >= 0);
    }
    int64_t* row = pp + b * T;
    if (cfg.greedy) {
      int64_t best = 0, bestd = 0;
      dep[0] = 0;
      for (int64_t i = 1; i < T; ++i) {
        const int64_t q = pr[size_t(i)];
        const bool on = ok[size_t(i)] && ok[size_t(q)] && tok[b * T + i] == yb[q];
        ok[size_t(i)] = on;
        if (on) {
          dep[size_t(i)] = dep[size_t(q)] + 1;
          if (dep[size_t(i)] > bestd) {
            bestd = dep[size_t(i)];
            best = i;
          }
        }
      }
      for (int64_t j = bestd, v = best; j >= 0; --j, v = pr[size_t(v)]) row[j] = v;
      np[b] = bestd;
      bp[b] = yb[best];
    } else {
      int64_t cur = 0, n = 0;
      row[0] = 0;
      while (true) {
        int64_t child = -1;
        for (int64_t i = cur + 1; i < T; ++i)
          if (ok[size_t(i)] && pr[size_t(i)] == cur && tok[b * T + i] == yb[cur]) {
            child = i;
            break;
          }
        if (child < 0) break;
        row[++n] = child;
        cur = child;
      }
      np[b] = n;
      bp[b] = yb[cur];
    }
    off[b] += 1;
  }
  return {path, nacc, bonus};
}

}  // namespace

TORCH_LIBRARY_IMPL(specmoe, CPU, m) {
  m.impl("tree_accept", &tree_accept_cpu);
}

}  // namespace specmoe
