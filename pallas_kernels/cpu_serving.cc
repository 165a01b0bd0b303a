// The CPU serving step's kernels, XLA FFI custom calls over float32 activations; the matmuls' weights are
// float32 or bfloat16, widened to float32 as they are loaded (see cpu_serving.py for why).
//
// LongcatSmallRowsMatmul: y = x @ w for a few rows; x [M, K] and w [K, N] are row-major. The columns of w are
// cut into panels of kPanel<W> columns; a panel's rows are read once per block of rows of x (up to 8 over
// float32 weights, 4 over bfloat16: 16 accumulators), with the block's outputs held in vector registers for
// the whole K loop, so w streams from memory once (a second block of rows reads the panel again from L2),
// and the rows of w a few steps ahead are prefetched. Panels are handed out in chunks to the calling thread
// and to XLA's intra-op threads. Each output is summed in order of k, whatever M is: a row's result does not
// depend on the other rows.
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
using Weight = ffi::AnyBuffer;  // float32 or bfloat16
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
typedef uint32_t IntVec __attribute__((vector_size(kLanes * 4), aligned(4)));
using Bf16 = uint16_t;  // a bfloat16's bits: the top half of a float32's

// A weight's data as W (float or Bf16; the caller has checked its element type).
template <typename W>
const W* Data(const ffi::AnyBuffer& w) {
  return static_cast<const W*>(w.untyped_data());
}

// A bfloat16 is exact in float32: its bits are a float32's top half.
inline float Widen(float v) { return v; }
inline float Widen(Bf16 v) { return __builtin_bit_cast(float, static_cast<uint32_t>(v) << 16); }

// A panel's row is two vectors of float32 weights (two 64-byte lines with AVX-512), or four vectors' worth of
// bfloat16 columns, so that a bfloat16 panel streams as many lines per row as a float32 one: with one line
// per row the bfloat16 matmuls ran barely faster than float32's (the lines in flight, more than the bytes,
// seem to set the rate).
template <typename W>
constexpr int kPanelVecs = 2 * sizeof(float) / sizeof(W);
template <typename W>
constexpr int kPanel = kPanelVecs<W> * kLanes;  // columns of a panel
constexpr int kPrefetchRows = 16;          // how many rows of w ahead to prefetch
constexpr int64_t kPanelsPerChunk = 4;

// One panel row of weights as V float32 vectors (V = kPanelVecs<W>, or half that for the columns past the
// last panel). float32: the columns in order. bfloat16: each 32-bit lane holds columns 2i and 2i+1, widened
// with one shift (the even column) and one mask (the odd one), so vector 2p holds the even columns of the
// p-th group of 2 * kLanes and vector 2p+1 its odd ones (`StoreRow` puts them back in order). Converting
// 16-bit lanes to 32-bit ones instead took as many instructions as the loads and FMAs together, and made the
// bfloat16 matmuls barely faster than float32's.
template <int V>
void LoadRow(const float* row, Vec* out) {
  for (int v = 0; v < V; ++v) out[v] = *reinterpret_cast<const Vec*>(row + v * kLanes);
}
template <int V>
void LoadRow(const Bf16* row, Vec* out) {
  for (int p = 0; p < V / 2; ++p) {
    const IntVec pairs = *reinterpret_cast<const IntVec*>(row + 2 * p * kLanes);
    out[2 * p] = __builtin_bit_cast(Vec, pairs << 16);
    out[2 * p + 1] = __builtin_bit_cast(Vec, pairs & 0xFFFF0000u);
  }
}

// The sums of one panel row, laid out as `LoadRow` laid out its weights, into y in column order.
template <int V>
void StoreRow(const Vec* acc, float* y, const float*) {
  for (int v = 0; v < V; ++v) *reinterpret_cast<Vec*>(y + v * kLanes) = acc[v];
}
template <int V>
void StoreRow(const Vec* acc, float* y, const Bf16*) {
  for (int p = 0; p < V / 2; ++p)
    for (int i = 0; i < kLanes; ++i) {
      y[2 * p * kLanes + 2 * i] = acc[2 * p][i];
      y[2 * p * kLanes + 2 * i + 1] = acc[2 * p + 1][i];
    }
}

// Row r of x starts at x + r * ldx, row k of w at w + k * ldw, row r of y at y + r * ldy.
template <int R, int V, typename W>
void Block(const float* x, int64_t ldx, int64_t K, const W* w, int64_t ldw, float* y, int64_t ldy,
           int64_t n0) {
  Vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = Vec{};
  for (int64_t k = 0; k < K; ++k) {
    const W* row = w + k * ldw + n0;
    if (k + kPrefetchRows < K)  // one prefetch per 64-byte line
      for (int c = 0; c < V * kLanes; c += 64 / sizeof(W)) __builtin_prefetch(row + kPrefetchRows * ldw + c);
    Vec wv[V];
    LoadRow<V>(row, wv);
    for (int r = 0; r < R; ++r) {
      const float xr = x[r * ldx + k];
      for (int v = 0; v < V; ++v) acc[r][v] += xr * wv[v];
    }
  }
  for (int r = 0; r < R; ++r) StoreRow<V>(acc[r], y + r * ldy + n0, w);
}

// All M rows of one panel of V vectors' columns starting at column n0, in blocks of up to 16 accumulators.
template <typename W, int V = kPanelVecs<W>>
void Panel(const float* x, int64_t ldx, int64_t M, int64_t K, const W* w, int64_t ldw, float* y,
           int64_t ldy, int64_t n0) {
  constexpr int64_t kRows = std::min(8, 16 / V);
  for (int64_t m = 0; m < M; m += kRows) {
    const float* xb = x + m * ldx;
    float* yb = y + m * ldy;
    switch (std::min<int64_t>(kRows, M - m)) {
      case 8: Block<8, V>(xb, ldx, K, w, ldw, yb, ldy, n0); break;
      case 7: Block<7, V>(xb, ldx, K, w, ldw, yb, ldy, n0); break;
      case 6: Block<6, V>(xb, ldx, K, w, ldw, yb, ldy, n0); break;
      case 5: Block<5, V>(xb, ldx, K, w, ldw, yb, ldy, n0); break;
      case 4: Block<4, V>(xb, ldx, K, w, ldw, yb, ldy, n0); break;
      case 3: Block<3, V>(xb, ldx, K, w, ldw, yb, ldy, n0); break;
      case 2: Block<2, V>(xb, ldx, K, w, ldw, yb, ldy, n0); break;
      default: Block<1, V>(xb, ldx, K, w, ldw, yb, ldy, n0); break;
    }
  }
}

// Columns n0 .. n1, one output at a time (summed in order of k, as the panels are).
template <typename W>
void Columns(const float* x, int64_t ldx, int64_t M, int64_t K, const W* w, int64_t ldw, float* y,
             int64_t ldy, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[m * ldx + k] * Widen(w[k * ldw + n]);
      y[m * ldy + n] = s;
    }
}

// Columns n0 .. n1 past the last whole panel: a half panel where it fits (the 32 columns past a bfloat16
// matmul's 64-column panels, as in MLA's [D, R + Hr] = [., 160] projection), the rest one at a time.
template <typename W>
void Tail(const float* x, int64_t ldx, int64_t M, int64_t K, const W* w, int64_t ldw, float* y, int64_t ldy,
          int64_t n0, int64_t n1) {
  constexpr int kHalf = kPanelVecs<W> / 2;
  if (n1 - n0 >= kHalf * kLanes) {
    Panel<W, kHalf>(x, ldx, M, K, w, ldw, y, ldy, n0);
    n0 += kHalf * kLanes;
  }
  Columns(x, ldx, M, K, w, ldw, y, ldy, n0, n1);
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
template <typename W>
struct Work {
  const float* x;
  const W* w;
  float* y;
  int64_t M, H, K, N, panels, chunks;  // panels and chunks per head
  std::atomic<int64_t> next{0}, done{0};

  void Run() {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < H * chunks;) {
      const int64_t h = i / chunks, c = i % chunks;
      const int64_t end = std::min(panels, (c + 1) * kPanelsPerChunk);
      for (int64_t p = c * kPanelsPerChunk; p < end; ++p)
        Panel(x + h * K, H * K, M, K, w + h * K * N, N, y + h * N, H * N, p * kPanel<W>);
      done.fetch_add(1, std::memory_order_release);
    }
  }

  bool Finished() const { return done.load(std::memory_order_acquire) == H * chunks; }
};

template <typename W>
void HeadsMatmul(ffi::ThreadPool& pool, const float* x, const W* w, float* y, int64_t M, int64_t H,
                 int64_t K, int64_t N) {
  auto work = std::make_shared<Work<W>>();
  work->x = x, work->w = w, work->y = y;
  work->M = M, work->H = H, work->K = K, work->N = N;
  work->panels = N / kPanel<W>;
  work->chunks = (work->panels + kPanelsPerChunk - 1) / kPanelsPerChunk;
  for (int64_t h = 0; h < H; ++h)
    Tail(x + h * K, H * K, M, K, w + h * K * N, N, y + h * N, H * N, work->panels * kPanel<W>, N);
  RunShared(pool, work, H * work->chunks);
}

// HeadsMatmul over a float32 or bfloat16 weight w [H, K, N] (rank 2: H = 1); x [M, H, K], y [M, H, N].
ffi::Error AnyHeadsMatmul(ffi::ThreadPool& pool, const float* x, const Weight& w, float* y, int64_t M,
                          int64_t H, int64_t K, int64_t N) {
  switch (w.element_type()) {
    case ffi::DataType::F32: HeadsMatmul(pool, x, Data<float>(w), y, M, H, K, N); break;
    case ffi::DataType::BF16: HeadsMatmul(pool, x, Data<Bf16>(w), y, M, H, K, N); break;
    default: return ffi::Error::InvalidArgument("small_rows_matmul: the weight must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

ffi::Error SmallRowsMatmul(ffi::ThreadPool pool, Matrix x, Weight w, MatrixResult y) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1];
  if (w.dimensions().size() != 2 || w.dimensions()[0] != K || y->dimensions()[0] != M ||
      y->dimensions()[1] != w.dimensions()[1])
    return ffi::Error::InvalidArgument("small_rows_matmul: shapes do not match");
  return AnyHeadsMatmul(pool, x.typed_data(), w, y->typed_data(), M, 1, K, w.dimensions()[1]);
}

ffi::Error SmallRowsHeadsMatmul(ffi::ThreadPool pool, Heads x, Weight w, HeadsResult y) {
  const int64_t M = x.dimensions()[0], H = x.dimensions()[1], K = x.dimensions()[2];
  if (w.dimensions().size() != 3 || w.dimensions()[0] != H || w.dimensions()[1] != K ||
      y->dimensions()[0] != M || y->dimensions()[1] != H || y->dimensions()[2] != w.dimensions()[2])
    return ffi::Error::InvalidArgument("small_rows_heads_matmul: shapes do not match");
  return AnyHeadsMatmul(pool, x.typed_data(), w, y->typed_data(), M, H, K, w.dimensions()[2]);
}

// A MoE layer's experts over expert-sorted rows: for expert e, rows starts[e] .. starts[e+1] of xs [M, D] go
// through y = (silu(x Wg[e]) * (x Wu[e])) Wd[e], Wg/Wu [D, F], Wd [F, D]; rows past starts[E] come out 0.
// Work items are (expert, panel) pairs: phase 1 fills h [M, F] panel by panel, phase 2 (after all of phase
// 1) reads it. A helper that finds no phase-1 item left waits for phase 1 to end before it takes phase 2's.
template <typename W>
struct GroupedWork {
  const float* xs;
  float* y;
  int64_t D, F;
  std::vector<int64_t> row0, rows;  // of each expert with rows
  std::vector<const W*> gate, up, down;
  std::vector<float> g, u;  // [M, F] scratch: x Wg and x Wu, then h = silu(g) * u in g
  int64_t items1, items2;
  std::atomic<int64_t> next1{0}, done1{0}, next2{0}, done2{0};

  void Run() {
    constexpr int64_t P = kPanel<W>;
    const int64_t panels1 = F / P, panels2 = D / P;
    for (int64_t i; (i = next1.fetch_add(1, std::memory_order_relaxed)) < items1;) {
      const int64_t e = i / panels1, n0 = (i % panels1) * P, r0 = row0[e];
      Panel(xs + r0 * D, D, rows[e], D, gate[e], F, g.data() + r0 * F, F, n0);
      Panel(xs + r0 * D, D, rows[e], D, up[e], F, u.data() + r0 * F, F, n0);
      for (int64_t r = r0; r < r0 + rows[e]; ++r)
        for (int64_t c = n0; c < n0 + P; ++c) {
          const float a = g[r * F + c];
          g[r * F + c] = a / (1.f + std::exp(-a)) * u[r * F + c];
        }
      done1.fetch_add(1, std::memory_order_release);
    }
    while (done1.load(std::memory_order_acquire) < items1) std::this_thread::yield();
    for (int64_t i; (i = next2.fetch_add(1, std::memory_order_relaxed)) < items2;) {
      const int64_t e = i / panels2, n0 = (i % panels2) * P, r0 = row0[e];
      Panel(g.data() + r0 * F, F, rows[e], F, down[e], D, y + r0 * D, D, n0);
      done2.fetch_add(1, std::memory_order_release);
    }
  }

  bool Finished() const { return done2.load(std::memory_order_acquire) == items2; }
};

// W is the weights' element type, `type` (every weight's, checked here).
template <typename W>
ffi::Error Grouped(ffi::ThreadPool& pool, const Matrix& xs, const Offsets& starts,
                   const ffi::RemainingArgs& weights, ffi::DataType type, MatrixResult& y) {
  const int64_t M = xs.dimensions()[0], D = xs.dimensions()[1], E = starts.dimensions()[0] - 1;
  auto work = std::make_shared<GroupedWork<W>>();
  const int32_t* s = starts.typed_data();
  for (int64_t e = 0; e < E; ++e) {
    auto wg = weights.get<Weight>(e), wu = weights.get<Weight>(E + e), wd = weights.get<Weight>(2 * E + e);
    if (!wg.has_value() || !wu.has_value() || !wd.has_value())
      return ffi::Error::InvalidArgument("grouped_swiglu: the weights must be buffers");
    for (const Weight* w : {&*wg, &*wu, &*wd})
      if (w->dimensions().size() != 2 || w->element_type() != type)
        return ffi::Error::InvalidArgument("grouped_swiglu: weights must be 2-D and of one dtype");
    if (e == 0) work->F = wg->dimensions()[1];
    if (wg->dimensions()[0] != D || wu->dimensions()[0] != D || wd->dimensions()[1] != D ||
        wg->dimensions()[1] != work->F || wu->dimensions()[1] != work->F || wd->dimensions()[0] != work->F)
      return ffi::Error::InvalidArgument("grouped_swiglu: weight shapes do not match");
    const int64_t r0 = std::clamp<int64_t>(s[e], 0, M), r1 = std::clamp<int64_t>(s[e + 1], r0, M);
    if (r1 > r0) {
      work->row0.push_back(r0);
      work->rows.push_back(r1 - r0);
      work->gate.push_back(Data<W>(*wg));
      work->up.push_back(Data<W>(*wu));
      work->down.push_back(Data<W>(*wd));
    }
  }
  const int64_t F = work->F;
  if (F % kPanel<W> != 0 || D % kPanel<W> != 0)
    return ffi::Error::InvalidArgument("grouped_swiglu: D and F must be multiples of the panel width");
  work->xs = xs.typed_data();
  work->y = y->typed_data();
  work->D = D;
  work->g.resize(M * F);
  work->u.resize(M * F);
  const int64_t active = work->rows.size();
  work->items1 = active * (F / kPanel<W>);
  work->items2 = active * (D / kPanel<W>);
  const int64_t routed = std::clamp<int64_t>(s[E], 0, M);
  std::memset(work->y + routed * D, 0, (M - routed) * D * sizeof(float));
  RunShared(pool, work, work->items1);
  return ffi::Error::Success();
}

ffi::Error GroupedSwiglu(ffi::ThreadPool pool, Matrix xs, Offsets starts, ffi::RemainingArgs weights,
                         MatrixResult y) {
  const int64_t E = starts.dimensions()[0] - 1;
  if (E < 1 || static_cast<int64_t>(weights.size()) != 3 * E)
    return ffi::Error::InvalidArgument("grouped_swiglu: takes 3 weights per expert");
  auto first = weights.get<Weight>(0);
  if (!first.has_value()) return ffi::Error::InvalidArgument("grouped_swiglu: the weights must be buffers");
  switch (first->element_type()) {
    case ffi::DataType::F32: return Grouped<float>(pool, xs, starts, weights, first->element_type(), y);
    case ffi::DataType::BF16: return Grouped<Bf16>(pool, xs, starts, weights, first->element_type(), y);
    default: return ffi::Error::InvalidArgument("grouped_swiglu: the weights must be float32 or bfloat16");
  }
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
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Weight>()
                                  .Ret<Matrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LongcatGroupedSwiglu, GroupedSwiglu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Offsets>()
                                  .RemainingArgs()
                                  .Ret<Matrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LongcatSmallRowsHeadsMatmul, SmallRowsHeadsMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Heads>()
                                  .Arg<Weight>()
                                  .Ret<Heads>());

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
