// The whole forward pass of a llama-family decoder in one native call per step, over GGUF weight
// blocks (interleaved by rows at load, never decoded) and a paged KV cache read in place.
//
// Per step, for N packed tokens (prefill chunks and decode tokens alike) and every layer:
//   rms_norm -> quantize to int8 blocks -> q|k|v (one pool job) -> rope, write K/V slots ->
//   attention per (token, head) over the token's context slots -> o -> + residual ->
//   rms_norm -> quantize -> gate|up (one job) -> silu * up -> quantize -> down -> + residual,
// then the final norm and the output head for the rows that are sampled.
//
// Tensor parallelism (a Shard): a rank holds some of every linear's output rows -- its query /
// KV heads of q|k|v, its MLP channels of gate|up, a range of the model dimension's rows of o and
// down, a range of the vocabulary -- and after each of those four stages the ranks' outputs are
// gathered (a Python callback, torch.distributed), so every row is still one rank's whole dot
// product over the full input: the same arithmetic as one process, bit for bit, whatever the split.
//
// Weights stay in their GGUF block encodings (Q4_0, Q4_1, Q8_0): the bytes llama.cpp reads, with
// fp16 scales inside each block, rearranged so 8 rows share each vector (make_linear). Activations are quantized per 32-block to int8 (llama.cpp's
// Q8_1) so every block is an integer dot product. Two instruction sets are compiled from
// native_isa.h: AVX2 (maddubs + madd) and AVX-512 VNNI on 256-bit vectors (dpbusd), chosen at
// run time; both give bit-identical results (integer sums are exact, the fp32 order is fixed).
//
// Threads: a persistent pool. Work is split into small items claimed from one atomic counter, so
// a thread that the OS deschedules delays only the item it holds; idle workers spin ~50 us and
// then sleep on a futex, so a busy machine is not fought over.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace miaotui {

constexpr int64_t QK = 32;  // values per block, weights and activations
constexpr int64_t MAX_HEAD_DIM = 256;
constexpr int64_t KV_SPLIT = 256;  // context positions per attention work item
constexpr int64_t ATTN_TILE = 16;  // consecutive query tokens of one sequence per attention work item
// GGML type ids (ggml.h enum ggml_type).
constexpr int QT_F32 = 0, QT_F16 = 1, QT_Q4_0 = 2, QT_Q4_1 = 3, QT_Q8_0 = 8;

constexpr int64_t block_bytes(int qt) {
  // Q4_0: fp16 d + 16 B nibbles; Q4_1: fp16 d, fp16 m + 16 B; Q8_0: fp16 d + 32 int8 (GGUF spec)
  return qt == QT_Q4_0 ? 18 : qt == QT_Q4_1 ? 20 : qt == QT_Q8_0 ? 34 : 0;
}

bool is_block_type(int qt) { return block_bytes(qt) > 0; }

// A weight matrix (M, K). As an embedding table it stays in the file's encoding (GGUF blocks,
// F32 or F16): row r is row_bytes at data + r * row_bytes, and only the rows looked up are read.
// As a linear layer its blocks are interleaved by make_linear (below): group_bytes per 8 rows.
struct Weight {
  at::Tensor keep;  // owns (or views) the bytes
  const uint8_t* data = nullptr;
  int64_t rows = 0, cols = 0, row_bytes = 0, group_bytes = 0;
  int qtype = 0;
};

Weight make_weight(const at::Tensor& t, int64_t qtype, int64_t cols, const char* name) {
  TORCH_CHECK(is_block_type(static_cast<int>(qtype)), name, ": unsupported GGML type ", qtype,
              " (native step: Q4_0, Q4_1, Q8_0)");
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kByte && t.is_contiguous(), name,
              " must be a contiguous uint8 (rows, row_bytes) tensor");
  TORCH_CHECK(cols % QK == 0 && t.size(1) == cols / QK * block_bytes(static_cast<int>(qtype)), name, ": ",
              t.size(1), " bytes per row do not hold ", cols, " values of type ", qtype);
  return Weight{t, t.data_ptr<uint8_t>(), t.size(0), cols, t.size(1), 0, static_cast<int>(qtype)};
}

// The linear kernels' layout: rows in groups of ROW_GROUP = 8, a group's K/32 blocks stored
// one after the other, each group block holding, for its 8 rows,
//   fp16 d[8] | fp16 m[8] (Q4_0 and Q4_1; Q4_0's m = -8 d, exact) | codes,
// codes transposed so that one 32-byte load holds 4 code bytes of each of the 8 rows: load p,
// dword i = row i's code bytes [4p, 4p + 4) (Q4: 4 loads, low nibbles are values 4p.., high
// nibbles 16 + 4p..; Q8_0: 8 loads). A block's products for 8 rows then land in the 8 lanes of
// one vector, and the scales multiply 8 rows at once. Same bytes as the file, rearranged.
constexpr int64_t ROW_GROUP = 8;
constexpr int64_t group_block_bytes(int qt) { return qt == QT_Q8_0 ? 16 + 8 * 32 : 32 + 4 * 32; }

void interleave_group_block(const uint8_t* rows, int64_t row_bytes, int64_t valid, int64_t b, int qt, uint8_t* out) {
  const int64_t bs = block_bytes(qt), code_words = qt == QT_Q8_0 ? 8 : 4;
  uint8_t* codes = out + (qt == QT_Q8_0 ? 16 : 32);
  for (int64_t i = 0; i < valid; ++i) {
    const uint8_t* blk = rows + i * row_bytes + b * bs;
    std::memcpy(out + 2 * i, blk, 2);  // d
    const uint8_t* qs = blk + 2;
    if (qt == QT_Q4_1) {
      std::memcpy(out + 16 + 2 * i, blk + 2, 2);
      qs = blk + 4;
    } else if (qt == QT_Q4_0) {
      uint16_t hd;
      std::memcpy(&hd, blk, 2);
      const uint16_t hm = _cvtss_sh(-8.0f * _cvtsh_ss(hd), 0);
      std::memcpy(out + 16 + 2 * i, &hm, 2);
    }
    for (int64_t p = 0; p < code_words; ++p) std::memcpy(codes + p * 32 + 4 * i, qs + 4 * p, 4);
  }
}

Weight make_linear(const at::Tensor& t, int64_t qtype, int64_t cols, const char* name) {
  const Weight raw = make_weight(t, qtype, cols, name);
  const int qt = raw.qtype;
  const int64_t nb = cols / QK, gbb = group_block_bytes(qt), groups = (raw.rows + ROW_GROUP - 1) / ROW_GROUP;
  at::Tensor packed = at::zeros({groups * nb * gbb}, at::TensorOptions().dtype(at::kByte));
  uint8_t* dst = packed.data_ptr<uint8_t>();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t valid = std::min(ROW_GROUP, raw.rows - g * ROW_GROUP);  // padding rows stay zero
    for (int64_t b = 0; b < nb; ++b)
      interleave_group_block(raw.data + g * ROW_GROUP * raw.row_bytes, raw.row_bytes, valid, b, qt,
                             dst + (g * nb + b) * gbb);
  }
  return Weight{packed, dst, raw.rows, cols, 0, nb * gbb, qt};
}

// Activation rows quantized per 32-block: codes (N, K), scales d and d * sum(codes) (N, K/32).
// One layer's KV cache as the attention kernels read it: (num_slots, KVH, D) float16 rows, or
// int8 rows with one fp32 scale per (slot, KV head) when k_scale / v_scale are set.
struct KVRows {
  const void* k = nullptr;
  const void* v = nullptr;
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
};

struct QuantActs {
  int64_t N = 0, K = 0;
  std::vector<int8_t> q;
  bool has_u = false;      // u filled: only for Q8_0 weights, which the VNNI kernels read it for
  std::vector<uint8_t> u;  // q + 128: the unsigned operand of the VNNI kernels' Q8_0 products
  std::vector<float> d, s;
  void resize(int64_t n, int64_t k, bool with_u) {
    N = n;
    K = k;
    q.resize(n * k);
    has_u = with_u;
    if (with_u) u.resize(n * k);
    d.resize(n * k / QK);
    s.resize(n * k / QK);
  }
};

// ---------------------------------------------------------------------------------------------
// Thread pool: one job at a time. Items are claimed by CAS on one word holding the job's
// generation, its item count and the next item, so a claim can never mix one job's count with
// another's (a worker waking late sees a stale generation and stops).

class ThreadPool {
 public:
  explicit ThreadPool(int threads) : size_(std::max(1, threads)) {
    for (int i = 1; i < size_; ++i) workers_.emplace_back([this] { worker(); });
  }
  ~ThreadPool() {
    stop_.store(true);
    epoch_.fetch_add(1);
    epoch_.notify_all();
    for (auto& t : workers_) t.join();
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  int size() const { return size_; }

  // f(i) for i in [0, n), on all threads; returns when every item is done.
  template <class F>
  void run(int64_t n, F&& f) {
    if (size_ == 1 || n <= 1) {
      for (int64_t i = 0; i < n; ++i) f(i);
      return;
    }
    for (int64_t base = 0; base < n; base += MAX_ITEMS) {  // jobs above 2^20 items: in slices
      const int64_t count = std::min(MAX_ITEMS, n - base);
      auto slice = [&](int64_t i) { f(base + i); };
      run_job(count, slice);
    }
  }

 private:
  static constexpr int ITEM_BITS = 20, GEN_BITS = 24;
  static constexpr int64_t MAX_ITEMS = int64_t{1} << ITEM_BITS;
  static constexpr uint64_t ITEM_MASK = (uint64_t{1} << ITEM_BITS) - 1;
  static constexpr int SPIN_US = 50;

  static uint64_t pack(uint64_t gen, uint64_t total, uint64_t next) {
    return (gen << (2 * ITEM_BITS)) | (total << ITEM_BITS) | next;
  }
  static uint32_t gen_of(uint64_t v) { return static_cast<uint32_t>(v >> (2 * ITEM_BITS)); }

  template <class F>
  void run_job(int64_t n, F& f) {
    ctx_ = static_cast<void*>(&f);
    call_ = [](void* c, int64_t i) { (*static_cast<F*>(c))(i); };
    done_.store(0, std::memory_order_relaxed);
    gen_ = (gen_ + 1) & ((1u << GEN_BITS) - 1);
    claim_.store(pack(gen_, static_cast<uint64_t>(n), 0), std::memory_order_release);
    epoch_.fetch_add(1);
    if (sleepers_.load() > 0) epoch_.notify_all();
    work(gen_);
    wait_done(n);
  }

  void work(uint32_t g) {
    uint64_t v = claim_.load(std::memory_order_acquire);
    while (gen_of(v) == g) {
      const uint64_t total = (v >> ITEM_BITS) & ITEM_MASK, next = v & ITEM_MASK;
      if (next >= total) return;
      if (claim_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        call_(ctx_, static_cast<int64_t>(next));  // job g cannot finish before this item
        done_.fetch_add(1, std::memory_order_release);
        v = claim_.load(std::memory_order_acquire);
      }
    }
  }

  void wait_done(int64_t n) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int spins = 0; done_.load(std::memory_order_acquire) < n; ++spins) {
      _mm_pause();
      // A worker holding an item may have been descheduled: after ~50 us, give the core away.
      if ((spins & 255) == 255 && std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(SPIN_US))
        sched_yield();
    }
  }

  void worker() {
    uint32_t seen = 0;
    while (!stop_.load()) {
      auto t0 = std::chrono::steady_clock::now();
      for (int spins = 0;; ++spins) {
        const uint32_t g = gen_of(claim_.load(std::memory_order_acquire));
        if (stop_.load()) return;
        if (g != seen) {
          seen = g;
          work(g);
          break;
        }
        _mm_pause();
        if ((spins & 255) != 255) continue;
        if (std::chrono::steady_clock::now() - t0 < std::chrono::microseconds(SPIN_US)) continue;
        const uint32_t e = epoch_.load();
        sleepers_.fetch_add(1);
        if (gen_of(claim_.load()) == seen && !stop_.load()) epoch_.wait(e);
        sleepers_.fetch_sub(1);
        t0 = std::chrono::steady_clock::now();
      }
    }
  }

  const int size_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<uint32_t> epoch_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  uint32_t gen_ = 0;
  void* ctx_ = nullptr;
  void (*call_)(void*, int64_t) = nullptr;
};

}  // namespace miaotui

// ---------------------------------------------------------------------------------------------
// The two instruction sets.

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace miaotui::avx2 {
#define MIAOTUI_VNNI 0
#include "native_isa.h"
#undef MIAOTUI_VNNI
}  // namespace miaotui::avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
namespace miaotui::vnni {
#define MIAOTUI_VNNI 1
#include "native_isa.h"
#undef MIAOTUI_VNNI
}  // namespace miaotui::vnni
#pragma GCC pop_options

namespace miaotui {

struct Kernels {
  const char* name;
  void (*linear_rows)(const Weight&, const QuantActs&, int64_t, int64_t, float*, int64_t, const float*);
  void (*quantize_rows)(const float*, int64_t, int64_t, QuantActs&);
  void (*rms_norm_row)(const float*, const float*, float, int64_t, float*);
  void (*silu_mul)(const float*, const float*, int64_t, float*);
  void (*rope_heads)(float*, int64_t, int64_t, const float*, const float*);
  void (*attend_tile)(const float*, int64_t, int64_t, int64_t, int64_t, const int64_t*, const KVRows&,
                      const int64_t*, int64_t, float, float*, float*, float*, float*, float*, float*);
  void (*merge_splits)(int64_t, int64_t, const float*, const float*, const float*, int64_t, float*);
  void (*to_half)(const float*, int64_t, uint16_t*);
  void (*quantize_kv)(const float*, int64_t, int64_t, int8_t*, float*);
};

#define MIAOTUI_KERNELS(ns) \
  Kernels { #ns, ns::linear_rows, ns::quantize_rows, ns::rms_norm_row, ns::silu_mul, ns::rope_heads, ns::attend_tile, ns::merge_splits, ns::to_half, ns::quantize_kv }

bool cpu_has_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

// "auto": the best this CPU runs; "avx2" / "vnni" force one (tests compare them).
Kernels pick_kernels(const std::string& isa) {
  if (isa == "avx2") return MIAOTUI_KERNELS(avx2);
  if (isa == "vnni") {
    TORCH_CHECK(cpu_has_vnni(), "this CPU has no AVX-512 VNNI");
    return MIAOTUI_KERNELS(vnni);
  }
  TORCH_CHECK(isa == "auto", "isa must be auto, avx2 or vnni, got ", isa);
  return cpu_has_vnni() ? MIAOTUI_KERNELS(vnni) : MIAOTUI_KERNELS(avx2);
}

// One linear layer's rows split into pool items: (weight, row range, output, bias).
struct LinearItem {
  const Weight* w;
  int64_t r0, r1;
  float* out;
  int64_t ldo;
  const float* bias;
};

// Items of ~`rows` rows (a multiple of ROW_GROUP) for each (weight, out, ldo, bias), in order.
void add_items(std::vector<LinearItem>& items, const Weight& w, float* out, int64_t ldo, const float* bias,
               int64_t rows) {
  for (int64_t r = 0; r < w.rows; r += rows)
    items.push_back({&w, r, std::min(w.rows, r + rows), out, ldo, bias});
}

// Rows per item. Decode (few activation rows) streams weights from DRAM: long contiguous runs
// per item let the hardware prefetcher run ahead, a few items per thread keep the balance.
// Larger batches are compute-bound: more, smaller items.
constexpr int64_t DECODE_ITEMS_PER_THREAD = 4;  // measured: 2-thread decode 11.5 -> 7.9 ms vs 16
int64_t item_rows(int64_t total_rows, int64_t n_acts, int threads) {
  const int64_t per_thread = n_acts >= 16 ? 16 : DECODE_ITEMS_PER_THREAD;
  int64_t rows = total_rows / std::max<int64_t>(1, threads * per_thread);
  rows = std::clamp<int64_t>(rows, 16, n_acts >= 16 ? 256 : 2048);
  return (rows + ROW_GROUP - 1) / ROW_GROUP * ROW_GROUP;
}

void run_linears(ThreadPool& pool, const Kernels& k, const QuantActs& a, std::vector<LinearItem>& items) {
  pool.run(static_cast<int64_t>(items.size()), [&](int64_t i) {
    const LinearItem& it = items[i];
    k.linear_rows(*it.w, a, it.r0, it.r1, it.out, it.ldo, it.bias);
  });
}

bool any_q8_0(std::initializer_list<const Weight*> ws) {
  return std::any_of(ws.begin(), ws.end(), [](const Weight* w) { return w->qtype == QT_Q8_0; });
}

// with_u: also the codes + 128, for the products with Q8_0 weights that follow (any_q8_0).
void quantize_all(ThreadPool& pool, const Kernels& k, const float* x, int64_t N, int64_t K, QuantActs& a,
                  bool with_u) {
  a.resize(N, K, with_u);
  constexpr int64_t ROWS = 8;
  pool.run((N + ROWS - 1) / ROWS, [&](int64_t i) { k.quantize_rows(x, i * ROWS, std::min(N, (i + 1) * ROWS), a); });
}

// Row r of an embedding table -> K floats (any block type or F32 / F16).
void embedding_row(const Weight& w, int64_t r, int64_t K, float* dst) {
  const uint8_t* row = w.data + r * w.row_bytes;
  if (w.qtype == QT_F32) {
    std::memcpy(dst, row, K * sizeof(float));
    return;
  }
  if (w.qtype == QT_F16) {
    for (int64_t k = 0; k < K; ++k) {
      uint16_t h;
      std::memcpy(&h, row + 2 * k, 2);
      dst[k] = _cvtsh_ss(h);
    }
    return;
  }
  const int64_t bs = block_bytes(w.qtype);
  for (int64_t b = 0; b < K / QK; ++b) {
    const uint8_t* blk = row + b * bs;
    uint16_t hd;
    std::memcpy(&hd, blk, 2);
    const float d = _cvtsh_ss(hd);
    float* o = dst + b * QK;
    if (w.qtype == QT_Q8_0) {
      for (int j = 0; j < QK; ++j) o[j] = d * static_cast<float>(static_cast<int8_t>(blk[2 + j]));
    } else {
      float m = -8.0f * d;
      const uint8_t* qs = blk + 2;
      if (w.qtype == QT_Q4_1) {
        uint16_t hm;
        std::memcpy(&hm, blk + 2, 2);
        m = _cvtsh_ss(hm);
        qs = blk + 4;
      }
      for (int j = 0; j < QK / 2; ++j) {
        o[j] = d * static_cast<float>(qs[j] & 0x0F) + m;
        o[j + QK / 2] = d * static_cast<float>(qs[j] >> 4) + m;
      }
    }
  }
}

struct Layer {
  at::Tensor attn_norm, ffn_norm, bq, bk, bv;
  Weight wq, wk, wv, wo, w_gate, w_up, w_down;
};

// A tensor-parallel rank's part (NativeModel's n_heads, n_kv_heads, ffn and vocab are then the
// rank's own): full sizes, the rows of o / down this rank computes, and the gather callback
// gather(stage, local (N, w) float32) -> (N, full width), stages GATHER_*; for GATHER_LOGITS the
// result is returned as it is (the driver's full logits, a worker's own part).
constexpr int64_t GATHER_ATTN = 0, GATHER_ATTN_OUT = 1, GATHER_FFN = 2, GATHER_FFN_OUT = 3, GATHER_LOGITS = 4;
struct Shard {
  int64_t n_heads = 0, ffn = 0, vocab = 0, dim_rows = 0;
  py::object gather;  // None: one process, nothing to gather
};

at::Tensor f32_vector(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, name,
              " must be a contiguous float32 tensor of ", n, " values");
  return t;
}

// ---------------------------------------------------------------------------------------------

class NativeModel {
 public:
  NativeModel(int64_t dim, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t ffn, int64_t vocab,
              double eps, const at::Tensor& embed, int64_t embed_type, const at::Tensor& head, int64_t head_type,
              const at::Tensor& final_norm, const at::Tensor& cos, const at::Tensor& sin, int64_t threads,
              const std::string& isa, const py::object& shard)
      : C_(dim), H_(n_heads), KVH_(n_kv_heads), D_(head_dim), F_(ffn), V_(vocab), eps_(static_cast<float>(eps)),
        k_(pick_kernels(isa)), pool_(std::make_unique<ThreadPool>(static_cast<int>(threads))) {
    shard_ = shard.is_none() ? Shard{n_heads, ffn, vocab, dim, py::none()} : shard.cast<Shard>();
    TORCH_CHECK(shard_.n_heads >= H_ && shard_.ffn >= F_ && shard_.vocab >= V_ && shard_.dim_rows <= C_ &&
                    shard_.dim_rows > 0 && (shard_.n_heads * head_dim) % QK == 0 && shard_.ffn % QK == 0,
                "shard sizes must cover this rank's part");
    TORCH_CHECK(dim % QK == 0 && ffn % QK == 0 && (n_heads * head_dim) % QK == 0,
                "native step needs dim, ffn and heads*head_dim to be multiples of 32");
    TORCH_CHECK(head_dim % 16 == 0 && head_dim <= MAX_HEAD_DIM, "head_dim must be a multiple of 16, <= 256");
    TORCH_CHECK(n_heads % n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads");
    if (embed_type == QT_F32 || embed_type == QT_F16) {
      TORCH_CHECK(embed.dim() == 2 && embed.size(1) == dim && embed.is_contiguous(), "embedding must be (V, C)");
      embed_ = Weight{embed, static_cast<const uint8_t*>(embed.data_ptr()), embed.size(0), dim,
                      dim * (embed_type == QT_F32 ? 4 : 2), static_cast<int>(embed_type)};
    } else {
      embed_ = make_weight(embed, embed_type, dim, "tok_embeddings");
    }
    head_ = make_linear(head, head_type, dim, "output");
    TORCH_CHECK(head_.rows == vocab && embed_.rows == shard_.vocab, "embedding / output rows must equal vocab ",
                shard_.vocab, " / ", vocab);
    final_norm_ = f32_vector(final_norm, dim, "norm.weight");
    TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.dim() == 2 && cos.size(1) == head_dim && cos.is_contiguous() &&
                    sin.sizes() == cos.sizes() && sin.is_contiguous(),
                "cos/sin must be contiguous float32 (max_len, head_dim)");
    cos_ = cos;
    sin_ = sin;
  }

  void add_layer(const py::dict& d) {
    auto tensor = [&](const char* key) { return d[key].cast<at::Tensor>(); };
    auto weight = [&](const char* key, int64_t cols) {
      auto [t, qt] = d[key].cast<std::tuple<at::Tensor, int64_t>>();
      return make_linear(t, qt, cols, key);
    };
    auto bias = [&](const char* key, int64_t n) {
      return d.contains(key) && !d[key].is_none() ? f32_vector(tensor(key), n, key) : at::Tensor();
    };
    const int64_t qd = H_ * D_, kvd = KVH_ * D_;
    Layer L;
    L.attn_norm = f32_vector(tensor("attn_norm"), C_, "attn_norm");
    L.ffn_norm = f32_vector(tensor("ffn_norm"), C_, "ffn_norm");
    L.wq = weight("wq", C_);
    L.wk = weight("wk", C_);
    L.wv = weight("wv", C_);
    L.wo = weight("wo", shard_.n_heads * D_);  // the full input: gathered from every rank's heads
    L.w_gate = weight("w_gate", C_);
    L.w_up = weight("w_up", C_);
    L.w_down = weight("w_down", shard_.ffn);
    TORCH_CHECK(L.wq.rows == qd && L.wk.rows == kvd && L.wv.rows == kvd && L.wo.rows == shard_.dim_rows &&
                    L.w_gate.rows == F_ && L.w_up.rows == F_ && L.w_down.rows == shard_.dim_rows,
                "layer ", layers_.size(), ": weight shapes do not match the config");
    L.bq = bias("bq", qd);
    L.bk = bias("bk", kvd);
    L.bv = bias("bv", kvd);
    layers_.push_back(std::move(L));
  }

  void set_threads(int64_t threads) {
    if (threads != pool_->size()) pool_ = std::make_unique<ThreadPool>(static_cast<int>(threads));
  }
  int64_t threads() const { return pool_->size(); }
  std::string isa() const { return k_.name; }

  // The greedy token of each row of the last forward's logits (its first largest logit,
  // torch.argmax's choice), found while the output head's items were in cache; -1 for a row
  // holding a NaN. Empty under tensor parallelism (a rank holds part of the vocabulary).
  at::Tensor greedy() const {
    at::Tensor t = at::empty({static_cast<int64_t>(greedy_.size())}, at::TensorOptions().dtype(at::kLong));
    std::copy(greedy_.begin(), greedy_.end(), t.data_ptr<int64_t>());
    return t;
  }

  // token_ids, positions, seq_index, slot_mapping: (N,); block_table: (B, n_blocks) cache block
  // of every block_size context positions of each sequence; logits_index: (S,) rows to return
  // logits for.
  // k_cache[l], v_cache[l]: (num_slots, KVH, D) float16 (half the bytes a long context reads
  // per token; llama.cpp's default too), or int8 with k_scale[l], v_scale[l] (num_slots, KVH, 1)
  // float32 (a quarter; model/kv_cache.py's Int8KVCache). Runs the first num_layers layers
  // (all when < 0; fewer: a self-draft) before the final norm and head. Returns (S, V) float32
  // logits.
  at::Tensor forward(const at::Tensor& token_ids, const at::Tensor& positions, const at::Tensor& seq_index,
                     const at::Tensor& block_table, int64_t block_size, const at::Tensor& slot_mapping,
                     const at::Tensor& logits_index, const std::vector<at::Tensor>& k_cache,
                     const std::vector<at::Tensor>& v_cache, const std::vector<at::Tensor>& k_scale,
                     const std::vector<at::Tensor>& v_scale, int64_t num_layers) {
    const int64_t N = token_ids.numel(), nl = static_cast<int64_t>(layers_.size());
    const int64_t run_layers = num_layers < 0 ? nl : num_layers;
    TORCH_CHECK(run_layers >= 1 && run_layers <= nl, "num_layers must be in 1..", nl, ", got ", num_layers);
    TORCH_CHECK(static_cast<int64_t>(k_cache.size()) == nl && static_cast<int64_t>(v_cache.size()) == nl,
                "need one K and one V cache tensor per layer (", nl, ")");
    for (const auto* t : {&token_ids, &positions, &seq_index, &block_table, &slot_mapping, &logits_index})
      TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "index tensors must be contiguous int64");
    TORCH_CHECK(positions.numel() == N && seq_index.numel() == N && slot_mapping.numel() == N,
                "token_ids, positions, seq_index and slot_mapping must have the same length");
    TORCH_CHECK(block_table.dim() == 2, "block_table must be (B, n_blocks)");
    TORCH_CHECK(block_size > 0, "block_size must be positive");
    const int64_t* ids = token_ids.data_ptr<int64_t>();
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* seq = seq_index.data_ptr<int64_t>();
    const int64_t* wslot = slot_mapping.data_ptr<int64_t>();
    const int64_t* table = block_table.data_ptr<int64_t>();
    const int64_t B = block_table.size(0), nbt = block_table.size(1), L = nbt * block_size;
    const int64_t num_slots = k_cache.empty() ? 0 : k_cache[0].size(0);
    for (int64_t n = 0; n < N; ++n) {
      TORCH_CHECK(ids[n] >= 0 && ids[n] < shard_.vocab, "token id ", ids[n], " out of range [0, ", shard_.vocab, ")");
      TORCH_CHECK(pos[n] >= 0 && pos[n] < L && pos[n] < cos_.size(0), "position ", pos[n], " out of range");
      TORCH_CHECK(seq[n] >= 0 && seq[n] < B, "seq_index ", seq[n], " out of range");
      TORCH_CHECK(wslot[n] >= 0 && wslot[n] < num_slots, "slot ", wslot[n], " out of range");
    }
    for (int64_t i = 0; i < B * nbt; ++i)
      TORCH_CHECK(table[i] >= 0 && (table[i] + 1) * block_size <= num_slots, "cache block ", table[i], " out of range");
    const bool i8 = !k_cache.empty() && k_cache[0].scalar_type() == at::kChar;
    TORCH_CHECK(!i8 || (static_cast<int64_t>(k_scale.size()) == nl && static_cast<int64_t>(v_scale.size()) == nl),
                "an int8 KV cache needs one K and one V scale tensor per layer");
    for (const auto& t : k_cache) check_cache(t, num_slots, i8);
    for (const auto& t : v_cache) check_cache(t, num_slots, i8);
    if (i8)
      for (const auto* ts : {&k_scale, &v_scale})
        for (const auto& t : *ts)
          TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == num_slots * KVH_,
                      "KV scales must be contiguous float32 (num_slots, ", KVH_, ", 1)");

    const int64_t qd = H_ * D_, kvd = KVH_ * D_, qkvd = qd + 2 * kvd, R = shard_.dim_rows;
    x_.resize(N * C_);
    h_.resize(N * C_);
    part_.resize(N * R);
    qkv_.resize(N * qkvd);
    attn_.resize(N * qd);
    gu_.resize(N * 2 * F_);
    act_.resize(N * F_);
    ThreadPool& pool = *pool_;
    pool.run(N, [&](int64_t n) { embedding_row(embed_, ids[n], C_, x_.data() + n * C_); });

    const int T = pool.size();
    for (int64_t l = 0; l < run_layers; ++l) {
      const Layer& Ly = layers_[l];
      KVRows kv{k_cache[l].data_ptr(), v_cache[l].data_ptr()};
      if (i8) kv = {kv.k, kv.v, k_scale[l].data_ptr<float>(), v_scale[l].data_ptr<float>()};
      // attention
      norm_rows(x_.data(), Ly.attn_norm.data_ptr<float>(), N, h_.data());
      quantize_all(pool, k_, h_.data(), N, C_, qa_, any_q8_0({&Ly.wq, &Ly.wk, &Ly.wv}));
      items_.clear();
      const int64_t rows = item_rows(qkvd, N, T);
      add_items(items_, Ly.wq, qkv_.data(), qkvd, opt(Ly.bq), rows);
      add_items(items_, Ly.wk, qkv_.data() + qd, qkvd, opt(Ly.bk), rows);
      add_items(items_, Ly.wv, qkv_.data() + qd + kvd, qkvd, opt(Ly.bv), rows);
      run_linears(pool, k_, qa_, items_);
      pool.run(N, [&](int64_t n) {
        float* q = qkv_.data() + n * qkvd;
        const float* c = cos_.data_ptr<float>() + pos[n] * D_;
        const float* s = sin_.data_ptr<float>() + pos[n] * D_;
        k_.rope_heads(q, H_, D_, c, s);
        k_.rope_heads(q + qd, KVH_, D_, c, s);
        write_kv(kv, q + qd, wslot[n]);
      });
      attention(pool, kv, pos, seq, {table, nbt, block_size}, N);
      quantize_all(pool, k_, gathered(GATHER_ATTN, attn_, N, qd, shard_.n_heads * D_), N, shard_.n_heads * D_, qa_,
                   any_q8_0({&Ly.wo}));
      linear_gathered(Ly.wo, GATHER_ATTN_OUT, N);
      // feed-forward
      norm_rows(x_.data(), Ly.ffn_norm.data_ptr<float>(), N, h_.data());
      quantize_all(pool, k_, h_.data(), N, C_, qa_, any_q8_0({&Ly.w_gate, &Ly.w_up}));
      items_.clear();
      const int64_t frows = item_rows(2 * F_, N, T);
      add_items(items_, Ly.w_gate, gu_.data(), 2 * F_, nullptr, frows);
      add_items(items_, Ly.w_up, gu_.data() + F_, 2 * F_, nullptr, frows);
      run_linears(pool, k_, qa_, items_);
      pool.run(N, [&](int64_t n) { k_.silu_mul(gu_.data() + n * 2 * F_, gu_.data() + n * 2 * F_ + F_, F_, act_.data() + n * F_); });
      quantize_all(pool, k_, gathered(GATHER_FFN, act_, N, F_, shard_.ffn), N, shard_.ffn, qa_,
                   any_q8_0({&Ly.w_down}));
      linear_gathered(Ly.w_down, GATHER_FFN_OUT, N);
    }
    return logits(pool, logits_index);
  }

 private:
  static const float* opt(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

  void check_cache(const at::Tensor& t, int64_t num_slots, bool i8) const {
    TORCH_CHECK(t.scalar_type() == (i8 ? at::kChar : at::kHalf) && t.is_contiguous() && t.dim() == 3 &&
                    t.size(0) == num_slots && t.size(1) == KVH_ && t.size(2) == D_,
                "KV cache tensors must be contiguous float16 or int8 (num_slots, ", KVH_, ", ", D_, "), all alike");
  }

  // A token's K and V rows (KVH * D each, side by side at kv_new) into cache slot `slot`.
  void write_kv(const KVRows& kv, const float* kv_new, int64_t slot) const {
    const int64_t kvd = KVH_ * D_;
    if (kv.k_scale == nullptr) {
      k_.to_half(kv_new, kvd, static_cast<uint16_t*>(const_cast<void*>(kv.k)) + slot * kvd);
      k_.to_half(kv_new + kvd, kvd, static_cast<uint16_t*>(const_cast<void*>(kv.v)) + slot * kvd);
      return;
    }
    k_.quantize_kv(kv_new, KVH_, D_, static_cast<int8_t*>(const_cast<void*>(kv.k)) + slot * kvd,
                   const_cast<float*>(kv.k_scale) + slot * KVH_);
    k_.quantize_kv(kv_new + kvd, KVH_, D_, static_cast<int8_t*>(const_cast<void*>(kv.v)) + slot * kvd,
                   const_cast<float*>(kv.v_scale) + slot * KVH_);
  }

  void norm_rows(const float* x, const float* w, int64_t N, float* y) {
    pool_->run(N, [&](int64_t n) { k_.rms_norm_row(x + n * C_, w, eps_, C_, y + n * C_); });
  }

  static void add_rows(float* x, const float* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] += y[i];
  }

  // Every rank's (N, width) part of a stage's output side by side, (N, full) (the parts are
  // column ranges in rank order): `local` itself in one process.
  const float* gathered(int64_t stage, const std::vector<float>& local, int64_t N, int64_t width, int64_t full) {
    if (shard_.gather.is_none()) return local.data();
    py::gil_scoped_acquire gil;
    const at::Tensor part = at::from_blob(const_cast<float*>(local.data()), {N, width}, at::kFloat);
    const at::Tensor all = shard_.gather(stage, part).cast<at::Tensor>();
    TORCH_CHECK(all.scalar_type() == at::kFloat && all.is_contiguous() && all.numel() == N * full,
                "gather of stage ", stage, " returned ", all.sizes(), ", expected (", N, ", ", full, ")");
    full_.assign(all.data_ptr<float>(), all.data_ptr<float>() + N * full);
    return full_.data();
  }

  // x_ += the rows of w (o or down) this rank holds, gathered from every rank: (N, C).
  void linear_gathered(const Weight& w, int64_t stage, int64_t N) {
    const int64_t R = shard_.dim_rows;
    float* out = shard_.gather.is_none() ? h_.data() : part_.data();
    items_.clear();
    add_items(items_, w, out, R, nullptr, item_rows(R, N, pool_->size()));
    run_linears(*pool_, k_, qa_, items_);
    if (!shard_.gather.is_none()) std::copy_n(gathered(stage, part_, N, R, C_), N * C_, h_.data());
    add_rows(x_.data(), h_.data(), N * C_);
  }

  // attn_ (N, H*D) <- softmax(q K^T / sqrt(D)) V for every (token, head), causal by position.
  // Work items are (query tile, split of KV_SPLIT context positions): a tile is up to ATTN_TILE
  // consecutive tokens of one sequence (a prefill chunk; one token when decoding), so each
  // slot's K/V row (all KV heads, contiguous) is converted once for all of the tile's tokens and
  // heads; a long context is spread over all threads (split-K, merged with the softmax
  // rescaling). Splits depend on the position only and a row's arithmetic not on the tile:
  // batch-invariant.
  struct BlockTables {
    const int64_t* table;  // (B, per_seq)
    int64_t per_seq, block_size;
  };

  void attention(ThreadPool& pool, const KVRows& kv, const int64_t* pos, const int64_t* seq, const BlockTables& bt,
                 int64_t N) {
    const int64_t qd = H_ * D_, kvd = KVH_ * D_, qkvd = qd + 2 * kvd, G = H_ / KVH_;
    const float scale = 1.0f / std::sqrt(static_cast<float>(D_));
    split_base_.resize(N + 1);
    split_base_[0] = 0;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t S = (pos[n] + KV_SPLIT) / KV_SPLIT;  // ceil((pos + 1) / KV_SPLIT)
      split_base_[n + 1] = split_base_[n] + S;
    }
    const int64_t total = split_base_[N];  // splits over all tokens, per KV head
    part_m_.resize(total * H_);
    part_l_.resize(total * H_);
    part_acc_.resize(total * H_ * D_);
    attn_items_.clear();
    for (int64_t n0 = 0, n1; n0 < N; n0 = n1) {
      for (n1 = n0 + 1; n1 < N && n1 - n0 < ATTN_TILE && seq[n1] == seq[n0] && pos[n1] == pos[n1 - 1] + 1;) ++n1;
      for (int64_t s = 0; s < split_base_[n1] - split_base_[n1 - 1]; ++s) attn_items_.push_back({n0, n1 - n0, s});
    }
    pool.run(static_cast<int64_t>(attn_items_.size()), [&](int64_t i) {
      const AttnItem& it = attn_items_[i];
      const int64_t j0 = it.split * KV_SPLIT;
      thread_local std::vector<float> kbuf, vbuf, scores, m, l, acc;
      thread_local std::vector<int64_t> n_keys, slots;
      kbuf.resize(8 * kvd);
      vbuf.resize(KV_SPLIT * kvd);
      scores.resize(ATTN_TILE * H_ * KV_SPLIT);
      m.resize(ATTN_TILE * H_);
      l.resize(ATTN_TILE * H_);
      acc.resize(ATTN_TILE * qd);
      n_keys.resize(ATTN_TILE);
      slots.resize(KV_SPLIT);
      int64_t t0 = 0;  // the tile's first token that reaches this split (positions increase)
      while (pos[it.n0 + t0] < j0) ++t0;
      const int64_t T = it.count - t0, n0 = it.n0 + t0;
      for (int64_t t = 0; t < T; ++t) n_keys[t] = std::min(pos[n0 + t] + 1 - j0, KV_SPLIT);
      const int64_t* blocks = bt.table + seq[n0] * bt.per_seq;
      for (int64_t j = 0; j < n_keys[T - 1]; ++j)
        slots[j] = blocks[(j0 + j) / bt.block_size] * bt.block_size + (j0 + j) % bt.block_size;
      k_.attend_tile(qkv_.data() + n0 * qkvd, qkvd, T, KVH_, G, n_keys.data(), kv, slots.data(), D_, scale,
                     kbuf.data(), vbuf.data(), scores.data(), m.data(), l.data(), acc.data());
      for (int64_t t = 0; t < T; ++t) {
        const int64_t n = n0 + t;
        if (split_base_[n + 1] - split_base_[n] == 1) {  // the token's only split: normalise in place
          for (int64_t h = 0; h < H_; ++h)
            k_.merge_splits(1, 1, m.data() + t * H_ + h, l.data() + t * H_ + h, acc.data() + (t * H_ + h) * D_, D_,
                            attn_.data() + n * qd + h * D_);
          continue;
        }
        const int64_t slot = (split_base_[n] + it.split) * H_;  // partials of (split, head)
        std::copy_n(m.data() + t * H_, H_, part_m_.data() + slot);
        std::copy_n(l.data() + t * H_, H_, part_l_.data() + slot);
        std::copy_n(acc.data() + t * qd, qd, part_acc_.data() + slot * D_);
      }
    });
    multi_split_.clear();  // tokens whose context spans several splits: merge them
    for (int64_t n = 0; n < N; ++n)
      if (split_base_[n + 1] - split_base_[n] > 1) multi_split_.push_back(n);
    pool.run(static_cast<int64_t>(multi_split_.size()) * H_, [&](int64_t i) {
      const int64_t n = multi_split_[i / H_], h = i % H_;
      const int64_t first = split_base_[n] * H_ + h, stride = H_;
      k_.merge_splits(split_base_[n + 1] - split_base_[n], stride, part_m_.data() + first, part_l_.data() + first,
                      part_acc_.data() + first * D_, D_, attn_.data() + n * qd + h * D_);
    });
  }

  at::Tensor logits(ThreadPool& pool, const at::Tensor& logits_index) {
    const int64_t S = logits_index.numel();
    at::Tensor out = at::empty({S, V_}, at::TensorOptions().dtype(at::kFloat));
    greedy_.clear();
    if (S == 0) return out;
    const int64_t* rows = logits_index.data_ptr<int64_t>();
    const int64_t N = static_cast<int64_t>(x_.size()) / C_;
    std::vector<float> hs(S * C_);
    for (int64_t i = 0; i < S; ++i) {
      TORCH_CHECK(rows[i] >= 0 && rows[i] < N, "logits_index ", rows[i], " out of range");
      k_.rms_norm_row(x_.data() + rows[i] * C_, final_norm_.data_ptr<float>(), eps_, C_, hs.data() + i * C_);
    }
    quantize_all(pool, k_, hs.data(), S, C_, qa_, any_q8_0({&head_}));
    items_.clear();
    add_items(items_, head_, out.data_ptr<float>(), V_, nullptr, item_rows(V_, S, pool.size()));
    const bool whole_vocab = shard_.gather.is_none();
    item_best_.resize(items_.size() * S);
    pool.run(static_cast<int64_t>(items_.size()), [&](int64_t i) {
      const LinearItem& it = items_[i];
      k_.linear_rows(*it.w, qa_, it.r0, it.r1, it.out, it.ldo, it.bias);
      if (whole_vocab)  // each row's best of this item's logits, while they are in cache
        for (int64_t r = 0; r < S; ++r) item_best_[i * S + r] = first_max(it.out + r * V_ + it.r0, it.r1 - it.r0, it.r0);
    });
    greedy_.assign(whole_vocab ? S : 0, -1);
    for (int64_t r = 0; r < static_cast<int64_t>(greedy_.size()); ++r) {
      Best best{-INFINITY, -1, false};
      for (size_t i = 0; i < items_.size(); ++i) {  // items in vocabulary order: ties keep the first
        const Best& b = item_best_[i * S + r];
        best.nan |= b.nan;
        if (b.index >= 0 && (best.index < 0 || b.value > best.value)) best = {b.value, b.index, best.nan};
      }
      greedy_[r] = best.nan ? -1 : best.index;
    }
    if (whole_vocab) return out;
    py::gil_scoped_acquire gil;
    return shard_.gather(GATHER_LOGITS, out).cast<at::Tensor>();
  }

  // The largest of x[0, n) and its first index (+ offset); whether a NaN is among them.
  struct Best {
    float value;
    int64_t index;
    bool nan;
  };
  static Best first_max(const float* x, int64_t n, int64_t offset) {
    __m256 mv = _mm256_set1_ps(-INFINITY), unordered = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 v = _mm256_loadu_ps(x + j);
      mv = _mm256_max_ps(v, mv);  // a NaN in v keeps mv
      unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mv);
    float m = lanes[0];
    for (int i = 1; i < 8; ++i) m = std::max(m, lanes[i]);
    bool nan = _mm256_movemask_ps(unordered) != 0;
    for (; j < n; ++j) {
      nan |= x[j] != x[j];
      m = x[j] > m ? x[j] : m;
    }
    j = 0;
    while (j < n && !(x[j] == m)) ++j;
    return {m, j < n ? offset + j : -1, nan};
  }

  const int64_t C_, H_, KVH_, D_, F_, V_;
  const float eps_;
  const Kernels k_;
  std::unique_ptr<ThreadPool> pool_;
  Weight embed_, head_;
  at::Tensor final_norm_, cos_, sin_;
  std::vector<Layer> layers_;
  Shard shard_;
  // per-step scratch, reused
  std::vector<float> x_, h_, qkv_, attn_, gu_, act_;
  std::vector<float> part_, full_;  // this rank's rows of o / down; a gathered stage
  std::vector<int64_t> split_base_;  // first split of each token
  struct AttnItem {
    int64_t n0, count, split;  // tokens [n0, n0 + count) of one sequence, against one split
  };
  std::vector<AttnItem> attn_items_;
  std::vector<int64_t> multi_split_;
  std::vector<float> part_m_, part_l_, part_acc_;  // attention partials per (split, kv head, head)
  QuantActs qa_;
  std::vector<LinearItem> items_;
  std::vector<Best> item_best_;  // (head item, row): the item's best logit of the row
  std::vector<int64_t> greedy_;
};

// y (N, M) = x W^T (+ bias) for one GGUF block weight, interleaved once at construction (tests
// and kernel benchmarks).
class BlockLinear {
 public:
  BlockLinear(const at::Tensor& w_bytes, int64_t qtype, int64_t cols, int64_t threads, const std::string& isa)
      : k_(pick_kernels(isa)),
        pool_(std::make_unique<ThreadPool>(static_cast<int>(threads))),
        w_(make_linear(w_bytes, qtype, cols, "weight")) {}
  at::Tensor operator()(const at::Tensor& x_in, const c10::optional<at::Tensor>& bias) {
    const at::Tensor x = x_in.reshape({-1, w_.cols}).to(at::kFloat).contiguous();
    const int64_t N = x.size(0);
    at::Tensor b;
    if (bias.has_value()) b = f32_vector(bias->to(at::kFloat).contiguous(), w_.rows, "bias");
    quantize_all(*pool_, k_, x.data_ptr<float>(), N, w_.cols, qa_, any_q8_0({&w_}));
    at::Tensor out = at::empty({N, w_.rows}, x.options());
    std::vector<LinearItem> items;
    add_items(items, w_, out.data_ptr<float>(), w_.rows, b.defined() ? b.data_ptr<float>() : nullptr,
              item_rows(w_.rows, N, pool_->size()));
    run_linears(*pool_, k_, qa_, items);
    return out;
  }
  std::string isa() const { return k_.name; }

 private:
  const Kernels k_;
  std::unique_ptr<ThreadPool> pool_;
  const Weight w_;
  QuantActs qa_;
};

}  // namespace miaotui

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace miaotui;
  m.def("cpu_has_vnni", &cpu_has_vnni, "True when this CPU runs the AVX-512 VNNI kernels");
  py::class_<Shard>(m, "Shard")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, py::object>(), py::arg("n_heads"), py::arg("ffn"),
           py::arg("vocab"), py::arg("dim_rows"), py::arg("gather"));
  py::class_<NativeModel>(m, "NativeModel")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, const at::Tensor&, int64_t,
                    const at::Tensor&, int64_t, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                    const std::string&, const py::object&>(),
           py::arg("dim"), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("ffn"),
           py::arg("vocab"), py::arg("eps"), py::arg("embed"), py::arg("embed_type"), py::arg("head"),
           py::arg("head_type"), py::arg("final_norm"), py::arg("cos"), py::arg("sin"), py::arg("threads"),
           py::arg("isa"), py::arg("shard") = py::none())
      .def("add_layer", &NativeModel::add_layer)
      .def("forward", &NativeModel::forward, py::call_guard<py::gil_scoped_release>())
      .def("greedy", &NativeModel::greedy)
      .def("set_threads", &NativeModel::set_threads)
      .def_property_readonly("threads", &NativeModel::threads)
      .def_property_readonly("isa", &NativeModel::isa);
  py::class_<BlockLinear>(m, "BlockLinear")
      .def(py::init<const at::Tensor&, int64_t, int64_t, int64_t, const std::string&>(), py::arg("w_bytes"),
           py::arg("qtype"), py::arg("cols"), py::arg("threads"), py::arg("isa"))
      .def("__call__", &BlockLinear::operator(), py::arg("x"), py::arg("bias") = py::none(),
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("isa", &BlockLinear::isa);
}
