#!/usr/bin/env python3
"""Writes grafana/dashboards/*.json from the panel lists below (one description per panel, no
copy-pasted JSON), and the same dashboards as ConfigMaps for Grafana's dashboard sidecar in
deploy/kubernetes/dashboards.yaml. Rerun after editing: python3 grafana/generate.py
`--check` compares instead of writing (a test fails when the committed files drift).
The end-to-end test evaluates every query here against a real Prometheus scraping the demo."""
import json
import pathlib
import sys

import yaml

# A variable, so an import into any Grafana finds its Prometheus (a hard-coded uid shows
# "datasource not found" anywhere but the compose stack).
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
MiB = 1024 * 1024
# The growth alerts' threshold (alerts/generate_rules.py), drawn on the growth panels.
GROWTH_ALERT_BYTES_PER_HOUR = 50 * MiB
SEL = 'job=~"$job",instance=~"$instance"'
SCOPE_SEL = SEL + ',scope=~"$scope"'


def q(expr, legend="", instant=False, fmt="time_series"):
    return {"expr": expr, "legendFormat": legend, "instant": instant, "format": fmt}


def panel(kind, title, description, unit, queries, w=12, h=8, **options):
    """`options`: `stacked`, `mappings`, `text_mode`, `red_above` (a threshold drawn in red;
    without one, no threshold colours the panel), `legend_table`, `unstacked` (series names
    drawn as lines over a stack)."""
    return {"type": kind, "title": title, "description": description, "unit": unit,
            "queries": queries, "w": w, "h": h, "options": options}


def variables(with_scope):
    def var(name, query, label):
        return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
                "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
                # No allValue: "All" then means the values listed (of the selected jobs), not
                # ".*", which would pull in every job's process_* series.
                "refresh": 2, "includeAll": True, "multi": True,
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1}
    datasource = {"name": "datasource", "label": "Prometheus", "type": "datasource",
                  "query": "prometheus", "current": {}, "hide": 0}
    out = [datasource, var("job", "label_values(jemalloc_info, job)", "job"),
           var("instance", 'label_values(jemalloc_info{job=~"$job"}, instance)', "instance")]
    if with_scope:
        out.append(var("scope", f"label_values(memory_scope_live_bytes{{{SEL}}}, scope)", "scope"))
    return out


def build(uid, title, description, panels, with_scope):
    out, x, y, row_h = [], 0, 0, 0
    for i, p in enumerate(panels, start=1):
        if x + p["w"] > 24:
            x, y, row_h = 0, y + row_h, 0
        steps = [{"color": "green", "value": None}]
        if "red_above" in p["options"]:
            steps.append({"color": "red", "value": p["options"]["red_above"]})
        field_defaults = {"unit": p["unit"], "thresholds": {"mode": "absolute", "steps": steps}}
        if "mappings" in p["options"]:
            field_defaults["mappings"] = p["options"]["mappings"]
        custom = {}
        if p["type"] == "timeseries":
            custom = {"fillOpacity": 10, "lineWidth": 1, "showPoints": "never"}
            if p["options"].get("stacked"):
                custom.update({"stacking": {"mode": "normal", "group": "A"}, "fillOpacity": 40})
            if "red_above" in p["options"]:
                custom["thresholdsStyle"] = {"mode": "dashed"}
        if custom:
            field_defaults["custom"] = custom
        overrides = [
            {"matcher": {"id": "byName", "options": name},
             "properties": [{"id": "custom.stacking", "value": {"mode": "none"}},
                            {"id": "custom.fillOpacity", "value": 0},
                            {"id": "custom.lineWidth", "value": 2}]}
            for name in p["options"].get("unstacked", [])
        ]
        targets = [dict(refId=chr(ord("A") + n), datasource=DATASOURCE, **query)
                   for n, query in enumerate(p["queries"])]
        entry = {"id": i, "type": p["type"], "title": p["title"], "description": p["description"],
                 "datasource": DATASOURCE, "gridPos": {"x": x, "y": y, "w": p["w"], "h": p["h"]},
                 "fieldConfig": {"defaults": field_defaults, "overrides": overrides}, "targets": targets}
        if p["options"].get("legend_table"):
            entry["options"] = {"legend": {"displayMode": "table", "placement": "right",
                                           "calcs": ["lastNotNull", "max"], "sortBy": "Last *",
                                           "sortDesc": True}}
        if p["type"] == "table":
            entry["transformations"] = [{"id": "merge", "options": {}},
                                        {"id": "organize", "options": {"excludeByName": {"Time": True},
                                         "renameByName": {"Value #A": "now", "Value #B": "1 h ago", "Value #C": "change"}}}]
        if p["type"] == "bargauge":
            entry["options"] = {"orientation": "horizontal", "displayMode": "gradient",
                                "reduceOptions": {"calcs": ["lastNotNull"], "values": False}}
        if p["type"] == "stat":
            entry["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "values": False},
                                "colorMode": "value", "graphMode": "area",
                                "textMode": p["options"].get("text_mode", "auto")}
        out.append(entry)
        x += p["w"]
        row_h = max(row_h, p["h"])
    return {"uid": uid, "title": title, "description": description, "tags": ["memory", "jemalloc"],
            "timezone": "browser", "schemaVersion": 39, "version": 1, "editable": False,
            "refresh": "1m", "time": {"from": "now-6h", "to": "now"},
            "templating": {"list": variables(with_scope)}, "panels": out,
            "annotations": {"list": [RESTARTS]},
            "links": [{"title": "Memory scopes" if uid == "memory-overview" else "Memory overview",
                       "type": "link", "keepTime": True, "includeVars": True,
                       "url": "/d/" + ("memory-scopes" if uid == "memory-overview" else "memory-overview")}]}


# A restart lowers every figure: marked on every panel so it is not read as memory freed.
RESTARTS = {"name": "Restarts", "datasource": DATASOURCE, "enable": True, "iconColor": "orange",
            "expr": f"changes(process_start_time_seconds{{{SEL}}}[2m]) > 0",
            "step": "1m", "titleFormat": "restart", "textFormat": "{{instance}} restarted"}


def change_since(expr, offset):
    """`expr` now minus `expr` `offset` ago, summed over the selection rather than per instance,
    so a pod replaced by an identical one changes nothing; what did not exist then counts from
    zero (and a fresh Prometheus shows the figures since it began)."""
    return f"{expr} - {then(expr, offset)}"


def then(expr, offset):
    """`expr` as it was `offset` ago, or zero for what did not exist then."""
    return f"({offset_of(expr, offset)} or {expr} * 0)"


def offset_of(expr, offset):
    """`expr` with every selector shifted `offset` into the past."""
    return expr.replace("}", f"}} offset {offset}")


def tracking_mode(w, h):
    """The per-scope figures' provenance: exact counts or sampled estimates (memory_tracking_info)."""
    return panel("stat", "Tracking mode",
                 "How the per-scope figures are measured. exact: TrackingAlloc counts every block. "
                 "sampled: SampledAlloc records one block per sample_interval_bytes allocated on "
                 "average and weights it, so scope figures are unbiased estimates with a relative "
                 "error of about sqrt(interval / bytes held). A warning means tracking does not work "
                 "as configured (see the service's log).", "none",
                 [q(f"memory_tracking_info{{{SEL}}} + on (job, instance) group_left "
                    f"memory_tracking_warning{{{SEL}}}",
                    "{{instance}}: {{mode}}, interval {{sample_interval_bytes}} B, {{placement}}",
                    instant=True)],
                 w=w, h=h, text_mode="value_and_name",
                 mappings=[{"type": "value", "options": {
                     "1": {"text": "ok", "color": "green", "index": 0},
                     "2": {"text": "WARNING: not as configured, see the service's log",
                           "color": "red", "index": 1}}}])


OVERVIEW = [
    panel("timeseries", "Heap (jemalloc)",
          "What jemalloc holds. allocated: live blocks; active: their pages; resident: pages in RAM "
          "(including dirty ones and metadata); mapped and retained: address space. A gap between "
          "resident and allocated is fragmentation or unpurged dirty pages.",
          "bytes", [q(f"jemalloc_{m}_bytes{{{SEL}}}", f"{m} {{{{instance}}}}")
                    # Not retained: virtual address space only, often far larger, it flattened
                    # the other lines.
                    for m in ("allocated", "active", "resident", "mapped", "metadata")]),
    panel("timeseries", "Process RSS vs jemalloc resident",
          "RSS counts every resident page of the process. Memory above jemalloc's resident belongs to "
          "code, stacks, or allocations outside jemalloc (C libraries using libc malloc, mmap).",
          "bytes", [q(f"process_resident_memory_bytes{{{SEL}}}", "process RSS {{instance}}"),
                    q(f"jemalloc_resident_bytes{{{SEL}}}", "jemalloc resident {{instance}}"),
                    q(f"process_resident_memory_bytes{{{SEL}}} - on (job, instance) jemalloc_resident_bytes{{{SEL}}}",
                      "outside jemalloc {{instance}}")]),
    panel("timeseries", "Fragmentation (resident ÷ allocated)",
          "Resident bytes per allocated byte. Near 1 is tight; above 1.5 on a large heap the alert "
          "MemoryFragmentationHigh fires. Spikes right after a batch job are normal while dirty "
          "pages decay.", "none",
          [q(f"jemalloc_resident_bytes{{{SEL}}} / jemalloc_allocated_bytes{{{SEL}}}", "{{instance}}")], w=8,
          red_above=1.5),
    panel("timeseries", "Dirty and muzzy pages",
          "Freed pages jemalloc has not returned to the OS yet. They count in RSS. If they stay high, "
          "lower dirty_decay_ms or enable background_thread.", "bytes",
          [q(f"jemalloc_dirty_bytes{{{SEL}}}", "dirty {{instance}}"),
           q(f"jemalloc_muzzy_bytes{{{SEL}}}", "muzzy {{instance}}")], w=8),
    panel("timeseries", "Allocated, by who holds it",
          "jemalloc's allocated bytes split into parts, stacked (one reading per scrape, so they add "
          "up to allocated): what the scopes hold, free blocks sitting in thread caches (jemalloc "
          "counts them as allocated), the tracking allocator's own overhead, and unattributed: held "
          "by someone no scope names (C libraries, allocations before the tracker, size-class "
          "rounding). If unattributed grows, add scopes or diff heap profiles.",
          "bytes", [q(f"sum by (instance) (memory_scope_live_bytes{{{SEL}}})", "scopes {{instance}}"),
                    q(f"jemalloc_tcache_bytes{{{SEL}}}", "thread caches {{instance}}"),
                    q(f"memory_tracking_overhead_bytes{{{SEL}}}", "tracking overhead {{instance}}"),
                    q(f"memory_unattributed_bytes{{{SEL}}}", "unattributed {{instance}}")],
          w=8, stacked=True),
    panel("stat", "Growth over 1 h",
          "Change of jemalloc allocated bytes of the selected instances together over the last "
          "hour (a replaced pod does not count as growth). Red above the growth alerts' threshold "
          "(50 MiB/h); positive and steady for hours is a leak, see MemorySlowGrowth.", "bytes",
          [q(change_since(f"sum(jemalloc_allocated_bytes{{{SEL}}})", "1h"), "selection")], w=6, h=5,
          red_above=GROWTH_ALERT_BYTES_PER_HOUR),
    panel("stat", "Growth over 24 h",
          "Change of jemalloc allocated bytes of the selected instances together over the last day. "
          "Compare with the 1 h figure: a leak grows at both scales, a daily cycle only at one. Red "
          "above 24 h of the growth alerts' threshold.", "bytes",
          [q(change_since(f"sum(jemalloc_allocated_bytes{{{SEL}}})", "24h"), "selection")], w=6, h=5,
          red_above=24 * GROWTH_ALERT_BYTES_PER_HOUR),
    panel("stat", "Heap profile dumps (24 h)",
          "Heap profiles written in the last day, by trigger (manual POST /debug/pprof/dumps or the "
          "automatic growth trigger) and result. Errors mean the dump directory is missing, full or "
          "read-only.", "short",
          [q(f"sum by (trigger, result) (increase(jemalloc_prof_dumps_total{{{SEL}}}[24h]))",
             "{{trigger}} {{result}}", instant=True)], w=6, h=5),
    panel("stat", "Profiling",
          "1 when heap profiling is enabled at start-up (prof:true) and when it is sampling now "
          "(prof.active). Profiles over HTTP need both.", "bool",
          [q(f"jemalloc_profiling_enabled{{{SEL}}}", "enabled {{instance}}"),
           q(f"jemalloc_profiling_active{{{SEL}}}", "active {{instance}}")], w=6, h=5),
    tracking_mode(w=24, h=3),
    panel("timeseries", "Exporter refresh duration",
          "Time to advance jemalloc's epoch and read its statistics, every refresh interval. It takes "
          "arena locks: if it reaches milliseconds, raise the refresh interval.", "s",
          [q(f"memory_exporter_refresh_duration_seconds{{{SEL}}}", "{{instance}}")]),
    panel("timeseries", "Exporter scrapes",
          "Scrapes of /metrics per second by status code; 401s mean a scraper without the token.",
          "reqps", [q(f"sum by (instance, code) (rate(memory_exporter_scrapes_total{{{SEL}}}[$__rate_interval]))",
                      "{{instance}} {{code}}")]),
]

LIVE_BY_SCOPE = f"sum by (scope) (memory_scope_live_bytes{{{SCOPE_SEL}}})"

SCOPES = [
    tracking_mode(w=24, h=3),
    panel("timeseries", "Live bytes per scope",
          "Bytes the ten largest scopes hold (requested sizes), stacked, the rest as other; the "
          "line above is jemalloc's allocated bytes, so the gap is what no scope names. A block "
          "stays with the scope that allocated it wherever it is freed. A band that only rises is "
          "a leak candidate.",
          "bytes", [q(f"topk(10, sum by (scope) (memory_scope_live_bytes{{{SCOPE_SEL}}}))", "{{scope}}"),
                    q(f"sum(memory_scope_live_bytes{{{SCOPE_SEL}}}) - "
                      f"sum(topk(10, sum by (scope) (memory_scope_live_bytes{{{SCOPE_SEL}}})))", "other"),
                    q(f"sum(jemalloc_allocated_bytes{{{SEL}}})", "jemalloc allocated")],
          w=16, stacked=True, legend_table=True, unstacked=["jemalloc allocated"]),
    panel("bargauge", "Top scopes now",
          "The ten scopes holding the most memory at the end of the range.", "bytes",
          [q(f"topk(10, sum by (scope) (memory_scope_live_bytes{{{SCOPE_SEL}}}))", "{{scope}}", instant=True)],
          w=8),
    panel("timeseries", "Growth per scope, bytes per hour (1h slope)",
          "Slope of live bytes over the last hour (linear regression), in bytes per hour; the dashed "
          "line is the growth alerts' threshold (50 MiB/h). Reacts within the hour, but a cache "
          "that fills and is cleared swings it both ways. From the recording rule, so it costs one "
          "sample per series and step.", "bytes",
          [q(f"sum by (scope) (instance_scope:memory_scope_live_bytes:deriv1h{{{SCOPE_SEL}}}) * 3600",
             "{{scope}}")], w=12, red_above=GROWTH_ALERT_BYTES_PER_HOUR),
    panel("timeseries", "Floor growth per scope, bytes per hour (what the alerts measure)",
          "How fast the floor (the lowest point of the last 90 min) of each scope's live bytes "
          "rises, in bytes per hour: what MemoryScopeSlowGrowth fires on above the dashed line. A "
          "cache cleared every cycle keeps a flat floor; a leak raises it. From the recording rule "
          "(one sample per series and step; a regression over hours would read them all).",
          "bytes",
          [q(f"sum by (scope) (instance_scope:memory_scope_live_bytes:floor_growth_per_hour{{{SCOPE_SEL}}})",
             "{{scope}}")], w=12, red_above=GROWTH_ALERT_BYTES_PER_HOUR),
    panel("timeseries", "Allocation rate (bytes/s)",
          "Bytes allocated per second by each scope: churn, not growth. High churn with flat live "
          "bytes is CPU cost, not a leak.", "binBps",
          [q(f"sum by (scope) (rate(memory_scope_allocated_bytes_total{{{SCOPE_SEL}}}[$__rate_interval]))", "{{scope}}")]),
    panel("timeseries", "Allocation rate (ops/s)",
          "Allocations per second by each scope. Many small allocations cost more CPU than few large "
          "ones of the same bytes.", "ops",
          [q(f"sum by (scope) (rate(memory_scope_allocations_total{{{SCOPE_SEL}}}[$__rate_interval]))", "{{scope}}")]),
    panel("table", "Scopes: now, 1 h ago, change",
          "Live bytes per scope over the selected instances together: now, an hour ago (0 if the "
          "scope did not exist), and the change. Summed before comparing, so a pod replaced by an "
          "identical one shows no change. Sort by change to find what grows.", "bytes",
          [q(LIVE_BY_SCOPE, "", instant=True, fmt="table"),
           q(then(LIVE_BY_SCOPE, "1h"), "", instant=True, fmt="table"),
           q(change_since(LIVE_BY_SCOPE, "1h"), "", instant=True, fmt="table")],
          w=24, h=10),
]

DASHBOARDS = {
    "memory-overview.json": build("memory-overview", "Memory overview",
                                  "Where the process's memory is: jemalloc's view, RSS, fragmentation, growth.",
                                  OVERVIEW, with_scope=False),
    "memory-scopes.json": build("memory-scopes", "Memory scopes",
                                "Which part of the program holds memory, and which part grows.",
                                SCOPES, with_scope=True),
}

HERE = pathlib.Path(__file__).parent
CONFIGMAPS = HERE.parent / "deploy" / "kubernetes" / "dashboards.yaml"


class _Literal(str):
    pass


yaml.SafeDumper.add_representer(
    _Literal, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|"))


def dashboard_json(dashboard):
    return json.dumps(dashboard, indent=2) + "\n"


def configmaps():
    """One ConfigMap per dashboard, labelled for kube-prometheus-stack's Grafana sidecar."""
    docs = []
    for name, dashboard in DASHBOARDS.items():
        docs.append({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "grafana-dashboard-" + name.removesuffix(".json"),
                         "labels": {"grafana_dashboard": "1", "app.kubernetes.io/name": "memory-exporter"}},
            "data": {name: _Literal(dashboard_json(dashboard))},
        })
    header = "# Generated by grafana/generate.py from its panel lists: do not edit.\n"
    return header + yaml.safe_dump_all(docs, sort_keys=False, width=1000)


def outputs():
    files = {HERE / "dashboards" / name: dashboard_json(d) for name, d in DASHBOARDS.items()}
    files[CONFIGMAPS] = configmaps()
    return files


if __name__ == "__main__":
    for target, generated in outputs().items():
        if "--check" in sys.argv[1:]:
            if not target.exists() or target.read_text() != generated:
                sys.exit(f"{target} differs from what grafana/generate.py writes: rerun it")
            print(f"{target} is up to date")
        else:
            target.write_text(generated)
