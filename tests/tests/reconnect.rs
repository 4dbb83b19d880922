//! `--keep-listening`: after the VMM disconnects the device resets and serves the next
//! connection on the same socket. Ten connections in a row each get a fresh device (no
//! resource survives), draw exact pixels, and leave neither a process nor a descriptor
//! behind. (A blob mapped when the VMM goes away: `blobs.rs`
//! `a_vmm_gone_with_a_blob_mapped_leaves_a_fresh_device_for_the_next`.)

mod common;

use std::time::Duration;

use common::{expect, fd_counts, flush_shows, image, ok, resource_with};
use vgpu_tests::gpu::{format, resp, Rect};
use vgpu_tests::{Stack, TestVmm};

/// Bound on each positive wait.
const WAIT: Duration = Duration::from_secs(20);

/// One guest session: a fresh device (resource 1 does not exist yet), a frame drawn and
/// checked pixel for pixel.
fn session(vmm: &mut TestVmm, round: u32) {
    let (w, h) = (320, 200);
    let full = Rect::new(0, 0, w, h);
    expect(
        &format!("round {round}: the last connection's resource 1 is gone"),
        vmm.gpu().resource_flush(1, full),
        resp::ERR_INVALID_RESOURCE_ID,
    );
    let pixels = image(w, h, round);
    resource_with(vmm, 1, format::B8G8R8X8_UNORM, w, h, &pixels);
    ok("SET_SCANOUT", vmm.gpu().set_scanout(0, 1, full));
    flush_shows(vmm, 1, full, &pixels, w, &format!("round {round}"));
}

#[test]
fn ten_connections_in_a_row_each_get_a_fresh_device_and_leak_nothing() {
    let mut stack = Stack::start(&["--keep-listening", "--output", "320x200"])
        .unwrap_or_else(|e| panic!("starting vgpu-sandbox --keep-listening: {e}"));
    let mut baseline = None;
    for round in 1..=10 {
        let mut vmm = stack
            .connect()
            .unwrap_or_else(|e| panic!("round {round}: connecting: {e}"));
        session(&mut vmm, round);
        vmm.disconnect();
        let waiting = "waiting for the next VMM connection";
        stack
            .wait_for_log_count(waiting, round as usize, WAIT)
            .unwrap_or_else(|e| panic!("round {round}: the device did not reset: {e}"));
        let counts = fd_counts(&mut stack);
        assert_eq!(counts.len(), 4, "round {round}: processes {counts:?}");
        // The first round settles what stays open for good (ipc-channel's routers, the
        // listener, the lane); from then on every round must end where the first did.
        match &baseline {
            None => baseline = Some(counts),
            Some(b) => assert_eq!(&counts, b, "round {round}: descriptors leaked"),
        }
    }
    assert!(
        stack.exit_status().is_none(),
        "the device ended although --keep-listening"
    );
}

#[test]
fn without_keep_listening_a_disconnect_still_ends_the_device() {
    let mut stack = Stack::start(&["--output", "320x200"]).expect("start");
    let mut vmm = stack.connect().expect("connect");
    session(&mut vmm, 1);
    vmm.disconnect();
    let status = stack.wait_exit(WAIT).expect("the device ends with its VMM");
    assert!(status.success(), "{status}");
}
