"""The CUDA simulator itself (csrc/sim/sim.h): barriers, warp shuffles and block reductions
must have CUDA's semantics, and misuse must raise instead of hanging. The kernels' parity with
the reference is tested with backend="cuda_sim" elsewhere."""
import pytest

from lowbit import _ext

sim = _ext.C_SIM
pytestmark = pytest.mark.skipif(sim is None, reason="lowbit._C_sim not built (LOWBIT_SIM=1)")


@pytest.mark.parametrize("nthreads", [1, 32, 96, 1024])
def test_barrier_orders_writes_before_reads(nthreads):
    out = sim.sim_selftest_barrier(nthreads, nblocks=3)
    want = [1000 + (t + 1) % nthreads + 1000000 * b for b in range(3) for t in range(nthreads)]
    assert out == want


@pytest.mark.parametrize("lane_mask", [1, 5, 16, 31])
@pytest.mark.parametrize("width", [32, 8])
def test_shfl_xor(lane_mask, width):
    out = sim.sim_selftest_shfl("xor", 64, lane_mask, width)
    for t in range(64):
        lane, src = t % 32, (t % 32) ^ lane_mask
        # a source in a later width-segment returns the caller's own value (CUDA semantics)
        want = t if src // width > lane // width else t - lane + src
        assert out[t] == 100 + want, t


@pytest.mark.parametrize("delta", [1, 4, 16])
@pytest.mark.parametrize("width", [32, 16])
def test_shfl_down(delta, width):
    out = sim.sim_selftest_shfl("down", 32, delta, width)
    for lane in range(32):
        want = lane + delta if lane % width + delta < width else lane
        assert out[lane] == 100 + want, lane


@pytest.mark.parametrize("nthreads", [32, 64, 256, 1024])
def test_block_reduce_every_thread_gets_the_result(nthreads):
    out = sim.sim_selftest_block_reduce(nthreads)
    assert set(out[0::3]) == {nthreads * (nthreads - 1) // 2}
    assert set(out[1::3]) == {nthreads - 1}
    assert set(out[2::3]) == {nthreads}   # second reduction reusing the same scratch


@pytest.mark.parametrize("nthreads, nblocks", [(32, 1), (256, 3), (1024, 2)])
def test_atomic_max_on_shared_and_global_memory(nthreads, nblocks):
    out = sim.sim_selftest_atomic_max(nthreads, nblocks)
    assert out[:nblocks] == [nthreads] * nblocks          # each block's shared maximum
    assert out[nblocks] == nthreads + 10000 * (nblocks - 1)  # over every block
    # atomicMax returns the previous value: with more than one thread some call sees a larger one
    assert out[nblocks + 1] == (nblocks if nthreads > 1 else 0)


@pytest.mark.parametrize("which, message", [
    (0, "divergent barrier"),
    (1, r"__syncthreads\(\) at .* never arrive"),
    (2, r"shuffle at .* never arrive"),
    (3, r"shuffle at .* never arrive"),
])
def test_misuse_raises_instead_of_hanging(which, message):
    with pytest.raises(RuntimeError, match=message):
        sim.sim_selftest_misuse(which)
    # the simulator is usable again afterwards
    assert sim.sim_selftest_barrier(32) == [1000 + (t + 1) % 32 for t in range(32)]
