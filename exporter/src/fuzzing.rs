//! The properties the fuzz targets check, shared with the corpus replay test (which runs on the
//! stable toolchain in the README's test command). Not part of the API.

use crate::params::Query;
use crate::profiling::{Format, HeapProfile};

/// Parsing any input as a heap dump either fails cleanly or yields a profile whose text form
/// parses back to the same stacks (less scope pseudo-frames, identical stacks merged), whose
/// diff with itself is empty, and whose unbiased figures are finite.
pub fn heap_dump(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(profile) = HeapProfile::parse(text) else {
        return;
    };
    let again = HeapProfile::parse(&profile.to_text()).expect("a written profile parses");
    assert_eq!(again.stacks, profile.without_scope_frames().stacks);
    assert!(profile.growth_since(&profile).stacks.is_empty());
    for stack in &profile.stacks {
        let (objects, bytes) = stack.unbiased(profile.period);
        assert!(objects.is_finite() && bytes.is_finite());
    }
}

/// Any query string is either refused with a message or parsed into allowed keys only, and
/// every `format` value is either known or refused.
pub fn query_params(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let allowed = ["format", "seconds", "base", "probe"];
    match Query::parse(Some(text), &allowed) {
        Ok(query) => {
            if let Some(format) = query.get("format") {
                let _ = Format::parse(format);
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
