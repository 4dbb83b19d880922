//! Cost of per-range guest memory mapping (the renderer maps only the attached ranges)
//! against the former whole-region mapping, for ATTACH_BACKING + DETACH_BACKING of a 2D
//! resource, through the real translation and the real rutabaga renderer.
//!
//!   cargo bench -p vgpu-renderer-worker --bench attach [-- --reps N]
//!
//! For each resource size and backing layout it times, in the same run and alternating the
//! two ways, (1) translate + attach + detach and (2) the same with one full-resource
//! TRANSFER_TO_HOST_2D in between (the first touch of freshly mapped pages), and prints the
//! median over the repetitions. The whole-region way maps guest RAM once, before timing,
//! as `SET_GUEST_MEMORY` used to.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::memfd::{memfd_create, MFdFlags};
use protocol::ipc::{BackingEntry, GuestRegion};
use protocol::virtio_gpu::Rect;
use vgpu_renderer_worker::{GuestMemory, Renderer, RutabagaRenderer};

const PAGE: u64 = 4096;
const GUEST_BASE: u64 = 0x1_0000_0000;
const GUEST_BYTES: u64 = 160 << 20;
const FORMAT_B8G8R8X8: u32 = 2;

#[derive(Clone, Copy)]
enum Layout {
    /// One entry for the whole resource.
    One,
    /// One entry per 4 KiB page, pages contiguous in guest memory (merged by translate).
    PagesContiguous,
    /// One entry per 4 KiB page, every other guest page, in reverse order: nothing merges.
    PagesScattered,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::One => "1 entry",
            Layout::PagesContiguous => "1 entry/page, contiguous",
            Layout::PagesScattered => "1 entry/page, scattered",
        }
    }

    fn entries(self, bytes: u64) -> Vec<BackingEntry> {
        let pages = bytes.div_ceil(PAGE);
        let len = |i: u64| (bytes - i * PAGE).min(PAGE) as u32;
        match self {
            Layout::One => vec![BackingEntry {
                addr: GUEST_BASE,
                length: bytes as u32,
            }],
            Layout::PagesContiguous => (0..pages)
                .map(|i| BackingEntry {
                    addr: GUEST_BASE + i * PAGE,
                    length: len(i),
                })
                .collect(),
            Layout::PagesScattered => (0..pages)
                .map(|i| BackingEntry {
                    addr: GUEST_BASE + (pages - 1 - i) * 2 * PAGE,
                    length: len(i),
                })
                .collect(),
        }
    }
}

fn guest_memory(whole: bool) -> Arc<GuestMemory> {
    let fd = memfd_create(c"bench-guest", MFdFlags::MFD_CLOEXEC).expect("memfd_create");
    let mut file = File::from(fd);
    // Populate every page, as a running guest's RAM is.
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..GUEST_BYTES / chunk.len() as u64 {
        file.write_all(&chunk).expect("fill guest memory");
    }
    let region = [GuestRegion {
        guest_addr: GUEST_BASE,
        size: GUEST_BYTES,
        fd_offset: 0,
    }];
    let memory = if whole {
        GuestMemory::new_whole_mapped(&region, vec![file.into()])
    } else {
        GuestMemory::new(&region, vec![file.into()])
    };
    Arc::new(memory.expect("guest memory"))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn main() {
    let mut reps = 31;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--reps" {
            reps = args.next().and_then(|n| n.parse().ok()).expect("--reps N");
        }
    }
    let mut renderer = RutabagaRenderer::new(policy::limits::DEFAULT, |_| {}).expect("renderer");
    let whole = guest_memory(true);
    let ranges = guest_memory(false);
    let max_entries = policy::limits::DEFAULT.max_backing_entries as usize;
    println!("attach bench: median of {reps} reps (+1 warm-up), microseconds");
    println!(
        "| resource  | backing                  | mode          | attach+detach | attach+transfer+detach | mappings |"
    );
    println!(
        "|-----------|--------------------------|---------------|---------------|------------------------|----------|"
    );
    let mut id = 1;
    for (w, h) in [(1280u32, 800u32), (3840, 2160)] {
        let bytes = u64::from(w) * u64::from(h) * 4;
        let full = Rect {
            x: 0,
            y: 0,
            width: w,
            height: h,
        };
        for layout in [Layout::One, Layout::PagesContiguous, Layout::PagesScattered] {
            let entries = layout.entries(bytes);
            // [mode][with transfer] samples, the modes interleaved rep by rep.
            let mut samples = [[vec![], vec![]], [vec![], vec![]]];
            let mut mappings = [0; 2];
            for rep in 0..=reps {
                for (m, memory) in [&whole, &ranges].into_iter().enumerate() {
                    for (t, transfer) in [false, true].into_iter().enumerate() {
                        renderer
                            .create_resource_2d(id, FORMAT_B8G8R8X8, w, h)
                            .expect("create");
                        let start = Instant::now();
                        let backing = memory
                            .translate(&entries, max_entries, bytes)
                            .expect("translate");
                        mappings[m] = backing.mapping_count();
                        renderer.attach_backing(id, backing).expect("attach");
                        if transfer {
                            renderer.transfer_to_host_2d(id, full, 0).expect("transfer");
                        }
                        renderer.detach_backing(id).expect("detach");
                        let took = start.elapsed();
                        renderer.unref(id).expect("unref");
                        id += 1;
                        if rep > 0 {
                            samples[m][t].push(took);
                        }
                    }
                }
            }
            for (m, mode) in ["whole-region", "per-range"].into_iter().enumerate() {
                let [plain, transfer] = std::mem::take(&mut samples[m]);
                println!(
                    "| {:<9} | {:<24} | {:<13} | {:>13} | {:>22} | {:>8} |",
                    format!("{w}x{h}"),
                    layout.name(),
                    mode,
                    us(median(plain)),
                    us(median(transfer)),
                    if m == 0 {
                        "-".to_string()
                    } else {
                        mappings[m].to_string()
                    },
                );
            }
        }
    }
}
