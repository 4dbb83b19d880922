//! A real QEMU (10, TCG) boots a real Debian 6.12 kernel whose virtio_gpu driver talks to
//! the real `vgpu-sandbox` binary over vhost-user; a guest program draws three frames
//! (fbdev mmap, KMS dumb buffer + SETCRTC, second dumb buffer + page flip) and each is
//! compared exactly against a QMP screendump. QEMU's own backend runs the same boot as a
//! control, so a failure says whether it is ours or the set-up's.
//!
//! Needs `scripts/setup-qemu-tests.sh` (run once, as root). Without QEMU or the kernel
//! cache these tests FAIL, naming the script; `VGPU_SKIP_QEMU_TESTS=1` skips them.
//! Only these tests: `cargo test -p vgpu-tests --test qemu_guest`.

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use vgpu_tests::qemu::boot::{run_boot, BackendSpec, BootReport, BootSpec, Ending};
use vgpu_tests::qemu::{self, QemuEnv};

/// One boot at a time: TCG guests on two cores would only slow each other down.
static SERIAL: Mutex<()> = Mutex::new(());

fn env() -> Option<&'static QemuEnv> {
    static ENV: OnceLock<Result<QemuEnv, String>> = OnceLock::new();
    if qemu::skip_requested() {
        eprintln!("{}=1: skipping the QEMU guest test", qemu::SKIP_ENV);
        return None;
    }
    match ENV.get_or_init(qemu::prepare) {
        Ok(env) => Some(env),
        Err(e) => panic!("QEMU guest test cannot run: {e}"),
    }
}

fn boot(spec: BootSpec) -> Option<BootReport> {
    let env = env()?;
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let t = Instant::now();
    let report = run_boot(env, &spec).unwrap_or_else(|e| panic!("{e}"));
    print_report(env, &spec, &report, t.elapsed());
    Some(report)
}

fn print_report(env: &QemuEnv, spec: &BootSpec, r: &BootReport, total: std::time::Duration) {
    println!("=== {} ===", spec.name);
    println!(
        "QEMU {} ({}), kernel {} ({}), modules loaded: {}",
        r.qemu_version,
        env.qemu_version,
        env.kernel.release,
        env.kernel.package,
        env.modules.join(" ")
    );
    println!("command line: {}", r.command_line.join(" "));
    for f in &r.features {
        println!("guest driver: {f}");
    }
    println!(
        "mode: connector {}x{}, sysfs {}x{}, fbdev {}x{} (virtual {}x{})",
        r.connector_mode.0,
        r.connector_mode.1,
        r.sysfs_mode.0,
        r.sysfs_mode.1,
        r.fb_mode.0 .0,
        r.fb_mode.0 .1,
        r.fb_mode.1 .0,
        r.fb_mode.1 .1
    );
    match &r.edid {
        Some((size, head)) => println!("EDID blob: {size} bytes, starts {head}"),
        None => println!("EDID blob: none"),
    }
    for f in &r.frames {
        println!(
            "frame {} ({}): {}x{} screendump identical to the pattern (after {} screendump(s))",
            f.frame, f.how, f.size.0, f.size.1, f.attempts
        );
    }
    if let Some(l) = &r.disconnect_line {
        println!("backend: {l}");
    }
    println!(
        "QEMU exit: {}; backend exit: {}",
        r.qemu_exit, r.backend_exit
    );
    let t: Vec<String> = r
        .timings
        .iter()
        .map(|(w, d)| format!("{w} {:.1}s", d.as_secs_f64()))
        .collect();
    println!(
        "timings: {}; whole boot {:.1}s",
        t.join(", "),
        total.as_secs_f64()
    );
}

/// Our backend with a non-default output: the guest must see exactly that mode, read an
/// EDID, draw three frames; the guest powers off and the backend exits 0, nothing left.
#[test]
fn qemu_guest_draws_through_vgpu_sandbox_1152x864() {
    boot(BootSpec {
        name: "vgpu-sandbox --output 1152x864".into(),
        backend: BackendSpec::Ours(vec!["--output".into(), "1152x864".into()]),
        mode: (1152, 864),
        expect_edid: true,
        ending: Ending::GuestPowerOff,
    });
}

/// Our backend without `--output`: display info comes from QEMU (1280x800); QEMU quits
/// by QMP while the guest runs, and the backend exits 0.
#[test]
fn qemu_guest_vgpu_sandbox_mode_from_qemu_then_qmp_quit() {
    boot(BootSpec {
        name: "vgpu-sandbox (mode from QEMU)".into(),
        backend: BackendSpec::Ours(Vec::new()),
        mode: (1280, 800),
        expect_edid: true,
        ending: Ending::QmpQuit,
    });
}

/// Our backend with `--virgl`: the guest's driver sees VIRTIO_GPU_F_VIRGL (its features
/// line says `+virgl`, and it reads both capsets at probe), and its 2D output (fbdev, KMS
/// dumb buffers: virgl textures here) still reaches the screen pixel for pixel.
#[cfg(feature = "virgl")]
#[test]
fn qemu_guest_sees_virgl_and_still_draws_2d() {
    let Some(report) = boot(BootSpec {
        name: "vgpu-sandbox --virgl".into(),
        backend: BackendSpec::Ours(vec!["--virgl".into()]),
        mode: (1280, 800),
        expect_edid: true,
        ending: Ending::GuestPowerOff,
    }) else {
        return;
    };
    assert!(
        report.features.iter().any(|f| f.contains("+virgl")),
        "the guest driver did not report +virgl: {:?}",
        report.features
    );
}

/// Connected as libvirt connects them: our backend gets one end of a socketpair with
/// `--fd`, QEMU the other as `-chardev socket,fd=N` (the broker relays the vhost-user
/// messages to its frontend); the guest draws its three frames exactly, and QEMU's exit
/// ends the backend with 0.
#[test]
fn qemu_guest_draws_through_a_connected_fd_as_libvirt_passes_it() {
    boot(BootSpec {
        name: "vgpu-sandbox --fd (socketpair)".into(),
        backend: BackendSpec::OursConnected(Vec::new()),
        mode: (1280, 800),
        expect_edid: true,
        ending: Ending::GuestPowerOff,
    });
}

/// The control: QEMU's own vhost-user-gpu backend, same guest, same checks.
#[test]
fn qemu_guest_reference_backend_control() {
    boot(BootSpec {
        name: "reference vhost-user-gpu".into(),
        backend: BackendSpec::Reference,
        mode: (1280, 800),
        expect_edid: true,
        ending: Ending::GuestPowerOff,
    });
}
