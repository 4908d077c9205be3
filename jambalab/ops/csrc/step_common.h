// What the two whole decode steps (step.cpp, step_bf16.cpp) share: their threads (StepPool, and the
// split of a GEMV's outputs and of the state updates into claimed tasks; step.cpp's head says why), their
// ATen thread guard, the K/V-room check and an MoE's routing.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "kernels.h"  // update_parts

namespace jambalab {

constexpr int64_t kParallelBytes = 256 << 10;     // a GEMV reading less runs on the caller alone
constexpr int64_t kTaskBytes = 64 << 10;          // weight bytes per claimed task: at least
constexpr int64_t kMaxTaskBytes = 1 << 20;        //   and at most; else 1/8 of a thread's share
constexpr int64_t kParallelStepBytes = 2 << 20;   // a step reading less never uses a second thread
constexpr auto kSpin = std::chrono::microseconds(50);  // a worker polls this long before it sleeps

// One pool per process (an inline function's static: the same in every source file).
class StepPool {
 public:
  static StepPool& get() {
    static StepPool* pool = new StepPool;  // never destroyed: its detached workers sleep until exit
    return *pool;
  }

  // body(i) for i in [0, n) on the caller and up to threads - 1 workers; returns when all are done.
  template <typename F>
  void run(int64_t n, int threads, const F& body) {
    if (n <= 1 || threads <= 1 || !busy_.try_lock()) {  // a concurrent caller runs alone
      for (int64_t i = 0; i < n; ++i) body(i);
      return;
    }
    ensure_workers(threads - 1);
    fn_ = [](const void* ctx, int64_t i) { (*static_cast<const F*>(ctx))(i); };
    ctx_ = &body;
    n_.store(n, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint32_t job = ++job_;
    state_.store(static_cast<uint64_t>(job) << 32, std::memory_order_release);
    seq_.store(job, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) seq_.notify_all();
    work(job);
    // Only tasks a worker has claimed are outstanding: it is running them (or was preempted inside one).
    for (int spins = 0; done_.load(std::memory_order_acquire) < n; ++spins) {
      if (spins < 4096) {
        _mm_pause();
      } else {
        std::this_thread::yield();
      }
    }
    busy_.unlock();
  }

 private:
  // Claims and runs tasks of `job` until none is left.
  void work(uint32_t job) {
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      if (static_cast<uint32_t>(s >> 32) != job) return;
      const int64_t i = static_cast<int64_t>(s & 0xffffffffu);
      if (i >= n_.load(std::memory_order_relaxed)) return;
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) continue;
      fn_(ctx_, i);  // job is still open: fn_ and ctx_ are its own (the caller waits for this task)
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void worker() {
    uint32_t seen = seq_.load();
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      uint32_t now;
      int polls = 0;
      while ((now = seq_.load(std::memory_order_acquire)) == seen) {
        _mm_pause();
        if (++polls % 256 == 0 && std::chrono::steady_clock::now() - start > kSpin) {
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          seq_.wait(seen, std::memory_order_seq_cst);
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        }
      }
      seen = now;
      work(now);
    }
  }

  void ensure_workers(int n) {
    while (static_cast<int>(workers_) < n) {
      std::thread([this] { worker(); }).detach();
      ++workers_;
    }
  }

  std::mutex busy_;
  std::atomic<uint64_t> state_{0};  // (job << 32) | next unclaimed task
  std::atomic<int64_t> n_{0}, done_{0};
  std::atomic<uint32_t> seq_{0};    // the newest job, for workers to wait on
  std::atomic<int> sleepers_{0};
  uint32_t job_ = 0;
  size_t workers_ = 0;
  void (*fn_)(const void*, int64_t) = nullptr;
  const void* ctx_ = nullptr;
};

// body(lo, hi) over the N outputs of a matrix of `bytes` bytes (rows of row_bytes weight bytes): split
// by output rows into tasks when large enough, each 1/8 of a thread's share of the weights, within
// [kTaskBytes, kMaxTaskBytes]. A task is one sequential stream that the prefetchers (and
// prefetch_weights) must ramp up again at its start: 64 KiB tasks cost A's 134 MB bf16 in_proj that
// ramp 2,000 times, and A bf16w decoded at 16.7-19.8 tokens/s against 18.1-23.6 with these (4
// interleaved rounds; B 4-bit 166-187 against 177-197). Eight tasks a thread still leave the claiming
// to even out a thread that is descheduled or slower.
template <typename F>
void split_outputs(int64_t N, int64_t bytes, int64_t row_bytes, int threads, const F& body) {
  if (threads <= 1 || bytes < kParallelBytes) {
    body(0, N);
    return;
  }
  const int64_t task = std::clamp<int64_t>(bytes / (8 * threads), kTaskBytes, kMaxTaskBytes);
  const int64_t rows = std::max<int64_t>(4, task / row_bytes), tasks = (N + rows - 1) / rows;
  StepPool::get().run(tasks, threads, [&](int64_t t) { body(t * rows, std::min(N, (t + 1) * rows)); });
}

// body(part, parts) over the parts update_parts() splits rows of the state updates into (as their ops
// split them: the epilogue's vector/scalar split depends on it), on the pool when there are several.
template <typename F>
void run_parts(int64_t work_per_row, int64_t rows, int threads, const F& body) {
  const int p = update_parts(rows, work_per_row);
  if (p == 1) {
    body(0, 1);
  } else {
    StepPool::get().run(p, threads, [&](int64_t i) { body(static_cast<int>(i), p); });
  }
}

// The calling thread's ATen thread counts: OpenMP's (what at::get_num_threads() returns on it, hence how
// many threads its ATen ops fork) and MKL's thread-local one (the vector math behind ATen's exp and log,
// which forks its own OpenMP regions whatever the first says; 0 = none, the global setting applies).
// Both are settings of this thread only. Returns the previous pair. MKL's is skipped in a torch built
// without MKL (the weak symbol is then null). MKL_Set_Num_Threads_Local is the C entry point that
// mkl_service.h's mkl_set_num_threads_local names (the lowercase symbol is Fortran's: a pointer).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

inline std::pair<int, int> set_aten_threads(int omp, int mkl_local) {
  const int previous_omp = omp_get_max_threads();
  omp_set_num_threads(omp);
  const int previous_mkl = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(mkl_local) : 0;
  return {previous_omp, previous_mkl};
}

// The model's dimensions as both steps' arguments give them: weights[0] the embedding (vocab, d),
// weights[2] the lm_head (V, d); meta[0..2] heads, KV heads, head_dim; eps[0] the model's norm eps,
// eps[1] the Mamba inner norms'.
struct StepDims {
  int64_t d, V, H, Hk, hd;
  float norm_eps, inner_eps;
  StepDims(at::TensorList weights, at::IntArrayRef meta, at::ArrayRef<double> eps)
      : d(weights[0].size(1)),
        V(weights[2].size(0)),
        H(meta[0]),
        Hk(meta[1]),
        hd(meta[2]),
        norm_eps(static_cast<float>(eps[0])),
        inner_eps(static_cast<float>(eps[1])) {}
};

// While it lives, the ATen ops this thread calls run on it alone: run on two threads, each one woke
// torch's OpenMP workers, which then spun for milliseconds beside StepPool's (step_bf16.cpp: torch's
// flash attention kernel, B bf16 decoding at 42-47 tokens/s against ~60; sampling between steps).
struct SerialAten {
  std::pair<int, int> saved = set_aten_threads(1, 1);
  ~SerialAten() { set_aten_threads(saved.first, saved.second); }
  SerialAten() = default;
  SerialAten(const SerialAten&) = delete;
  SerialAten& operator=(const SerialAten&) = delete;
};

// An attention layer's R K caches then R V caches, each (1, Hk, capacity, hd): row r's must have room
// for a key at position past[r].
inline void check_kv_rows(const at::Tensor* kv, int64_t R, int64_t Hk, int64_t hd, const int64_t* past) {
  for (int64_t r = 0; r < R; ++r) {
    const at::Tensor &kr = kv[r], &vr = kv[R + r];
    TORCH_CHECK(kr.dim() == 4 && kr.size(1) == Hk && kr.size(3) == hd && vr.sizes() == kr.sizes() && past[r] >= 0 &&
                    past[r] < kr.size(2),
                "decode_step: row ", r, "'s K/V cache ", kr.sizes(), " has no room at position ", past[r]);
  }
}

// An MoE layer's top-k choices experts (R, top_k) int64, as the decode steps run them: per expert, the
// slots r * top_k + k routed to it, rows ascending (it runs once on those rows, as MoE.dispatch); per
// row, its choices k in ascending expert id (the order the layer path sums them in).
struct Routing {
  std::vector<std::vector<int64_t>> slots, order;

  Routing(const at::Tensor& experts, int64_t E) : slots(E), order(experts.size(0)) {
    const auto ids = experts.accessor<int64_t, 2>();
    const int64_t R = experts.size(0), top_k = experts.size(1);
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t k = 0; k < top_k; ++k) slots[ids[r][k]].push_back(r * top_k + k), order[r].push_back(k);
      std::sort(order[r].begin(), order[r].end(), [&](int64_t a, int64_t b) { return ids[r][a] < ids[r][b]; });
    }
  }
};

}  // namespace jambalab
