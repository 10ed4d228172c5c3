//! Dumps belong to their program: by default each program (executable, build id, port) has a
//! ring of its own, found again after a restart, and a diff against another build's dump is
//! refused.
mod support;

use std::time::Duration;

use serde_json::Value;
use support::{free_port, get, request, Demo, TempDir};

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

fn store(demo: &Demo) -> String {
    let stored = request(demo.addr, "POST", "/debug/pprof/dumps", &[]);
    assert_eq!(stored.status, 201, "{}", stored.text());
    json(&stored.body)["id"].as_str().unwrap().to_owned()
}

fn listed(demo: &Demo) -> Vec<String> {
    json(&get(demo.addr, "/debug/pprof/dumps").body)
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn two_demos_on_one_host_keep_separate_rings() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let a = Demo::start(&["--listen", &listen], &[]);
    let b = Demo::start(&[], &[]);
    let dir = |demo: &Demo| {
        json(&get(demo.addr, "/debug/pprof/status").body)["dump_dir"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (dir_a, dir_b) = (dir(&a), dir(&b));
    assert_ne!(dir_a, dir_b, "each program has its own ring");
    assert!(
        dir_a.ends_with(&format!("-{port}")) && dir_a.contains("demo-"),
        "{dir_a}"
    );

    let id_a = store(&a);
    std::thread::sleep(Duration::from_millis(5));
    let id_b = store(&b);
    assert!(listed(&a).contains(&id_a) && !listed(&a).contains(&id_b));
    assert!(listed(&b).contains(&id_b) && !listed(&b).contains(&id_a));
    let info = json(&get(a.addr, "/debug/pprof/dumps").body);
    let build = info[0]["build_id"]
        .as_str()
        .expect("a dump records its build id");
    assert!(
        build.len() >= 16 && build.bytes().all(|c| c.is_ascii_hexdigit()),
        "{build}"
    );

    // The same binary restarted on the same port finds its ring again and can diff against it.
    drop(a);
    let again = Demo::start(&["--listen", &listen], &[]);
    assert!(listed(&again).contains(&id_a), "{:?}", listed(&again));
    let diff = get(
        again.addr,
        &format!("/debug/pprof/heap?base={id_a}&format=collapsed"),
    );
    assert_eq!(diff.status, 200, "{}", diff.text());
    let _ = std::fs::remove_dir_all(&dir_a);
    let _ = std::fs::remove_dir_all(&dir_b);
}

#[test]
fn a_diff_against_another_builds_dump_is_refused() {
    let dumps = TempDir::new("foreign-build");
    let demo = Demo::start(&["--dump-dir", dumps.path().to_str().unwrap()], &[]);
    let id = store(&demo);
    // As if another build of the program had written this dump into a shared directory.
    std::fs::write(
        dumps.path().join(format!("heap-{id}.build")),
        "deadbeefdeadbeef",
    )
    .unwrap();
    let diff = get(demo.addr, &format!("/debug/pprof/heap?base={id}"));
    assert_eq!(diff.status, 409, "{}", diff.text());
    assert!(diff.text().contains("another build"), "{}", diff.text());
    assert!(
        diff.text().contains("POST /debug/pprof/dumps"),
        "says how to fix it"
    );
    let listed = json(&get(demo.addr, "/debug/pprof/dumps").body);
    assert_eq!(
        listed[0]["build_id"], "deadbeefdeadbeef",
        "the listing shows each dump's build"
    );
}
