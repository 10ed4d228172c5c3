//! The pprof protobuf format (`profile.proto`), gzipped, as `go tool pprof` reads it.
//!
//! Messages are declared with `prost`'s derive instead of hand-written encoding; only the fields
//! a heap profile uses are declared (the others default to empty, as protobuf allows).

use std::collections::HashMap;
use std::io::Write;

use super::heap_dump::HeapProfile;
use super::scope_frames;
use super::symbols::{mappings, Symbolizer};
use super::SampleType;

#[derive(Clone, PartialEq, prost::Message)]
struct Profile {
    #[prost(message, repeated, tag = "1")]
    sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    sample: Vec<Sample>,
    #[prost(message, repeated, tag = "3")]
    mapping: Vec<Mapping>,
    #[prost(message, repeated, tag = "4")]
    location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    time_nanos: i64,
    #[prost(message, optional, tag = "11")]
    period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    period: i64,
    #[prost(int64, repeated, tag = "13")]
    comment: Vec<i64>,
    #[prost(int64, tag = "14")]
    default_sample_type: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ValueType {
    #[prost(int64, tag = "1")]
    r#type: i64,
    #[prost(int64, tag = "2")]
    unit: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    label: Vec<Label>,
}

/// A sample's label: here `scope` = the owner's name (`go tool pprof -tagfocus=scope=cache`).
#[derive(Clone, PartialEq, prost::Message)]
struct Label {
    #[prost(int64, tag = "1")]
    key: i64,
    #[prost(int64, tag = "2")]
    str: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Mapping {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(uint64, tag = "2")]
    memory_start: u64,
    #[prost(uint64, tag = "3")]
    memory_limit: u64,
    #[prost(uint64, tag = "4")]
    file_offset: u64,
    #[prost(int64, tag = "5")]
    filename: i64,
    #[prost(int64, tag = "6")]
    build_id: i64,
    #[prost(bool, tag = "7")]
    has_functions: bool,
    #[prost(bool, tag = "8")]
    has_filenames: bool,
    #[prost(bool, tag = "9")]
    has_line_numbers: bool,
    #[prost(bool, tag = "10")]
    has_inline_frames: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Location {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(uint64, tag = "2")]
    mapping_id: u64,
    #[prost(uint64, tag = "3")]
    address: u64,
    #[prost(message, repeated, tag = "4")]
    line: Vec<Line>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Line {
    #[prost(uint64, tag = "1")]
    function_id: u64,
    #[prost(int64, tag = "2")]
    line: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Function {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(int64, tag = "2")]
    name: i64,
    #[prost(int64, tag = "3")]
    system_name: i64,
    #[prost(int64, tag = "4")]
    filename: i64,
}

/// pprof's string table: index 0 is always "".
#[derive(Default)]
struct Strings {
    index: HashMap<String, i64>,
    table: Vec<String>,
}

impl Strings {
    fn id(&mut self, s: &str) -> i64 {
        if self.table.is_empty() {
            self.table.push(String::new());
            self.index.insert(String::new(), 0);
        }
        if let Some(&id) = self.index.get(s) {
            return id;
        }
        let id = self.table.len() as i64;
        self.table.push(s.to_owned());
        self.index.insert(s.to_owned(), id);
        id
    }
}

/// Encodes `heap` (sampled counts, unbiased here) as a gzipped pprof profile with Go's sample
/// types, so Pyroscope and Parca classify it as Go's heap profile
/// (`memory:inuse_space:bytes:space:bytes`): `inuse_objects`/`count` and `inuse_space`/`bytes`,
/// preceded, where jemalloc keeps cumulative counts (`prof_accum:true`), by `alloc_objects` and
/// `alloc_space` in Go's order. `shown` picks the default sample type (Go's `/allocs` shows
/// `alloc_space`, `/heap` `inuse_space`). Symbolized in-process; each sample labelled with its
/// owner's `scope` where the dump carries it (see `scope_frames`).
pub fn encode(
    heap: &HeapProfile,
    symbols: &mut Symbolizer,
    comment: &str,
    shown: SampleType,
) -> Vec<u8> {
    let mut strings = Strings::default();
    strings.id("");
    let value_type = |strings: &mut Strings, kind: &str, unit: &str| ValueType {
        r#type: strings.id(kind),
        unit: strings.id(unit),
    };
    let mut sample_type = Vec::new();
    if heap.accumulated {
        sample_type.push(value_type(&mut strings, "alloc_objects", "count"));
        sample_type.push(value_type(&mut strings, "alloc_space", "bytes"));
    }
    sample_type.push(value_type(&mut strings, "inuse_objects", "count"));
    sample_type.push(value_type(&mut strings, "inuse_space", "bytes"));

    let maps = mappings(&heap.maps);
    let mapping: Vec<Mapping> = maps
        .iter()
        .enumerate()
        .map(|(i, m)| Mapping {
            id: i as u64 + 1,
            memory_start: m.start,
            memory_limit: m.limit,
            file_offset: m.offset,
            filename: strings.id(&m.path),
            build_id: strings.id(m.build_id.as_deref().unwrap_or("")),
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
        })
        .collect();

    let mut locations: HashMap<u64, u64> = HashMap::new();
    let mut location = Vec::new();
    let mut functions: HashMap<(String, Option<String>), u64> = HashMap::new();
    let mut function = Vec::new();
    let mut sample = Vec::new();
    let scope_key = strings.id("scope");
    for stack in &heap.stacks {
        let (addrs, scope) = scope_frames::split(&stack.addrs);
        let label = scope
            .map(|id| Label {
                key: scope_key,
                str: strings.id(scope_frames::name(id)),
            })
            .into_iter()
            .collect();
        let addrs = symbols.trim_allocator_frames(addrs);
        let mut location_id = Vec::with_capacity(addrs.len());
        for &addr in addrs {
            let id = match locations.get(&addr) {
                Some(&id) => id,
                None => {
                    let id = location.len() as u64 + 1;
                    let line = symbols
                        .frames(addr)
                        .iter()
                        .map(|frame| {
                            let key = (frame.function.clone(), frame.file.clone());
                            let function_id = *functions.entry(key).or_insert_with(|| {
                                let id = function.len() as u64 + 1;
                                let name = strings.id(&frame.function);
                                function.push(Function {
                                    id,
                                    name,
                                    system_name: name,
                                    filename: strings.id(frame.file.as_deref().unwrap_or("")),
                                });
                                id
                            });
                            Line {
                                function_id,
                                line: frame.line.map_or(0, i64::from),
                            }
                        })
                        .collect();
                    let mapping_id = maps
                        .iter()
                        .position(|m| (m.start..m.limit).contains(&addr))
                        .map_or(0, |i| i as u64 + 1);
                    location.push(Location {
                        id,
                        mapping_id,
                        address: addr,
                        line,
                    });
                    locations.insert(addr, id);
                    id
                }
            };
            location_id.push(id);
        }
        let mut value = Vec::with_capacity(sample_type.len());
        if heap.accumulated {
            let (objects, bytes) = stack.unbiased_allocated(heap.period);
            value.extend([objects.round() as i64, bytes.round() as i64]);
        }
        let (objects, bytes) = stack.unbiased(heap.period);
        value.extend([objects.round() as i64, bytes.round() as i64]);
        sample.push(Sample {
            location_id,
            value,
            label,
        });
    }

    let period_type = Some(value_type(&mut strings, "space", "bytes"));
    let default_sample_type = match shown {
        SampleType::Allocated if heap.accumulated => strings.id("alloc_space"),
        _ => strings.id("inuse_space"),
    };
    let comment = vec![strings.id(comment)];
    let profile = Profile {
        sample_type,
        sample,
        mapping,
        location,
        function,
        string_table: std::mem::take(&mut strings.table),
        time_nanos: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64),
        period_type,
        period: heap.period as i64,
        comment,
        default_sample_type,
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&prost::Message::encode_to_vec(&profile))
        .expect("writing to a Vec cannot fail");
    gz.finish().expect("writing to a Vec cannot fail")
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::io::Read;

    use super::*;
    use crate::profiling::heap_dump::Stack;
    use crate::profiling::test_support::call_site;

    fn decode(gzipped: &[u8]) -> Profile {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(gzipped)
            .read_to_end(&mut raw)
            .unwrap();
        <Profile as prost::Message>::decode(raw.as_slice()).unwrap()
    }

    fn heap(accumulated: bool) -> HeapProfile {
        let here = call_site();
        let stack = |addrs: Vec<u64>, objects, bytes, allocated: [u64; 2]| Stack {
            addrs,
            objects,
            bytes,
            allocated_objects: allocated[0],
            allocated_bytes: allocated[1],
        };
        HeapProfile {
            period: 524288,
            stacks: vec![
                stack(vec![here, here], 1, 524288, [4, 1 << 21]),
                stack(vec![here], 1, 64 << 20, [1, 64 << 20]),
            ],
            accumulated,
            maps: std::fs::read_to_string("/proc/self/maps").unwrap(),
        }
    }

    #[test]
    fn go_sample_types_unbiased_values_and_each_string_once() {
        let heap = heap(true);
        for (shown, default) in [
            (SampleType::Inuse, "inuse_space"),
            (SampleType::Allocated, "alloc_space"),
        ] {
            let profile = decode(&encode(&heap, &mut Symbolizer::default(), "a title", shown));
            let s = |i: i64| profile.string_table[i as usize].as_str();
            assert_eq!(profile.string_table[0], "");
            let distinct: HashSet<_> = profile.string_table.iter().collect();
            assert_eq!(
                distinct.len(),
                profile.string_table.len(),
                "each string once"
            );
            let types: Vec<_> = profile
                .sample_type
                .iter()
                .map(|t| format!("{}/{}", s(t.r#type), s(t.unit)))
                .collect();
            assert_eq!(
                types,
                [
                    "alloc_objects/count",
                    "alloc_space/bytes",
                    "inuse_objects/count",
                    "inuse_space/bytes"
                ]
            );
            assert_eq!(s(profile.default_sample_type), default);
            let period = profile.period_type.as_ref().unwrap();
            assert_eq!((s(period.r#type), s(period.unit)), ("space", "bytes"));
            assert_eq!(profile.period, 524288);
            assert_eq!(s(profile.comment[0]), "a title");

            // Values: cumulative then live, each unbiased like jeprof and rounded.
            for (sample, stack) in profile.sample.iter().zip(&heap.stacks) {
                let (ao, ab) = stack.unbiased_allocated(heap.period);
                let (o, b) = stack.unbiased(heap.period);
                let expected = [ao, ab, o, b].map(|v| v.round() as i64);
                assert_eq!(sample.value, expected);
            }
            assert_eq!(profile.sample[0].value[2], 2, "1 live object at 1.58");

            // One location per address, shared by the samples; named after the function.
            assert_eq!(profile.sample[0].location_id, [1, 1]);
            assert_eq!(profile.sample[1].location_id, [1]);
            assert_eq!(profile.location.len(), 1);
            assert_eq!(profile.location[0].address, call_site());
            // Mappings are numbered from 1; the location's is this executable's.
            for (i, mapping) in profile.mapping.iter().enumerate() {
                assert_eq!(mapping.id, i as u64 + 1);
            }
            let mapping = &profile.mapping[profile.location[0].mapping_id as usize - 1];
            assert!((mapping.memory_start..mapping.memory_limit).contains(&call_site()));
            let exe = std::env::current_exe().unwrap();
            assert_eq!(s(mapping.filename), exe.display().to_string());
            let function = &profile.function[profile.location[0].line[0].function_id as usize - 1];
            assert!(
                s(function.name).contains("test_support::call_site"),
                "{}",
                s(function.name)
            );
        }
    }

    #[test]
    fn without_cumulative_counts_only_live_bytes_are_shown() {
        let profile = decode(&encode(
            &heap(false),
            &mut Symbolizer::default(),
            "",
            SampleType::Allocated,
        ));
        let s = |i: i64| profile.string_table[i as usize].as_str();
        let types: Vec<_> = profile.sample_type.iter().map(|t| s(t.r#type)).collect();
        assert_eq!(types, ["inuse_objects", "inuse_space"]);
        assert_eq!(s(profile.default_sample_type), "inuse_space");
        assert_eq!(profile.sample[1].value, [1, 64 << 20]);
    }
}
