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
    if folded.is_empty() {
        // inferno refuses input without counts; an empty profile is an answer, not an error.
        return message_svg(&format!(
            "{title}: no sampled allocations in this profile (jemalloc samples one allocation \
             per {} bytes on average)",
            heap.period
        ));
    }
    let mut options = inferno::flamegraph::Options::default();
    options.title = title.to_owned();
    options.count_name = "bytes".to_owned();
    let mut svg = Vec::new();
    match inferno::flamegraph::from_lines(&mut options, folded.lines(), &mut svg) {
        Ok(()) => svg,
        Err(e) => message_svg(&format!("{title}: the flamegraph could not be drawn: {e}")),
    }
}

/// A valid SVG that shows one line of text (escaped).
fn message_svg(text: &str) -> Vec<u8> {
    let text = text
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1200\" height=\"40\"><text x=\"10\" y=\"25\">{text}</text></svg>"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiling::heap_dump::Stack;
    use crate::profiling::test_support::call_site;

    /// Stacks of one frame (`call_site`) holding `bytes` each, at a 1-byte period: unbiased
    /// bytes are the bytes themselves.
    fn heap(bytes: &[u64]) -> HeapProfile {
        HeapProfile {
            period: 1,
            stacks: bytes
                .iter()
                .map(|&bytes| Stack {
                    addrs: vec![call_site()],
                    objects: 1,
                    bytes,
                    ..Stack::default()
                })
                .collect(),
            accumulated: false,
            maps: String::new(),
        }
    }

    #[test]
    fn identical_stacks_are_merged_into_one_line() {
        let folded = collapsed(&heap(&[4096, 8192]), &mut Symbolizer::default());
        let lines: Vec<_> = folded.lines().collect();
        assert_eq!(lines.len(), 1, "{folded}");
        let (stack, bytes) = lines[0].rsplit_once(' ').unwrap();
        assert!(stack.contains("test_support::call_site"), "{stack}");
        assert_eq!(bytes, "12288");
    }

    #[test]
    fn stacks_holding_nothing_are_left_out() {
        assert_eq!(collapsed(&heap(&[0]), &mut Symbolizer::default()), "");
        let svg = flamegraph(&heap(&[]), &mut Symbolizer::default(), "<empty>");
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"), "{svg}");
        assert!(
            svg.contains("&lt;empty&gt;: no sampled allocations in this profile"),
            "{svg}"
        );
    }

    #[test]
    fn the_flamegraph_has_the_title_and_the_frames() {
        let svg = flamegraph(&heap(&[1 << 20]), &mut Symbolizer::default(), "a title");
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.contains("a title"));
        assert!(svg.contains("call_site"));
        assert!(svg.contains("bytes"), "the count's name");
    }
}
