//! Helpers for tests that talk HTTP to the exporter and drive real tools (the demo binary,
//! Prometheus, promtool, go tool pprof, jeprof). No mocks: when a tool is missing the test fails
//! under `CI=true` and is skipped elsewhere with the Debian package to install.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one HTTP/1.1 request (with `Connection: close`) and reads the whole response.
pub fn request(addr: SocketAddr, method: &str, target: &str, headers: &[(&str, &str)]) -> Response {
    try_request(addr, method, target, headers, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{method} {target}: {e}"))
}

/// One request with a client timeout, as a scraper sends it: an error instead of a panic.
pub fn try_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<Response, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("no complete answer within {timeout:?}: {e}"))?;
    Ok(parse_response(&raw, method == "HEAD"))
}

pub fn get(addr: SocketAddr, target: &str) -> Response {
    request(addr, "GET", target, &[])
}

fn parse_response(raw: &[u8], head_only: bool) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked && !head_only {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parses the sample lines of a Prometheus text exposition (label values without escapes).
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let rest = rest.strip_suffix('}').unwrap();
                    let labels = split_labels(rest);
                    (name.to_owned(), labels)
                }
                None => (series.to_owned(), Vec::new()),
            };
            Sample {
                name,
                labels,
                value: value
                    .parse()
                    .unwrap_or_else(|_| panic!("value in {line:?}")),
            }
        })
        .collect()
}

fn split_labels(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = text;
    while let Some((name, after)) = rest.split_once("=\"") {
        let end = after.find('"').unwrap();
        labels.push((
            name.trim_start_matches(',').to_owned(),
            after[..end].to_owned(),
        ));
        rest = &after[end + 1..];
    }
    labels
}

pub fn value_of(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && label.is_none_or(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|s| s.value)
}

/// The path of `tool` if installed. Under `CI=true` a missing tool fails the test; elsewhere
/// the caller skips, and this prints which Debian package provides it.
pub fn require_tool(tool: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|path| path.is_file())
    });
    if found.is_none() {
        let message = format!("`{tool}` is not installed: apt-get install {package}");
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{message} (CI=true: end-to-end tests may not be skipped)");
        }
        eprintln!("SKIPPED: {message}");
    }
    found
}

/// Go's own pprof parser (`github.com/google/pprof/profile`, what Parca's and Alloy's
/// scrapers call) as a small program, `tests/pprof_inspect`, built once per test process over
/// Debian's `golang-github-google-pprof-dev`. `None` (skip) when Go or the package is missing
/// outside `CI=true`.
pub struct GoPprof(PathBuf);

/// Where Debian's golang-github-google-pprof-dev puts the package, as a GOPATH.
const GOPATH: &str = "/usr/share/gocode";

impl GoPprof {
    pub fn build() -> Option<GoPprof> {
        static BUILT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
        let go = require_tool("go", "golang-go")?;
        if !Path::new(GOPATH)
            .join("src/github.com/google/pprof/profile")
            .is_dir()
        {
            let message =
                "Go's pprof package is not installed: apt-get install golang-github-google-pprof-dev";
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "{message} (CI=true: end-to-end tests may not be skipped)"
            );
            eprintln!("SKIPPED: {message}");
            return None;
        }
        let binary = BUILT.get_or_init(|| {
            let out = std::env::temp_dir().join(format!("pprof_inspect-{}", std::process::id()));
            let status = Command::new(go)
                .args(["build", "-o"])
                .arg(&out)
                .arg(".")
                .current_dir(workspace_root().join("exporter/tests/pprof_inspect"))
                .env("GO111MODULE", "off")
                .env("GOPATH", GOPATH)
                .status()
                .expect("go build runs");
            assert!(status.success(), "building tests/pprof_inspect failed");
            Some(out)
        });
        binary.clone().map(GoPprof)
    }

    /// What Go's parser reads from each profile (see `tests/pprof_inspect/main.go`), or its
    /// error for the first one it cannot parse.
    pub fn inspect(&self, profiles: &[&[u8]]) -> Result<Vec<serde_json::Value>, String> {
        let dir = TempDir::new("pprof-inspect");
        let files: Vec<PathBuf> = profiles
            .iter()
            .enumerate()
            .map(|(i, body)| {
                let file = dir.path().join(format!("{i}.pb.gz"));
                std::fs::write(&file, body).unwrap();
                file
            })
            .collect();
        let out = Command::new(&self.0).args(&files).output().unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect())
    }
}

/// Runs `command` to completion; panics with its output unless it succeeds.
pub fn assert_succeeds(command: &mut Command) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The alert rules as `alerts/generate_rules.py` writes them with `settings` (`--name value`
/// pairs: compressed windows, a 1 s group interval), into `dir`; returns the file.
pub fn generated_rules(dir: &TempDir, settings: &[&str]) -> PathBuf {
    let output = dir.path().join("memory.rules.yml");
    let status = Command::new("python3")
        .arg(workspace_root().join("alerts/generate_rules.py"))
        .arg("--output")
        .arg(&output)
        .args(settings)
        .status()
        .expect("python3 runs alerts/generate_rules.py (apt-get install python3-yaml)");
    assert!(status.success(), "generate_rules.py {settings:?} failed");
    output
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "memexp-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The demo binary, built in release mode (as the README runs it) if `DEMO_BIN` is not set.
pub fn demo_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("DEMO_BIN") {
        return bin.into();
    }
    example_binary("demo", &[])
}

/// An example of the exporter crate, built in release mode with `features`.
pub fn example_binary(name: &str, features: &[&str]) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "exporter", "--example", name])
        .args(["--features", &features.join(",")])
        .current_dir(workspace_root())
        .status()
        .expect("cannot run cargo to build an example");
    assert!(status.success(), "building the example {name} failed");
    target.join("release/examples").join(name)
}

/// A running demo process, killed on drop.
pub struct Demo {
    pub child: Child,
    pub addr: SocketAddr,
    pub output: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Demo {
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Demo {
        let mut command = Command::new(demo_binary());
        command
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("cannot start the demo");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let output = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = output.clone();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if let Some(url) = line.trim().strip_prefix("http://") {
                    if let Some(addr) = url.strip_suffix("/metrics") {
                        let _ = tx.send(addr.parse::<SocketAddr>().unwrap());
                    }
                }
                lines.lock().unwrap().push(line);
            }
        });
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let lines = output.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "the demo printed no metrics URL: {:?}",
                    output.lock().unwrap()
                )
            });
        Demo {
            child,
            addr,
            output,
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until a server started as a child process listens on `addr`; after `timeout`,
/// panics with `what` and its log.
pub fn wait_until_listening(
    addr: SocketAddr,
    timeout: Duration,
    what: &str,
    log: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start: {}", log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A real Prometheus server scraping `targets` every second, killed on drop.
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus with `config` (YAML text; `{data}` in it is the data directory).
    pub fn start(binary: &Path, config: &str) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let config = config.replace("{data}", &dir.path().display().to_string());
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(binary)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("cannot start prometheus");
        let prometheus = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        wait_until_listening(addr, Duration::from_secs(60), "prometheus", || {
            prometheus.log()
        });
        prometheus
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Evaluates an instant query; returns the `data.result` array.
    pub fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        self.try_query(promql)
            .unwrap_or_else(|e| panic!("{promql}: {e}"))
    }

    fn try_query(&self, promql: &str) -> Result<Vec<serde_json::Value>, String> {
        let target = format!("/api/v1/query?query={}", url_encode(promql));
        let response = try_request(self.addr, "GET", &target, &[], Duration::from_secs(30))?;
        let json: serde_json::Value = serde_json::from_slice(&response.body)
            .map_err(|e| format!("HTTP {}: {e}: {}", response.status, response.text()))?;
        if json["status"] != "success" {
            return Err(json.to_string());
        }
        Ok(json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Polls `promql` until it returns at least one series, or panics after `timeout` (an
    /// answer Prometheus could not give, under load, is polled again; the last one is shown).
    pub fn wait_for(&self, promql: &str, timeout: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let outcome = self.try_query(promql);
            if let Ok(result) = &outcome {
                if !result.is_empty() {
                    return result.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no data for {promql} after {timeout:?} (last answer: {outcome:?}); prometheus log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs `promtool check metrics` on an exposition; returns its combined output on failure.
pub fn promtool_check_metrics(promtool: &Path, exposition: &[u8]) -> Result<(), String> {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(exposition).unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Every dashboard JSON under grafana/dashboards, by file name.
pub fn dashboards() -> Vec<(String, serde_json::Value)> {
    let dir = workspace_root().join("grafana/dashboards");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let json = serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), json)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
