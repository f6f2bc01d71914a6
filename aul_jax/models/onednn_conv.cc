// NHWC/HWIO 2-D convolution and its two gradients as XLA FFI handlers on oneDNN (CPU).
//
// XLA:CPU runs the convolution gradients of small CNNs 2-3x slower than the oneDNN kernels
// PyTorch uses (docs/benchmarks.md). These handlers call oneDNN directly with activations in
// NHWC, the layout JAX already uses, so no activation is ever transposed; only the (small)
// kernel is reordered into the blocked layout oneDNN's JIT kernels want. Built and loaded by
// aul_jax/models/onednn.py.
//
// Under jax.vmap (vmap_method='expand_dims') every operand comes with the same number of
// leading "trial" dimensions in front of NHWC/HWIO, each either 1 (the operand is shared by
// all trials) or the result's. One call then runs all trials: as one convolution over the
// stacked batch when the kernel is shared, else as one convolution per trial, in place.
// Running R trials as one grouped convolution instead (groups = R, the activations reordered
// to and from trial-interleaved NHW(R*C) around it) was 1.1-1.4x slower for ResNet-20's layers
// at R = 2-8, the reorders costing more than grouping saved (commit 7510a3d has it;
// benchmarks/conv_layers.py, docs/benchmarks.md section 2g).

#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

// Shapes and hyper-parameters of one convolution: the key of the primitive cache.
struct ConvShape {
  int64_t n, h, w, c;     // input, NHWC
  int64_t kh, kw, o;      // kernel, HWIO
  int64_t ho, wo;         // output, NHWC
  int64_t sh, sw;         // strides
  int64_t plh, phh, plw, phw;  // padding, low/high per spatial dimension
  memory::data_type dtype;

  auto tie() const {
    return std::tie(n, h, w, c, kh, kw, o, ho, wo, sh, sw, plh, phh, plw, phw, dtype);
  }
  bool operator<(const ConvShape& other) const { return tie() < other.tie(); }

  memory::desc src() const { return {{n, c, h, w}, dtype, memory::format_tag::nhwc}; }
  memory::desc dst() const { return {{n, o, ho, wo}, dtype, memory::format_tag::nhwc}; }
  memory::desc weights_user() const { return {{o, c, kh, kw}, dtype, memory::format_tag::hwio}; }
  memory::desc weights_any() const { return {{o, c, kh, kw}, dtype, memory::format_tag::any}; }
  memory::dims strides() const { return {sh, sw}; }
  memory::dims pad_low() const { return {plh, plw}; }
  memory::dims pad_high() const { return {phh, phw}; }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One primitive, and the reorder of its kernel (or kernel gradient) from or to JAX's HWIO when
// it wants another (blocked) layout.
struct Step {
  dnnl::primitive primitive;
  memory::desc weights;
  memory::desc scratchpad;
  int weights_arg;
  bool weights_are_output;
  std::optional<dnnl::reorder> reorder;

  Step(dnnl::primitive primitive, const dnnl::primitive_desc_base& pd,
       const memory::desc& weights_desc, int weights_arg, const memory::desc& user,
       bool weights_are_output)
      : primitive(std::move(primitive)),
        weights(weights_desc),
        scratchpad(pd.scratchpad_desc()),
        weights_arg(weights_arg),
        weights_are_output(weights_are_output) {
    if (weights != user) {
      reorder = weights_are_output
                    ? dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), weights, Engine(), user))
                    : dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), user, Engine(), weights));
    }
  }
};

// The forward pass and both gradients of one convolution shape, created once and kept.
struct ConvPrimitives {
  std::optional<Step> forward, input_grad, weight_grad;

  explicit ConvPrimitives(const ConvShape& s) {
    auto& engine = Engine();
    const auto algo = dnnl::algorithm::convolution_direct;
    // One primitive may run on several threads at once (one per XLA device, or concurrent
    // thunks); that is safe only with a scratchpad per execution.
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    dnnl::convolution_forward::primitive_desc fwd(
        engine, dnnl::prop_kind::forward_training, algo, s.src(), s.weights_any(), s.dst(),
        s.strides(), s.pad_low(), s.pad_high(), attr);
    forward.emplace(dnnl::convolution_forward(fwd), fwd, fwd.weights_desc(), DNNL_ARG_WEIGHTS, s.weights_user(), false);
    dnnl::convolution_backward_data::primitive_desc bwd_data(
        engine, algo, s.src(), s.weights_any(), s.dst(), s.strides(), s.pad_low(), s.pad_high(),
        fwd, attr);
    input_grad.emplace(dnnl::convolution_backward_data(bwd_data), bwd_data,
                       bwd_data.weights_desc(), DNNL_ARG_WEIGHTS, s.weights_user(), false);
    dnnl::convolution_backward_weights::primitive_desc bwd_weights(
        engine, algo, s.src(), s.weights_any(), s.dst(), s.strides(), s.pad_low(), s.pad_high(),
        fwd, attr);
    weight_grad.emplace(dnnl::convolution_backward_weights(bwd_weights), bwd_weights,
                        bwd_weights.diff_weights_desc(), DNNL_ARG_DIFF_WEIGHTS,
                        s.weights_user(), true);
  }
};

const ConvPrimitives& Primitives(const ConvShape& shape) {
  static std::mutex mutex;
  static std::map<ConvShape, std::unique_ptr<ConvPrimitives>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& entry = cache[shape];
  if (!entry) entry = std::make_unique<ConvPrimitives>(shape);
  return *entry;
}

// A 64-byte aligned buffer that grows as needed and is kept for reuse.
class Buffer {
 public:
  void* Get(size_t size) {
    if (size > size_) {
      data_.reset(static_cast<char*>(std::aligned_alloc(64, (size + 63) / 64 * 64)));
      size_ = size;
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> data_;
  size_t size_ = 0;
};

using Dims = ffi::AnyBuffer::Dimensions;

// Fills `shape` from the per-trial input (or its gradient), kernel and output (or its
// gradient) shapes.
ffi::Error MakeShape(ffi::DataType dtype, Dims x, Dims w, Dims y, ffi::Span<const int64_t> strides,
                     ffi::Span<const int64_t> padding, ConvShape& shape) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4 || strides.size() != 2 ||
      padding.size() != 4) {
    return ffi::Error::InvalidArgument("oneDNN convolution: expected NHWC, HWIO, NHWC ranks");
  }
  if (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("oneDNN convolution: only float32 and bfloat16");
  }
  shape = ConvShape{x[0],       x[1],       x[2],       x[3],       w[0],       w[1],
                    w[3],       y[1],       y[2],       strides[0], strides[1], padding[0],
                    padding[1], padding[2], padding[3],
                    dtype == ffi::DataType::F32 ? memory::data_type::f32
                                                : memory::data_type::bf16};
  return ffi::Error::Success();
}

// Runs `step` on `args` plus the kernel at `user_weights` (HWIO), reordered before the call
// for an input kernel and after it for a kernel gradient.
//
// The scratchpad and the reordered kernel live in this thread's buffers: executions on one
// thread are sequential, and no two threads share one.
void Execute(const Step& step, std::unordered_map<int, memory> args, const ConvShape& shape,
             void* user_weights) {
  auto& engine = Engine();
  thread_local Buffer scratchpad, blocked_weights;
  args.insert({DNNL_ARG_SCRATCHPAD,
               memory(step.scratchpad, engine, scratchpad.Get(step.scratchpad.get_size()))});
  dnnl::stream stream(engine);
  memory user(shape.weights_user(), engine, user_weights);
  if (!step.reorder) {
    args.insert({step.weights_arg, user});
    step.primitive.execute(stream, args);
  } else {
    memory blocked(step.weights, engine, blocked_weights.Get(step.weights.get_size()));
    if (!step.weights_are_output) step.reorder->execute(stream, user, blocked);
    args.insert({step.weights_arg, blocked});
    step.primitive.execute(stream, args);
    if (step.weights_are_output) step.reorder->execute(stream, blocked, user);
  }
  stream.wait();
}

template <typename F>
ffi::Error Guarded(F&& f) {
  try {
    return f();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution: ") + e.what());
  }
}

enum class Direction { kForward, kInputGrad, kWeightGrad };

// x, w and y (or their gradients) of one trial.
struct Operands {
  char* x;
  char* w;
  char* y;
};

// Runs one convolution of `shape` in `kDirection`.
template <Direction kDirection>
void Run(const ConvShape& shape, const Operands& at) {
  const auto& p = Primitives(shape);
  auto& engine = Engine();
  memory x(shape.src(), engine, at.x);
  memory y(shape.dst(), engine, at.y);
  switch (kDirection) {
    case Direction::kForward:
      Execute(*p.forward, {{DNNL_ARG_SRC, x}, {DNNL_ARG_DST, y}}, shape, at.w);
      break;
    case Direction::kInputGrad:
      Execute(*p.input_grad, {{DNNL_ARG_DIFF_DST, y}, {DNNL_ARG_DIFF_SRC, x}}, shape, at.w);
      break;
    case Direction::kWeightGrad:
      Execute(*p.weight_grad, {{DNNL_ARG_SRC, x}, {DNNL_ARG_DIFF_DST, y}}, shape, at.w);
      break;
  }
}

// Byte offset of each trial of an operand whose leading dimensions are `dims`, each 1 (shared
// by all trials) or the result's `trials`; `size` is the bytes of one trial.
std::vector<int64_t> TrialOffsets(Dims dims, Dims trials, int64_t size) {
  int64_t count = 1;
  for (int64_t t : trials) count *= t;
  std::vector<int64_t> offsets(count, 0);
  int64_t stride = size;  // bytes between consecutive indices of leading dimension d
  int64_t period = 1;     // trials between consecutive indices of leading dimension d
  for (size_t d = trials.size(); d-- > 0;) {
    if (dims[d] != 1) {
      for (int64_t i = 0; i < count; ++i) offsets[i] += (i / period) % trials[d] * stride;
      stride *= dims[d];
    }
    period *= trials[d];
  }
  return offsets;
}

// Whether every leading dimension is `size`'s (1: the operand is shared by all trials).
bool AllOf(Dims leading, Dims size) {
  for (size_t d = 0; d < leading.size(); ++d) {
    if (leading[d] != size[d]) return false;
  }
  return true;
}

// One handler for the three directions: out = forward(x, w), input_grad(dy, w) or
// weight_grad(x, dy). The convolution's shape is read off whichever buffers are x, w and y
// (or their gradients, which have their shapes), less their leading trial dimensions.
template <Direction kDirection>
ffi::Error ConvImpl(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                    ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding) {
  return Guarded([&]() -> ffi::Error {
    ffi::AnyBuffer& result = *out;
    ffi::AnyBuffer& x = kDirection == Direction::kInputGrad ? result : a;
    ffi::AnyBuffer& w = kDirection == Direction::kWeightGrad ? result : b;
    ffi::AnyBuffer& y = kDirection == Direction::kForward ? result
                        : kDirection == Direction::kInputGrad ? a
                                                              : b;
    const size_t rank = result.dimensions().size();
    if (rank < 4 || a.dimensions().size() != rank || b.dimensions().size() != rank) {
      return ffi::Error::InvalidArgument(
          "oneDNN convolution: expected NHWC, HWIO, NHWC ranks after one common number of "
          "leading trial dimensions");
    }
    const size_t k = rank - 4;
    const Dims trials = result.dimensions().first(k);
    for (const ffi::AnyBuffer* operand : {&a, &b}) {
      for (size_t d = 0; d < k; ++d) {
        const int64_t size = operand->dimensions()[d];
        if (size != 1 && size != trials[d]) {
          return ffi::Error::InvalidArgument(
              "oneDNN convolution: an operand's leading trial dimension is neither 1 nor the "
              "result's");
        }
      }
    }
    ConvShape shape;
    ffi::Error error = MakeShape(a.element_type(), x.dimensions().last(4),
                                 w.dimensions().last(4), y.dimensions().last(4), strides, padding,
                                 shape);
    if (error.failure()) return error;
    char* x_data = static_cast<char*>(x.untyped_data());
    char* w_data = static_cast<char*>(w.untyped_data());
    char* y_data = static_cast<char*>(y.untyped_data());
    int64_t count = 1;
    for (int64_t t : trials) count *= t;
    const std::vector<int64_t> ones(k, 1);
    const bool w_shared = AllOf(w.dimensions().first(k), ones);
    const bool xy_stacked =
        AllOf(x.dimensions().first(k), trials) && AllOf(y.dimensions().first(k), trials);
    if (count == 0) {
      // No trials (vmap over an empty axis): nothing to compute.
    } else if (count == 1) {
      Run<kDirection>(shape, {x_data, w_data, y_data});
    } else if (kDirection != Direction::kWeightGrad && w_shared && xy_stacked) {
      // One kernel for all trials: one convolution of the trials' batches stacked.
      shape.n *= count;
      Run<kDirection>(shape, {x_data, w_data, y_data});
    } else {
      const int64_t bytes = ffi::ByteWidth(a.element_type());
      const auto x_offsets =
          TrialOffsets(x.dimensions().first(k), trials, bytes * shape.n * shape.h * shape.w * shape.c);
      const auto w_offsets = TrialOffsets(w.dimensions().first(k), trials,
                                          bytes * shape.kh * shape.kw * shape.c * shape.o);
      const auto y_offsets = TrialOffsets(y.dimensions().first(k), trials,
                                          bytes * shape.n * shape.ho * shape.wo * shape.o);
      for (int64_t i = 0; i < count; ++i) {
        Run<kDirection>(shape,
                        {x_data + x_offsets[i], w_data + w_offsets[i], y_data + y_offsets[i]});
      }
    }
    return ffi::Error::Success();
  });
}

// Two operands, one result, the strides and the (low, high) padding of both spatial dims.
auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Attr<ffi::Span<const int64_t>>("strides")
      .Attr<ffi::Span<const int64_t>>("padding");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AulOnednnConvForward, ConvImpl<Direction::kForward>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(AulOnednnConvInputGrad, ConvImpl<Direction::kInputGrad>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(AulOnednnConvWeightGrad, ConvImpl<Direction::kWeightGrad>,
                              Binding());
