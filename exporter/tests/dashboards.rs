//! Lint of the provisioned Grafana dashboards: unique panel ids, a datasource variable that
//! resolves to the provisioned datasource, IEC units, explicit thresholds and descriptions on
//! every panel, the template variables the queries use, fleet-safe variables.
mod support;

use std::collections::HashSet;

use serde_json::Value;
use support::{dashboards, workspace_root};

/// Every panel and query names its datasource through the `datasource` variable, so an import
/// into another Grafana finds its own Prometheus (the provisioned one is the default there).
const DATASOURCE_UID: &str = "${datasource}";

fn provisioned_datasource_is_the_default_prometheus() {
    let text = std::fs::read_to_string(
        workspace_root().join("grafana/provisioning/datasources/prometheus.yml"),
    )
    .unwrap();
    assert!(text.contains("type: prometheus") && text.contains("isDefault: true"));
}

#[test]
fn dashboards_are_consistent() {
    provisioned_datasource_is_the_default_prometheus();
    let uid = DATASOURCE_UID;
    let all = dashboards();
    assert!(all.len() >= 2, "at least two dashboards: {all:?}");
    let mut dashboard_uids = HashSet::new();
    for (file, dashboard) in &all {
        assert!(
            dashboard_uids.insert(dashboard["uid"].as_str().unwrap().to_owned()),
            "{file}: duplicate uid"
        );
        let variables: Vec<&str> = dashboard["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        for required in ["datasource", "job", "instance"] {
            assert!(
                variables.contains(&required),
                "{file}: no ${required} variable"
            );
        }
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            // ".*" as "All" would pull in every job's series (process_* of Prometheus itself).
            assert!(
                variable.get("allValue").is_none_or(Value::is_null),
                "{file}: variable {} has an allValue",
                variable["name"]
            );
        }
        assert_eq!(dashboard["refresh"], "1m", "{file}: refresh");
        for link in dashboard["links"].as_array().unwrap() {
            assert_eq!(
                (&link["keepTime"], &link["includeVars"]),
                (&Value::Bool(true), &Value::Bool(true)),
                "{file}: links keep time and variables"
            );
        }
        let mut ids = HashSet::new();
        for panel in dashboard["panels"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap();
            assert!(
                ids.insert(panel["id"].as_u64().unwrap()),
                "{file}: duplicate panel id in {title}"
            );
            assert_eq!(
                panel["datasource"]["uid"], uid,
                "{file}/{title}: datasource"
            );
            let unit = panel["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .unwrap_or("");
            assert!(!unit.is_empty(), "{file}/{title}: no unit");
            // Bytes are IEC everywhere (`bytes`, `binBps`), never SI beside them.
            assert!(
                !["Bps", "decbytes", "KBs", "MBs"].contains(&unit),
                "{file}/{title}: SI unit {unit}"
            );
            // Grafana's default threshold (red at 80) means 80 bytes on a bytes panel.
            let steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
                .as_array()
                .unwrap_or_else(|| panic!("{file}/{title}: no explicit thresholds"));
            assert!(
                steps.iter().all(|s| s["value"] != 80),
                "{file}/{title}: Grafana's default threshold"
            );
            let description = panel["description"].as_str().unwrap_or("");
            assert!(description.len() > 40, "{file}/{title}: no description");
            let targets = panel["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{file}/{title}: no query");
            for target in targets {
                assert_eq!(
                    target["datasource"]["uid"], uid,
                    "{file}/{title}: target datasource"
                );
                let expr = target["expr"].as_str().unwrap();
                for variable in ["job", "instance"] {
                    assert!(
                        expr.contains(&format!("${variable}")),
                        "{file}/{title}: {expr} ignores ${variable}"
                    );
                }
                if variables.contains(&"scope") && expr.contains("memory_scope_") {
                    assert!(
                        expr.contains("$scope"),
                        "{file}/{title}: {expr} ignores $scope"
                    );
                }
            }
        }
    }
}

#[test]
fn generated_dashboards_are_up_to_date() {
    // The JSON and its Kubernetes ConfigMaps are generated by grafana/generate.py; a hand edit
    // would be lost on regeneration.
    let Some(python) = support::require_tool("python3", "python3") else {
        return;
    };
    support::assert_succeeds(
        std::process::Command::new(python)
            .arg(workspace_root().join("grafana/generate.py"))
            .arg("--check"),
    );
}
