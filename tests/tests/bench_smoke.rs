//! Smoke run of the isolation bench (tests/benches/isolation.rs) with tiny counts: it must
//! complete and print its table. No timing is asserted; the numbers of a real run are in
//! docs/BENCHMARKS.md.

#[allow(dead_code)]
#[path = "../benches/isolation.rs"]
mod isolation;

#[test]
fn isolation_bench_completes_and_prints_its_table() {
    let bin =
        vgpu_tests::stack::default_binary().unwrap_or_else(|e| panic!("vgpu-sandbox binary: {e}"));
    let bin = bin.to_string_lossy().into_owned();
    let args = [
        "--size",
        "128x64",
        "--frames",
        "2",
        "--samples",
        "3",
        "--commands",
        "5",
        "--blob-cycles",
        "3",
        "--pingpongs",
        "50",
        "--memcpys",
        "2",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--fleet",
        "2",
        "--fleet-frames",
        "2",
        "--bin",
        bin.as_str(),
    ];
    let o = isolation::parse_args(args.iter().map(|s| s.to_string()))
        .unwrap_or_else(|e| panic!("options: {e}"));
    let table = isolation::run(&o).unwrap_or_else(|e| panic!("isolation bench failed: {e}"));
    for needle in [
        "| benchmark",
        "start-to-ready",
        "socket accepts a connection",
        "full frames (TRANSFER+FLUSH+UPDATE)",
        "fenced command round trip, p99",
        "64x64 damage round trip, median",
        "PSS, all processes, total",
        "blob MAP+UNMAP cycle (--hostmem 64M), median",
        "cache-hot (one buffer)",
        "out of cache (",
        "1-byte Unix-socket round trip",
        "blob MAP+UNMAP floor",
        "frames/s of all VMs together",
        "PSS per VM without guest RAM, median",
    ] {
        assert!(table.contains(needle), "no {needle:?} in:\n{table}");
    }
}
