//! Cross-checks the test VMM itself against an independent backend: QEMU's
//! `vhost-user-gpu` (Debian: /usr/lib/qemu/vhost-user-gpu in qemu-system-gui). Runs only
//! when `VGPU_REFERENCE_BACKEND` names that binary, so a bug in the test VMM is not
//! mistaken for a bug in vgpu-sandbox.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use vgpu_tests::gpu::{format, resp, Rect};
use vgpu_tests::{DisplayEvent, TestVmm, VmmOptions};

#[test]
fn test_vmm_drives_qemu_reference_backend() {
    let Some(bin) = std::env::var_os("VGPU_REFERENCE_BACKEND") else {
        eprintln!("VGPU_REFERENCE_BACKEND not set; skipping the reference cross-check");
        return;
    };
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    // The backend inherits `theirs` by number (--fd), so it must survive exec.
    fcntl(&theirs, FcntlArg::F_SETFD(FdFlag::empty())).expect("clear CLOEXEC");
    let mut child = Command::new(&bin)
        .arg(format!("--fd={}", theirs.as_raw_fd()))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn reference backend");
    drop(theirs);

    let result = std::panic::catch_unwind(move || {
        let mut vmm =
            TestVmm::from_stream(ours, &VmmOptions::default()).expect("vhost-user set-up");
        eprintln!("reference backend config: {:?}", vmm.config());
        let display = vmm.display().clone();
        let mem = vmm.memory().clone();
        let gpu = vmm.gpu();
        let info = gpu.get_display_info().expect("GET_DISPLAY_INFO");
        assert_eq!(info.kind, resp::OK_DISPLAY_INFO, "got {}", info.kind_name());
        let (w, h) = (64u32, 32u32);
        let (b, c, a) = gpu
            .create_backed_resource(1, format::B8G8R8X8_UNORM, w, h)
            .expect("create");
        assert_eq!((c.kind, a.kind), (resp::OK_NODATA, resp::OK_NODATA));
        let pixels: Vec<u8> = (0..w * h * 4).map(|i| (i * 7 % 251) as u8).collect();
        mem.write(b.addr, &pixels).expect("write");
        let full = Rect::new(0, 0, w, h);
        assert_eq!(
            gpu.transfer_to_host_2d(1, full, 0).unwrap().kind,
            resp::OK_NODATA
        );
        assert_eq!(gpu.set_scanout(0, 1, full).unwrap().kind, resp::OK_NODATA);
        display.skip_to_end();
        assert_eq!(gpu.resource_flush(1, full).unwrap().kind, resp::OK_NODATA);
        display
            .wait_update(0, Duration::from_secs(10))
            .expect("UPDATE after flush");
        let (fw, fh, fb) = display.framebuffer(0).expect("framebuffer");
        assert_eq!((fw, fh), (w, h));
        assert_eq!(
            fb, pixels,
            "reference backend's pixels differ from the guest's"
        );
        // Fenced command echoes its fence.
        let r = gpu
            .execute_fenced(
                &vgpu_tests::Command::ResourceFlush {
                    resource_id: 1,
                    rect: full,
                },
                42,
            )
            .unwrap();
        assert_eq!((r.kind, r.fence_id), (resp::OK_NODATA, 42));
        assert!(
            vmm.display().violations().is_empty(),
            "{:?}",
            vmm.display().violations()
        );
        let _ = DisplayEvent::Closed;
    });
    let _ = child.kill();
    let _ = child.wait();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}
