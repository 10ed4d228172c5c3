//! End to end: the demo's leak seen by a real Prometheus running the repository's rules (the
//! windows compressed from 90 minutes to 15 seconds through `alerts/generate_rules.py`'s
//! settings) and delivered by a real Alertmanager, configured by `alerts/alertmanager.yml`, to
//! a webhook receiver.
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::{
    free_port, generated_rules, require_tool, wait_until_listening, workspace_root, Demo,
    Prometheus, TempDir,
};

/// A webhook receiver: every request body it gets, on a channel.
fn webhook() -> (SocketAddr, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let _ = reader
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            if tx
                .send(String::from_utf8_lossy(&body).into_owned())
                .is_err()
            {
                return;
            }
        }
    });
    (addr, rx)
}

struct Alertmanager {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Alertmanager with the repository's configuration, its webhook pointed at `hook` and its
/// waits shortened from 30 s / 5 min to a second.
fn alertmanager(binary: &std::path::Path, hook: SocketAddr) -> Alertmanager {
    let dir = TempDir::new("alertmanager");
    let shipped =
        std::fs::read_to_string(workspace_root().join("alerts/alertmanager.yml")).unwrap();
    let config = shipped
        .replace(
            "http://127.0.0.1:9099/alerts",
            &format!("http://{hook}/alerts"),
        )
        .replace("group_wait: 30s", "group_wait: 1s")
        .replace("group_interval: 5m", "group_interval: 1s");
    assert!(
        config.contains(&hook.to_string()) && config.contains("group_wait: 1s"),
        "alerts/alertmanager.yml no longer has the receiver URL and waits this test replaces"
    );
    let file = dir.path().join("alertmanager.yml");
    std::fs::write(&file, config).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new(binary)
        .arg(format!("--config.file={}", file.display()))
        .arg(format!(
            "--storage.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("alertmanager.log")).unwrap())
        .spawn()
        .expect("cannot start prometheus-alertmanager");
    wait_until_listening(addr, Duration::from_secs(30), "alertmanager", || {
        std::fs::read_to_string(dir.path().join("alertmanager.log")).unwrap_or_default()
    });
    Alertmanager {
        child,
        addr,
        _dir: dir,
    }
}

#[test]
fn the_demos_leak_is_delivered_to_the_webhook() {
    let (Some(prometheus), Some(alertmanager_binary)) = (
        require_tool("prometheus", "prometheus"),
        require_tool("prometheus-alertmanager", "prometheus-alertmanager"),
    ) else {
        return;
    };
    // Exact counts: the compressed windows are too short for sampling noise to average out.
    let demo = Demo::start(&["--tracking", "exact"], &[]);
    let (hook, deliveries) = webhook();
    let alertmanager = alertmanager(&alertmanager_binary, hook);
    // The leak (32 KiB/s, 112.5 MiB/h) against a 1 MiB/h threshold over 15 s windows; the fleet
    // alert (which would inhibit the per-instance one for a one-instance job) kept out of reach.
    let rules_dir = TempDir::new("rules");
    let rules = generated_rules(
        &rules_dir,
        &[
            "--group-interval",
            "1s",
            "--floor-window",
            "15s",
            "--growth-for",
            "5s",
            "--keep-firing-for",
            "0s",
            "--growth-mib-per-hour",
            "1",
            "--fleet-growth-mib-per-hour",
            "1000000",
        ],
    );
    let _server = Prometheus::start(
        &prometheus,
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{}']\n\
             rule_files: ['{}']\n\
             scrape_configs:\n  - job_name: demo\n    static_configs:\n      - targets: ['{}']\n",
            alertmanager.addr,
            rules.display(),
            demo.addr
        ),
    );
    // Two 15 s windows of history, the uptime guard (30 s), `for: 5s`, then delivery.
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let Ok(body) = deliveries.recv_timeout(Duration::from_secs(5)) else {
            continue;
        };
        if body.contains(r#""alertname":"MemoryScopeSlowGrowth""#)
            && body.contains(r#""scope":"cache""#)
        {
            assert!(body.contains(r#""status":"firing""#), "{body}");
            assert!(
                body.contains("runbook_url"),
                "the alert carries its runbook: {body}"
            );
            return;
        }
        seen.push(body);
    }
    panic!("no MemoryScopeSlowGrowth for scope cache reached the webhook in 180 s; got: {seen:#?}");
}
