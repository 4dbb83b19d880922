//! Blob mapping end to end (issue 5).
//!
//! DEPENDS ON THE LEAD'S WORK IN PROGRESS: `vgpu-sandbox --hostmem SIZE` offering
//! VIRTIO_GPU_F_RESOURCE_BLOB / F_CONTEXT_INIT and protocol feature SHMEM, and sending
//! SHMEM_MAP / SHMEM_UNMAP with REPLY_ACK. These tests fail until the binary supports it.

mod common;

use std::time::Duration;

use vgpu_tests::{Stack, TestVmm, VmmOptions};

const HOSTMEM: u64 = 64 << 20;

fn start_hostmem(extra: &[&str]) -> (Stack, TestVmm) {
    let mut args = vec!["--hostmem", "64M"];
    args.extend_from_slice(extra);
    let stack = Stack::start(&args).unwrap_or_else(|e| panic!("starting vgpu-sandbox: {e}"));
    let opts = VmmOptions {
        hostmem: Some(HOSTMEM),
        reset_device: true,
        ..VmmOptions::default()
    };
    let vmm = stack.connect_with(&opts).unwrap_or_else(|e| {
        panic!(
            "test VMM set-up with hostmem failed: {e}\nvgpu-sandbox output:\n{}",
            stack.log_text()
        )
    });
    (stack, vmm)
}

#[test]
fn hostmem_handshake() {
    let (_stack, vmm) = start_hostmem(&[]);
    assert_eq!(vmm.hostmem().expect("window").size(), HOSTMEM);
    let _ = Duration::from_secs(1);
    assert!(vmm.backend_requests().is_some());
}
