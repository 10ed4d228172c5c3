#!/usr/bin/env python3
"""Writes memory.test.yml: the three shapes the growth alerts must tell apart (steady growth,
a sawtooth cache, noisy flat memory) plus the other alerts' cases, with the annotations each
firing alert must carry. Deterministic (fixed seed); rerun after changing memory.rules.yml:

    python3 alerts/generate_tests.py && promtool test rules alerts/memory.test.yml
"""
import math
import pathlib
import random
import re

import yaml

HERE = pathlib.Path(__file__).parent
MiB = 1024 * 1024
MINUTES = 6 * 60

RULES = {
    rule["alert"]: rule
    for group in yaml.safe_load((HERE / "memory.rules.yml").read_text())["groups"]
    for rule in group["rules"]
    if "alert" in rule
}


def render(template, labels, value):
    """Prometheus' template rendering for the few forms the rules use."""
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)
    return text.replace("{{ $value | humanize1024 }}", value).replace("{{ $value | humanize }}", value)


def expected_alert(name, labels, value):
    rule = RULES[name]
    return {
        "exp_labels": {**rule["labels"], **labels},
        "exp_annotations": {k: render(v, labels, value) for k, v in rule["annotations"].items()},
    }


def shapes():
    rng = random.Random(7)
    noisy = " ".join(str(int(1024 * MiB + rng.uniform(-40, 40) * MiB)) for _ in range(MINUTES + 1))
    sawtooth = " ".join(f"{512 * MiB}+{10 * MiB}x59" for _ in range(6))  # fills 600 MiB/h, cleared
    growth = f"{1024 * MiB}+{100 * MiB / 60:.0f}x{MINUTES}"  # +100 MiB/h
    return growth, sawtooth, noisy


def per_minute(values):
    """promtool's series notation for one value per minute."""
    return " ".join(str(int(v)) for v in values)


def leak_under_sawtooth(period, minutes=8 * 60):
    """+100 MiB/h under a cache that fills 600 MiB over `period` minutes and is cleared."""
    return per_minute(
        1024 * MiB + 100 * MiB * t / 60 + 600 * MiB * (t % period) / period for t in range(minutes + 1)
    )


def restart_with_warm_up(minutes=8 * 60):
    """Flat at 2 GiB; restarted at 2 h: down to 200 MiB, back to 2 GiB over 30 min, flat."""
    def value(t):
        if t < 120:
            return 2048 * MiB
        return 200 * MiB + (2048 - 200) * MiB * min(1.0, (t - 120) / 30)
    return per_minute(value(t) for t in range(minutes + 1))


def levels_off(minutes=10 * 60):
    """+100 MiB/h for 4 h, then flat."""
    return per_minute(1024 * MiB + 100 * MiB * min(t, 240) / 60 for t in range(minutes + 1))


def daily_ramp(leak_mib_per_hour=0, days=3):
    """Busy by day, quiet at night: 1 GiB at 03:00 up to 2 GiB at 15:00 and back (its steepest
    hour adds 134 MiB), plus an optional leak."""
    return per_minute(
        1024 * MiB + 512 * MiB * (1 - math.cos(2 * math.pi * t / 1440)) + leak_mib_per_hour * MiB * t / 60
        for t in range(days * 1440 + 1)
    )


def noisy_scopes(count, minutes=8 * 60):
    """`count` scopes that each hover around a level of their own, ±20 MiB, without trend."""
    rng = random.Random(11)
    return [
        per_minute(level + rng.uniform(-20, 20) * MiB for _ in range(minutes + 1))
        for level in (rng.uniform(16, 256) * MiB for _ in range(count))
    ]


def series(metric, labels, values):
    body = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{metric}{{{body}}}", "values": values}


def alert_case(at, name, alerts):
    return {"eval_time": at, "alertname": name, "exp_alerts": alerts}


def firing(name, at, label_sets):
    """A check through ALERTS, whose labels carry no value: for alerts whose annotations hold a
    figure that varies with where the windows fall (alert_rule_test compares annotations)."""
    severity = RULES[name]["labels"]["severity"]
    samples = [
        {
            "labels": "ALERTS{"
            + ",".join(
                f'{k}="{v}"'
                for k, v in {"alertname": name, "alertstate": "firing", **labels, "severity": severity}.items()
            )
            + "}",
            "value": 1,
        }
        for labels in label_sets
    ]
    return {"expr": f'ALERTS{{alertname="{name}",alertstate="firing"}}', "eval_time": at, "exp_samples": samples}


def main():
    growth, sawtooth, noisy = shapes()
    svc = lambda instance, **extra: {"job": "svc", "instance": instance, **extra}
    started = lambda labels: series("process_start_time_seconds", labels, "0x600")
    tests = [
        {
            "name": "process growth fires on steady growth, not on a sawtooth or noise",
            "interval": "1m",
            "input_series": [
                series("jemalloc_allocated_bytes", svc("growing:9464"), growth),
                series("jemalloc_allocated_bytes", svc("sawtooth:9464"), sawtooth),
                series("jemalloc_allocated_bytes", svc("noisy:9464"), noisy),
                *(started(svc(i)) for i in ("growing:9464", "sawtooth:9464", "noisy:9464")),
            ],
            "alert_rule_test": [
                alert_case("2h", "MemorySlowGrowth", []),
                # The floor has risen since 2h15m and the process is up 3 h: pending, not firing
                # before `for: 30m` has passed.
                alert_case("3h10m", "MemorySlowGrowth", []),
                *(
                    alert_case(t, "MemorySlowGrowth", [expected_alert("MemorySlowGrowth", svc("growing:9464"), "100Mi")])
                    for t in ("3h40m", "6h")
                ),
            ],
            "promql_expr_test": [
                {
                    "expr": 'round(instance:jemalloc_allocated_bytes:floor_growth_per_hour{instance="growing:9464"} / 1048576)',
                    "eval_time": "4h",
                    "exp_samples": [{"labels": '{job="svc",instance="growing:9464"}', "value": 100}],
                },
                {
                    "expr": 'instance:jemalloc_allocated_bytes:floor_growth_per_hour{instance="sawtooth:9464"}',
                    "eval_time": "5h",
                    "exp_samples": [
                        {"labels": 'instance:jemalloc_allocated_bytes:floor_growth_per_hour{job="svc",instance="sawtooth:9464"}', "value": 0}
                    ],
                },
            ],
        },
        {
            "name": "scope growth keeps the scope label and ignores sawtooth and noise",
            "interval": "1m",
            "input_series": [
                series("memory_scope_live_bytes", svc("a:9464", scope="cache"), growth),
                series("memory_scope_live_bytes", svc("a:9464", scope="lru"), sawtooth),
                series("memory_scope_live_bytes", svc("a:9464", scope="requests"), noisy),
                started(svc("a:9464")),
            ],
            "alert_rule_test": [
                alert_case("2h", "MemoryScopeSlowGrowth", []),
                alert_case("3h10m", "MemoryScopeSlowGrowth", []),
                *(
                    alert_case(t, "MemoryScopeSlowGrowth", [expected_alert("MemoryScopeSlowGrowth", svc("a:9464", scope="cache"), "100Mi")])
                    for t in ("3h40m", "6h")
                ),
            ],
        },
        {
            # The most common real shape: a leak and a cache at once. Each clear makes the
            # short-term slope negative; the floor still rises at the leak's rate.
            "name": "a leak under a cache sawtooth fires, whatever the period up to 90 minutes",
            "interval": "1m",
            "input_series": [
                *(
                    series("jemalloc_allocated_bytes", svc(f"leak-{period}m:9464"), leak_under_sawtooth(period))
                    for period in (20, 45, 60)
                ),
                *(started(svc(f"leak-{period}m:9464")) for period in (20, 45, 60)),
            ],
            # The floor is measured between clears, so its rate reads 100–133 MiB/h depending on
            # where the windows fall in the cycle: checked through ALERTS.
            "promql_expr_test": [
                firing("MemorySlowGrowth", t, [svc(f"leak-{period}m:9464") for period in (20, 45, 60)])
                for t in ("4h30m", "5h", "6h", "7h", "8h")
            ],
        },
        {
            # Ten instances whose "cache" scope each grows 30 MiB/h: below the per-process
            # threshold, 300 MiB/h for the job.
            "name": "a scope growing a little on every instance fires once for the job",
            "interval": "1m",
            "input_series": [
                *(
                    series("memory_scope_live_bytes", svc(f"pod-{i}:9464", scope="cache"), f"{512 * MiB}+{30 * MiB // 60}x360")
                    for i in range(10)
                ),
                *(
                    series("memory_scope_live_bytes", svc(f"pod-{i}:9464", scope="lru"), sawtooth)
                    for i in range(10)
                ),
                *(started(svc(f"pod-{i}:9464")) for i in range(10)),
            ],
            "alert_rule_test": [
                alert_case("5h", "MemoryScopeSlowGrowth", []),
                alert_case("3h10m", "MemoryScopeFleetGrowth", []),
            ],
            "promql_expr_test": [
                firing("MemoryScopeFleetGrowth", t, [{"job": "svc", "scope": "cache"}]) for t in ("3h40m", "5h")
            ],
        },
        {
            # Resident memory rises 1 GiB/h from 2 GiB towards a 4 GiB container limit (joined
            # on namespace and pod; the pod-level series without a container is ignored), beside
            # a flat process at 3 GiB of the same limit and one without any limit.
            "name": "predicted exhaustion fires for the process on course to its limit",
            "interval": "1m",
            "input_series": [
                series("process_resident_memory_bytes", svc("rising:9464", namespace="prod", pod="rising"), f"{2048 * MiB}+{1024 * MiB // 60}x120"),
                series("process_resident_memory_bytes", svc("flat:9464", namespace="prod", pod="flat"), f"{3072 * MiB}x120"),
                series("process_resident_memory_bytes", svc("unlimited:9464"), f"{2048 * MiB}+{1024 * MiB // 60}x120"),
                *(
                    series("container_spec_memory_limit_bytes", {"namespace": "prod", "pod": pod, "container": "app"}, f"{4096 * MiB}x120")
                    for pod in ("rising", "flat")
                ),
                series("container_spec_memory_limit_bytes", {"namespace": "prod", "pod": "rising", "container": ""}, f"{8192 * MiB}x120"),
            ],
            "alert_rule_test": [alert_case("10m", "MemoryExhaustionPredicted", [])],
            "promql_expr_test": [
                {
                    "expr": "instance:memory_limit_bytes",
                    "eval_time": "1h",
                    "exp_samples": [
                        {"labels": f'instance:memory_limit_bytes{{job="svc",instance="{i}:9464"}}', "value": 4096 * MiB}
                        for i in ("rising", "flat")
                    ],
                },
                *(
                    firing("MemoryExhaustionPredicted", t, [svc("rising:9464")])
                    for t in ("1h", "1h30m")
                ),
            ],
        },
        {
            "name": "statistics not refreshed for five minutes are stale",
            "interval": "1m",
            "input_series": [
                series("memory_exporter_last_refresh_timestamp_seconds", svc("fresh:9464"), "0+60x60"),
                series("memory_exporter_last_refresh_timestamp_seconds", svc("stuck:9464"), "0+60x20 1200x40"),
            ],
            "alert_rule_test": [alert_case("28m", "MemoryExporterStale", [])],
            "promql_expr_test": [firing("MemoryExporterStale", "40m", [svc("stuck:9464")])],
        },
        {
            # A daily traffic cycle rises as fast as a leak for hours each morning; only a leak
            # under it also leaves today's floor above yesterday's. The first day has no
            # yesterday to compare with (see MemorySlowGrowth in RUNBOOK.md).
            "name": "a daily ramp does not fire from the second day on; a leak under it does",
            "interval": "1m",
            "input_series": [
                series("jemalloc_allocated_bytes", svc("daily:9464"), daily_ramp()),
                series("jemalloc_allocated_bytes", svc("daily-leak:9464"), daily_ramp(leak_mib_per_hour=100)),
                *(started(svc(i)) for i in ("daily:9464", "daily-leak:9464")),
            ],
            # Mornings of the second and third day, while the ramp rises fastest.
            "promql_expr_test": [
                firing("MemorySlowGrowth", t, [svc("daily-leak:9464")])
                for t in ("1d10h", "1d12h", "2d10h", "2d12h")
            ],
        },
        {
            # One scope leaks 100 MiB/h among 40 that hover; the process total grows too.
            # One scope alert (and the process alert, which Alertmanager's inhibition holds back
            # while the scope alert fires: alerts/alertmanager.yml).
            "name": "one leaking scope among 40 noisy ones is the only scope alert",
            "interval": "1m",
            "input_series": [
                series("memory_scope_live_bytes", svc("a:9464", scope="sessions"), growth),
                *(
                    series("memory_scope_live_bytes", svc("a:9464", scope=f"noisy-{i}"), values)
                    for i, values in enumerate(noisy_scopes(40, MINUTES))
                ),
                started(svc("a:9464")),
            ],
            "alert_rule_test": [
                alert_case("3h40m", "MemoryScopeSlowGrowth", [
                    expected_alert("MemoryScopeSlowGrowth", svc("a:9464", scope="sessions"), "100Mi")
                ]),
            ],
            "promql_expr_test": [
                firing("MemoryScopeSlowGrowth", "6h", [svc("a:9464", scope="sessions")]),
            ],
        },
        {
            "name": "a restart (dip, warm-up) does not fire",
            "interval": "1m",
            "input_series": [
                series("jemalloc_allocated_bytes", svc("restarted:9464"), restart_with_warm_up()),
                series("process_start_time_seconds", svc("restarted:9464"), "0x120 7200x480"),
            ],
            # The floor rises by 1.8 GiB between the windows while the process has not been up
            # for both of them; once it has, the floor is flat again.
            "alert_rule_test": [alert_case(t, "MemorySlowGrowth", []) for t in ("3h30m", "4h30m", "5h30m", "8h")],
        },
        {
            "name": "growth that levels off resolves once the floor stops rising",
            "interval": "1m",
            "input_series": [
                series("jemalloc_allocated_bytes", svc("levelled:9464"), levels_off()),
                started(svc("levelled:9464")),
            ],
            "alert_rule_test": [
                *(
                    alert_case(t, "MemorySlowGrowth", [expected_alert("MemorySlowGrowth", svc("levelled:9464"), "100Mi")])
                    for t in ("4h", "5h")
                ),
                *(alert_case(t, "MemorySlowGrowth", []) for t in ("7h", "10h")),
            ],
        },
        {
            "name": "fragmentation needs a high ratio and a large heap for an hour",
            "interval": "1m",
            "input_series": [
                series("jemalloc_resident_bytes", svc("frag:9464"), f"{2048 * MiB}x120"),
                series("jemalloc_allocated_bytes", svc("frag:9464"), f"{1024 * MiB}x120"),
                series("jemalloc_resident_bytes", svc("small:9464"), f"{300 * MiB}x120"),
                series("jemalloc_allocated_bytes", svc("small:9464"), f"{100 * MiB}x120"),
                series("jemalloc_resident_bytes", svc("tight:9464"), f"{1100 * MiB}x120"),
                series("jemalloc_allocated_bytes", svc("tight:9464"), f"{1000 * MiB}x120"),
            ],
            "alert_rule_test": [
                alert_case("30m", "MemoryFragmentationHigh", []),
                alert_case("90m", "MemoryFragmentationHigh", [expected_alert("MemoryFragmentationHigh", svc("frag:9464"), "2")]),
            ],
        },
        {
            "name": "exporter down only for targets that exported memory metrics; refresh errors",
            "interval": "1m",
            "input_series": [
                series("up", svc("a:9464"), "1x30 0x30"),
                series("jemalloc_info", svc("a:9464", version="5.3.0", malloc_conf="prof:true"), "1x30"),
                series("up", {"job": "node", "instance": "b:9100"}, "0x60"),
                series("memory_exporter_refresh_errors_total", svc("a:9464"), "0x10 1+1x50"),
            ],
            "alert_rule_test": [
                alert_case("33m", "MemoryExporterDown", []),
                alert_case("40m", "MemoryExporterDown", [expected_alert("MemoryExporterDown", svc("a:9464"), "")]),
                alert_case("5m", "MemoryExporterRefreshFailing", []),
                alert_case("40m", "MemoryExporterRefreshFailing", [expected_alert("MemoryExporterRefreshFailing", svc("a:9464"), "15")]),
            ],
        },
    ]
    document = {"rule_files": ["memory.rules.yml"], "evaluation_interval": "1m", "tests": tests}
    header = "# Generated by alerts/generate_tests.py: edit that file, not this one.\n"
    return header + yaml.safe_dump(document, sort_keys=False, width=200)


if __name__ == "__main__":
    import sys

    generated = main()
    target = HERE / "memory.test.yml"
    if "--check" in sys.argv:
        # The drift test: the committed file is what the generator writes.
        if target.read_text() != generated:
            sys.exit("alerts/memory.test.yml differs from what alerts/generate_tests.py writes: rerun it")
        print("alerts/memory.test.yml is up to date")
    else:
        target.write_text(generated)

