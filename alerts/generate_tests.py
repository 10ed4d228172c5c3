#!/usr/bin/env python3
"""Writes memory.test.yml: the three shapes the growth alerts must tell apart (steady growth,
a sawtooth cache, noisy flat memory) plus the other alerts' cases, with the annotations each
firing alert must carry. Deterministic (fixed seed); rerun after changing memory.rules.yml:

    python3 alerts/generate_tests.py && promtool test rules alerts/memory.test.yml
"""
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


def series(metric, labels, values):
    body = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{metric}{{{body}}}", "values": values}


def alert_case(at, name, alerts):
    return {"eval_time": at, "alertname": name, "exp_alerts": alerts}


def main():
    growth, sawtooth, noisy = shapes()
    svc = lambda instance, **extra: {"job": "svc", "instance": instance, **extra}
    tests = [
        {
            "name": "process growth fires on steady growth, not on a sawtooth or noise",
            "interval": "1m",
            "input_series": [
                series("jemalloc_allocated_bytes", svc("growing:9464"), growth),
                series("jemalloc_allocated_bytes", svc("sawtooth:9464"), sawtooth),
                series("jemalloc_allocated_bytes", svc("noisy:9464"), noisy),
            ],
            "alert_rule_test": [
                alert_case("2h", "MemorySlowGrowth", []),
                *(
                    alert_case(t, "MemorySlowGrowth", [expected_alert("MemorySlowGrowth", svc("growing:9464"), "100Mi")])
                    for t in ("3h", "6h")
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
            ],
            "alert_rule_test": [
                alert_case("2h", "MemoryScopeSlowGrowth", []),
                *(
                    alert_case(t, "MemoryScopeSlowGrowth", [expected_alert("MemoryScopeSlowGrowth", svc("a:9464", scope="cache"), "100Mi")])
                    for t in ("3h", "6h")
                ),
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
    (HERE / "memory.test.yml").write_text(header + yaml.safe_dump(document, sort_keys=False, width=200))


if __name__ == "__main__":
    main()
