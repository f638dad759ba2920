"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90 (no GPU needed).

The suite runs the Triton kernels under TRITON_INTERPRET=1, which never lowers them, so GPU-only
compile errors and codegen regressions would go unnoticed. Here each kernel variant the wrappers
can launch is compiled to PTX with triton's own backend and the PTX is checked for the
instructions bit-exactness depends on: IEEE division (div.rn.f32, never the approximate
div.full.f32 / div.approx.f32 that `/` gives) and no fma.rn.f32 (the launches pass
enable_fp_fusion=False; a contracted a*b+c rounds once instead of twice).

With TRITON_INTERPRET=1 in the environment `@triton.jit` returns interpreter objects that cannot be
compiled, so the compile runs in a subprocess (this file run as a script) with the variable
removed; one subprocess per target, in parallel.
"""
import json
import os
import subprocess
import sys
import time

TARGETS = ((80, "sm_80"), (90, "sm_90"))
# Small tiles keep the compile fast (Triton unrolls the per-thread elements: a 2048-element tile
# takes 1.5-4 s to compile, 128 elements 0.1-0.4 s); the instruction mix checked here does not
# depend on the tile size. One variant per kernel family is also built at the tile the wrappers
# launch on a GPU (2048 quantization elements, 1024 rounding elements, 4096 statistics elements),
# to catch size-dependent failures. The statistics kernel must also square in float64.
SMALL = (64, 2)
GPU_TILE = (256, 8)


def _variants():
    """(label, kernel name, signature, constexprs, options) for each kernel variant to compile.

    Runtime ints are typed as the wrappers' int64 path (n > 2**31, large seeds and offsets)."""
    from lowbit.reference import clip as clip_ref
    from lowbit.reference import optim as ref
    from lowbit.triton_kernels._common import FORMATS, KINDS
    from lowbit.triton_kernels.stats import GPU_TILE as STATS_GPU_TILE

    import torch

    out = []
    x_ptr = {0: "*fp32", 1: "*i16", 2: "*i16"}
    for kind in (0, 1, 2):
        for ncode in (16, 256):
            for stochastic in (False, True):
                tiles = [SMALL] + ([GPU_TILE] if (kind, ncode, stochastic) == (1, 16, True)
                                   else [])
                for block, rows in tiles:
                    sig = {"x_ptr": x_ptr[kind], "code_ptr": "*fp32", "mids_ptr": "*fp32",
                           "codes_ptr": "*u8", "absmax_ptr": "*fp32", "n": "i64",
                           "nblocks": "i64", "seed": "i64", "offset": "i64"}
                    const = {"IN_KIND": kind, "BLOCK": block, "ROWS": rows, "NCODE": ncode,
                             "STOCHASTIC": stochastic}
                    out.append((f"quantize kind={kind} ncode={ncode} st={stochastic} "
                                f"block={block} rows={rows}", "quant._quantize_kernel", sig,
                                const, True))
    for kind, dtype in ((0, torch.float32), (1, torch.bfloat16), (2, torch.float16)):
        fmt = FORMATS.get(dtype, (0, 0, 0, 0, 0, 0, False))
        for ncode, (block, rows) in ((16, SMALL), (256, SMALL), (16, GPU_TILE)):
            if (block, rows) == GPU_TILE and kind != 1:
                continue
            sig = {"codes_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
                   "out_ptr": "*fp32" if kind == 0 else "*i16", "n": "i64", "nblocks": "i64"}
            const = {"OUT_KIND": kind, "BLOCK": block, "ROWS": rows, "NCODE": ncode,
                     "MBITS": fmt[1],
                     "EMIN": fmt[2], "MAX_FINITE": fmt[3], "OVERFLOW": fmt[4], "NAN": fmt[5],
                     "NAN_KEEPS_SIGN": fmt[6]}
            out.append((f"dequantize out={dtype} ncode={ncode} block={block} rows={rows}",
                        "quant._dequantize_kernel", sig, const, False))
    for dtype, fmt in FORMATS.items():
        for elems in (128, 1024) if dtype == torch.float8_e4m3fn else (128,):
            sig = {"x_ptr": "*fp32", "out_ptr": "*i16" if fmt[0] == 16 else "*u8", "n": "i64",
                   "seed": "i64", "offset": "i64"}
            const = dict(zip(("WIDTH", "MBITS", "EMIN", "MAX_FINITE", "OVERFLOW", "NAN",
                              "NAN_KEEPS_SIGN"), fmt), ELEMS=elems)
            out.append((f"stochastic_round to {dtype} elems={elems}",
                        "rounding._stochastic_round_kernel", sig, const, False))
    # the raw Philox words behind the Hessian probes: one word and all four (a seed above 2**63
    # reaches the kernel as u64)
    for words, seed_t in ((1, "i64"), (4, "u64")):
        out.append((f"philox_words words={words}", "rounding._philox_words_kernel",
                    {"out_ptr": "*i32", "n": "i64", "seed": seed_t, "counter0": "i64"},
                    {"WORDS": words, "ELEMS": 1024}, False))
    # fused optimizer step: every rule, state format and param write-back at least once (fp32 and
    # bf16 params, fp16 kahan for its widening), and the 4-bit tile the wrapper launches on a GPU
    # (16 blocks of 128). Lion and SGD divide only when requantizing (1 / absmax).
    optim = [  # kind, nstates, state_bits, tile, param dtype, writeback, flags
        ("adam", 2, 32, SMALL, torch.float32, "f32", ref.DECAY),
        ("adam", 2, 8, SMALL, torch.bfloat16, "stochastic", ref.DECAY),
        ("adam", 2, 4, SMALL, torch.bfloat16, "kahan", ref.MAXIMIZE | ref.L2),
        ("lion", 1, 8, SMALL, torch.float32, "f32", ref.DECAY | ref.MAXIMIZE),
        ("lion", 1, 32, SMALL, torch.bfloat16, "stochastic", ref.DECAY),
        ("sgd", 1, 4, SMALL, torch.bfloat16, "nearest", ref.L2 | ref.NESTEROV),
        ("sgd", 0, 32, SMALL, torch.float16, "kahan", ref.NO_MOMENTUM),
        ("adam", 2, 4, (128, 16), torch.bfloat16, "stochastic", ref.DECAY),
    ]
    # (the last two again with rank-1 second states: per-element scales from row/column maxima)
    rank1 = {len(optim) - 1, len(optim) - 6}
    optim += [optim[i] for i in sorted(rank1)]
    # and the clipping policies' part (lowbit.clip): every transform step, spike clip (its square
    # root), reset, SPAM's decay order, the per-tensor clip row and the clipped-element counter
    clipped = [("adam", 2, 8, SMALL, torch.bfloat16, "stochastic", ref.DECAY | ref.CLIP_FLAGS),
               ("lion", 1, 32, SMALL, torch.float32, "f32", ref.DECAY | ref.CLIP_FLAGS),
               ("sgd", 1, 32, SMALL, torch.float32, "f32",
                clip_ref.VALUE_CLIP | clip_ref.NORM_SCALE)]
    # the curvature optimizers: Sophia (Hessian EMA, clipped ratio, signed second state) and
    # AdaHessian (Adam's v from the estimate, hessian_power 1/2: two square roots)
    clipped += [("sophia", 2, 8, SMALL, torch.bfloat16, "stochastic",
                 ref.DECAY | ref.HESS_EMA | clip_ref.VALUE_CLIP),
                ("sophia", 2, 4, SMALL, torch.float32, "f32", ref.HESS_EMA | ref.SOPHIA_ADD_EPS),
                ("adam", 2, 8, SMALL, torch.float32, "f32",
                 ref.DECAY | ref.HESS_V | ref.HESS_EMA | ref.QUARTER)]
    first_clipped = len(optim)
    optim += clipped
    # the update-clipping statistics pass (RMS: no stores, a float64 atomic sum per program)
    first_rms = len(optim)
    optim += [("adam", 2, 8, SMALL, torch.bfloat16, "kahan",
               ref.L2 | clip_ref.VALUE_CLIP | clip_ref.TENSOR_SCALE | ref.SPIKE_CLIP | ref.RESET),
              ("adam", 2, 4, SMALL, torch.float32, "f32", ref.DECAY | ref.UPDATE_SCALE)]
    for number, (kind, nstates, bits, (block, rows), dtype, writeback, flags) in enumerate(optim):
        sig = {"work_ptr": "*i64", "tab_ptr": "*i64", "sc_ptr": "*fp32", "code1_ptr": "*fp32",
               "mids1_ptr": "*fp32", "code2_ptr": "*fp32", "mids2_ptr": "*fp32"}
        fmt = FORMATS.get(dtype, (0, 0, 0, 0, 0, 0, False))[1:]
        const = dict(zip(("MBITS", "EMIN", "MAX_FINITE", "OVERFLOW", "NAN", "NAN_KEEPS_SIGN"),
                         fmt),
                     KIND=ref.KINDS[kind], NSTATES=nstates, STATE_BITS=bits, BLOCK=block,
                     ROWS=rows, NCODE={32: 0, 8: 256, 4: 16}[bits],
                     P_KIND=KINDS[dtype],
                     WRITEBACK=ref.WRITEBACK[writeback],
                     **{name: bool(flags & bit) for name, bit in (
                         ("MAXIMIZE", ref.MAXIMIZE), ("DECAY", ref.DECAY), ("L2", ref.L2),
                         ("NESTEROV", ref.NESTEROV), ("FIRST_STEP", ref.FIRST_STEP),
                         ("NO_MOMENTUM", ref.NO_MOMENTUM))},
                     RANK1=first_clipped - len(rank1) <= number < first_clipped,
                     **{name: bool(flags & bit) for name, bit in (
                         ("VALUE_CLIP", clip_ref.VALUE_CLIP),
                         ("TENSOR_SCALE", clip_ref.TENSOR_SCALE),
                         ("ADA_CLIP", clip_ref.ADA_CLIP), ("NORM_SCALE", clip_ref.NORM_SCALE),
                         ("SPIKE_CLIP", ref.SPIKE_CLIP), ("RESET", ref.RESET),
                         ("DECAY_AFTER", ref.DECAY_AFTER), ("UPDATE_SCALE", ref.UPDATE_SCALE),
                         ("HESS_EMA", ref.HESS_EMA), ("HESS_V", ref.HESS_V),
                         ("QUARTER", ref.QUARTER), ("SOPHIA_ADD_EPS", ref.SOPHIA_ADD_EPS))},
                     HAS_CLIP_ROW=bool(flags & ref.PER_TENSOR_FLAGS),
                     COUNT=first_clipped <= number < first_rms, RMS=number >= first_rms)
        out.append((f"optim {kind} state_bits={bits} {dtype} {writeback} flags={flags} "
                    f"block={block} rows={rows} rank1={const['RANK1']}", "optim._optim_kernel",
                    sig, const, kind in ("adam", "sophia") or bits != 32))
    # the rank-1 prepass (no division: it only decodes, computes v and takes maxima)
    for dtype, writeback, flags, (tr, tc) in (
            (torch.float32, "f32", ref.DECAY, (2, 64)),
            (torch.bfloat16, "kahan", ref.L2 | ref.MAXIMIZE, (2, 64)),
            (torch.bfloat16, "stochastic", ref.DECAY, (8, 256))):
        sig = {"work_ptr": "*i64", "tab_ptr": "*i64", "sc_ptr": "*fp32", "code2_ptr": "*fp32"}
        const = dict(P_KIND=KINDS[dtype], WRITEBACK=ref.WRITEBACK[writeback],
                     NEED_P=bool(flags & ref.L2), MAXIMIZE=bool(flags & ref.MAXIMIZE),
                     DECAY=bool(flags & ref.DECAY), L2=bool(flags & ref.L2), TR=tr, TC=tc)
        out.append((f"rank1 maxima {dtype} {writeback} flags={flags} tile={tr}x{tc}",
                    "optim._rank1_maxima_kernel", sig, const, False))
    # statistics pass: every grad dtype without the transform, the full transform on bf16 (at the
    # GPU tile too), the capture (atomic slots; raw gradients only) on bf16 and fp32, and the
    # combine; squares and sums in float64, no division
    small = SMALL[0] * SMALL[1]
    stats = [(0, 0, small, False), (1, 0, small, False), (2, 0, small, False),
             (1, clip_ref.TRANSFORM_FLAGS, small, False), (0, clip_ref.VALUE_CLIP, small, False),
             (1, clip_ref.TRANSFORM_FLAGS, STATS_GPU_TILE, False), (1, 0, small, True),
             (0, 0, STATS_GPU_TILE, True)]
    for kind, flags, tile, capture in stats:
        sig = {"work_ptr": "*i64", "tab_ptr": "*i64", "cv_ptr": "*fp32", "psum_ptr": "*fp64",
               "pcnt_ptr": "*i64", "pmax_ptr": "*i32", "tau_ptr": "*fp32", "over_ptr": "*fp32",
               "count_ptr": "*i64", "capacity": "i64"}
        const = dict(TILE=tile, G_KIND=kind, CAPTURE=capture,
                     **{name: bool(flags & bit) for name, bit in (
                         ("VALUE_CLIP", clip_ref.VALUE_CLIP),
                         ("TENSOR_SCALE", clip_ref.TENSOR_SCALE),
                         ("ADA_CLIP", clip_ref.ADA_CLIP), ("NORM_SCALE", clip_ref.NORM_SCALE))})
        out.append((f"grad_stats kind={kind} flags={flags} tile={tile} capture={capture}",
                    "stats._stats_kernel", sig, const, False))
    sig = {"first_ptr": "*i64", "psum_ptr": "*fp64", "pcnt_ptr": "*i64", "pmax_ptr": "*i32",
           "out_ptr": "*fp64"}
    out.append(("grad_stats combine", "stats._combine_kernel", sig, {"BLOCK": 128}, False))
    # lowprec: the launches of the wrapper's own plan (lowprec.launch, GPU tiles) for small
    # shapes, every pass, format, scaling and rotation kind; then two at the full GPU tile (a
    # 2048-element tile with a 128 rotation, and one 8192-column row). Quantizing passes divide.
    from lowbit.triton_kernels import lowprec as lp
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    calls = [  # dtype, R, C, fmt, scaling, block, e8m0, stochastic, hadamard, codes, out
        (f32, 2, 64, -1, 0, 1, False, False, 16, False, True),
        (bf16, 4, 4096, -1, 0, 1, False, False, 4096, False, True),
        (f32, 2, 100, 0, 0, 48, False, False, 0, True, True),
        (bf16, 2, 64, 2, 0, 32, True, True, 16, True, True),
        (f16, 2, 128, 4, 0, 8, True, False, 64, False, True),
        (f16, 2, 96, 3, 1, 32, False, True, 32, True, False),
        (bf16, 2, 64, 1, 0, 24, False, True, 16, True, True),
        (f32, 4, 64, 2, 2, 32, True, False, 16, True, True),
        (f16, 4, 64, 0, 3, 32, False, False, 0, False, True),
        (bf16, 1, 2 * lp.MAX_FUSED_GROUP, 4, 1, 32, True, True, 0, True, True),
        (bf16, 64, 1024, 2, 0, 32, True, True, 128, True, True),
        (f32, 1, lp.MAX_FUSED_GROUP, 0, 1, 32, False, False, 0, True, True),
    ]
    ptr = {f32: "*fp32", bf16: "*i16", f16: "*i16"}
    for dtype, rows, cols, fmt, scaling, block, e8m0, stochastic, hb, codes, out_ in calls:
        plan = lp.launch(dtype, rows, cols, fmt, scaling, block, e8m0, stochastic, hb, codes,
                         out_)
        sig = {"x_ptr": ptr[dtype], "codes_ptr": "*u8", "scales_ptr": "*u8" if e8m0 else "*fp32",
               "out_ptr": ptr[dtype], "amax_ptr": "*i32", "R": "i64", "C": "i64", "B": "i64",
               "nb": "i64", "nps": "i64", "seed": "i64", "offset": "i64", "norm": "fp32"}
        for p in plan.passes:
            const = dict(plan.const, PASS=p)
            out.append((f"lowprec {dtype} {rows}x{cols} fmt={fmt} scaling={scaling} "
                        f"block={block} e8m0={e8m0} st={stochastic} hadamard={hb} pass={p} "
                        f"tile={const['TR']}x{const['NSEG']}x{const['SEGP']}",
                        "lowprec._lowprec_kernel", sig, const, fmt >= 0 and p != lp.PASS_ABSMAX))
    return out


def _worker(cc: int) -> None:
    """Compile every variant for cuda cc (80 / 90) and print one JSON line of PTX facts each."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lowbit.triton_kernels._common import LAUNCH_OPTS

    target = GPUTarget("cuda", cc, 32)
    for label, name, sig, const, divides in _variants():
        mod_name, fn_name = name.split(".")
        fn = getattr(importlib.import_module(f"lowbit.triton_kernels.{mod_name}"), fn_name)
        full_sig = dict(sig, **{k: "constexpr" for k in const})
        t0 = time.perf_counter()
        kernel = triton.compile(ASTSource(fn=fn, signature=full_sig, constexprs=const),
                                target=target, options=dict(LAUNCH_OPTS, num_warps=4))
        ptx = kernel.asm["ptx"]
        print(json.dumps({
            "label": label, "divides": divides, "seconds": time.perf_counter() - t0,
            "ptx_chars": len(ptx), "cubin_bytes": len(kernel.asm.get("cubin", b"")),
            "div_rn": ptx.count("div.rn.f32"), "div_full": ptx.count("div.full.f32"),
            "div_approx": ptx.count("div.approx"), "fma": ptx.count("fma.rn.f32"),
            # only Adam takes a square root
            "sqrt": (name == "optim._optim_kernel" and const["KIND"] == 0
                     and not const["RMS"]),
            "sqrt_rn": ptx.count("sqrt.rn.f32"),
            "sqrt_approx": ptx.count("sqrt.approx"),
            # the statistics pass squares in float64 (exact), never in fp32
            "f64_square": name == "stats._stats_kernel",
            "mul_f64": ptx.count("mul.rn.f64") + ptx.count("fma.rn.f64"),
            "target": f".target sm_{cc}" in ptx}), flush=True)


def test_triton_kernels_compile_for_sm80_and_sm90(tmp_path):
    import pytest

    pytest.importorskip("triton")
    from lowbit.triton_kernels._common import LAUNCH_OPTS
    assert LAUNCH_OPTS.get("enable_fp_fusion") is False, "launches must turn FMA contraction off"

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")   # a real compile, not a cache hit
    start = time.perf_counter()
    procs = {arch: subprocess.Popen([sys.executable, __file__, str(cc)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cc, arch in TARGETS}
    results = {}
    for arch, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, f"AOT compile for {arch} failed:\n{stderr[-4000:]}"
        results[arch] = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    elapsed = time.perf_counter() - start

    n_variants = len(_variants())
    problems = []
    for arch, rows in results.items():
        assert len(rows) == n_variants, f"{arch}: compiled {len(rows)} of {n_variants} variants"
        for r in rows:
            where = f"{arch} {r['label']}"
            if r["ptx_chars"] == 0 or r["cubin_bytes"] == 0 or not r["target"]:
                problems.append(f"{where}: no PTX/cubin for the target")
            if r["divides"] and r["div_rn"] == 0:
                problems.append(f"{where}: no div.rn.f32 (x / absmax must be IEEE division)")
            if r["div_full"] or r["div_approx"]:
                problems.append(f"{where}: approximate division in the PTX")
            if r["sqrt"] and r["sqrt_rn"] == 0:
                problems.append(f"{where}: no sqrt.rn.f32 (the Adam denominator is IEEE sqrt)")
            if r["f64_square"] and r["mul_f64"] == 0:
                problems.append(f"{where}: no float64 product (squares must be exact)")
            if r["sqrt_approx"]:
                problems.append(f"{where}: approximate square root in the PTX")
            if r["fma"]:
                problems.append(f"{where}: {r['fma']} fma.rn.f32 although fusion is off")
    assert not problems, "\n".join(problems)
    print(f"AOT: {n_variants} variants x {len(TARGETS)} targets in {elapsed:.1f} s")


if __name__ == "__main__":
    _worker(int(sys.argv[1]))
