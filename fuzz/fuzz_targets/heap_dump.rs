#![no_main]
//! The jemalloc heap_v2 parser, on arbitrary bytes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| exporter::fuzzing::heap_dump(data));
