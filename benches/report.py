#!/usr/bin/env python3
"""Aggregates a benches/run.sh result directory into one Markdown table.

Each figure is the median over the rounds; every ratio compares targets measured in
the same run (they alternate), because these machines are noisy.
"""
import glob
import json
import os
import statistics
import sys


def load(out):
    runs = {}
    for path in glob.glob(os.path.join(out, "*.*.*.json")):
        name = os.path.basename(path)
        if name.startswith(("startup.", "rss.")):
            continue
        scenario, target, _round, _ = name.rsplit(".", 3)
        with open(path) as f:
            runs.setdefault((scenario, target), []).append(json.load(f))
    return runs


def med(rs, key):
    return statistics.median(r[key] for r in rs)


def main(out):
    runs = load(out)
    scenarios = sorted({s for s, _ in runs}, key=lambda s: (s.split("-")[0], s))
    targets = ["floor", "pitboss", "ceiling", "peer", "direct", "proxy", "pitboss-tls"]
    print("## Throughput and latency (median of rounds)\n")
    print("| scenario | target | req/s | p50 µs | p90 µs | p99 µs | p99.9 µs | errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for s in scenarios:
        for t in targets:
            rs = runs.get((s, t))
            if not rs:
                continue
            print(
                f"| {s} | {t} | {med(rs, 'rps'):,.0f} | {med(rs, 'p50_us'):,.0f} | "
                f"{med(rs, 'p90_us'):,.0f} | {med(rs, 'p99_us'):,.0f} | {med(rs, 'p999_us'):,.0f} | "
                f"{sum(r['errors'] for r in rs)} |"
            )

    def get(s, t, k):
        rs = runs.get((s, t))
        if not rs or any(r.get(k) is None for r in rs):
            return None
        return med(rs, k)

    def cpu(v):
        return "-" if v is None else f"{v:.1f}"

    print("\n## CPU per request, µs (median of rounds; user + system from /proc)\n")
    print("server: the process serving the Bridge (for the floor: none, its driver is the")
    print("load generator); workers: the server's Python processes; client: the load generator.\n")
    print("| scenario | target | server | workers | client | total |")
    print("|---|---|---:|---:|---:|---:|")
    for s in scenarios:
        for t in targets:
            if (s, t) not in runs:
                continue
            parts = [get(s, t, f"cpu_{k}_us_per_req") for k in ("server", "workers", "client")]
            known = [p for p in parts if p is not None]
            total = sum(known) if known else None
            print(f"| {s} | {t} | {' | '.join(cpu(p) for p in parts)} | {cpu(total)} |")

    print("\n## Targets (ratios within this run)\n")
    print("| measure | target | measured | met |")
    print("|---|---|---:|---|")

    def row(measure, target, value, ok, fmt="{:.2f}"):
        if value is None:
            print(f"| {measure} | {target} | n/a | - |")
        else:
            # A figure with no target (target "-") is reported, never judged.
            met = "-" if target == "-" else ("yes" if ok else "NO")
            print(f"| {measure} | {target} | {fmt.format(value)} | {met} |")

    pb, fl = get("compute-c8", "pitboss", "rps"), get("compute-c8", "floor", "rps")
    r = pb / fl if pb and fl else None
    row("throughput, CPU-bound command, vs floor", ">= 0.90", r, r is not None and r >= 0.9)
    pb, fl, ce = (get("echo-64B-c8", t, "rps") for t in ("pitboss", "floor", "ceiling"))
    base = min(x for x in (fl, ce) if x) if (fl or ce) else None
    r = pb / base if pb and base else None
    row("throughput, echo 64 B c=8, vs min(floor, ceiling)", ">= 0.80", r, r is not None and r >= 0.8)
    pb, fl = get("echo-64B-c1", "pitboss", "p50_us"), get("echo-64B-c1", "floor", "p50_us")
    r = pb - fl if pb and fl else None
    row("added p50 latency over floor, echo c=1 (µs)", "<= 100", r, r is not None and r <= 100, "{:.0f}")
    pb, pe = get("echo-64B-c8", "pitboss", "rps"), get("echo-64B-c8", "peer", "rps")
    r = pb / pe if pb and pe else None
    row("throughput vs grpcio + ProcessPool peer, echo", ">= 5", r, r is not None and r >= 5, "{:.1f}x")
    for s in scenarios:
        pb, pe = get(s, "pitboss", "p99_us"), get(s, "peer", "p99_us")
        r = pb / pe if pb and pe else None
        row(f"p99 vs peer, {s} (ratio)", "< 1", r, r is not None and r < 1)

    # Issue 15: wake-ups per request.
    pb, ce = (get("echo-64B-c8", t, "cpu_server_us_per_req") for t in ("pitboss", "ceiling"))
    r = pb / ce if pb and ce else None
    row("server CPU per echo request, pitboss / ceiling (c=8)", "<= 1.4", r, r is not None and r <= 1.4)
    r = get("echo-64B-c8", "pitboss", "cpu_workers_us_per_req")
    row("Python worker CPU per echo request under pitboss, c=8 (µs)", "<= 20", r, r is not None and r <= 20, "{:.1f}")
    r = get("echo-64B-c1", "floor", "p50_us")
    row("floor p50, echo c=1 (µs)", "<= 40", r, r is not None and r <= 40, "{:.0f}")
    pb, fl, ce = (get("echo-64B-c1", t, "p50_us") for t in ("pitboss", "floor", "ceiling"))
    r = pb - (fl + ce) if pb and fl and ce else None
    row("pitboss p50 - (floor p50 + ceiling p50), echo c=1 (µs)", "<= 15", r, r is not None and r <= 15, "{:+.0f}")
    pb, fl, ce = (get("echo-64B-c8", t, "rps") for t in ("pitboss", "floor", "ceiling"))
    r = pb / (1 / (1 / fl + 1 / ce)) if pb and fl and ce else None
    row("echo c=8 throughput / additive model 1/(1/floor + 1/ceiling)", ">= 0.9", r, r is not None and r >= 0.9)
    pb, fl = get("compute-c8", "pitboss", "rps"), get("compute-c8", "floor", "rps")
    r = pb / fl if pb and fl else None
    row("CPU-bound command throughput / floor", ">= 0.93", r, r is not None and r >= 0.93)

    # Issue 17: the grpc_proxy passthrough, against the service called directly.
    pb, di = (get("transparent-add-c1", t, "p50_us") for t in ("pitboss", "direct"))
    r = pb / di if pb and di else None
    row("transparent passthrough p50 / the service directly, c=1", "<= 1.10", r, r is not None and r <= 1.1)
    r = pb - di if pb and di else None
    row("transparent passthrough added p50, c=1 (µs)", "-", r, True, "{:+.0f}")
    px = get("transparent-add-c1", "proxy", "p50_us")
    r = px - di if px and di else None
    row("passthrough ceiling (bare hyper proxy) added p50, c=1 (µs)", "-", r, True, "{:+.0f}")
    r = pb - px if pb and px else None
    row("transparent passthrough p50 - passthrough ceiling p50, c=1 (µs)", "-", r, True, "{:+.0f}")

    # Issue 18: the Bridge over TLS (pitboss-tls) against plaintext (pitboss), same run.
    tls = [s for s in scenarios if (s, "pitboss-tls") in runs and (s, "pitboss") in runs]
    if tls:
        print("\n## TLS on the Bridge vs plaintext (pitboss-tls / pitboss, same run)\n")
        print("A ratio above 1 is TLS costing more (latency, CPU) or serving more (req/s).\n")
        print("| scenario | req/s TLS | req/s plain | req/s ratio | p50 ratio | p99 ratio | server CPU/req ratio |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for s in tls:
            def ratio(k):
                a, b = get(s, "pitboss-tls", k), get(s, "pitboss", k)
                return f"{a / b:.2f}" if a and b else "n/a"
            print(
                f"| {s} | {get(s, 'pitboss-tls', 'rps'):,.0f} | {get(s, 'pitboss', 'rps'):,.0f} | "
                f"{ratio('rps')} | {ratio('p50_us')} | {ratio('p99_us')} | {ratio('cpu_server_us_per_req')} |"
            )

    starts = sorted(glob.glob(os.path.join(out, "startup.*.json")))
    if starts:
        print("\n## Pool startup (median of runs)\n")
        print("| workers | floor ms | pitboss ms | ratio | target <= 1.2 (8 workers) |")
        print("|---:|---:|---:|---:|---|")
        for p in sorted(starts, key=lambda p: int(p.split(".")[-2])):
            with open(p) as f:
                d = json.load(f)
            ok = "yes" if d["ratio"] <= 1.2 else "NO"
            print(
                f"| {d['workers']} | {d['floor_median_ms']:.1f} | {d['pool_median_ms']:.1f} | "
                f"{d['ratio']:.2f} | {ok if d['workers'] == 8 else '-'} |"
            )
    rss = os.path.join(out, "rss.json")
    if os.path.exists(rss):
        with open(rss) as f:
            d = json.load(f)
        mib = lambda b: b / 1048576
        ok = "yes" if mib(d["rss_sessions_bytes"]) <= 64 else "NO"
        print("\n## pitboss memory\n")
        print("| state | RSS MiB | target |")
        print("|---|---:|---|")
        print(f"| idle (after the load above) | {mib(d['rss_idle_bytes']):.1f} | |")
        print(f"| with {d['sessions']:,} sessions | {mib(d['rss_sessions_bytes']):.1f} | <= 64: {ok} |")


if __name__ == "__main__":
    main(sys.argv[1])
