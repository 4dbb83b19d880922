//! The `decode` target: arbitrary bytes through the command decoder, as the control actor
//! runs it on every descriptor chain.
//!
//! Input: one byte of settings (bit 0: the cursor queue; bits 1-2: which limits), then the
//! request bytes (header, body, trailing data). The decoder must not panic; a rejected
//! request must map to a VIRTIO_GPU_RESP_ERR_* response that echoes the fence of a
//! readable header; an accepted one must stay within the limits and survive a round trip
//! through the driver-side encoder.

use device_frontend::decode::{decode, DecodeLimits, Queue, DEFAULT_MAX_SUBMIT_BYTES};
use protocol::virtio_gpu::{
    decode_response, encode_response, Command, ErrorCode, Response, CTRL_HDR_SIZE,
    VIRTIO_GPU_FLAG_FENCE, VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER, VIRTIO_GPU_RESP_ERR_UNSPEC,
};

/// The limits a settings byte selects: the device defaults, small ones, none at all, and
/// the largest the types allow (the decoder must still allocate only what the bytes hold).
fn limits(settings: u8) -> DecodeLimits {
    let (max_backing_entries, max_submit_bytes) = match (settings >> 1) & 3 {
        0 => (
            policy::limits::DEFAULT.max_backing_entries,
            DEFAULT_MAX_SUBMIT_BYTES,
        ),
        1 => (16, 1024),
        2 => (0, 0),
        _ => (u32::MAX, u32::MAX),
    };
    DecodeLimits {
        max_backing_entries,
        max_submit_bytes,
    }
}

/// Runs one input; panics on a broken rule.
pub fn run(data: &[u8]) {
    let Some((&settings, bytes)) = data.split_first() else {
        return;
    };
    let queue = if settings & 1 == 0 {
        Queue::Control
    } else {
        Queue::Cursor
    };
    let limits = limits(settings);
    match decode(queue, bytes, limits) {
        Ok(req) => {
            assert_eq!(req.cmd.cmd_type(), req.hdr.type_, "{req:?}");
            assert_eq!(req.cmd.is_cursor(), queue == Queue::Cursor, "{req:?}");
            match &req.cmd {
                Command::ResourceAttachBacking { entries, .. }
                | Command::ResourceCreateBlob { entries, .. } => {
                    assert!(entries.len() as u64 <= u64::from(limits.max_backing_entries));
                    assert!(
                        entries.len() * 16 <= bytes.len(),
                        "more entries than the request holds"
                    );
                }
                Command::Submit3d { commands } => {
                    assert!(commands.len() as u64 <= u64::from(limits.max_submit_bytes));
                    assert!(commands.len() <= bytes.len());
                }
                Command::CtxCreate { name, .. } => assert!(name.len() <= 64),
                _ => {}
            }
            // What the decoder accepted, the driver-side encoder writes back in canonical
            // form, and that decodes to the same request.
            let again = decode(queue, &req.encode(), limits);
            assert_eq!(again.as_ref(), Ok(&req), "re-encoded request");
        }
        Err(e) => {
            let _ = e.to_string();
            let hdr = e.header();
            assert_eq!(hdr.is_some(), bytes.len() >= CTRL_HDR_SIZE, "{e}");
            let code = e.error_code();
            let wire = encode_response(hdr.as_ref(), &Response::Err(code));
            let (resp_hdr, resp) = decode_response(&wire).expect("error response parses");
            assert!(
                (VIRTIO_GPU_RESP_ERR_UNSPEC..=VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER)
                    .contains(&resp_hdr.type_),
                "{e} answered with type {:#x}",
                resp_hdr.type_
            );
            assert_eq!(ErrorCode::from_resp_type(resp_hdr.type_), Some(code));
            assert_eq!(resp, Response::Err(code));
            match hdr {
                Some(h) if h.is_fenced() => {
                    assert_ne!(resp_hdr.flags & VIRTIO_GPU_FLAG_FENCE, 0, "fence echoed");
                    assert_eq!(resp_hdr.fence_id, h.fence_id);
                    assert_eq!(resp_hdr.ctx_id, h.ctx_id);
                }
                _ => assert_eq!(resp_hdr.flags, 0, "{e}: no fence to echo"),
            }
        }
    }
}
