"""zaya-kernels: fast kernels for Zyphra's ZAYA1 models, exposed as torch.ops.zaya.*.

`import zaya_kernels` loads the compiled extension (the op schemas) and registers every implementation.
Choose the backend with ZAYA_KERNELS_BACKEND=auto|triton|hip|reference or `zaya_kernels.use_backend(...)`.
"""
__version__ = "0.1.0"

import torch  # noqa: F401  (loads libtorch, which the extension links against)

try:
    from zaya_kernels import _C  # noqa: F401  (defines the torch.ops.zaya schemas)
except ImportError as exc:  # say how to fix it rather than fail later with "no such op"
    raise ImportError(
        "zaya_kernels: the compiled extension zaya_kernels._C is missing or does not match this torch "
        f"({exc}). Build it with `pip install --no-build-isolation -e .` in the repository."
    ) from exc

from zaya_kernels import ops  # noqa: E402,F401  (registers the implementations)
from zaya_kernels.backend import last_backend, requested_backend, use_backend  # noqa: E402

__all__ = ["ops", "use_backend", "requested_backend", "last_backend", "__version__"]
