"""The unified runner's rows, tables and files: one row per (family, group, implementation) with
its median time, the bytes it must move (None where a byte count means nothing, e.g. an HVP),
and the fp32 copy timed just before each of its repetitions; from those the effective GB/s,
the fraction of the copy bandwidth and the ratio to the fastest peer of the same group.
Also the machine description the reports start with."""
import importlib.metadata
import importlib.util
import json
import os
import platform

# (what the report calls it, import name, distribution name on PyPI)
PEERS = [("torch.optim", "torch", "torch"),
         ("bitsandbytes", "bitsandbytes", "bitsandbytes"),
         ("torchao", "torchao", "torchao"),
         ("pytorch-optimizer", "pytorch_optimizer", "pytorch_optimizer"),
         ("torch-optimi", "optimi", "torch-optimi"),
         ("sophia-opt", "sophia_opt", "sophia-opt"),
         ("PyHessian", "pyhessian", "pyhessian")]

COLUMNS = ["group", "implementation", "kind", "ms (median)", "reps", "GB/s", "x copy BW",
           "x best peer", "note"]


def peer_versions():
    """{report name: version or None when not importable}, without importing the peers."""
    out = {}
    for name, module, dist in PEERS:
        if importlib.util.find_spec(module) is None:
            out[name] = None
            continue
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "?"
    return out


def machine():
    """{cpu, cores, l3, os, load} of this machine (what the timings depend on)."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    l3 = "n/a"
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            l3 = f.read().strip()
    except OSError:
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), l3=l3,
                os=f"{platform.system()} {platform.release()}", load=load_avg())


def load_avg():
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def row(family, group, label, kind, time_s, *, reps=None, nbytes=None, copy_s=None,
        copy_bytes=None, note="", min_s=None, err=None):
    """One measurement. kind: "lowbit", "peer" (another library doing the same work) or
    "baseline" (a reference that does less, e.g. a round-to-nearest cast or a gradient)."""
    return dict(family=family, group=group, label=label, kind=kind, time_s=time_s, min_s=min_s,
                reps=reps, bytes=nbytes, copy_s=copy_s, copy_bytes=copy_bytes, note=note, err=err)


def derive(rows, copy_gbps):
    """Add gbps, x_copy_bw (GB/s over the copy bandwidth measured interleaved with the row, or
    over the run's copy bandwidth) and x_best_peer (fastest peer's time / this time, > 1: this
    row is faster) to each row."""
    for r in rows:
        r["gbps"] = r["bytes"] / r["time_s"] / 1e9 if r["bytes"] else None
        ref = (r["copy_bytes"] / r["copy_s"] / 1e9) if r["copy_s"] and r["copy_bytes"] else copy_gbps
        r["x_copy_bw"] = r["gbps"] / ref if r["gbps"] is not None and ref else None
        peers = [g for g in rows if g["family"] == r["family"] and g["group"] == r["group"]
                 and g["kind"] == "peer"]
        best = min((g["time_s"] for g in peers), default=None)
        r["x_best_peer"] = best / r["time_s"] if best else None
    return rows


def _f(v, fmt):
    return "—" if v is None else format(v, fmt)


def table(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["group"], r["label"], r["kind"], _f(r["time_s"] * 1e3, ".3f"),
            str(r["reps"]) if r["reps"] is not None else "—", _f(r["gbps"], ".2f"),
            _f(r["x_copy_bw"], ".2f"), _f(r["x_best_peer"], ".2f"),
            r["note"].replace("|", "/")]) + " |")
    return lines


LEGEND = """Legend: ms = wall time of one call or optimizer step (median over the timed repetitions,
after warm-up; each repetition follows one timed fp32 copy `dst.copy_(src)` of N elements on
separate buffers). GB/s = the bytes the operation must move (input read + output written in its
storage format; an optimizer step: parameters read + written, gradients read, every state tensor
read + written in that implementation's format) / median time; "—" where bytes mean nothing
(HVPs, eigenvalue readings). x copy BW = GB/s / the copy's GB/s measured interleaved with that
row (8 B/element), so machine noise largely cancels. x best peer = the fastest peer's median time
/ this row's (> 1: this row is faster); peers are other libraries' implementations of the same
group's work (torch.optim counts as a peer; baselines such as round-to-nearest casts or a plain
gradient do not). On a shared machine trust the in-run ratios, not the absolute ms."""


def markdown(title, header_lines, sections, notes, footer_lines):
    """sections: [(heading, intro lines, rows)]."""
    lines = [f"# {title}", ""] + header_lines + [""]
    for heading, intro, rows in sections:
        lines += [f"## {heading}", ""] + intro + ([""] if intro else [])
        lines += table(rows) if rows else ["(no rows: every implementation was skipped)"]
        lines.append("")
    lines += [LEGEND, ""]
    if notes:
        lines += ["Notes:", ""] + [f"- {s}" for s in notes] + [""]
    return "\n".join(lines + footer_lines) + "\n"


def write_json(path, meta, rows, notes):
    with open(path, "w") as f:
        json.dump(dict(meta, rows=rows, notes=notes), f, indent=1)
