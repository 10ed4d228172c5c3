//! Text renderings of a heap profile: folded stacks and a flamegraph (drawn by `inferno`).

use std::collections::BTreeMap;

use super::heap_dump::HeapProfile;
use super::scope_frames;
use super::symbols::Symbolizer;

/// Folded stacks, `outer;…;inner <bytes>` per line, unbiased live bytes, sorted, identical
/// stacks merged: the input of flamegraph tools. Where the dump carries the owner scope, the
/// outermost frame is `[scope NAME]`.
pub fn collapsed(heap: &HeapProfile, symbols: &mut Symbolizer) -> String {
    let mut folded: BTreeMap<String, f64> = BTreeMap::new();
    for stack in &heap.stacks {
        let (_, bytes) = stack.unbiased(heap.period);
        let (addrs, scope) = scope_frames::split(&stack.addrs);
        let addrs = symbols.trim_allocator_frames(addrs).to_vec();
        let mut names = Vec::new();
        for addr in addrs.iter().rev() {
            // Frames at one address are innermost first; the folded line runs outermost first.
            for frame in symbols.frames(*addr).iter().rev() {
                names.push(frame.function.replace(';', ":"));
            }
        }
        if names.is_empty() {
            continue;
        }
        // The owner scope is the root, so the graph first splits by part of the program.
        if let Some(id) = scope {
            names.insert(0, format!("[scope {}]", scope_frames::name(id)));
        }
        *folded.entry(names.join(";")).or_default() += bytes;
    }
    let mut out = String::new();
    for (stack, bytes) in folded {
        let bytes = bytes.round() as u64;
        if bytes > 0 && !stack.is_empty() {
            out.push_str(&format!("{stack} {bytes}\n"));
        }
    }
    out
}

/// An SVG flamegraph of live bytes by call stack.
pub fn flamegraph(heap: &HeapProfile, symbols: &mut Symbolizer, title: &str) -> Vec<u8> {
    let folded = collapsed(heap, symbols);
    let mut options = inferno::flamegraph::Options::default();
    options.title = title.to_owned();
    options.count_name = "bytes".to_owned();
    let mut svg = Vec::new();
    let lines: Vec<&str> = if folded.is_empty() {
        vec!["(no sampled allocations) 0"]
    } else {
        folded.lines().collect()
    };
    if let Err(e) = inferno::flamegraph::from_lines(&mut options, lines, &mut svg) {
        // inferno fails only on empty input; say so in a valid SVG.
        svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"600\" height=\"40\"><text x=\"10\" y=\"25\">{e}</text></svg>"
        )
        .into_bytes();
    }
    svg
}
