//! Per-VM limits: how much of the host one guest may make the device use.
//!
//! The wire type, [`Limits`], lives in `protocol` because both children receive it in
//! their [`protocol::config::DeviceConfig`]; what the values are, why, and which values a
//! user may choose is decided here: [`DEFAULT`] (each value with its reason), one [`Bound`]
//! per limit, and [`validate`], which the broker runs on the final configuration.
//!
//! Where they are enforced (each one twice: the frontend answers the guest, and the
//! renderer-worker checks again before it allocates, because it must not trust the
//! frontend):
//!
//! | limit | frontend | renderer-worker |
//! | --- | --- | --- |
//! | `max_resources`, `max_resource_bytes` | `resources.rs` `ResourceTable` (2D, 3D, blobs, scanout buffers) | `resources.rs` `ResourceLedger` (2D, 3D, host blobs) |
//! | `max_contexts` | `blobs.rs` CTX_CREATE | `executor.rs` CreateContext |
//! | `max_submit_bytes` | `decode.rs` SUBMIT_3D | `executor.rs` Submit3d |
//! | `max_mappings` | `blobs.rs` RESOURCE_MAP_BLOB | `executor.rs` Map |
//! | `max_dimension`, `max_backing_entries` | `decode.rs`, `resources.rs`, `blobs.rs` | `resources.rs`, `guest_memory.rs`, the backends |
//!
//! A guest beyond a count or byte limit gets `VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY` and the
//! device goes on serving; nothing is allocated for the refused command. `max_dimension`
//! and `max_backing_entries` are not budgets but the largest values a valid command may
//! carry: beyond them a command is malformed (`ERR_INVALID_PARAMETER`).

use protocol::config::Limits;
use thiserror::Error;

/// The limits a device has unless the user chose otherwise.
pub const DEFAULT: Limits = Limits {
    // The Linux driver makes one resource per framebuffer, cursor and (with 3D or blobs)
    // per GEM object: a desktop guest has hundreds to a few thousand. Each costs an entry
    // in the frontend's table and the renderer's ledger plus the renderer's own state, so
    // the count bounds the bookkeeping that zero-byte resources would otherwise grow.
    max_resources: 16384,
    // 1 GiB holds a dozen 4K framebuffers (32 MiB each) with room for a 3D guest's
    // textures, while one VM cannot take more of the host than that.
    max_resource_bytes: 1 << 30,
    // The largest texture virglrenderer (llvmpipe and common GPUs) and the Linux driver's
    // mode config allow; a row of it (64 KiB) and every `width * 4` fit a u32 with room.
    max_dimension: 16384,
    // The Linux driver sends one entry per physically contiguous run: 65536 entries cover
    // 256 MiB scattered page by page. An entry is 16 bytes, so the longest ATTACH_BACKING
    // is 1 MiB, and the renderer maps each run (at most `MAX_LIVE_RANGE_MAPPINGS`).
    max_backing_entries: 1 << 16,
    // One context per guest DRM file that asked for 3D (each GL or Vulkan client process).
    // A virgl context is a host GL context (MiBs with llvmpipe); a cross-domain context
    // keeps an item table rutabaga never shrinks (up to ~2.5 MiB): 64 bound that to
    // ~160 MiB, well above what a desktop guest opens at once.
    max_contexts: 64,
    // Mesa's virgl winsys flushes its command buffer at 64 Ki dwords (256 KiB), so 1 MiB
    // is four times the largest stream a real guest sends. The frontend reads a command
    // whole before it is checked and the renderer gets a copy: two of these per command.
    max_submit_bytes: 1 << 20,
    // Each live mapping is an mmap (one VMA or more) in the VMM and an fd it may keep;
    // Linux's vm.max_map_count is 65530 per process by default. 4096 leaves the VMM most
    // of that while a guest that suballocates (Venus, cross-domain) rarely needs hundreds.
    max_mappings: 4096,
};

/// The values a user may give one limit (inclusive), and the option that sets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bound {
    /// The field of [`Limits`], for messages.
    pub name: &'static str,
    /// The command-line option that sets it, if any.
    pub option: Option<&'static str>,
    /// Smallest value: below it the device cannot serve a guest at all.
    pub min: u64,
    /// Largest value: above it the limit no longer protects the host (or the arithmetic
    /// that relies on it).
    pub max: u64,
}

impl Bound {
    /// `value` if it lies in `min..=max`, else the error that says so.
    pub fn check(&self, value: u64) -> Result<u64, LimitError> {
        if (self.min..=self.max).contains(&value) {
            Ok(value)
        } else {
            Err(LimitError::OutOfRange {
                name: self.option.unwrap_or(self.name),
                value,
                min: self.min,
                max: self.max,
            })
        }
    }
}

/// `max_resources`: at least one resource (a framebuffer); at most 2^20, where the
/// bookkeeping alone of zero-sized blobs reaches hundreds of MiB.
pub const RESOURCES: Bound = Bound {
    name: "max_resources",
    option: Some("--max-resources"),
    min: 1,
    max: 1 << 20,
};

/// `max_resource_bytes`: 1 MiB..=64 GiB (the option takes MiB).
pub const RESOURCE_BYTES: Bound = Bound {
    name: "max_resource_bytes",
    option: Some("--max-resource-memory"),
    min: 1 << 20,
    max: 64 << 30,
};

/// `max_dimension`: not an option; the code relies on `max_dimension * 4` fitting a u32
/// and on scanout sizes (16..=16384) fitting it.
pub const DIMENSION: Bound = Bound {
    name: "max_dimension",
    option: None,
    min: 16,
    max: 16384,
};

/// `max_backing_entries`: not an option; the frontend sizes its request buffer from it
/// (16 bytes each) and the renderer's mappings are bounded near 2^16.
pub const BACKING_ENTRIES: Bound = Bound {
    name: "max_backing_entries",
    option: None,
    min: 1,
    max: 1 << 16,
};

/// `max_contexts`: at most 1024 (~2.5 GiB of cross-domain item tables at worst).
pub const CONTEXTS: Bound = Bound {
    name: "max_contexts",
    option: Some("--max-contexts"),
    min: 1,
    max: 1024,
};

/// `max_submit_bytes`: 4 KiB..=64 MiB (a command is read whole, and copied once more to
/// the renderer).
pub const SUBMIT_BYTES: Bound = Bound {
    name: "max_submit_bytes",
    option: Some("--max-submit-size"),
    min: 4 << 10,
    max: 64 << 20,
};

/// `max_mappings`: at most 32768, half of Linux's default vm.max_map_count, so the VMM
/// keeps room for its own mappings.
pub const MAPPINGS: Bound = Bound {
    name: "max_mappings",
    option: Some("--max-mappings"),
    min: 1,
    max: 32768,
};

/// A limit outside its [`Bound`].
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum LimitError {
    /// The value is below the minimum or above the maximum.
    #[error("{name} {value} is out of range (must be {min}..={max})")]
    OutOfRange {
        /// The option (or field) it was given for.
        name: &'static str,
        /// The value given.
        value: u64,
        /// Smallest accepted value.
        min: u64,
        /// Largest accepted value.
        max: u64,
    },
}

/// Checks every field of `limits` against its [`Bound`].
pub fn validate(limits: &Limits) -> Result<(), LimitError> {
    let Limits {
        max_resources,
        max_resource_bytes,
        max_dimension,
        max_backing_entries,
        max_contexts,
        max_submit_bytes,
        max_mappings,
    } = *limits;
    RESOURCES.check(max_resources.into())?;
    RESOURCE_BYTES.check(max_resource_bytes)?;
    DIMENSION.check(max_dimension.into())?;
    BACKING_ENTRIES.check(max_backing_entries.into())?;
    CONTEXTS.check(max_contexts.into())?;
    SUBMIT_BYTES.check(max_submit_bytes.into())?;
    MAPPINGS.check(max_mappings.into())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(validate(&DEFAULT), Ok(()));
    }

    #[test]
    fn every_field_is_checked_at_both_ends() {
        type Set = fn(&mut Limits, u64);
        let fields: [(Bound, Set); 7] = [
            (RESOURCES, |l, v| l.max_resources = v as u32),
            (RESOURCE_BYTES, |l, v| l.max_resource_bytes = v),
            (DIMENSION, |l, v| l.max_dimension = v as u32),
            (BACKING_ENTRIES, |l, v| l.max_backing_entries = v as u32),
            (CONTEXTS, |l, v| l.max_contexts = v as u32),
            (SUBMIT_BYTES, |l, v| l.max_submit_bytes = v as u32),
            (MAPPINGS, |l, v| l.max_mappings = v as u32),
        ];
        for (bound, set) in fields {
            // Every bound fits its field, so the casts above are exact.
            assert!(bound.min >= 1 && bound.min <= bound.max, "{bound:?}");
            for ok in [bound.min, bound.max] {
                let mut l = DEFAULT;
                set(&mut l, ok);
                assert_eq!(validate(&l), Ok(()), "{} = {ok}", bound.name);
            }
            for bad in [bound.min - 1, bound.max + 1] {
                let mut l = DEFAULT;
                set(&mut l, bad);
                let err = validate(&l).expect_err(bound.name);
                let text = err.to_string();
                assert!(
                    text.contains(bound.option.unwrap_or(bound.name))
                        && text.contains(&bad.to_string()),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn dimension_bound_keeps_row_arithmetic_in_u32() {
        assert!(DIMENSION
            .max
            .checked_mul(4)
            .is_some_and(|r| r <= u64::from(u32::MAX)));
        assert!(u64::from(DEFAULT.max_dimension) <= DIMENSION.max);
    }
}
