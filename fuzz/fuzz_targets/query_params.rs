#![no_main]
//! The debug routes' query-string parser, on arbitrary bytes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| exporter::fuzzing::query_params(data));
