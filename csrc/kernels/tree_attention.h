// Tree attention for speculative verification (and plain decode): torch-free host interface.
//
// Shapes (legend): bs requests, T query tokens per request (tree nodes; T = 1 is decode), Hq / Hk query
// and key-value heads (rep = Hq / Hk queries share a KV head), d head dim (64 | 128), S cache capacity
// (slots per request), W = ceil(T / 32) mask words.
//
//   q            [bs, T, Hq, d]   bf16 | fp16, d contiguous, strides q_stride_{b,t,h} (elements)
//   k, v         [bs, Hk, S, d]   the runtime's static cache rows, d contiguous, strides kv_stride_{b,h,s}
//   prefix_lens  [bs]  int64      committed tokens of request b: slots [0, prefix) hold its prefix
//   tree_mask    [bs, T, W] int32 ancestor bitmask: bit j of row t = query t sees slot prefix + j
//                                 (the tree node written there); every row must have its own bit set
//   out          [bs, T, Hq, d]   same dtype, contiguous
//
//   out[b, t, h] = softmax_j(scale * q[b, t, h] . k[b, h / rep, j]) v[b, h / rep, j]
//                  over slots j < prefix_b and j = prefix_b + i with bit i of tree_mask[b, t]
//
// Slots >= min(prefix_b + T, S) are never read (nor any below 0): prefix_lens outside [0, S - T], which the
// CPU op refuses, cannot make the kernel read out of bounds.
//
// Algorithm (flash-decoding with the GQA group folded into the query rows):
//   rows m = t * rep + r (r = query head within the group) of one (request, KV head) form the M
//   operand of mma.sync m16n8k16. A CTA owns a tile of RT = 16, 32 or 64 rows (the smallest that
//   holds T * rep; larger groups take several 64-row tiles, which re-read the KV from L2 while they
//   run side by side), so the prefix K/V of one (request, KV head) is read once for all T queries and
//   the whole GQA group. Its warps form RG row groups of 16 rows x KG key groups (RG * KG = 4 or 8
//   warps): each warp takes 64 / KG keys of every chunk with its own online-softmax state, and the
//   key groups are merged through shared memory at the end. Decode (T * rep <= 16) thus still keeps
//   four warps busy, and a 64-row tile runs eight.
//   The KV sequence is cut into 64-key chunks, streamed through shared memory with cp.async
//   (kStages deep); S = Q K^T and O += P V on tensor cores (ldmatrix / ldmatrix.trans from padded,
//   bank-conflict-free rows), online softmax in float32 (exp2 domain). The ancestor mask is applied
//   only to chunks that reach past the prefix.
//   Long sequences are split across CTAs (grid x = splits, each takes an equal share of that request's
//   chunks, computed on the device from prefix_lens, so one graph serves growing lengths); the splits
//   write float32 partial outputs + log-sum-exp and a second launch merges them in split order
//   (deterministic). With one split the first launch writes `out` directly.
// No host synchronization; capturable in a CUDA graph.
#pragma once

#include <cstdint>

namespace specmoe {
namespace tree_attention {

enum class DType : int { kBFloat16 = 1, kFloat16 = 2 };

constexpr int kRowTile = 64;    // most query rows (t, r) per CTA; the partial buffers' row stride
constexpr int kKeyChunk = 64;   // keys per pipeline stage
constexpr int kMaxSplits = 64;

struct TreeAttentionParams {
  const void* q = nullptr;
  int64_t q_stride_b = 0, q_stride_t = 0, q_stride_h = 0;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t kv_stride_b = 0, kv_stride_h = 0, kv_stride_s = 0;   // shared by k and v
  const int64_t* prefix_lens = nullptr;
  const int32_t* tree_mask = nullptr;
  void* out = nullptr;                 // [bs, T, Hq, d] contiguous
  float* partial_out = nullptr;        // [bs * Hk * row_tiles, splits, 64, d] (splits > 1 only)
  float* partial_lse = nullptr;        // [bs * Hk * row_tiles, splits, 64]    (log2 domain)
  int bs = 0, T = 0, Hq = 0, Hk = 0, d = 0, S = 0;
  int num_splits = 1;
  float scale = 0.f;                   // softmax scale (natural units; the kernel converts to exp2)
  DType dtype = DType::kBFloat16;
};

// Rows per CTA for M = T * rep query rows: 16 (decode), 32, else 64.
inline int tile_rows(int M) { return M <= 16 ? 16 : (M <= 32 ? 32 : kRowTile); }

inline int row_tiles(const TreeAttentionParams& p) {
  const int M = p.T * (p.Hq / p.Hk), rt = tile_rows(M);
  return (M + rt - 1) / rt;
}

// Splits for one launch: as many CTAs as fit in ONE wave (the kernel runs one CTA per SM: its 4-stage
// pipeline takes ~150 KB of shared memory; a partial second wave would double the time), but few
// enough that the float32 partials stay a small fraction of the KV bytes (splits * rows / keys <=
// 1/4). kv_len_hint: the longest prefix + T expected (it only steers the split count; any length is
// handled correctly).
inline int choose_splits(int bs, int Hk, int tiles, int rows, int kv_len_hint, int num_sms) {
  const int ctas = bs * Hk * tiles;
  int s = num_sms / ctas;
  const int by_bytes = kv_len_hint / (4 * tile_rows(rows));
  if (s > by_bytes) s = by_bytes;
  const int chunks = (kv_len_hint + kKeyChunk - 1) / kKeyChunk;
  if (s > chunks) s = chunks;
  if (s > kMaxSplits) s = kMaxSplits;
  return s < 1 ? 1 : s;
}

}  // namespace tree_attention
}  // namespace specmoe

#if defined(__CUDACC__) || defined(SPECMOE_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace specmoe {
namespace tree_attention {

// Enqueues the attention launch (+ the merge launch when num_splits > 1). d in {64, 128},
// Hq % Hk == 0; partial buffers sized as above when num_splits > 1. Arguments validated by the caller.
cudaError_t launch_tree_attention(const TreeAttentionParams& p, cudaStream_t stream);

}  // namespace tree_attention
}  // namespace specmoe
#endif
