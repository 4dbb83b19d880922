//! VHOST_USER_GET_VRING_BASE stops a ring: the index it returns is final for the VMM (it
//! restores it on resume), so every command the device consumed by then must already be
//! answered in the used ring, and nothing may be written to the ring afterwards.

mod common;

use vgpu_tests::gpu::format;
use vgpu_tests::{Command, Queue};
use vhost::VhostBackend;

#[test]
fn get_vring_base_answers_every_consumed_command_first() {
    let (_stack, mut vmm) = common::start(&[]);
    let used_ring = vmm.gpu().queue(Queue::Control).addrs().used;
    let mut pending = Vec::new();
    for id in 1..=48 {
        let c = Command::ResourceCreate2d {
            resource_id: id,
            format: format::B8G8R8X8_UNORM,
            width: 256,
            height: 256,
        };
        pending.push(vmm.gpu().submit(&c, None).expect("submit"));
    }
    // The first answer means the device has started on the batch; the rest may still be
    // with the renderer when the VMM stops the ring.
    let mut pending = pending.into_iter();
    let first = pending.next().expect("a first command");
    common::ok("first RESOURCE_CREATE_2D", vmm.gpu().wait(first));
    let base = vmm
        .frontend()
        .get_vring_base(0)
        .expect("GET_VRING_BASE for the control queue");
    // Read the used index straight away: whatever the device wrote after answering
    // GET_VRING_BASE would be a write to a ring the VMM already considers stopped.
    let read_used_idx = |vmm: &vgpu_tests::TestVmm| {
        let b = vmm.memory().read_vec(used_ring + 2, 2).expect("used.idx");
        u32::from(u16::from_le_bytes([b[0], b[1]]))
    };
    let used_now = read_used_idx(&vmm);
    assert_eq!(
        used_now, base,
        "GET_VRING_BASE returned {base} consumed descriptors but only {used_now} were answered"
    );
    assert!(
        base > 1,
        "the device consumed only {base} command(s) before the stop"
    );
    // And it stays that way: no late answers.
    let stats_before = read_used_idx(&vmm);
    let _ = vmm
        .frontend()
        .get_features()
        .expect("a round trip on the vhost-user socket");
    assert_eq!(
        read_used_idx(&vmm),
        stats_before,
        "the device wrote a stopped ring"
    );
    drop(pending);
}
