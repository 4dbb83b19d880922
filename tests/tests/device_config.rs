//! What the device announces: vhost-user features, virtio_gpu_config, EDID.

mod common;

use common::{expect, start, still_works};
use vgpu_tests::edid;
use vgpu_tests::gpu::resp;
use vgpu_tests::vmm::{
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, VIRTIO_GPU_F_EDID, VIRTIO_RING_F_EVENT_IDX,
};
use vgpu_tests::VmmOptions;

#[test]
fn features_and_config_by_default() {
    let (_s, vmm) = start(&[]);
    let f = vmm.device_features();
    for (bit, name) in [
        (VIRTIO_F_VERSION_1, "VIRTIO_F_VERSION_1"),
        (VIRTIO_RING_F_EVENT_IDX, "VIRTIO_RING_F_EVENT_IDX"),
        (VIRTIO_GPU_F_EDID, "VIRTIO_GPU_F_EDID"),
        (
            VHOST_USER_F_PROTOCOL_FEATURES,
            "VHOST_USER_F_PROTOCOL_FEATURES",
        ),
    ] {
        assert_ne!(f & bit, 0, "{name} not offered (features {f:#x})");
    }
    let c = vmm.config();
    assert_eq!(c.num_scanouts, 1, "{c:?}");
    assert_eq!(c.num_capsets, 0, "a 2D device has no capsets: {c:?}");
    assert_eq!(c.events_read, 0, "{c:?}");
}

#[test]
fn two_outputs_give_two_scanouts() {
    let (_s, mut vmm) = start(&["--output", "800x600", "--output", "640x480"]);
    assert_eq!(vmm.config().num_scanouts, 2);
    let r = vmm.gpu().get_display_info().expect("GET_DISPLAY_INFO");
    let m = r.display_modes();
    assert!(m[0].enabled && m[1].enabled && !m[2].enabled, "{m:?}");
    assert_eq!((m[0].rect.width, m[0].rect.height), (800, 600));
    assert_eq!((m[1].rect.width, m[1].rect.height), (640, 480));
}

#[test]
fn get_edid_returns_a_valid_edid_for_the_output() {
    let (_s, mut vmm) = start(&["--output", "1024x768"]);
    let r = expect("GET_EDID 0", vmm.gpu().get_edid(0), resp::OK_EDID);
    assert_eq!(
        r.used_len as usize,
        vgpu_tests::gpu::EDID_RESP_SIZE,
        "GET_EDID used len"
    );
    let blob = r.edid().expect("EDID size field <= 1024");
    assert!(blob.len() >= 128, "EDID is {} bytes", blob.len());
    let info = edid::check(&blob).unwrap_or_else(|e| panic!("device EDID invalid: {e}"));
    common::no_violations(&vmm);
    assert_eq!(
        (info.preferred_width, info.preferred_height),
        (1024, 768),
        "EDID preferred mode should be the output's size"
    );
}

#[test]
fn no_edid_option_withdraws_the_feature() {
    let (_s, mut vmm) = start(&["--no-edid"]);
    assert_eq!(
        vmm.device_features() & VIRTIO_GPU_F_EDID,
        0,
        "VIRTIO_GPU_F_EDID offered despite --no-edid"
    );
    let r = vmm.gpu().get_edid(0).expect("GET_EDID is answered");
    assert!(
        !r.is_ok(),
        "GET_EDID without the EDID feature must fail, got {}",
        r.kind_name()
    );
    still_works(&mut vmm, "GET_EDID without the feature");
}

#[test]
fn works_without_event_idx() {
    let stack = vgpu_tests::Stack::start(&[]).unwrap_or_else(|e| panic!("{e}"));
    let opts = VmmOptions {
        event_idx: false,
        ..VmmOptions::default()
    };
    let mut vmm = stack.connect_with(&opts).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(vmm.acked_features() & VIRTIO_RING_F_EVENT_IDX, 0);
    for _ in 0..20 {
        still_works(&mut vmm, "without EVENT_IDX");
    }
}

#[test]
fn many_commands_wrap_the_rings() {
    // More commands than descriptors, so ring indices wrap and descriptors are reused; with
    // EVENT_IDX the driver also relies on the device's avail_event updates.
    let (_s, mut vmm) = start(&[]);
    let size = usize::from(vmm.gpu().queue(vgpu_tests::Queue::Control).size());
    for _ in 0..(size * 2 / 3 + 1) {
        still_works(&mut vmm, "ring wrap");
    }
    let (kicks, suppressed) = vmm.gpu().queue(vgpu_tests::Queue::Control).kick_stats();
    assert!(kicks > 0, "no kick was ever sent");
    let _ = suppressed;
}

#[test]
fn edid_display_feature_is_negotiated_before_use() {
    // The VMM offers VHOST_USER_GPU_PROTOCOL_F_EDID (as QEMU does): if the device asks the
    // VMM for an EDID at all, it must have enabled the feature first.
    let (_s, mut vmm) = start(&[]);
    let _ = vmm.gpu().get_edid(0).expect("GET_EDID");
    common::no_violations(&vmm);
}

#[test]
fn no_get_edid_to_a_vmm_without_the_edid_display_feature() {
    let stack = vgpu_tests::Stack::start(&[]).unwrap_or_else(|e| panic!("{e}"));
    let mut opts = VmmOptions::default();
    opts.display.offer_edid = false;
    let mut vmm = stack.connect_with(&opts).unwrap_or_else(|e| panic!("{e}"));
    let r = expect("GET_EDID 0", vmm.gpu().get_edid(0), resp::OK_EDID);
    let blob = r.edid().expect("EDID size field <= 1024");
    edid::check(&blob).unwrap_or_else(|e| panic!("device EDID invalid: {e}"));
    common::no_violations(&vmm);
}
