#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| aiaas::fuzzing::image_decode(data));
