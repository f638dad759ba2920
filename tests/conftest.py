import os

# The interpreter flag is read when @triton.jit runs, so it must be set before lowbit (and its
# Triton kernels) are imported. There is no GPU on any machine of this project.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import lowbit  # noqa: E402
from lowbit import _ext  # noqa: E402

# Backends that must equal the reference bit for bit. "cuda" itself needs a GPU (none here): its
# kernels run through "cuda_sim", the same .cu source compiled for the CPU.
KERNEL_BACKENDS = ("cpu", "cuda_sim", "triton")


def kernel_backend_params():
    params = []
    available = lowbit.available_backends()
    for name in KERNEL_BACKENDS:
        marks = ()
        if name not in available:
            marks = pytest.mark.skip(reason=f"backend {name!r} is not built in this install")
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def cuda_runtime_present() -> bool:
    return _ext.cuda_device_count() > 0
