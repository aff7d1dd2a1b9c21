// Element types the kernels are instantiated for. Shared by the torch-free .cu launchers and the
// torch bindings, so neither side needs the other's headers.
#pragma once

namespace mjp {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace mjp
