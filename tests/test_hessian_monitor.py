"""SharpnessMonitor on quadratics with a known top eigenvalue: the reading, the threshold, warm
starts, the CSV and the plot, the Adam preconditioner (torch and lowbit 32/8-bit states)."""
import csv

import pytest
import torch
import torch.nn as nn

import lowbit.hessian as H
import lowbit.optim
from lowbit.reference import optim as ref

D = torch.float64


class Quadratic(nn.Module):
    """f(θ) = ½ θᵀAθ with A = Q diag(eigs) Qᵀ."""

    def __init__(self, eigs, dtype=D, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = len(eigs)
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
        self.register_buffer("A", (Q @ torch.diag(torch.tensor(eigs, dtype=D)) @ Q.T).to(dtype))
        self.theta = nn.Parameter(torch.randn(n, generator=g, dtype=D).to(dtype))

    def forward(self):
        return 0.5 * self.theta @ self.A @ self.theta


EIGS = [10.0, 8.0, 7.5] + torch.linspace(0.1, 7.0, 37).tolist()
# A Ritz value with residual r is within r²/gap of an eigenvalue; the monitor stops at
# r <= tol·λ (tol = 1e-3), so with the gap 10 − 8 a reading is within (1e-3·10)²/2 of 10.
REL = (1e-3 * 10.0) ** 2 / 2 / 10.0


def test_stability_thresholds():
    assert H.stability_threshold(0.1) == pytest.approx(20.0)
    assert H.stability_threshold(0.1, rule="heavy_ball", momentum=0.9) == pytest.approx(38.0)
    assert H.stability_threshold(0.1, rule="nesterov", momentum=0.9) == pytest.approx(
        3.8 / (0.1 * 2.8))
    assert H.stability_threshold(1e-3, rule="adam", beta1=0.9) == pytest.approx(38.0 / 1e-3)
    with pytest.raises(ValueError, match="rule"):
        H.stability_threshold(0.1, rule="lion")


def test_reading_threshold_warm_start_csv_and_plot(tmp_path):
    model = Quadratic(EIGS)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    path = tmp_path / "sharpness.csv"
    mon = H.SharpnessMonitor(model, model, every=5, optimizer=opt, csv_path=path,
                             plot_path=tmp_path / "sharpness.png")
    cold = H.SharpnessMonitor(model, model, every=5, optimizer=opt, warm_start=False)
    rows = []
    for step in range(16):
        opt.zero_grad()
        model().backward()
        opt.step()
        row = mon.maybe_measure(step)
        assert (row is None) == (step % 5 != 0)
        if row is not None:
            rows.append(row)
            cold.measure(step)
    assert [r["step"] for r in rows] == [0, 5, 10, 15]
    for r in rows:  # H = A does not move: every reading is λ_max(A) = 10
        assert r["sharpness"] == pytest.approx(10.0, rel=REL)
        assert r["rule"] == "heavy_ball" and r["threshold"] == pytest.approx(3.8 / 0.05)
        assert r["ratio"] == pytest.approx(r["sharpness"] / 76.0, rel=1e-12)
        assert r["converged"] and r["hvp_method"] == "double_backward"
        assert not r["preconditioned"]
    # warm starts from the previous eigenvector need fewer HVPs than cold starts
    assert rows[0]["hvps"] == cold.history[0]["hvps"]
    assert all(r["hvps"] <= 3 for r in rows[1:])
    assert all(c["hvps"] >= 2 * r["hvps"] for c, r in zip(cold.history[1:], rows[1:]))
    assert all(c["sharpness"] == pytest.approx(10.0, rel=REL) for c in cold.history)
    # one CSV row per reading, under a header
    with open(path) as fh:
        got = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in got] == [0, 5, 10, 15]
    assert list(got[0].keys()) == list(H.monitor.COLUMNS)
    assert float(got[2]["sharpness"]) == pytest.approx(rows[2]["sharpness"], rel=1e-9)
    assert float(got[2]["threshold"]) == pytest.approx(76.0)
    data = open(tmp_path / "sharpness.png", "rb").read()
    assert data[:4] == b"\x89PNG" and len(data) > 5000


def test_lr_schedule_and_power_method_and_finite_differences():
    model = Quadratic(EIGS, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = H.SharpnessMonitor(model, model, every=1, optimizer=opt, method="power",
                             max_steps=500, tol=1e-7)
    r = mon.measure(0)
    assert r["sharpness"] == pytest.approx(10.0, rel=1e-6) and r["threshold"] == 20.0
    opt.param_groups[0]["lr"] = 0.25
    assert mon.measure(1)["threshold"] == pytest.approx(8.0)  # and sharpness 10 > 2/η
    fd = H.SharpnessMonitor(model, model, lr=0.1, hvp_method="finite_difference")
    r = fd.measure(0)
    assert r["hvp_method"] == "finite_difference"
    assert r["sharpness"] == pytest.approx(10.0, rel=REL + 1e-9)


def dense_preconditioned_top(model, P):
    s = P.double().rsqrt()
    return float(torch.linalg.eigvalsh(s[:, None] * model.A.double() * s[None, :])[-1])


def test_adam_preconditioned_sharpness_from_torch_adam():
    model = Quadratic(EIGS, seed=2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    mon = H.SharpnessMonitor(model, model, optimizer=opt, tol=1e-9)
    with pytest.raises(RuntimeError, match="first optimizer step"):
        mon.measure(0)
    for _ in range(5):
        opt.zero_grad()
        model().backward()
        opt.step()
    st = opt.state[model.theta]
    P = (st["exp_avg_sq"] / (1 - 0.99 ** float(st["step"]))).sqrt() + 1e-8
    r = mon.measure(5)
    assert r["preconditioned"] and r["rule"] == "adam"
    assert r["threshold"] == pytest.approx(38.0 / 0.01)
    assert r["sharpness"] == pytest.approx(dense_preconditioned_top(model, P), rel=1e-7)
    # the same with P passed explicitly (tensors, or a callable), and raw sharpness
    r2 = H.SharpnessMonitor(model, model, lr=0.01, rule="adam", beta1=0.9, tol=1e-9,
                            preconditioner=lambda: [P]).measure()
    assert r2["sharpness"] == pytest.approx(r["sharpness"], rel=1e-7)
    raw = H.SharpnessMonitor(model, model, optimizer=opt, preconditioner="none").measure()
    assert raw["sharpness"] == pytest.approx(10.0, rel=REL)
    assert raw["threshold"] != raw["threshold"]  # NaN: raw sharpness has no Adam threshold


def test_adam_preconditioner_from_lowbit_8bit_states():
    model32 = Quadratic(EIGS * 8, dtype=torch.float32, seed=3)  # 320 elements
    model8 = Quadratic(EIGS * 8, dtype=torch.float32, seed=3)
    opt32 = lowbit.optim.AdamW(model32.parameters(), lr=1e-3, weight_decay=0.0)
    opt8 = lowbit.optim.AdamW8bit(model8.parameters(), lr=1e-3, weight_decay=0.0,
                                  min_quant_numel=0)
    for _ in range(4):
        for m, o in ((model32, opt32), (model8, opt8)):
            o.zero_grad()
            m().backward()
            o.step()
    assert "exp_avg_sq_codes" in opt8.state[model8.theta]  # the states really are 8-bit
    st = opt32.state[model32.theta]
    P32 = (st["exp_avg_sq"].double() / (1 - 0.999 ** float(st["step"]))).sqrt() + 1e-8
    assert torch.allclose(H.adam_preconditioner(opt32, [model32.theta])[0], P32, rtol=1e-6)
    P8 = H.adam_preconditioner(opt8, [model8.theta])[0]
    # P comes from the dequantized 8-bit codes (lowbit.reference's dequantization of the state)
    st8 = opt8.state[model8.theta]
    v8 = ref.dequantize_state(st8["exp_avg_sq_codes"], st8["exp_avg_sq_absmax"], 1, 8,
                              model8.theta.shape, 256).double()
    assert torch.allclose(P8, (v8 / (1 - 0.999 ** 4)).sqrt() + 1e-8, rtol=1e-6, atol=0)
    rel = (P8 / P32 - 1).abs()  # 8-bit v: ~1% on average, more on tiny elements of a block
    assert float(rel.mean()) < 0.03 and float(rel.max()) < 0.3
    r32 = H.SharpnessMonitor(model32, model32, optimizer=opt32, tol=1e-7).measure()
    r8 = H.SharpnessMonitor(model8, model8, optimizer=opt8, tol=1e-7).measure()
    assert r32["sharpness"] == pytest.approx(dense_preconditioned_top(model32, P32), rel=1e-5)
    assert r8["sharpness"] == pytest.approx(dense_preconditioned_top(model8, P8), rel=1e-5)
    # λ_max(P⁻¹H) is governed by the smallest entries of v, which block-wise 8-bit codes
    # resolve worst: the 8-bit reading is near the 32-bit one, not equal to it
    assert r8["sharpness"] == pytest.approx(r32["sharpness"], rel=0.25)
    assert r8["threshold"] == pytest.approx(38.0 / 1e-3)


def test_monitor_errors():
    model = Quadratic(EIGS)
    with pytest.raises(ValueError, match="lr="):
        H.SharpnessMonitor(model, model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="Adam-family"):
        H.SharpnessMonitor(model, model, optimizer=sgd, preconditioner="optimizer")
    frozen = torch.zeros(3)
    with pytest.raises(ValueError, match="does not require grad"):
        H.SharpnessMonitor(lambda: frozen.sum(), [frozen], lr=0.1)
    with pytest.raises(TypeError, match="scalar tensor"):
        H.SharpnessMonitor(lambda: (model(), 0), model, lr=0.1).measure()
    with pytest.raises(ValueError, match="every"):
        H.SharpnessMonitor(model, model, lr=0.1, every=0)
    other = nn.Parameter(torch.zeros(3, dtype=D))
    adam = torch.optim.Adam([other], lr=0.1)
    with pytest.raises(ValueError, match="not optimized by the optimizer"):
        H.SharpnessMonitor(model, model, optimizer=adam).measure()
