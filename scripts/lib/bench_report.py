#!/usr/bin/env python3
"""Raw records and the report of scripts/bench.sh.

  bench_report.py record RUNS.jsonl KEY=VALUE...
      appends one JSON object to RUNS.jsonl. VALUE is parsed as JSON when it
      is valid JSON, else kept as a string; KEY=@FILE reads FILE as JSON
      (null when FILE is missing or empty).

  bench_report.py report RUNS.jsonl META.json OUT.json
      writes OUT.json ({"meta", "runs", "summary"}) and prints a table of
      medians per link, each case next to the CRIU floor and the plain TCP
      copy of the same link, size and workload.
"""

import json
import statistics
import sys

# Figures of the cases; the summary takes the medians of those a case has.
FIGURES = [
    "downtime_ms",
    "app_downtime_ms",
    "total_ms",
    "bytes_wire",
    "raw_bytes",
    "transfer_ms",
    "transfer_bytes",
    "cpu_src_s",
    "cpu_dst_s",
]


def parse_value(text):
    if text.startswith("@"):
        try:
            with open(text[1:]) as f:
                data = f.read().strip()
            return json.loads(data) if data else None
        except (OSError, ValueError):
            return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def record(path, pairs):
    obj = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            sys.exit(f"bench_report.py record: {pair!r} is not KEY=VALUE")
        obj[key] = parse_value(value)
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def load_runs(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def numeric_fields(obj):
    if not isinstance(obj, dict):
        return {}
    return {
        k: v
        for k, v in obj.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def transfer_rate(run):
    """Raw bytes per second of transfer, when the case has both: the bytes
    the transfer time covers (migrate: its rounds'), else all raw bytes."""
    raw = run.get("transfer_bytes", run.get("raw_bytes"))
    ms = run.get("transfer_ms")
    if not raw or not ms:
        return None
    return raw / (ms / 1000)


def wire_vs_raw(run):
    raw, wire = run.get("raw_bytes"), run.get("bytes_wire")
    if not raw or wire is None:
        return None
    return wire / raw


def summarize(runs):
    groups = {}
    for r in runs:
        # Records of a bench.sh without --links have no link: the veth bare.
        key = (r.get("link", "bare"), r.get("size_bytes", 0), r.get("workload"), r.get("label"))
        groups.setdefault(key, []).append(r)
    summary = []
    for (link, size_bytes, workload, label), rs in groups.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        row = {
            "link": link,
            "size": rs[0].get("size"),
            "size_bytes": size_bytes,
            "workload": workload,
            "case": rs[0].get("case"),
            "mode": rs[0].get("mode"),
            "label": label,
            "runs": len(ok),
        }
        if not ok:
            row["status"] = rs[0].get("status")
            row["reason"] = rs[0].get("reason")
        else:
            row["status"] = "ok"
            for fig in FIGURES:
                row[fig] = median([r.get(fig) for r in ok])
            row["transfer_bytes_per_s"] = median([transfer_rate(r) for r in ok])
            row["wire_vs_raw"] = median([wire_vs_raw(r) for r in ok])
            # Every other number migrate reports (e.g. source_free_ms).
            extra = {}
            for r in ok:
                for k, v in numeric_fields(r.get("migrate")).items():
                    if k not in FIGURES:
                        extra.setdefault(k, []).append(v)
            if extra:
                row["migrate_medians"] = {k: median(v) for k, v in sorted(extra.items())}
        summary.append(row)

    # Rows stay in the order the cases first ran: sizes, workloads, cases
    # and modes as the command line listed them.
    # Ratios to the floor and to the plain TCP copy of the same link, size
    # and workload.
    def by_case(case):
        return {
            (r["link"], r["size_bytes"], r["workload"]): r
            for r in summary
            if r["case"] == case and r["status"] == "ok"
        }

    floors = by_case("criu-floor")
    copies = by_case("tcp-copy")
    for row in summary:
        if row["status"] != "ok":
            continue
        key = (row["link"], row["size_bytes"], row["workload"])
        floor = floors.get(key)
        if floor:
            for fig in ["downtime_ms", "app_downtime_ms", "total_ms"]:
                if row.get(fig) is not None and floor.get(fig):
                    row[fig.replace("_ms", "_vs_floor")] = round(row[fig] / floor[fig], 2)
        copy = copies.get(key)
        rate = row.get("transfer_bytes_per_s")
        if copy and rate is not None and copy.get("transfer_bytes_per_s"):
            row["transfer_vs_tcp_copy"] = round(rate / copy["transfer_bytes_per_s"], 2)
    return summary


def fmt_ms(v):
    return "-" if v is None else f"{v:.0f}"


def fmt_rate(v):
    return "-" if v is None else f"{v / 1e6:.0f}"


def fmt_ratio(v):
    return "" if v is None else f"x{v:.2f}"


def fmt_frac(v):
    return "-" if v is None else f"{v:.2f}"


def fmt_cpu(v):
    return "-" if v is None else f"{v:.2f}"


HEAD = [
    "size",
    "workload",
    "case",
    "n",
    "downtime ms",
    "",
    "app gap ms",
    "",
    "total ms",
    "MB/s",
    "",
    "wire/raw",
    "cpu src s",
    "cpu dst s",
]
NUMERIC = {3, 4, 6, 8, 9, 11, 12, 13}


def row_cells(r):
    if r["status"] != "ok":
        return [r["size"], r["workload"], r["label"], "0", r["status"]] + [""] * (len(HEAD) - 5)
    return [
        r["size"],
        r["workload"],
        r["label"],
        str(r["runs"]),
        fmt_ms(r.get("downtime_ms")),
        fmt_ratio(r.get("downtime_vs_floor")),
        fmt_ms(r.get("app_downtime_ms")),
        fmt_ratio(r.get("app_downtime_vs_floor")),
        fmt_ms(r.get("total_ms")),
        fmt_rate(r.get("transfer_bytes_per_s")),
        fmt_ratio(r.get("transfer_vs_tcp_copy")),
        fmt_frac(r.get("wire_vs_raw")),
        fmt_cpu(r.get("cpu_src_s")),
        fmt_cpu(r.get("cpu_dst_s")),
    ]


def table(summary):
    # One block per link, the links in the order they ran; the widths are
    # the same in every block.
    links = list(dict.fromkeys(r["link"] for r in summary))
    blocks = {link: [row_cells(r) for r in summary if r["link"] == link] for link in links}
    every = [HEAD] + [row for rows in blocks.values() for row in rows]
    widths = [max(len(row[i]) for row in every) for i in range(len(HEAD))]

    def line(row):
        cells = [
            cell.rjust(widths[i]) if i in NUMERIC else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(cells).rstrip()

    head = line(HEAD)
    lines = []
    for link in links:
        lines += [f"link {link}", head, "-" * len(head)]
        lines += [line(row) for row in blocks[link]]
    notes = {}  # dict as an ordered set: an unavailable mode is noted once
    for r in summary:
        if r["status"] != "ok":
            notes[(r["label"], r["status"], r.get("reason"))] = None
    for label, status, reason in notes:
        lines.append(f"  {label}: {status}: {reason}")
    # migrate's own timings (phases, and whatever else it reports in ms,
    # e.g. when post-copy's last page arrived).
    phases = [r for r in summary if r.get("migrate_medians")]
    if phases:
        lines.append("migrate's own timings (medians, ms):")
        for r in phases:
            ms = {k: v for k, v in r["migrate_medians"].items() if k.endswith("_ms")}
            cells = ", ".join(f"{k[:-3]} {v:.0f}" for k, v in ms.items())
            lines.append(f"  {r['link']} {r['size']} {r['workload']} {r['label']}: {cells}")
    return "\n".join(lines)


def report(runs_path, meta_path, out_path):
    runs = load_runs(runs_path)
    with open(meta_path) as f:
        meta = json.load(f)
    summary = summarize(runs)
    with open(out_path, "w") as f:
        json.dump({"meta": meta, "runs": runs, "summary": summary}, f, indent=2)
        f.write("\n")
    print("medians; xN after downtime and app gap: ratio to the CRIU floor, after MB/s: to")
    print("tcp-copy, both of the same link, size and workload")
    print("downtime: the tool's (freeze to restored); app gap: longest pause the heap saw;")
    print("MB/s: raw bytes (10^6) / transfer time; wire/raw: bytes on the wire / raw bytes;")
    print("cpu: CPU seconds of each side (see bench.sh --help for what counts)")
    print(table(summary))


def main(argv):
    if len(argv) >= 3 and argv[1] == "record":
        record(argv[2], argv[3:])
    elif len(argv) == 5 and argv[1] == "report":
        report(argv[2], argv[3], argv[4])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
