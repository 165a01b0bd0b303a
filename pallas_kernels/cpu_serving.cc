// The CPU serving step's kernels, XLA FFI custom calls over float32 (see cpu_serving.py for why).
//
// LongcatSmallRowsMatmul: y = x @ w for a few rows; x [M, K] and w [K, N] are row-major. The columns of w are
// cut into panels of kPanel columns; a panel's rows are read once per block of up to kRows rows of x, with
// the block's outputs held in vector registers for the whole K loop, so w streams from memory once (a second
// block of rows reads the panel again from L2), and the rows of w a few steps ahead are prefetched. Panels
// are handed out in chunks to the calling thread and to XLA's intra-op threads. Each output is summed in
// order of k, whatever M is: a row's result does not depend on the other rows.
// LongcatSmallRowsHeadsMatmul does the same for every head h of x [M, H, K] and w [H, K, N] (MLA's absorbed
// per-head projections).
//
// LongcatGroupedSwiglu runs a MoE layer's experts the same way: rows sorted by expert, each expert's rows
// through its own SwiGLU, silu(x Wg) * (x Wu) in a first phase, times Wd in a second.
//
// LongcatPagedDecodeAttention: dense decode attention of one new token per sequence over its paged rows.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Matrix = ffi::Buffer<ffi::F32, 2>;
using MatrixResult = ffi::ResultBuffer<ffi::F32, 2>;
using Offsets = ffi::Buffer<ffi::S32, 1>;
using Heads = ffi::Buffer<ffi::F32, 3>;
using Table = ffi::Buffer<ffi::S32, 2>;
using HeadsResult = ffi::ResultBuffer<ffi::F32, 3>;

#if defined(__AVX512F__)
typedef float Vec __attribute__((vector_size(64), aligned(4)));  // unaligned loads and stores
#else
typedef float Vec __attribute__((vector_size(32), aligned(4)));
#endif
constexpr int kLanes = sizeof(Vec) / sizeof(float);
constexpr int kPanelVecs = 2;
constexpr int kPanel = kPanelVecs * kLanes;  // columns of a panel
constexpr int kRows = 8;                     // rows of a block: kRows * kPanelVecs accumulators
constexpr int kPrefetchRows = 16;            // how many rows of w ahead to prefetch
constexpr int64_t kPanelsPerChunk = 4;

// Row r of x starts at x + r * ldx, row k of w at w + k * ldw, row r of y at y + r * ldy.
template <int R>
void Block(const float* x, int64_t ldx, int64_t K, const float* w, int64_t ldw, float* y, int64_t ldy,
           int64_t n0) {
  Vec acc[R][kPanelVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kPanelVecs; ++v) acc[r][v] = Vec{};
  for (int64_t k = 0; k < K; ++k) {
    const float* row = w + k * ldw + n0;
    if (k + kPrefetchRows < K)
      for (int c = 0; c < kPanel; c += 16) __builtin_prefetch(row + kPrefetchRows * ldw + c);
    Vec wv[kPanelVecs];
    for (int v = 0; v < kPanelVecs; ++v) wv[v] = *reinterpret_cast<const Vec*>(row + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const float xr = x[r * ldx + k];
      for (int v = 0; v < kPanelVecs; ++v) acc[r][v] += xr * wv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kPanelVecs; ++v) *reinterpret_cast<Vec*>(y + r * ldy + n0 + v * kLanes) = acc[r][v];
}

// All M rows of one panel starting at column n0, kRows at a time.
void Panel(const float* x, int64_t ldx, int64_t M, int64_t K, const float* w, int64_t ldw, float* y,
           int64_t ldy, int64_t n0) {
  for (int64_t m = 0; m < M; m += kRows) {
    const float* xb = x + m * ldx;
    float* yb = y + m * ldy;
    switch (std::min<int64_t>(kRows, M - m)) {
      case 8: Block<8>(xb, ldx, K, w, ldw, yb, ldy, n0); break;
      case 7: Block<7>(xb, ldx, K, w, ldw, yb, ldy, n0); break;
      case 6: Block<6>(xb, ldx, K, w, ldw, yb, ldy, n0); break;
      case 5: Block<5>(xb, ldx, K, w, ldw, yb, ldy, n0); break;
      case 4: Block<4>(xb, ldx, K, w, ldw, yb, ldy, n0); break;
      case 3: Block<3>(xb, ldx, K, w, ldw, yb, ldy, n0); break;
      case 2: Block<2>(xb, ldx, K, w, ldw, yb, ldy, n0); break;
      default: Block<1>(xb, ldx, K, w, ldw, yb, ldy, n0); break;
    }
  }
}

// Columns n0 .. n1, one output at a time (summed in order of k, as the panels are).
void Columns(const float* x, int64_t ldx, int64_t M, int64_t K, const float* w, int64_t ldw, float* y,
             int64_t ldy, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[m * ldx + k] * w[k * ldw + n];
      y[m * ldy + n] = s;
    }
}

// Runs work->Run() on the calling thread and on up to items - 1 of XLA's intra-op threads; returns when
// work->Finished(). Each Work hands out its items from atomic counters: a helper that starts after the work
// is done finds none left, so the caller never waits for a helper that has not started.
template <typename Shared>
void RunShared(ffi::ThreadPool& pool, const std::shared_ptr<Shared>& work, int64_t items) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (!work->Finished()) std::this_thread::yield();
}

// y[m, h] = x[m, h] @ w[h] for every head h: x [M, H, K], w [H, K, N], y [M, H, N] (H = 1: a plain matmul).
// Work items are chunks of one head's panels.
struct Work {
  const float* x;
  const float* w;
  float* y;
  int64_t M, H, K, N, panels, chunks;  // panels and chunks per head
  std::atomic<int64_t> next{0}, done{0};

  void Run() {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < H * chunks;) {
      const int64_t h = i / chunks, c = i % chunks;
      const int64_t end = std::min(panels, (c + 1) * kPanelsPerChunk);
      for (int64_t p = c * kPanelsPerChunk; p < end; ++p)
        Panel(x + h * K, H * K, M, K, w + h * K * N, N, y + h * N, H * N, p * kPanel);
      done.fetch_add(1, std::memory_order_release);
    }
  }

  bool Finished() const { return done.load(std::memory_order_acquire) == H * chunks; }
};

void HeadsMatmul(ffi::ThreadPool& pool, const float* x, const float* w, float* y, int64_t M, int64_t H,
                 int64_t K, int64_t N) {
  auto work = std::make_shared<Work>();
  work->x = x, work->w = w, work->y = y;
  work->M = M, work->H = H, work->K = K, work->N = N;
  work->panels = N / kPanel;
  work->chunks = (work->panels + kPanelsPerChunk - 1) / kPanelsPerChunk;
  for (int64_t h = 0; h < H; ++h)
    Columns(x + h * K, H * K, M, K, w + h * K * N, N, y + h * N, H * N, work->panels * kPanel, N);
  RunShared(pool, work, H * work->chunks);
}

ffi::Error SmallRowsMatmul(ffi::ThreadPool pool, Matrix x, Matrix w, MatrixResult y) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = w.dimensions()[1];
  if (w.dimensions()[0] != K || y->dimensions()[0] != M || y->dimensions()[1] != N)
    return ffi::Error::InvalidArgument("small_rows_matmul: shapes do not match");
  HeadsMatmul(pool, x.typed_data(), w.typed_data(), y->typed_data(), M, 1, K, N);
  return ffi::Error::Success();
}

ffi::Error SmallRowsHeadsMatmul(ffi::ThreadPool pool, Heads x, Heads w, HeadsResult y) {
  const int64_t M = x.dimensions()[0], H = x.dimensions()[1], K = x.dimensions()[2], N = w.dimensions()[2];
  if (w.dimensions()[0] != H || w.dimensions()[1] != K || y->dimensions()[0] != M || y->dimensions()[1] != H ||
      y->dimensions()[2] != N)
    return ffi::Error::InvalidArgument("small_rows_heads_matmul: shapes do not match");
  HeadsMatmul(pool, x.typed_data(), w.typed_data(), y->typed_data(), M, H, K, N);
  return ffi::Error::Success();
}

// A MoE layer's experts over expert-sorted rows: for expert e, rows starts[e] .. starts[e+1] of xs [M, D] go
// through y = (silu(x Wg[e]) * (x Wu[e])) Wd[e], Wg/Wu [D, F], Wd [F, D]; rows past starts[E] come out 0.
// Work items are (expert, panel) pairs: phase 1 fills h [M, F] panel by panel, phase 2 (after all of phase
// 1) reads it. A helper that finds no phase-1 item left waits for phase 1 to end before it takes phase 2's.
struct GroupedWork {
  const float* xs;
  float* y;
  int64_t D, F;
  std::vector<int64_t> row0, rows;  // of each expert with rows
  std::vector<const float*> gate, up, down;
  std::vector<float> g, u;  // [M, F] scratch: x Wg and x Wu, then h = silu(g) * u in g
  int64_t items1, items2;
  std::atomic<int64_t> next1{0}, done1{0}, next2{0}, done2{0};

  void Run() {
    const int64_t panels1 = F / kPanel, panels2 = D / kPanel;
    for (int64_t i; (i = next1.fetch_add(1, std::memory_order_relaxed)) < items1;) {
      const int64_t e = i / panels1, n0 = (i % panels1) * kPanel, r0 = row0[e];
      Panel(xs + r0 * D, D, rows[e], D, gate[e], F, g.data() + r0 * F, F, n0);
      Panel(xs + r0 * D, D, rows[e], D, up[e], F, u.data() + r0 * F, F, n0);
      for (int64_t r = r0; r < r0 + rows[e]; ++r)
        for (int64_t c = n0; c < n0 + kPanel; ++c) {
          const float a = g[r * F + c];
          g[r * F + c] = a / (1.f + std::exp(-a)) * u[r * F + c];
        }
      done1.fetch_add(1, std::memory_order_release);
    }
    while (done1.load(std::memory_order_acquire) < items1) std::this_thread::yield();
    for (int64_t i; (i = next2.fetch_add(1, std::memory_order_relaxed)) < items2;) {
      const int64_t e = i / panels2, n0 = (i % panels2) * kPanel, r0 = row0[e];
      Panel(g.data() + r0 * F, F, rows[e], F, down[e], D, y + r0 * D, D, n0);
      done2.fetch_add(1, std::memory_order_release);
    }
  }

  bool Finished() const { return done2.load(std::memory_order_acquire) == items2; }
};

ffi::Error GroupedSwiglu(ffi::ThreadPool pool, Matrix xs, Offsets starts,
                         ffi::RemainingArgs weights, MatrixResult y) {
  const int64_t M = xs.dimensions()[0], D = xs.dimensions()[1], E = starts.dimensions()[0] - 1;
  if (E < 1 || static_cast<int64_t>(weights.size()) != 3 * E)
    return ffi::Error::InvalidArgument("grouped_swiglu: takes 3 weights per expert");
  auto work = std::make_shared<GroupedWork>();
  const int32_t* s = starts.typed_data();
  for (int64_t e = 0; e < E; ++e) {
    auto wg = weights.get<Matrix>(e), wu = weights.get<Matrix>(E + e), wd = weights.get<Matrix>(2 * E + e);
    if (!wg.has_value() || !wu.has_value() || !wd.has_value())
      return ffi::Error::InvalidArgument("grouped_swiglu: weights must be 2-D float32");
    if (e == 0) work->F = wg->dimensions()[1];
    if (wg->dimensions()[0] != D || wu->dimensions()[0] != D || wd->dimensions()[1] != D ||
        wg->dimensions()[1] != work->F || wu->dimensions()[1] != work->F || wd->dimensions()[0] != work->F)
      return ffi::Error::InvalidArgument("grouped_swiglu: weight shapes do not match");
    const int64_t r0 = std::clamp<int64_t>(s[e], 0, M), r1 = std::clamp<int64_t>(s[e + 1], r0, M);
    if (r1 > r0) {
      work->row0.push_back(r0);
      work->rows.push_back(r1 - r0);
      work->gate.push_back(wg->typed_data());
      work->up.push_back(wu->typed_data());
      work->down.push_back(wd->typed_data());
    }
  }
  const int64_t F = work->F;
  if (F % kPanel != 0 || D % kPanel != 0)
    return ffi::Error::InvalidArgument("grouped_swiglu: D and F must be multiples of the panel width");
  work->xs = xs.typed_data();
  work->y = y->typed_data();
  work->D = D;
  work->g.resize(M * F);
  work->u.resize(M * F);
  const int64_t active = work->rows.size();
  work->items1 = active * (F / kPanel);
  work->items2 = active * (D / kPanel);
  const int64_t routed = std::clamp<int64_t>(s[E], 0, M);
  std::memset(work->y + routed * D, 0, (M - routed) * D * sizeof(float));
  RunShared(pool, work, work->items1);
  return ffi::Error::Success();
}


// Dense decode attention over a paged cache, one new token per sequence (mla.attend_paged_decode): for row b
// and head n, o[b, n] = sum_t softmax_t(q[b, n] . row_t * scale) row_t over its positions t = 0 .. pos[b],
// where row pos[b] is new_rows[b] and the others are read through the page table (a page index outside the
// pool is clamped, as XLA's gather does). Each (row, group of heads) is one work item. Its rows are read
// once, a block at a time: the block's scores, then its values while its rows are still in cache, with the
// running maximum and sum of the softmax rescaled once per block.
struct AttentionWork {
  static constexpr int64_t kBlock = 64;
  const float* q;
  const float* pages;
  const float* new_rows;
  const int32_t* table;
  const int32_t* positions;
  float* o;
  int64_t N, X, P, page, W, heads_per_item, groups, items;
  float scale;
  std::atomic<int64_t> next{0}, done{0};

  void Item(int64_t i) {
    const int64_t b = i / groups, n0 = (i % groups) * heads_per_item, n1 = std::min(N, n0 + heads_per_item);
    const int64_t pos = std::clamp<int64_t>(positions[b], 0, W * page - 1), H = n1 - n0, V = X / kLanes;
    auto row = [&](int64_t t) {
      if (t == pos) return new_rows + b * X;
      const int64_t p = std::clamp<int64_t>(table[b * W + t / page], 0, P - 1);
      return pages + (p * page + t % page) * X;
    };
    const float* qb = q + (b * N + n0) * X;
    std::vector<float> s(H * kBlock), acc(H * X, 0.f), top(H, -INFINITY), total(H, 0.f);
    const float* rows[kBlock];
    for (int64_t t0 = 0; t0 <= pos; t0 += kBlock) {
      const int64_t T = std::min(kBlock, pos + 1 - t0);
      for (int64_t j = 0; j < T; ++j) {
        rows[j] = row(t0 + j);
        const Vec* r = reinterpret_cast<const Vec*>(rows[j]);
        for (int64_t n = 0; n < H; ++n) {
          const Vec* qn = reinterpret_cast<const Vec*>(qb + n * X);
          Vec a = Vec{};
          for (int64_t v = 0; v < V; ++v) a += qn[v] * r[v];
          float sum = 0.f;
          for (int l = 0; l < kLanes; ++l) sum += a[l];
          s[n * kBlock + j] = sum * scale;
        }
      }
      for (int64_t n = 0; n < H; ++n) {
        float* sn = s.data() + n * kBlock;
        const float m = std::max(top[n], *std::max_element(sn, sn + T));
        const float rescale = std::exp(top[n] - m);  // 0 before the first block
        total[n] *= rescale;
        for (int64_t x = 0; x < X; ++x) acc[n * X + x] *= rescale;
        for (int64_t j = 0; j < T; ++j) total[n] += (sn[j] = std::exp(sn[j] - m));
        top[n] = m;
      }
      for (int64_t j = 0; j < T; ++j) {
        const Vec* r = reinterpret_cast<const Vec*>(rows[j]);
        for (int64_t n = 0; n < H; ++n) {
          const float p = s[n * kBlock + j];
          Vec* an = reinterpret_cast<Vec*>(acc.data() + n * X);
          for (int64_t v = 0; v < V; ++v) an[v] += p * r[v];
        }
      }
    }
    for (int64_t n = 0; n < H; ++n)
      for (int64_t x = 0; x < X; ++x) o[(b * N + n0 + n) * X + x] = acc[n * X + x] / total[n];
  }

  void Run() {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      Item(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }

  bool Finished() const { return done.load(std::memory_order_acquire) == items; }
};

ffi::Error PagedDecodeAttention(ffi::ThreadPool pool, Heads q, Heads pages, Offsets positions,
                                Table table, Matrix new_rows, HeadsResult o, float scale) {
  const int64_t B = q.dimensions()[0], N = q.dimensions()[1], X = q.dimensions()[2];
  if (pages.dimensions()[2] != X || new_rows.dimensions()[1] != X || table.dimensions()[0] != B ||
      positions.dimensions()[0] != B || X % kLanes != 0)
    return ffi::Error::InvalidArgument("paged_decode_attention: shapes do not match");
  auto work = std::make_shared<AttentionWork>();
  work->q = q.typed_data(), work->pages = pages.typed_data(), work->new_rows = new_rows.typed_data();
  work->table = table.typed_data(), work->positions = positions.typed_data(), work->o = o->typed_data();
  work->N = N, work->X = X, work->P = pages.dimensions()[0], work->page = pages.dimensions()[1];
  work->W = table.dimensions()[1], work->scale = scale;
  // One sequence's heads in two halves when it is alone, so that both threads have work.
  work->groups = B == 1 && N > 1 ? 2 : 1;
  work->heads_per_item = (N + work->groups - 1) / work->groups;
  work->items = B * work->groups;
  RunShared(pool, work, work->items);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LongcatSmallRowsMatmul, SmallRowsMatmul,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Matrix>().Arg<Matrix>().Ret<Matrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LongcatGroupedSwiglu, GroupedSwiglu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Offsets>()
                                  .RemainingArgs()
                                  .Ret<Matrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LongcatSmallRowsHeadsMatmul, SmallRowsHeadsMatmul,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Heads>().Arg<Heads>().Ret<Heads>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LongcatPagedDecodeAttention, PagedDecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Heads>()
                                  .Arg<Heads>()
                                  .Arg<Offsets>()
                                  .Arg<Table>()
                                  .Arg<Matrix>()
                                  .Ret<Heads>()
                                  .Attr<float>("scale"));
