//! The exporter's routes mounted in an axum application: the same answers as the built-in
//! server, over real HTTP, on the application's own port.
mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{example_binary, get, request};

#[global_allocator]
static GLOBAL: tracking_alloc::TrackingAlloc<tikv_jemallocator::Jemalloc> =
    tracking_alloc::TrackingAlloc::new(tikv_jemallocator::Jemalloc);

/// Profiling on, so the profile routes answer (and one runs at a time).
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: &[u8; 45] = b"prof:true,prof_active:true,lg_prof_sample:19\0";

const TOKEN: &str = "s3cret";

/// An axum app with a route of its own and the exporter's router merged in, served on a port
/// of its own runtime thread.
fn start_app() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let exporter = exporter::Exporter::builder()
                .without_server()
                .debug_routes(true)
                .debug_token(TOKEN)
                .max_profile_seconds(5)
                .start()
                .unwrap();
            let app = axum::Router::new()
                .route(
                    "/hello",
                    axum::routing::get(|| async { "hello from the app" }),
                )
                .merge(exporter.router());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    rx.recv_timeout(Duration::from_secs(30)).unwrap()
}

fn bearer(token: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {token}"))
}

#[test]
fn mounted_routes_keep_every_rule_of_the_built_in_server() {
    let a = start_app();
    let right = bearer(TOKEN);
    let wrong = bearer("nope");
    let with = |h: &(&'static str, String)| vec![(h.0, h.1.clone())];
    let call = |method: &str, target: &str, headers: &[(&'static str, String)]| {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        request(a, method, target, &headers)
    };

    // The app's own route and the exporter's, on one port.
    assert_eq!(get(a, "/hello").text(), "hello from the app");
    let metrics = get(a, "/metrics");
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    assert!(text.contains("jemalloc_allocated_bytes") && text.contains("memory_tracking_info"));

    // Every debug route: no token or a wrong one is 401, the right one is not.
    for (method, target) in [
        ("GET", "/debug/pprof/status"),
        ("GET", "/debug/pprof/heap?format=collapsed"),
        ("GET", "/debug/pprof/allocs?gc=1&format=collapsed"),
        ("POST", "/debug/pprof/heap/activate"),
        ("GET", "/debug/pprof/dumps"),
        ("POST", "/debug/memory/release?probe=all"),
        ("GET", "/debug/memory/overview?since=0"),
        ("GET", "/debug/memory/scopes?spark=0"),
    ] {
        assert_eq!(call(method, target, &[]).status, 401, "{method} {target}");
        assert_eq!(
            call(method, target, &with(&wrong)).status,
            401,
            "{method} {target}"
        );
        let ok = call(method, target, &with(&right));
        assert!(
            ok.status < 300,
            "{method} {target}: {} {}",
            ok.status,
            ok.text()
        );
    }

    // The console's page carries no data and asks for the token itself: served without one.
    let page = call("GET", "/debug/memory", &[]);
    assert_eq!(page.status, 200);
    assert!(page.text().contains("Token required") && !page.text().contains("jemalloc_"));
    for bad in [
        "/debug/memory/overview?since=yesterday",
        "/debug/memory/scopes?spark=2",
        "/debug/memory?x=1",
    ] {
        let response = call("GET", bad, &with(&right));
        assert_eq!(response.status, 400, "{bad}: {}", response.text());
    }

    // Bad input: 4xx with a message, as from the built-in server.
    let bad = call("GET", "/debug/pprof/heap?format=bogus", &with(&right));
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(bad.text().contains("format"), "{}", bad.text());
    let unknown = call("GET", "/debug/pprof/heap?colour=red", &with(&right));
    assert_eq!(unknown.status, 400, "{}", unknown.text());
    let path = call(
        "GET",
        "/debug/pprof/dumps/..%2F..%2Fetc%2Fpasswd",
        &with(&right),
    );
    assert!(matches!(path.status, 400 | 404), "{}", path.text());
    let method = call("GET", "/debug/pprof/heap/activate", &with(&right));
    assert_eq!(method.status, 405);
    assert_eq!(method.header("allow"), Some("POST"));
    let mut with_body = with(&right);
    with_body.push(("content-length", "3".into()));
    assert_eq!(call("POST", "/debug/pprof/dumps", &with_body).status, 413);
    let missing = call("GET", "/debug/nothing-here", &with(&right));
    assert_eq!(missing.status, 404);
    // GET lists the stored dumps (an array), it does not take one.
    let listed = call("GET", "/debug/pprof/dumps", &with(&right));
    assert_eq!(listed.status, 200, "{}", listed.text());
    let listed: serde_json::Value = serde_json::from_slice(&listed.body).unwrap();
    assert!(listed.is_array(), "{listed}");

    // One profiling operation at a time: a second one during a timed profile gets 409.
    let timed = std::thread::spawn(move || {
        let right = bearer(TOKEN);
        request(
            a,
            "GET",
            "/debug/pprof/heap?seconds=2",
            &[(right.0, right.1.as_str())],
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    let busy = call("GET", "/debug/pprof/heap", &with(&right));
    assert_eq!(busy.status, 409, "{}", busy.text());
    assert!(busy.header("retry-after").is_some());
    // Release probes wait their turn too: their before/after figures would be distorted.
    let release = call("POST", "/debug/memory/release?probe=all", &with(&right));
    assert_eq!(release.status, 409, "{}", release.text());
    let timed = timed.join().unwrap();
    assert_eq!(timed.status, 200, "{}", timed.text());
    // The profile itself: gzipped pprof, sent as a file named after what it holds.
    assert_eq!(
        timed.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(&timed.body[..2], &[0x1f, 0x8b], "gzipped");
    assert!(
        timed
            .header("content-disposition")
            .is_some_and(|d| d.starts_with("inline; filename=") && d.ends_with(".pb.gz\"")),
        "{:?}",
        timed.header("content-disposition")
    );
}

/// The example application, as a user runs it: its routes and the exporter's on one port.
#[test]
fn the_axum_example_serves_both_on_one_port() {
    let binary = example_binary("axum_app", &["axum"]);
    let mut child = Command::new(binary)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("the example starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on http://")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .parse()
        .unwrap();
    for id in 0..50 {
        assert_eq!(get(addr, &format!("/orders/{id}")).status, 200);
    }
    std::thread::sleep(std::time::Duration::from_millis(150)); // past a scrape's reading reuse
    let metrics = get(addr, "/metrics").text();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        metrics.contains("memory_scope_live_bytes{scope=\"orders\"}"),
        "the app's scope is exported:\n{metrics}"
    );
    assert!(metrics.contains("memory_tracking_info{mode=\"sampled\""));
}

/// The console's JSON is gzipped for clients that accept it (browsers do), plain for others,
/// the same data either way; its page carries a policy that loads nothing from elsewhere.
#[test]
fn the_console_routes_compress_for_browsers_and_confine_the_page() {
    use std::io::Read;
    let a = start_app();
    let auth = format!("Bearer {TOKEN}");
    let fetch = |path: &str, encoding: Option<&str>| {
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend(encoding.map(|e| ("accept-encoding", e)));
        let response = request(a, "GET", path, &headers);
        assert_eq!(response.status, 200, "{path}: {}", response.text());
        response
    };
    let json = |body: &[u8]| serde_json::from_slice::<serde_json::Value>(body).unwrap();
    for path in [
        "/debug/memory/scopes?spark=0",
        "/debug/memory/overview?since=0",
    ] {
        for plain_asked in [None, Some("identity"), Some("br")] {
            let plain = fetch(path, plain_asked);
            assert_eq!(plain.header("content-encoding"), None, "{plain_asked:?}");
            json(&plain.body);
        }
        for encoding in ["gzip", "deflate, gzip;q=0.8", "br,gzip"] {
            let compressed = fetch(path, Some(encoding));
            assert_eq!(
                compressed.header("content-encoding"),
                Some("gzip"),
                "{encoding}"
            );
            assert_eq!(compressed.header("vary"), Some("accept-encoding"));
            let mut body = Vec::new();
            flate2::read::GzDecoder::new(&compressed.body[..])
                .read_to_end(&mut body)
                .unwrap();
            let value = json(&body);
            if path.starts_with("/debug/memory/scopes") {
                let names: Vec<_> = value["scopes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|row| row["name"].as_str().unwrap().to_owned())
                    .collect();
                assert!(names.contains(&"exporter".to_owned()), "{names:?}");
            } else {
                assert!(value["points"].is_array(), "{value}");
            }
        }
    }
    // The overview's figures of now are one reading: fragmentation is resident / allocated.
    let overview = json(&fetch("/debug/memory/overview?since=0", None).body);
    let now = &overview["now"];
    let figure = |name: &str| now[name].as_f64().unwrap();
    assert!(figure("allocated") > 0.0, "{now}");
    let expected = figure("resident") / figure("allocated");
    assert!(
        (figure("fragmentation") - expected).abs() < 1e-9 * expected,
        "{now}"
    );
    // Sparklines by default and with spark=1 (a point a minute, then now: never empty),
    // none with spark=0 (the page's cheap refresh between minutes).
    for (path, with_spark) in [
        ("/debug/memory/scopes", true),
        ("/debug/memory/scopes?spark=1", true),
        ("/debug/memory/scopes?spark=0", false),
    ] {
        let value = json(&fetch(path, None).body);
        let rows = value["scopes"].as_array().unwrap();
        assert!(!rows.is_empty(), "{path}: {value}");
        for row in rows {
            let spark = row["spark"].as_array().unwrap();
            if with_spark {
                assert_eq!(spark.last(), Some(&row["live_bytes"]), "{path}: {row}");
            } else {
                assert!(spark.is_empty(), "{path}: {row}");
            }
        }
    }
    let page = get(a, "/debug/memory");
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let policy = page.header("content-security-policy").unwrap();
    assert!(
        policy.starts_with("default-src 'none';") && policy.contains("connect-src 'self'"),
        "{policy}"
    );
    assert_eq!(page.header("cache-control"), Some("no-store"));
}
