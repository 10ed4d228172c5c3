#!/usr/bin/env python3
"""Measures what every dashboard query costs on a synthetic fleet backfilled into a real
Prometheus: samples touched (Prometheus' own query statistics) and seconds (best of three).

A fleet of `--instances` processes with `--scopes` scopes each, scraped every `--interval`
seconds for `--hours` hours, is written as OpenMetrics and turned into TSDB blocks by
`promtool tsdb create-blocks-from openmetrics` (with the recording rule the dashboards read,
evaluated every minute); Prometheus then serves it and each panel's queries run as Grafana
sends them for the default 6 h range (range queries at one point per scrape interval, instant
queries at the end; "All" of a variable as the alternation of its values). Fails if a query
touches more than `--budget-samples` samples (seconds are reported, not asserted: the
machine is shared).

    python3 grafana/query_cost.py --instances 20 --scopes 32 --hours 7.5 --interval 60
"""
import argparse
import json
import math
import pathlib
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

HERE = pathlib.Path(__file__).parent
RANGE_HOURS = 6
MiB = 1024 * 1024

# Per process: one series each (labels beyond job and instance where the exporter adds them).
PROCESS_SERIES = [
    ("jemalloc_allocated_bytes", {}), ("jemalloc_active_bytes", {}), ("jemalloc_resident_bytes", {}),
    ("jemalloc_mapped_bytes", {}), ("jemalloc_metadata_bytes", {}), ("jemalloc_dirty_bytes", {}),
    ("jemalloc_muzzy_bytes", {}), ("jemalloc_tcache_bytes", {}), ("jemalloc_retained_bytes", {}),
    ("jemalloc_profiling_enabled", {}), ("jemalloc_profiling_active", {}),
    ("jemalloc_info", {"version": "5.3.0", "malloc_conf": "prof:true"}),
    ("jemalloc_prof_dumps_total", {"trigger": "manual", "result": "ok"}),
    ("jemalloc_prof_dumps_total", {"trigger": "auto", "result": "ok"}),
    ("memory_exporter_refresh_duration_seconds", {}), ("memory_exporter_scrapes_total", {"code": "200"}),
    ("memory_exporter_last_refresh_timestamp_seconds", {}),
    ("memory_tracking_info", {"mode": "sampled", "placement": "sampled", "sample_interval_bytes": "65536"}),
    ("memory_tracking_overhead_bytes", {}), ("memory_tracking_warning", {}), ("memory_unattributed_bytes", {}),
    ("process_resident_memory_bytes", {}), ("process_start_time_seconds", {}),
]
SCOPE_SERIES = ["memory_scope_live_bytes", "memory_scope_allocated_bytes_total", "memory_scope_allocations_total",
                "memory_scope_deallocated_bytes_total", "memory_scope_deallocations_total"]
# Recording rules the dashboards read, written at the rule groups' 1 m interval.
RECORDED = ["instance_scope:memory_scope_live_bytes:deriv1h",
            "instance_scope:memory_scope_live_bytes:floor_growth_per_hour"]


def labels(pairs):
    return "{" + ",".join(f'{k}="{v}"' for k, v in pairs.items()) + "}"


def write_fleet(path, instances, scopes, hours, interval, end):
    rng = random.Random(5)
    steps = int(hours * 3600 // interval)
    times = [end - (steps - i) * interval for i in range(steps + 1)]
    minutes = [t for t in times if t % 60 == 0]
    pods = [f"pod-{i:02}:9464" for i in range(instances)]
    names = [f"scope-{s:04}" for s in range(scopes)]
    levels = {(p, s): rng.uniform(1, 64) * MiB for p in pods for s in names}
    with open(path, "w") as out:
        for metric, extra in PROCESS_SERIES:
            for pod in pods:
                series = metric + labels({"job": "fleet", "instance": pod, **extra})
                base = rng.uniform(1, 4) * 1024 * MiB
                for i, t in enumerate(times):
                    value = times[0] if metric == "process_start_time_seconds" else base + i * 1024
                    out.write(f"{series} {value:.0f} {t}\n")
        for metric in SCOPE_SERIES:
            for pod in pods:
                for scope in names:
                    series = metric + labels({"job": "fleet", "instance": pod, "scope": scope})
                    level = levels[(pod, scope)]
                    for i, t in enumerate(times):
                        if metric == "memory_scope_live_bytes":
                            value = level * (1 + 0.1 * math.sin(i / 40))
                        else:
                            value = level * i / 8
                        out.write(f"{series} {value:.0f} {t}\n")
        for metric in RECORDED:
            for pod in pods:
                for scope in names:
                    series = metric + labels({"job": "fleet", "instance": pod, "scope": scope})
                    for t in minutes:
                        out.write(f"{series} {rng.uniform(-1, 1) * MiB:.0f} {t}\n")
        out.write("# EOF\n")
    return pods, names


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base, path, params):
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=300) as response:
        return json.load(response)


def dashboard_queries():
    for file in sorted((HERE / "dashboards").glob("*.json")):
        dashboard = json.loads(file.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                yield file.stem, panel["title"], target


def grafana_expr(expr, pods, names, interval):
    """The query as Grafana sends it: variables at "All" are the alternation of their values."""
    rate_interval = f"{max(4 * interval, interval + 60)}s"
    return (expr.replace("$job", "fleet")
            .replace("$instance", "(" + "|".join(p.replace(".", "\\\\.") for p in pods) + ")")
            .replace("$scope", "(" + "|".join(names) + ")")
            .replace("$__rate_interval", rate_interval))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--scopes", type=int, default=32)
    parser.add_argument("--hours", type=float, default=7.5,
                        help="history to backfill: the 6 h range plus the longest window read (1 h)")
    parser.add_argument("--interval", type=int, default=60, help="scrape interval, seconds")
    parser.add_argument("--budget-samples", type=int, default=None,
                        help="most samples one query may touch (default: 6 per scope series of the "
                             "fleet and range step: no panel reads a window longer than its rate "
                             "interval; longer windows belong in recording rules)")
    parser.add_argument("--prometheus", default="prometheus")
    parser.add_argument("--promtool", default="promtool")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="query-cost-") as tmp:
        tmp = pathlib.Path(tmp)
        end = int(time.time()) // 60 * 60 - 60
        started = time.time()
        pods, names = write_fleet(tmp / "fleet.om", args.instances, args.scopes, args.hours, args.interval, end)
        size = (tmp / "fleet.om").stat().st_size
        subprocess.run([args.promtool, "tsdb", "create-blocks-from", "openmetrics", str(tmp / "fleet.om"),
                        str(tmp / "tsdb")], check=True, stdout=subprocess.DEVNULL)
        (tmp / "fleet.om").unlink()
        print(f"backfilled {args.instances} instances x {args.scopes} scopes x {args.hours} h at "
              f"{args.interval} s ({size / 1e6:.0f} MB of OpenMetrics) in {time.time() - started:.0f} s")
        (tmp / "prometheus.yml").write_text("global:\n  scrape_interval: 1m\n")
        port = free_port()
        log = open(tmp / "prometheus.log", "w")
        prometheus = subprocess.Popen(
            [args.prometheus, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             "--storage.tsdb.retention.time=10y", f"--web.listen-address=127.0.0.1:{port}",
             "--query.max-samples=500000000"],
            stdout=subprocess.DEVNULL, stderr=log)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 600
            while True:
                try:
                    if api(base, "/api/v1/query", {"query": "count(memory_scope_live_bytes)", "time": end})["data"]["result"]:
                        break
                except OSError:
                    pass
                if time.time() > deadline or prometheus.poll() is not None:
                    log.close()
                    sys.exit("Prometheus did not serve the backfilled blocks:\n" + (tmp / "prometheus.log").read_text()[-3000:])
                time.sleep(1)
            return measure(base, args, pods, names, end)
        finally:
            prometheus.terminate()
            prometheus.wait()


def measure(base, args, pods, names, end):
    steps = RANGE_HOURS * 3600 // args.interval
    series_per_process = len(PROCESS_SERIES) + len(SCOPE_SERIES) * args.scopes
    budget = args.budget_samples or 6 * args.instances * args.scopes * steps
    rows, over = [], []
    for dashboard, title, target in dashboard_queries():
        expr = grafana_expr(target["expr"], pods, names, args.interval)
        if target.get("instant"):
            path, params = "/api/v1/query", {"query": expr, "time": end, "stats": "all"}
        else:
            path, params = "/api/v1/query_range", {"query": expr, "start": end - RANGE_HOURS * 3600, "end": end,
                                                   "step": args.interval, "stats": "all"}
        best, samples = math.inf, 0
        for _ in range(3):
            began = time.perf_counter()
            answer = api(base, path, params)
            best = min(best, time.perf_counter() - began)
            if answer["status"] != "success":
                sys.exit(f"{dashboard} / {title}: {answer}")
            samples = answer["data"]["stats"]["samples"]["totalQueryableSamples"]
        rows.append((dashboard, title, target["refId"], samples, best))
        if samples > budget:
            over.append(f"{dashboard} / {title} ({target['refId']}): {samples:,} samples > {budget:,}")
    print(f"\n{args.instances} instances x {args.scopes} scopes ({series_per_process} series each), "
          f"{RANGE_HOURS} h range, step {args.interval} s; budget {budget:,} samples per query\n")
    print("| dashboard | panel | query | samples touched | seconds (best of 3) |")
    print("|---|---|---|---:|---:|")
    for dashboard, title, ref, samples, seconds in rows:
        print(f"| {dashboard} | {title} | {ref} | {samples:,} | {seconds:.3f} |")
    heaviest = max(rows, key=lambda r: r[3])
    print(f"\nheaviest: {heaviest[0]} / {heaviest[1]} ({heaviest[2]}): {heaviest[3]:,} samples, {heaviest[4]:.2f} s")
    if over:
        print("\nover budget:\n" + "\n".join(over))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
