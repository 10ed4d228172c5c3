#!/usr/bin/env python3
"""Writes memory.rules.yml from the settings below: recording rules and alerts for services
that embed the exporter, and the same groups as a prometheus-operator PrometheusRule in
deploy/kubernetes/prometheusrule.yaml. Rerun after changing a setting, then regenerate the tests:

    python3 alerts/generate_rules.py [--runbook-base URL] && python3 alerts/generate_tests.py
    promtool test rules alerts/memory.test.yml

`--check` compares both files instead of writing (the test command's drift check). With
`--output FILE` only that rules file is written (the end-to-end tests' compressed windows).
"""
import argparse
import pathlib

import yaml

HERE = pathlib.Path(__file__).parent

SETTINGS = {
    # How often the groups evaluate.
    "group_interval": "1m",
    # The floor is the minimum over this window; growth compares it with the window before.
    # Longer than any fill-and-clear cycle of your caches.
    "floor_window": "90m",
    # Growth of the floor that alerts, per process and per scope.
    "growth_mib_per_hour": 50,
    # Growth of one scope summed over a job's instances that alerts (each may stay below the
    # per-process threshold).
    "fleet_growth_mib_per_hour": 200,
    "growth_for": "30m",
    # A daily cycle (busy by day, quiet at night) raises the floor every morning. Where the
    # floor of this long ago exists, the growth alerts also need today's floor above it by
    # half this period's growth at the threshold; a leak under the cycle still gets there.
    "daily_cycle": "24h",
    # Keeps a growth alert firing through a short dip of the floor (a cache cleared while the
    # windows move), so it does not resolve and fire again.
    "keep_firing_for": "30m",
    # Resident memory on course to reach its limit within this many hours fires (critical).
    "exhaustion_hours": 4,
    # ... once it is above this fraction of the limit.
    "exhaustion_min_fraction": 0.5,
    # A limit for processes without a container limit (bytes; None: only container limits).
    "memory_limit_bytes": None,
    # jemalloc statistics older than this are stale.
    "stale_after_seconds": 300,
    # Where alerts/RUNBOOK.md is served: each alert links to its section there.
    "runbook_base": "https://github.com/your-org/your-service/blob/main/alerts/RUNBOOK.md",
}


UNITS = {"s": 1, "m": 60, "h": 3600}


def seconds(duration):
    """Seconds in a Prometheus duration of one unit: 90m, 20s, 3h."""
    return int(duration[:-1]) * UNITS[duration[-1]]


def human(secs):
    """A duration for the alerts' descriptions: 3 hours, 40 seconds."""
    for unit, size in (("hours", 3600), ("minutes", 60)):
        if secs % size == 0:
            return f"{secs // size} {unit}"
    return f"{secs} seconds"


def rules(s):
    window = s["floor_window"]
    window_s = seconds(window)
    per_hour = f"{window_s / 3600:g}" if window_s % 360 == 0 else f"({window_s} / 3600)"
    threshold = f"{s['growth_mib_per_hour']} * 1024 * 1024"
    # Up for less than both windows: its floor may still be a restart's dip and warm-up.
    young = f"(time() - process_start_time_seconds < {2 * window_s})"

    def floor_growth(metric):
        return (
            f"(min_over_time({metric}[{window}])\n"
            f"  - min_over_time({metric}[{window}] offset {window})) / {per_hour}\n"
        )

    cycle = s["daily_cycle"]
    cycle_growth = f"{threshold} * {seconds(cycle) / 7200:g}"

    def beyond_daily_cycle(floor, by):
        """Today's floor above the floor one cycle ago, or no floor that long ago (a young
        series): a daily ramp rises as fast as a leak, but not from one day to the next."""
        return (
            f"and on ({by}) (\n"
            f"  {floor} - {floor} offset {cycle} > {cycle_growth}\n"
            f"  or {floor} unless {floor} offset {cycle}\n"
            ")\n"
        )

    def runbook(alert):
        return f"{s['runbook_base']}#{alert.lower()}"

    limit_sources = [
        "max by (job, instance) (\n"
        "  process_resident_memory_bytes * 0\n"
        "    + on (namespace, pod) group_left ()\n"
        '      max by (namespace, pod) (container_spec_memory_limit_bytes{container!=""} > 0)\n'
        ")\n"
    ]
    if s["memory_limit_bytes"]:
        limit_sources.append(
            f"max by (job, instance) (process_resident_memory_bytes * 0 + {int(s['memory_limit_bytes'])})\n"
        )
    recording = [
        {"record": "instance:jemalloc_fragmentation:ratio", "expr": "jemalloc_resident_bytes / jemalloc_allocated_bytes"},
        {"record": "instance:jemalloc_allocated_bytes:floor", "expr": f"min_over_time(jemalloc_allocated_bytes[{window}])"},
        {"record": "instance_scope:memory_scope_live_bytes:floor", "expr": f"min_over_time(memory_scope_live_bytes[{window}])"},
        {"record": "instance:jemalloc_allocated_bytes:floor_growth_per_hour", "expr": floor_growth("jemalloc_allocated_bytes")},
        {"record": "instance_scope:memory_scope_live_bytes:floor_growth_per_hour", "expr": floor_growth("memory_scope_live_bytes")},
        {"record": "instance_scope:memory_scope_live_bytes:deriv1h", "expr": "deriv(memory_scope_live_bytes[1h])"},
        # Fleet-wide panels: one series per job and scope, however many pods.
        {"record": "job_scope:memory_scope_live_bytes:sum", "expr": "sum by (job, scope) (memory_scope_live_bytes)"},
        {"record": "instance:memory_non_jemalloc_resident_bytes", "expr": "process_resident_memory_bytes - on (job, instance) jemalloc_resident_bytes"},
        {"record": "instance:memory_limit_bytes", "expr": "or\n".join(limit_sources)},
    ]
    growth_next = (
        'Next: open the "Memory scopes" dashboard to see which scope grows (alert '
        "MemoryScopeSlowGrowth names it); if the growth is unattributed, take a heap dump now "
        "(POST /debug/pprof/dumps), another in an hour, and diff them "
        "(GET /debug/pprof/heap?base=<first id>) with go tool pprof."
    )
    alerts = [
        {
            "alert": "MemorySlowGrowth",
            "expr": (
                f"instance:jemalloc_allocated_bytes:floor_growth_per_hour > {threshold}\n"
                f"unless on (job, instance) {young}\n"
                + beyond_daily_cycle("instance:jemalloc_allocated_bytes:floor", "job, instance")
            ),
            "for": s["growth_for"],
            "keep_firing_for": s["keep_firing_for"],
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "{{ $labels.instance }}: heap floor rising {{ $value | humanize1024 }}B/h",
                "description": (
                    "jemalloc's allocated bytes on {{ $labels.job }}/{{ $labels.instance }} have not returned "
                    f"to their earlier floor for {human(2 * window_s)}: the lowest value of the last {window} is "
                    f"higher than that of the {window} before by {{{{ $value | humanize1024 }}}}B per hour. "
                    "This is the shape of a leak or an unbounded cache, not of a cache that fills and is "
                    "cleared (which returns to the same floor). " + growth_next
                ),
                "runbook_url": runbook("MemorySlowGrowth"),
            },
        },
        {
            "alert": "MemoryScopeSlowGrowth",
            "expr": (
                f"instance_scope:memory_scope_live_bytes:floor_growth_per_hour > {threshold}\n"
                f"unless on (job, instance) {young}\n"
                + beyond_daily_cycle("instance_scope:memory_scope_live_bytes:floor", "job, instance, scope")
            ),
            "for": s["growth_for"],
            "keep_firing_for": s["keep_firing_for"],
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "scope {{ $labels.scope }} on {{ $labels.instance }} grows {{ $value | humanize1024 }}B/h",
                "description": (
                    'The live bytes of scope "{{ $labels.scope }}" on {{ $labels.job }}/{{ $labels.instance }} '
                    f"keep a rising floor: {{{{ $value | humanize1024 }}}}B per hour over the last {human(2 * window_s)}. "
                    "Look at what this scope keeps (caches, maps keyed by ids, queues without bounds). "
                    "To see which call sites hold it, diff heap profiles taken an hour apart "
                    "(POST /debug/pprof/dumps, then GET /debug/pprof/heap?base=<id>); to measure what a "
                    "cache holds, POST /debug/memory/release?probe=<name>."
                ),
                "runbook_url": runbook("MemoryScopeSlowGrowth"),
            },
        },
        {
            "alert": "MemoryScopeFleetGrowth",
            "expr": (
                "sum by (job, scope) (\n"
                "  instance_scope:memory_scope_live_bytes:floor_growth_per_hour\n"
                f"  unless on (job, instance) {young}\n"
                f") > {s['fleet_growth_mib_per_hour']} * 1024 * 1024\n"
            ),
            "for": s["growth_for"],
            "keep_firing_for": s["keep_firing_for"],
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "scope {{ $labels.scope }} grows {{ $value | humanize1024 }}B/h across {{ $labels.job }}",
                "description": (
                    'Summed over the instances of {{ $labels.job }}, the floor of scope "{{ $labels.scope }}" '
                    "rises {{ $value | humanize1024 }}B per hour, though no single instance may cross the "
                    "per-process threshold. One leak in a build shipped to every instance looks like this. "
                    "Pick any instance and follow MemoryScopeSlowGrowth's steps there."
                ),
                "runbook_url": runbook("MemoryScopeFleetGrowth"),
            },
        },
        {
            "alert": "MemoryExhaustionPredicted",
            "expr": (
                f"predict_linear(process_resident_memory_bytes[1h], {s['exhaustion_hours']} * 3600)\n"
                "  > on (job, instance) instance:memory_limit_bytes\n"
                "and on (job, instance)\n"
                "  process_resident_memory_bytes / on (job, instance) instance:memory_limit_bytes\n"
                f"  > {s['exhaustion_min_fraction']}\n"
            ),
            "for": "15m",
            "labels": {"severity": "critical"},
            "annotations": {
                "summary": f"{{{{ $labels.instance }}}} will run out of memory within {s['exhaustion_hours']} h",
                "description": (
                    "At the rate of the last hour, the resident memory of {{ $labels.job }}/{{ $labels.instance }} "
                    f"reaches its limit within {s['exhaustion_hours']} hours (predicted: {{{{ $value | humanize1024 }}}}B), "
                    "and it already holds more than half of it. The process will be OOM-killed, which also "
                    "hides the leak from the growth alerts (each restart lowers the floor). Take a heap dump "
                    "now (POST /debug/pprof/dumps) so it survives the kill, then follow MemorySlowGrowth's steps."
                ),
                "runbook_url": runbook("MemoryExhaustionPredicted"),
            },
        },
        {
            "alert": "MemoryFragmentationHigh",
            "expr": "instance:jemalloc_fragmentation:ratio > 1.5\nand jemalloc_resident_bytes > 512 * 1024 * 1024\n",
            "for": "1h",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "{{ $labels.instance }}: resident is {{ $value | humanize }}× allocated",
                "description": (
                    "jemalloc keeps {{ $value | humanize }} resident bytes per allocated byte on "
                    "{{ $labels.job }}/{{ $labels.instance }}. If jemalloc_dirty_bytes is large, freed "
                    "pages are not purged fast enough: lower dirty_decay_ms or set background_thread:true "
                    "in _RJEM_MALLOC_CONF. If not, many partly used pages remain after a peak: consider "
                    "fewer arenas (narenas) or check the batch scopes that spike."
                ),
                "runbook_url": runbook("MemoryFragmentationHigh"),
            },
        },
        {
            "alert": "MemoryExporterDown",
            "expr": "up == 0 and on (job, instance) max_over_time(jemalloc_info[1d])",
            "for": "5m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "memory metrics of {{ $labels.instance }} are not being scraped",
                "description": (
                    "Prometheus cannot scrape {{ $labels.job }}/{{ $labels.instance }}, which exported "
                    "memory metrics within the last day. Either the service is down (check restarts and "
                    "out-of-memory kills: dmesg, kubectl describe) or its exporter is unreachable (it "
                    "listens on 127.0.0.1 by default; bind it to an address Prometheus can reach)."
                ),
                "runbook_url": runbook("MemoryExporterDown"),
            },
        },
        {
            "alert": "MemoryExporterRefreshFailing",
            "expr": "increase(memory_exporter_refresh_errors_total[15m]) > 0",
            "for": "15m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "{{ $labels.instance }}: jemalloc statistics are stale",
                "description": (
                    "The exporter on {{ $labels.job }}/{{ $labels.instance }} failed to refresh jemalloc's "
                    "statistics {{ $value | humanize }} times in 15 minutes; jemalloc_* gauges keep their "
                    "last good values. The service log says which mallctl failed; usually jemalloc was "
                    'built without the "stats" feature or the global allocator is not jemalloc.'
                ),
                "runbook_url": runbook("MemoryExporterRefreshFailing"),
            },
        },
        {
            "alert": "MemoryExporterStale",
            "expr": f"time() - memory_exporter_last_refresh_timestamp_seconds > {s['stale_after_seconds']}",
            "for": "5m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "{{ $labels.instance }}: jemalloc statistics not refreshed for {{ $value | humanizeDuration }}",
                "description": (
                    "The last good refresh of jemalloc's statistics on {{ $labels.job }}/{{ $labels.instance }} "
                    "was {{ $value | humanizeDuration }} ago: every jemalloc_* gauge and the alerts built on "
                    "them are frozen. The refresh task may be stuck or failing (see "
                    "MemoryExporterRefreshFailing and the service log)."
                ),
                "runbook_url": runbook("MemoryExporterStale"),
            },
        },
    ]
    return {
        "groups": [
            {"name": "memory-recording", "interval": s["group_interval"], "rules": recording},
            {"name": "memory-alerts", "interval": s["group_interval"], "rules": alerts},
        ]
    }


HEADER = """\
# Generated by alerts/generate_rules.py from its SETTINGS: edit those, not this file.
# Unit-tested in memory.test.yml (promtool test rules alerts/*.test.yml).
#
# A leak raises the *floor* of memory use: the lowest value over a window longer than any
# fill-and-clear cycle. Caches that fill and are cleared (a sawtooth) drop back to the same floor
# every cycle, and noise moves the floor very little. So the growth alerts compare the floor over
# the last window with the floor over the window before (the recording rules) and hold for
# `for:`; they have no "still rising now" (deriv) condition, which right after each clear of a
# sawtooth kept resetting `for:`. A restarted process dips and warms up, which would look like a
# rising floor: the alerts wait until the process has been up for both windows
# (process_start_time_seconds; a target without that series is not held back). A leak that gets
# the process killed before that is MemoryExhaustionPredicted's.
"""


class Dumper(yaml.SafeDumper):
    pass


def _str(dumper, value):
    style = "|" if "\n" in value else (">" if len(value) > 100 else None)
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


Dumper.add_representer(str, _str)


def generate(settings):
    return HEADER + yaml.dump(rules(settings), Dumper=Dumper, sort_keys=False, width=100, allow_unicode=True)


PROMETHEUS_RULE = HERE.parent / "deploy" / "kubernetes" / "prometheusrule.yaml"


def prometheus_rule(settings):
    """The same groups as a prometheus-operator PrometheusRule (the release label the operator
    selects is added by deploy/kubernetes/kustomization.yaml)."""
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "memory-exporter", "labels": {"app.kubernetes.io/name": "memory-exporter"}},
        "spec": rules(settings),
    }
    header = ("# Generated by alerts/generate_rules.py from the settings of alerts/memory.rules.yml: "
              "do not edit.\n")
    return header + yaml.dump(rule, Dumper=Dumper, sort_keys=False, width=100, allow_unicode=True)


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if memory.rules.yml differs")
    parser.add_argument("--output", type=pathlib.Path, default=HERE / "memory.rules.yml")
    # Any setting, as --name value (the end-to-end tests compress the windows this way).
    for name, default in SETTINGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default) if default is not None else int)
    args = parser.parse_args()
    settings = dict(SETTINGS)
    for name in SETTINGS:
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    outputs = {args.output: generate(settings)}
    if args.output == HERE / "memory.rules.yml":
        outputs[PROMETHEUS_RULE] = prometheus_rule(settings)
    for target, generated in outputs.items():
        if args.check:
            if not target.exists() or target.read_text() != generated:
                sys.exit(f"{target} differs from what alerts/generate_rules.py writes: rerun it")
            print(f"{target} is up to date")
        else:
            target.write_text(generated)
