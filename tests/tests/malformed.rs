//! Malformed guest commands, one class per test (the CVE list in DESIGN.md is the source of
//! most classes). Each is answered with the documented error (or, where no response can be
//! written, returned with used len 0) and is followed by valid commands that must still work.

mod common;

use common::{expect, image, ok, resource_with, start, still_works, WAIT};
use vgpu_tests::gpu::{cmd, encode_hdr, format, resp, Command, MemEntry, Queue, Rect, POISON};
use vgpu_tests::{DisplayEvent, TestVmm};

/// A 64x64 B8G8R8X8 resource 1 with backing, for the classes that need one.
fn with_resource(args: &[&str]) -> (vgpu_tests::Stack, TestVmm) {
    let (stack, mut vmm) = start(args);
    resource_with(
        &mut vmm,
        1,
        format::B8G8R8X8_UNORM,
        64,
        64,
        &image(64, 64, 40),
    );
    (stack, vmm)
}

#[test]
fn short_header() {
    let (_s, mut vmm) = start(&[]);
    let hdr = encode_hdr(cmd::GET_DISPLAY_INFO, None);
    let (used, bytes) = vmm.gpu().raw(Queue::Control, &hdr[..8], 24).expect("raw");
    let kind = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    assert!(
        used == 0 || (used == 24 && kind == resp::ERR_UNSPEC),
        "8-byte header: expected ERR_UNSPEC (or used len 0), got used {used}, type {}",
        resp::name(kind)
    );
    still_works(&mut vmm, "a short header");
}

#[test]
fn unknown_command() {
    let (_s, mut vmm) = start(&[]);
    let mut c = encode_hdr(0x0999, None);
    c.extend_from_slice(&[0u8; 32]);
    let (used, bytes) = vmm.gpu().raw(Queue::Control, &c, 24).expect("raw");
    let kind = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    assert_eq!(
        (used, kind),
        (24, resp::ERR_UNSPEC),
        "unknown command 0x999: got {}",
        resp::name(kind)
    );
    still_works(&mut vmm, "an unknown command");
}

#[test]
fn command_on_the_wrong_queue() {
    let (_s, mut vmm) = start(&[]);
    let create = Command::ResourceCreate2d {
        resource_id: 5,
        format: format::B8G8R8X8_UNORM,
        width: 16,
        height: 16,
    };
    let p = vmm
        .gpu()
        .submit_on(Queue::Cursor, &create, None)
        .expect("submit");
    let r = vmm
        .gpu()
        .wait(p)
        .expect("control command on the cursor queue must still be returned");
    assert!(
        r.used_len == 0 || r.kind == resp::ERR_UNSPEC,
        "RESOURCE_CREATE_2D on the cursor queue: expected ERR_UNSPEC or used len 0, got {} (used {})",
        r.kind_name(),
        r.used_len
    );
    let mv = Command::MoveCursor {
        scanout_id: 0,
        x: 1,
        y: 1,
    };
    let p = vmm
        .gpu()
        .submit_on(Queue::Control, &mv, None)
        .expect("submit");
    let r = vmm
        .gpu()
        .wait(p)
        .expect("cursor command on the control queue");
    assert_eq!(
        r.kind,
        resp::ERR_UNSPEC,
        "MOVE_CURSOR on the control queue: got {}",
        r.kind_name()
    );
    // The misplaced create must not have created anything: id 5 is still free.
    ok(
        "RESOURCE_CREATE_2D 5 on the control queue",
        vmm.gpu().execute(&create),
    );
    still_works(&mut vmm, "commands on the wrong queue");
}

#[test]
fn create_with_resource_id_zero() {
    let (_s, mut vmm) = start(&[]);
    expect(
        "RESOURCE_CREATE_2D id 0",
        vmm.gpu()
            .resource_create_2d(0, format::B8G8R8X8_UNORM, 16, 16),
        resp::ERR_INVALID_RESOURCE_ID,
    );
    still_works(&mut vmm, "resource id 0");
}

#[test]
fn create_with_duplicate_id() {
    let (_s, mut vmm) = start(&[]);
    ok(
        "first create",
        vmm.gpu()
            .resource_create_2d(3, format::B8G8R8X8_UNORM, 16, 16),
    );
    expect(
        "duplicate create",
        vmm.gpu()
            .resource_create_2d(3, format::B8G8R8X8_UNORM, 32, 32),
        resp::ERR_INVALID_RESOURCE_ID,
    );
    ok("unref of the original", vmm.gpu().resource_unref(3));
    still_works(&mut vmm, "a duplicate id");
}

#[test]
fn create_with_invalid_format() {
    let (_s, mut vmm) = start(&[]);
    for f in [0u32, 5, 999, u32::MAX] {
        expect(
            &format!("RESOURCE_CREATE_2D format {f}"),
            vmm.gpu().resource_create_2d(4, f, 16, 16),
            resp::ERR_INVALID_PARAMETER,
        );
    }
    still_works(&mut vmm, "invalid formats");
}

#[test]
fn create_with_zero_size() {
    let (_s, mut vmm) = start(&[]);
    for (w, h) in [(0, 16), (16, 0), (0, 0)] {
        expect(
            &format!("RESOURCE_CREATE_2D {w}x{h}"),
            vmm.gpu()
                .resource_create_2d(4, format::B8G8R8X8_UNORM, w, h),
            resp::ERR_INVALID_PARAMETER,
        );
    }
    still_works(&mut vmm, "zero sizes");
}

#[test]
fn create_with_dimensions_beyond_limits() {
    let (_s, mut vmm) = start(&[]);
    for (w, h) in [
        (65536, 65536),
        (u32::MAX, 1),
        (1, u32::MAX),
        (0x8000_0000, 2),
    ] {
        expect(
            &format!("RESOURCE_CREATE_2D {w}x{h}"),
            vmm.gpu()
                .resource_create_2d(4, format::B8G8R8X8_UNORM, w, h),
            resp::ERR_INVALID_PARAMETER,
        );
    }
    still_works(&mut vmm, "huge dimensions");
}

#[test]
fn create_beyond_the_memory_limit() {
    // 1 MiB for all resources: a 1024x1024 B8G8R8X8 resource needs 4 MiB.
    let (_s, mut vmm) = start(&["--max-resource-memory", "1"]);
    expect(
        "RESOURCE_CREATE_2D 1024x1024 with a 1 MiB limit",
        vmm.gpu()
            .resource_create_2d(4, format::B8G8R8X8_UNORM, 1024, 1024),
        resp::ERR_OUT_OF_MEMORY,
    );
    // The failed create must not have used up the budget.
    ok(
        "a 256x256 create within the limit",
        vmm.gpu()
            .resource_create_2d(5, format::B8G8R8X8_UNORM, 256, 256),
    );
    still_works(&mut vmm, "a create beyond the memory limit");
}

#[test]
fn unref_unknown_id() {
    let (_s, mut vmm) = start(&[]);
    expect(
        "RESOURCE_UNREF 12345",
        vmm.gpu().resource_unref(12345),
        resp::ERR_INVALID_RESOURCE_ID,
    );
    ok(
        "create",
        vmm.gpu()
            .resource_create_2d(6, format::B8G8R8X8_UNORM, 8, 8),
    );
    ok("unref", vmm.gpu().resource_unref(6));
    expect(
        "second unref",
        vmm.gpu().resource_unref(6),
        resp::ERR_INVALID_RESOURCE_ID,
    );
    still_works(&mut vmm, "unref of unknown ids");
}

#[test]
fn set_scanout_with_invalid_scanout_id() {
    let (_s, mut vmm) = with_resource(&[]);
    let n = vmm.config().num_scanouts;
    for id in [n, 16, u32::MAX] {
        expect(
            &format!("SET_SCANOUT scanout {id} (num_scanouts {n})"),
            vmm.gpu().set_scanout(id, 1, Rect::new(0, 0, 64, 64)),
            resp::ERR_INVALID_SCANOUT_ID,
        );
    }
    still_works(&mut vmm, "invalid scanout ids");
}

#[test]
fn set_scanout_rect_outside_the_resource() {
    // CVE-2016-10029: a scanout rect beyond the resource let the host read out of bounds.
    let (_s, mut vmm) = with_resource(&[]);
    for r in [
        Rect::new(0, 0, 65, 64),
        Rect::new(0, 0, 64, 65),
        Rect::new(1, 0, 64, 64),
        Rect::new(0, 60, 64, 8),
        Rect::new(u32::MAX - 1, 0, 4, 4),
        Rect::new(0, u32::MAX, 1, 1),
    ] {
        expect(
            &format!("SET_SCANOUT rect {r:?} on a 64x64 resource"),
            vmm.gpu().set_scanout(0, 1, r),
            resp::ERR_INVALID_PARAMETER,
        );
    }
    still_works(&mut vmm, "scanout rects outside the resource");
}

#[test]
fn set_scanout_with_unknown_resource() {
    let (_s, mut vmm) = start(&[]);
    expect(
        "SET_SCANOUT of resource 99",
        vmm.gpu().set_scanout(0, 99, Rect::new(0, 0, 16, 16)),
        resp::ERR_INVALID_RESOURCE_ID,
    );
    still_works(&mut vmm, "set_scanout of an unknown resource");
}

#[test]
fn transfer_rect_outside_the_resource() {
    let (_s, mut vmm) = with_resource(&[]);
    for r in [
        Rect::new(0, 0, 65, 64),
        Rect::new(0, 1, 64, 64),
        Rect::new(u32::MAX, 0, 2, 1),
        Rect::new(0, u32::MAX - 2, 1, 8),
    ] {
        expect(
            &format!("TRANSFER_TO_HOST_2D rect {r:?} on a 64x64 resource"),
            vmm.gpu().transfer_to_host_2d(1, r, 0),
            resp::ERR_INVALID_PARAMETER,
        );
    }
    still_works(&mut vmm, "transfer rects outside the resource");
}

#[test]
fn transfer_offset_overflow() {
    let (_s, mut vmm) = with_resource(&[]);
    for off in [u64::MAX, u64::MAX - 255, 1 << 63, 64 * 64 * 4] {
        expect(
            &format!("TRANSFER_TO_HOST_2D offset {off:#x}"),
            vmm.gpu()
                .transfer_to_host_2d(1, Rect::new(0, 0, 64, 64), off),
            resp::ERR_INVALID_PARAMETER,
        );
    }
    // An offset that keeps the rect inside the backing is fine.
    ok(
        "in-bounds offset",
        vmm.gpu()
            .transfer_to_host_2d(1, Rect::new(0, 0, 32, 32), 4 * 64 * 32),
    );
    still_works(&mut vmm, "transfer offsets that overflow");
}

#[test]
fn attach_backing_with_huge_nr_entries() {
    let (_s, mut vmm) = start(&[]);
    ok(
        "create",
        vmm.gpu()
            .resource_create_2d(1, format::B8G8R8X8_UNORM, 64, 64),
    );
    let addr = vmm.memory().alloc(64 * 64 * 4).unwrap();
    for n in [u32::MAX, 0x1000_0000, 1 << 17] {
        let c = Command::AttachBacking {
            resource_id: 1,
            entries: vec![MemEntry {
                addr,
                length: 64 * 64 * 4,
            }],
            nr_entries: Some(n),
        };
        expect(
            &format!("ATTACH_BACKING claiming {n} entries"),
            vmm.gpu().execute(&c),
            resp::ERR_INVALID_PARAMETER,
        );
    }
    // A correct attach still works afterwards.
    ok(
        "ATTACH_BACKING",
        vmm.gpu().attach_backing(
            1,
            &[MemEntry {
                addr,
                length: 64 * 64 * 4,
            }],
        ),
    );
    still_works(&mut vmm, "huge nr_entries");
}

#[test]
fn attach_backing_outside_guest_memory() {
    let (_s, mut vmm) = start(&[]);
    ok(
        "create",
        vmm.gpu()
            .resource_create_2d(1, format::B8G8R8X8_UNORM, 64, 64),
    );
    let end = vmm.memory().base() + vmm.memory().size();
    for e in [
        MemEntry {
            addr: end,
            length: 4096,
        },
        MemEntry {
            addr: end - 4096,
            length: 8192,
        },
        MemEntry {
            addr: 1 << 47,
            length: 16384,
        },
    ] {
        expect(
            &format!("ATTACH_BACKING entry {e:?} (guest RAM ends at {end:#x})"),
            vmm.gpu().attach_backing(1, &[e]),
            resp::ERR_INVALID_PARAMETER,
        );
    }
    still_works(&mut vmm, "backing outside guest memory");
}

#[test]
fn attach_backing_entry_address_overflow() {
    let (_s, mut vmm) = start(&[]);
    ok(
        "create",
        vmm.gpu()
            .resource_create_2d(1, format::B8G8R8X8_UNORM, 64, 64),
    );
    for e in [
        MemEntry {
            addr: u64::MAX - 100,
            length: 4096,
        },
        MemEntry {
            addr: u64::MAX,
            length: 1,
        },
        MemEntry {
            addr: 0x1000,
            length: 0,
        },
    ] {
        expect(
            &format!("ATTACH_BACKING entry {e:?}"),
            vmm.gpu().attach_backing(1, &[e]),
            resp::ERR_INVALID_PARAMETER,
        );
    }
    still_works(&mut vmm, "entries whose addr+len overflows");
}

#[test]
fn flush_of_unknown_resource() {
    let (_s, mut vmm) = start(&[]);
    expect(
        "RESOURCE_FLUSH of resource 31337",
        vmm.gpu().resource_flush(31337, Rect::new(0, 0, 8, 8)),
        resp::ERR_INVALID_RESOURCE_ID,
    );
    expect(
        "DETACH_BACKING of resource 31337",
        vmm.gpu().detach_backing(31337),
        resp::ERR_INVALID_RESOURCE_ID,
    );
    still_works(&mut vmm, "a flush of an unknown resource");
}

#[test]
fn chain_without_writable_descriptor() {
    let (_s, mut vmm) = start(&[]);
    let c = Command::GetDisplayInfo.encode(None);
    let (used, _) = vmm
        .gpu()
        .raw(Queue::Control, &c, 0)
        .expect("chain with no writable buffer must be returned");
    assert_eq!(used, 0, "nothing writable, so used len must be 0");
    still_works(&mut vmm, "a chain with no writable descriptor");
}

#[test]
fn response_buffer_too_small() {
    let (_s, mut vmm) = start(&[]);
    let c = Command::GetDisplayInfo.encode(None);
    // 8 bytes cannot hold even the 24-byte header; the device must not write past them.
    let (used, bytes) = vmm.gpu().raw(Queue::Control, &c, 8).expect("returned");
    assert!(used <= 8, "used len {used} beyond the 8-byte buffer");
    // And a buffer big enough for a header but not for display info.
    let (used, bytes2) = vmm.gpu().raw(Queue::Control, &c, 24).expect("returned");
    assert!(
        used == 0 || used == 24,
        "24-byte buffer for GET_DISPLAY_INFO: used len {used} (bytes {:02x?})",
        &bytes2[..8]
    );
    let _ = (bytes, POISON);
    still_works(&mut vmm, "a response buffer that is too small");
}

#[test]
fn cursor_with_nonexistent_resource() {
    let (_s, mut vmm) = start(&[]);
    vmm.display().skip_to_end();
    vmm.gpu()
        .update_cursor(0, 10, 10, 4040, 0, 0)
        .expect("UPDATE_CURSOR with resource 4040 is returned");
    // A later, valid cursor command is served, and nothing showed an image of a
    // resource that does not exist.
    vmm.gpu().move_cursor(0, 123, 45).expect("MOVE_CURSOR");
    vmm.display()
        .wait_for("VHOST_USER_GPU_CURSOR_POS 123,45", WAIT, |e| {
            assert!(
                !matches!(e, DisplayEvent::CursorUpdate { .. }),
                "CURSOR_UPDATE sent for a non-existent resource"
            );
            matches!(e, DisplayEvent::CursorPos { x: 123, y: 45, .. })
        })
        .unwrap_or_else(|e| panic!("{e}"));
    still_works(&mut vmm, "a cursor with a non-existent resource");
}

#[test]
fn get_edid_for_invalid_scanout() {
    let (_s, mut vmm) = start(&[]);
    expect(
        "GET_EDID scanout 16",
        vmm.gpu().get_edid(16),
        resp::ERR_INVALID_SCANOUT_ID,
    );
    still_works(&mut vmm, "GET_EDID of an invalid scanout");
}

#[test]
fn transfer_without_backing() {
    let (_s, mut vmm) = start(&[]);
    ok(
        "create",
        vmm.gpu()
            .resource_create_2d(1, format::B8G8R8X8_UNORM, 16, 16),
    );
    let r = vmm
        .gpu()
        .transfer_to_host_2d(1, Rect::new(0, 0, 16, 16), 0)
        .expect("TRANSFER_TO_HOST_2D");
    assert!(
        !r.is_ok(),
        "transfer with no backing attached must fail, got {}",
        r.kind_name()
    );
    still_works(&mut vmm, "a transfer without backing");
}
