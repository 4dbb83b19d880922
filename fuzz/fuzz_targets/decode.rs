#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vgpu_sandbox_fuzz::run("decode", data));
