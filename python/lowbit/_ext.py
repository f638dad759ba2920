"""Loads the compiled modules, each optional: lowbit works (on the reference) without them."""
import importlib


def _try_import(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


C = _try_import("lowbit._C")            # CPU kernels
C_CUDA = _try_import("lowbit._C_cuda")  # CUDA kernels (built when nvcc was present)
C_SIM = _try_import("lowbit._C_sim")    # test-only: the CUDA kernels run on the CPU


def cuda_device_count() -> int:
    """Devices lowbit's CUDA module can use; 0 (never an exception) without a driver or GPU."""
    if C_CUDA is None:
        return 0
    return C_CUDA.device_count()
