// zaya::bind_gpu_launchers: adds every GPU launcher to zaya_kernels._C (called from csrc/zaya_ops.cpp).
// Each csrc/*.cu op family contributes through its own bind_* function declared in launchers.h.
#include "launchers.h"

namespace zaya {

void bind_gpu_launchers(pybind11::module_& m) {
  bind_residual_rmsnorm(m);  // csrc/residual_rmsnorm.cu
  bind_router(m);            // csrc/router.cu
  bind_moe(m);               // csrc/moe.cu
  bind_cca(m);               // csrc/cca.cu
}

}  // namespace zaya
