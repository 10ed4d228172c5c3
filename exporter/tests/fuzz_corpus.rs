//! Replays the cargo-fuzz corpus (fuzz/corpus/*) through the fuzz targets' checks on the stable
//! toolchain: every seed and every crash ever found must pass.
mod support;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = support::workspace_root().join("fuzz/corpus").join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{} fails {target}", path.display());
        count += 1;
    }
    assert!(count >= 5, "the {target} corpus has {count} inputs");
}

#[test]
fn heap_dump_corpus() {
    replay("heap_dump", exporter::fuzzing::heap_dump);
}

#[test]
fn query_params_corpus() {
    replay("query_params", exporter::fuzzing::query_params);
}
