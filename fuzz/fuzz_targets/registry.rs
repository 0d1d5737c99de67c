#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fwmark_trace::fuzzing::registry_file(data));
