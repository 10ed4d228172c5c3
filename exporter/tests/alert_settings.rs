//! The alert rules with non-default settings of `alerts/generate_rules.py`, checked by promtool
//! (the shipped defaults are covered by `alerts/memory.test.yml` in the test command).
mod support;

use std::process::Command;

use support::{assert_succeeds, generated_rules, require_tool, TempDir};

const MIB: u64 = 1024 * 1024;

#[test]
fn a_configured_limit_predicts_exhaustion_where_no_container_limit_exists() {
    let Some(promtool) = require_tool("promtool", "prometheus") else {
        return;
    };
    let dir = TempDir::new("alert-settings");
    let limit = 4096 * MIB;
    generated_rules(&dir, &["--memory-limit-bytes", &limit.to_string()]);
    // Outside Kubernetes: resident memory rises 1 GiB/h from 2 GiB towards the configured
    // 4 GiB; another process stays at 1 GiB; a third, in a container limited to 16 GiB, rises
    // the same way but its container limit wins (both sources: the larger, as max by).
    let rising = format!("{}+{}x120", 2048 * MIB, 1024 * MIB / 60);
    let tests = format!(
        r#"rule_files: [memory.rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'process_resident_memory_bytes{{job="svc",instance="rising:9464"}}'
        values: '{rising}'
      - series: 'process_resident_memory_bytes{{job="svc",instance="flat:9464"}}'
        values: '{flat}x120'
      - series: 'process_resident_memory_bytes{{job="svc",instance="big:9464",namespace="prod",pod="big"}}'
        values: '{rising}'
      - series: 'container_spec_memory_limit_bytes{{namespace="prod",pod="big",container="app"}}'
        values: '{big}x120'
    promql_expr_test:
      - expr: instance:memory_limit_bytes
        eval_time: 1h
        exp_samples:
          - labels: 'instance:memory_limit_bytes{{job="svc",instance="rising:9464"}}'
            value: {limit}
          - labels: 'instance:memory_limit_bytes{{job="svc",instance="flat:9464"}}'
            value: {limit}
          - labels: 'instance:memory_limit_bytes{{job="svc",instance="big:9464"}}'
            value: {big}
      - expr: ALERTS{{alertname="MemoryExhaustionPredicted",alertstate="firing"}}
        eval_time: 1h30m
        exp_samples:
          - labels: 'ALERTS{{alertname="MemoryExhaustionPredicted",alertstate="firing",job="svc",instance="rising:9464",severity="critical"}}'
            value: 1
"#,
        flat = 1024 * MIB,
        big = 16384 * MIB,
    );
    std::fs::write(dir.path().join("memory.test.yml"), tests).unwrap();
    assert_succeeds(
        Command::new(promtool)
            .args(["test", "rules", "memory.test.yml"])
            .current_dir(dir.path()),
    );
}
