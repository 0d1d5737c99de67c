#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fwmark_trace::fuzzing::recording(data));
