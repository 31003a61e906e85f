#!/usr/bin/env python3
"""Where each benchmark case's CPU time went, from a system-wide perf record.

    bench_profile.py attach RUNS_JSONL PERF_SCRIPT_TXT

reads `perf script -F pid,tid,comm,time,period,ip,sym,dso` of a run recorded
with `perf record -a -k CLOCK_REALTIME` (so that its times are the
benchmark's epoch milliseconds), and adds to each recorded case of
RUNS_JSONL (rewritten in place) a "profile": the CPU seconds (sum of the
samples' cpu-clock periods) in the case's CPU window (cpu_from_ms to
cpu_to_ms), per process and kernel thread, with each one's top functions.
Every CRIU process is its own entry, named by the order it first ran in
the window (the dump comes before the restore), with the window's seconds
it spanned. It prints a short summary per case.
"""

import collections
import json
import re
import sys

# "  comm  pid/tid  time:  period  ip  sym (dso)"
SAMPLE = re.compile(r"\s*(.+?)\s+(\d+)/(\d+)\s+([\d.]+):\s+(\d+)\s+\S+\s+(.*?)\s+\((.*)\)\s*$")
# The programs a case runs; their threads may carry names of their own
# ("tokio-rt-worker").
PROGRAMS = ("migrate", "migrate-dst", "migrate-heap", "criu", "runc", "socat", "zstd", "tar")
TOP_PROCESSES = 8
TOP_FUNCTIONS = 5


def read_samples(path):
    samples = []
    with open(path, errors="replace") as f:
        for line in f:
            m = SAMPLE.match(line)
            if not m:
                continue
            comm, pid, _tid, t, period, sym, dso = m.groups()
            samples.append((float(t) * 1000.0, int(pid), comm, int(period), sym, dso.rsplit("/", 1)[-1]))
    samples.sort()
    return samples


def program_of(samples):
    """The program each pid runs: the first of its samples in the program's
    own code, or failing that its first thread named as one (a process
    started before perf, like the destination daemon, may have only its
    worker threads sampled, and they carry their own names)."""
    by_code, by_name = {}, {}
    for _t, pid, comm, _p, _s, dso in samples:
        if pid not in by_code and dso in PROGRAMS:
            by_code[pid] = dso
        if pid not in by_name and comm in PROGRAMS:
            by_name[pid] = comm
    return {**by_name, **by_code}


def profile(samples, programs, start_ms, end_ms):
    seconds = collections.Counter()
    functions = collections.defaultdict(collections.Counter)
    span = {}
    criu_order = []
    for t, pid, comm, period, sym, dso in samples:
        if t < start_ms or t > end_ms:
            continue
        name = programs.get(pid, comm)
        if name == "swapper":
            name = "idle"
        elif name == "criu":
            if pid not in criu_order:
                criu_order.append(pid)
            name = f"criu#{criu_order.index(pid) + 1}"
        s = period / 1e9
        seconds[name] += s
        where = "kernel" if "kernel" in dso else dso
        functions[name][f"{sym} [{where}]"] += s
        first, last = span.get(name, (t, t))
        span[name] = (min(first, t), max(last, t))
    out = []
    for name, s in seconds.most_common(TOP_PROCESSES):
        first, last = span[name]
        out.append({
            "process": name,
            "cpu_s": round(s, 3),
            "from_s": round((first - start_ms) / 1000.0, 2),
            "to_s": round((last - start_ms) / 1000.0, 2),
            "top": [{"function": f, "cpu_s": round(v, 3)} for f, v in functions[name].most_common(TOP_FUNCTIONS)],
        })
    return out


def attach(runs_path, perf_path):
    samples = read_samples(perf_path)
    programs = program_of(samples)
    with open(runs_path) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    for run in runs:
        start, end = run.get("cpu_from_ms"), run.get("cpu_to_ms")
        if run.get("status") != "ok" or start is None or end is None:
            continue
        run["profile"] = profile(samples, programs, start, end)
        print(f"{run['link']} {run['size']} {run['workload']} run {run['run']} {run['label']}"
              f" ({(end - start) / 1000.0:.2f} s):")
        for p in run["profile"]:
            if p["process"] == "idle":
                print(f"  idle {p['cpu_s']:.2f} s")
                continue
            top = ", ".join(f"{t['function'].split(' [')[0]} {t['cpu_s']:.2f}" for t in p["top"][:3])
            print(f"  {p['process']} {p['cpu_s']:.2f} s ({p['from_s']:.2f}-{p['to_s']:.2f} s): {top}")
    with open(runs_path, "w") as f:
        for run in runs:
            f.write(json.dumps(run) + "\n")


def main(argv):
    if len(argv) == 4 and argv[1] == "attach":
        attach(argv[2], argv[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
