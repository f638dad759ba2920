"""lowbit._C_cuda on a machine without a GPU: it must import, report no device without raising,
and turn a launch into a clean RuntimeError. Also checks which GPU code the module carries.
Nothing here executes a kernel: the kernels run through the simulator (backend "cuda_sim")."""
import os
import shutil
import subprocess

import pytest
import torch

from lowbit import _ext

pytestmark = pytest.mark.skipif(_ext.C_CUDA is None,
                                reason="lowbit._C_cuda was not built (no nvcc at install time)")


def test_imports_and_reports_versions():
    assert _ext.C_CUDA.runtime_version() >= 13000
    assert isinstance(_ext.C_CUDA.driver_version(), int)


def test_device_count_never_raises():
    n = _ext.C_CUDA.device_count()
    assert isinstance(n, int) and n >= 0
    if n == 0:  # no driver here: asking twice must not turn into a sticky error either
        assert _ext.C_CUDA.device_count() == 0
        assert _ext.cuda_device_count() == 0


@pytest.mark.skipif(_ext.cuda_device_count() > 0, reason="a CUDA device is present")
def test_launch_without_device_raises_runtime_error():
    x = torch.zeros(64)
    code = torch.linspace(-1, 1, 256)
    mids = (code[:-1] + code[1:]) * 0.5
    codes = torch.empty(64, dtype=torch.uint8)
    absmax = torch.empty(2)
    with pytest.raises(RuntimeError, match=r"lowbit CUDA .*cudaError"):
        _ext.C_CUDA.quantize_blockwise(x.data_ptr(), 0, 64, 32, code.data_ptr(), mids.data_ptr(),
                                       256, codes.data_ptr(), absmax.data_ptr(), False, 0, 0, 0, 0)
    out = torch.empty(64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"lowbit CUDA .*cudaError"):
        _ext.C_CUDA.stochastic_round(x.data_ptr(), 64, out.data_ptr(), 1, 0, 0, 0, 0)
    with pytest.raises(RuntimeError, match=r"lowbit CUDA .*cudaError"):
        _ext.C_CUDA.dequantize_blockwise(codes.data_ptr(), absmax.data_ptr(), code.data_ptr(), 256,
                                         64, 32, out.data_ptr(), 1, 0, 0)
    grad = torch.zeros(64)
    state = torch.zeros(64)
    with pytest.raises(RuntimeError, match=r"lowbit CUDA optim_step.*cudaError"):
        _ext.C_CUDA.optim_step(2, [x.data_ptr()], [grad.data_ptr()], [64], [state.data_ptr()], [],
                               [], [], [], [], 32, 0, 0, 0, 0, 0, 0, 0, 0, [0.0] * 11, 0, 0, 0,
                               0, [], [], [], [], 0, 0)
    stats = torch.zeros(1, 4, dtype=torch.float64)
    need = _ext.C_CUDA.grad_stats_workspace([64])
    workspace = torch.empty(max(1, need // 8), dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"lowbit CUDA grad_stats.*cudaError"):
        _ext.C_CUDA.grad_stats([grad.data_ptr()], [64], 0, 0, 0.0, 0, stats.data_ptr(), 0, 0, 0,
                               0, workspace.data_ptr(), need, 0, 0)
    scales, fq = torch.zeros(2), torch.empty(64)
    with pytest.raises(RuntimeError, match=r"lowbit CUDA lowprec.*cudaError"):
        _ext.C_CUDA.lowprec(x.data_ptr(), 0, 2, 32, 0, 0, 32, False, False, 0, 0, 16,
                            codes.data_ptr(), scales.data_ptr(), fq.data_ptr(),
                            absmax.data_ptr(), 0, 0)


def test_grad_stats_workspace_is_the_sims():
    # the same stats.cu computes it in both modules; native.py sizes the buffer from it
    assert _ext.C_SIM is not None, "build lowbit with LOWBIT_SIM=1 (make test does)"
    sizes = [0, 1, 8192, 8193, 10**9]
    assert _ext.C_CUDA.grad_stats_workspace(sizes) == _ext.C_SIM.grad_stats_workspace(sizes) > 0


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


@pytest.mark.skipif(_cuobjdump() is None, reason="no cuobjdump (CUDA toolkit or triton) found")
def test_module_carries_sm80_sm90_sass_and_compute90_ptx():
    so = _ext.C_CUDA.__file__
    listing = subprocess.run([_cuobjdump(), "--list-elf", "--list-ptx", so], capture_output=True,
                             text=True, check=True).stdout
    assert "sm_80" in listing and "sm_90" in listing, listing
    ptx = [line for line in listing.splitlines() if line.startswith("PTX")]
    assert any("sm_90" in line for line in ptx), listing  # PTX for compute_90 (JIT on newer GPUs)
