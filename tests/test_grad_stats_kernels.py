"""The statistics pass (lowbit::grad_stats) on its kernels: the CPU kernel, the CUDA kernels run by
the simulator (csrc/cuda/stats.cu) and the Triton kernels run by the interpreter
(triton_kernels/stats.py) against the reference (lowbit.reference.clip.grad_stats), with every
route to the reference inside lowbit disabled, so whatever passes ran on a kernel. Counts and
maxima exact, sums of squares to float64 rounding. tests/test_optim_kernels.py covers common sizes
and each clip transform; this file covers the kernels' boundaries: empty and one-element tensors,
sizes around the work items, more tensors than one CUDA launch takes, mixed dtypes in one call."""
import pytest
import torch

import lowbit.backends.reference
import lowbit.reference.clip
from lowbit import _ext, ops
from lowbit.reference import clip as clip_ref
from conftest import kernel_backend_params

# The spec, bound before any test patches the module attribute.
SPEC = clip_ref.grad_stats

NAN, INF = float("nan"), float("inf")
ALL = clip_ref.TRANSFORM_FLAGS
# Around the kernels' work items: the CUDA kernel's 8192 elements, 2**16 (the CPU kernel's items
# and the Triton interpreter's largest tile).
EDGE_SIZES = (0, 1, 8191, 8193, 2**16 - 1, 2**16, 2**16 + 1)
CUDA_CHUNK = 64  # tensors per launch of csrc/cuda/stats.cu (kStatsChunk)


@pytest.fixture(autouse=True)
def kernels_only(monkeypatch):
    """Every route to the torch reference fails: the backends' fallback and the spec itself."""
    def forbidden(*args, **kwargs):
        raise AssertionError("grad_stats fell back to the torch reference")
    monkeypatch.setattr(lowbit.backends.reference, "grad_stats", forbidden)
    monkeypatch.setattr(lowbit.reference.clip, "grad_stats", forbidden)


def _assert_stats_equal(got, want):
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert torch.equal(got[:, 1:], want[:, 1:])
    torch.testing.assert_close(got[:, 0], want[:, 0], rtol=1e-12, atol=0)


def _check(grads, backend, xform=None, cv=0.0, flags=0, repeat=False):
    """The backend's statistics equal the spec's (and with `repeat`, a second call gives the same
    bits: the combine order is fixed)."""
    got = ops.grad_stats(grads, backend, xform, cv, flags)
    _assert_stats_equal(got, SPEC(grads, xform, cv, flags))
    if repeat:
        assert torch.equal(got, ops.grad_stats(grads, backend, xform, cv, flags))
    return got


def _xform(n):
    """Distinct per-tensor rows (s, thr, r, k) with thresholds inside the gradients' range: a row
    read for the wrong tensor changes that tensor's statistics."""
    i = torch.arange(n, dtype=torch.float32)
    return torch.stack([0.5 + 0.01 * i, 0.5 + 0.05 * (i % 17), 0.25 + 0.002 * i,
                        1.5 - 0.004 * i], dim=1).contiguous()


def _with_specials(g, k):
    """g with non-finite values at its first and last elements (item edges) and its largest
    magnitude just before the end; which ones depends on k."""
    n = g.numel()
    if n >= 3:
        g[0] = (NAN, INF, -INF)[k % 3]
        g[n - 1] = (INF, NAN, 0.0)[k % 3]
        g[n - 2] = -(100.0 + k)
    return g


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_the_kernel_runs_not_the_fallback(backend):
    impl = ops._backend_impl(backend)
    if backend == "triton":
        assert impl.grad_stats.__module__ == "lowbit.triton_kernels.stats"
    else:
        assert hasattr(impl.module, "grad_stats")
    grads = [_with_specials(torch.randn(n) * 3, k) for k, n in enumerate((5, 300, 9000))]
    got = _check(grads, backend, repeat=True)
    assert got[:, 1].tolist() == [2, 2, 1] and got[:, 3].tolist() == [1, 1, 0]
    assert got[:, 2].tolist() == [100.0, 101.0, 102.0]
    _check(grads, backend, _xform(3), 2.0, ALL)


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_sizes_around_the_work_items(backend, dtype):
    grads = [_with_specials(torch.randn(n) * 3, k).to(dtype) for k, n in enumerate(EDGE_SIZES)]
    _check(grads, backend, repeat=True)
    _check(grads, backend, _xform(len(grads)), 2.5, ALL)


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_empty_and_one_element_tensors(backend):
    grads = [torch.empty(0), torch.tensor([-3.0]), torch.empty(0), torch.tensor([NAN]),
             torch.tensor([-INF]), torch.tensor([-0.0])]
    got = _check(grads, backend)
    assert got.tolist() == [[0, 0, 0, 0], [9, 0, 3, 0], [0, 0, 0, 0], [0, 1, 0, 1], [0, 1, 0, 0],
                            [0, 0, 0, 0]]
    _check(grads, backend, _xform(len(grads)), 2.5, ALL)
    # only empty tensors: no work item at all
    assert _check([torch.empty(0)] * 3, backend).abs().sum().item() == 0


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_more_tensors_than_one_launch(backend):
    # two CUDA launches and a part, with the per-tensor rows and outputs offset per launch
    n = 2 * CUDA_CHUNK + 5
    sizes = torch.randint(0, 400, (n,)).tolist()
    sizes[CUDA_CHUNK - 1], sizes[CUDA_CHUNK] = 0, 9000  # an empty tensor ends the first chunk
    grads = [_with_specials(torch.randn(s) * 2, k) for k, s in enumerate(sizes)]
    _check(grads, backend, repeat=True)
    _check(grads, backend, _xform(n), 1.5, ALL)
    _check(grads, backend, None, 1.5, clip_ref.VALUE_CLIP)


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_mixed_dtypes_in_one_call(backend):
    dtypes = (torch.bfloat16, torch.float32, torch.float16)
    sizes = (7, 0, 8193, 300, 1, 20_000, 64, 5000)
    grads = [_with_specials(torch.randn(s) * 3, k).to(dtypes[k % 3])
             for k, s in enumerate(sizes)]
    _check(grads, backend)
    _check(grads, backend, _xform(len(grads)), 2.0, ALL)


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_invalid_arguments_raise(backend):
    grads = [torch.randn(10)]
    with pytest.raises(ValueError, match="per-tensor"):  # a per-tensor step without its table
        ops.grad_stats(grads, backend, None, 0.0, clip_ref.TENSOR_SCALE)
    with pytest.raises(ValueError, match="flags"):  # not a transform flag
        ops.grad_stats(grads, backend, _xform(1), 0.0, 1)


def test_cuda_workspace_is_checked():
    sim = _ext.C_SIM
    assert sim is not None, "build lowbit with LOWBIT_SIM=1 (make test does)"
    sizes = [8193, 0, 1]
    need = sim.grad_stats_workspace(sizes)
    assert need == 3 * 32  # one 32-byte partial per 8192-element work item
    assert sim.grad_stats_workspace([0, 0]) == 0
    grads = [torch.randn(s) for s in sizes]
    out = torch.zeros(3, 4, dtype=torch.float64)
    ws = torch.empty(need // 8, dtype=torch.float64)
    args = ([g.data_ptr() for g in grads], sizes, 0, 0, 0.0, 0, out.data_ptr(), 0, 0, 0, 0,
            ws.data_ptr())  # (tau, over, over_count, capacity: no capture)
    with pytest.raises(ValueError, match="grad_stats"):
        sim.grad_stats(*args, need - 1)
    sim.grad_stats(*args, need)
    _assert_stats_equal(out, SPEC(grads))


# --- the capture (elements above a per-tensor threshold, for Stable-SPAM's AdaGN) --------------

def _capture(grads, backend, tau, capacity):
    over = torch.zeros(len(grads), capacity)
    count = torch.zeros(len(grads), dtype=torch.int64)
    stats = ops.grad_stats(grads, backend, tau=tau, over=over, over_count=count)
    return stats, over, count


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_capture_above_threshold(backend, dtype):
    # each tensor's finite |g| > tau: counted exactly, and stored (as a set) while they fit;
    # thresholds from 0 (everything) to above the maximum (nothing); the statistics unchanged
    sizes = (1, 300, 8193, 2**16 + 3, 40, 0)
    grads = [_with_specials(torch.randn(s) * 2, k).to(dtype) for k, s in enumerate(sizes)]
    tau = torch.tensor([-1.0, 4.0, 5.5, 6.0, 1e9, 0.0])  # (negative: every finite element)
    stats, over, count = _capture(grads, backend, tau, 64)
    _assert_stats_equal(stats, SPEC(grads))
    for i, g in enumerate(grads):
        a = g.float().abs()
        want = a[torch.isfinite(a) & (a > tau[i])].sort().values
        assert int(count[i]) == want.numel(), i
        if want.numel() <= 64:
            got = over[i, :want.numel()].sort().values
            assert torch.equal(got, want), i
            assert (over[i, want.numel():] == 0).all(), i
        else:  # overflow: the row holds captured values, which ones is unspecified
            assert (over[i] > tau[i]).all(), i
    assert 0 < int(count[2]) <= 64 and int(count[3]) > 64 and int(count[4]) == 0


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_capture_needs_raw_gradients(backend):
    grads = [torch.randn(10)]
    with pytest.raises(ValueError, match="capture"):
        ops.grad_stats(grads, backend, None, 1.0, clip_ref.VALUE_CLIP, torch.zeros(1),
                       torch.zeros(1, 4), torch.zeros(1, dtype=torch.int64))
