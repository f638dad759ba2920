"""The microbenchmark runner (bench/run.py) in its --quick mode: it runs every family on tiny
sizes in a subprocess and writes a well-formed report, results JSON and charts. Timings are never
asserted (the machine is shared); only that the outputs exist and hold what they should."""
import importlib.util
import json
import os
import subprocess
import sys

import lowbit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "bench", "run.py")
FAMILIES = ["quant", "rounding", "optim", "clip", "hvp", "dist", "nn"]
COLUMNS = ["group", "implementation", "kind", "ms (median)", "reps", "GB/s", "x copy BW",
           "x best peer", "note"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(*argv, timeout=240):
    env = dict(os.environ)
    env.pop("LOWBIT_BENCH_REEXEC", None)  # let the runner do its own malloc / threads re-exec
    # the lowbit this suite imports, whether installed or on PYTHONPATH
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(lowbit.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, RUNNER, *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _tables(report):
    """{family: (header cells, [row cells])} of the report's family sections."""
    out, fam, lines = {}, None, report.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## "):
            fam = line[3:].split(" — ")[0]
        elif fam and line.startswith("| ") and fam not in out:
            cells = lambda s: [c.strip() for c in s.strip().strip("|").split("|")]  # noqa: E731
            rows = []
            for body in lines[i + 2:]:
                if not body.startswith("|"):
                    break
                rows.append(cells(body))
            out[fam] = (cells(line), rows)
    return out


def test_quick_run_writes_a_report_per_family(tmp_path):
    # one thread: with the other test worker busy, two OpenMP threads would wait on each other
    res = _run("--quick", "--threads", "1", "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]

    report = (tmp_path / "report.md").read_text()
    assert "`python bench/run.py --quick --threads 1 --out" in report
    assert "machine:" in report and "fp32 copy bandwidth" in report
    tables = _tables(report)
    for fam in FAMILIES:
        assert fam in tables, f"no table for {fam}"
        header, rows = tables[fam]
        assert header == COLUMNS
        assert rows and all(len(r) == len(COLUMNS) for r in rows)
        assert any(r[2] == "lowbit" for r in rows)
        assert all(float(r[3]) >= 0 for r in rows)

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quick"] is True and results["copy_gbps"] > 0
    assert results["families"] == FAMILIES
    fam_rows = [r for r in results["rows"] if r["family"] != "bandwidth"]
    assert {r["family"] for r in fam_rows} == set(FAMILIES)
    for r in results["rows"]:
        assert isinstance(r["time_s"], float) and r["time_s"] > 0, r
        assert r["kind"] in ("lowbit", "peer", "baseline")
        if r["bytes"] is not None:
            assert r["gbps"] > 0 and r["x_copy_bw"] > 0
    # the rows the report shows are the JSON's
    assert sum(len(tables[f][1]) for f in FAMILIES) == len(fam_rows)

    if importlib.util.find_spec("matplotlib") is not None:
        for fam in FAMILIES:
            png = (tmp_path / f"bench_{fam}.png").read_bytes()
            assert png.startswith(PNG_MAGIC) and len(png) > 1000


def test_families_subset_and_bad_family(tmp_path):
    res = _run("--quick", "--threads", "1", "--families", "rounding", "--no-peers",
               "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-4000:]
    tables = _tables((tmp_path / "report.md").read_text())
    assert set(tables) == {"Memory-copy baselines", "rounding"}
    assert all(r[2] != "peer" for r in tables["rounding"][1])

    bad = _run("--families", "quant,nope", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "unknown families ['nope']" in bad.stderr
    assert not (tmp_path / "bad").exists()
