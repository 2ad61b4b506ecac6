// An identity XLA cannot fuse across, for CPU: its output aliases its input (operand 0 -> result 0), so it costs
// nothing: XLA's copy insertion guarantees the alias (copying first where the operand is needed elsewhere); the
// copy here only guards against a runtime that would not.

#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace segnext {
namespace {

namespace ffi = xla::ffi;

ffi::Error FusionBarrierImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  if (x.size_bytes() != y->size_bytes()) {
    return ffi::Error::InvalidArgument("fusion barrier: the result's size differs from the operand's");
  }
  if (x.untyped_data() != y->untyped_data()) std::memcpy(y->untyped_data(), x.untyped_data(), x.size_bytes());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace segnext

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegnextFusionBarrier, segnext::FusionBarrierImpl,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
