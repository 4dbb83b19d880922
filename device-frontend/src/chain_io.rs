//! Reading a command out of a descriptor chain and writing its response back, into and
//! from buffers the control actor reuses: no allocation per command.
//!
//! virtio-queue's `Reader` and `Writer` gather a chain's buffers into a `VecDeque` each
//! time (two allocations per command, next to the request and response buffers). These
//! walk the descriptors directly and keep their checks: the sum of the descriptor lengths
//! must not overflow, and every byte of every descriptor of the direction must lie in
//! guest memory, even the bytes that are not copied.

use vm_memory::{GuestMemory, Permissions};

use crate::control::Chain;

/// Why a chain could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The descriptor lengths overflow when summed.
    #[error("descriptor lengths overflow")]
    Overflow,
    /// A descriptor is not (wholly) in guest memory.
    #[error("descriptor at {addr:#x}+{len:#x}: {err}")]
    Memory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
        /// What vm-memory said.
        err: vm_memory::GuestMemoryError,
    },
}

/// Replaces `buf`'s contents with the chain's readable bytes, at most `max` of them.
///
/// A longer chain is read only up to `max`: no valid command is longer (the limits bound
/// the two commands of variable length, and `max` is their largest), and the decoder
/// ignores a body's excess anyway, so the rest can never matter. Cutting it off instead of
/// refusing the chain makes an oversized command meet the check it fails on: a SUBMIT_3D
/// over the per-VM size limit is ERR_OUT_OF_MEMORY however long its chain is.
pub fn read_request(chain: &Chain, max: usize, buf: &mut Vec<u8>) -> Result<(), ChainError> {
    buf.clear();
    each_slice(chain, Permissions::Read, |slice| {
        let take = slice.len().min(max - buf.len());
        if take > 0 {
            let at = buf.len();
            buf.resize(at + take, 0);
            slice.copy_to(&mut buf[at..]);
        }
    })?;
    Ok(())
}

/// The writable room of a chain and, where it is, how much of `bytes` was written there.
pub struct Written {
    /// Bytes written.
    pub len: u32,
    /// Bytes the chain had room for.
    pub room: usize,
}

/// Writes as much of `bytes` as the chain's writable descriptors hold; nothing at all
/// when one of them is not in guest memory.
pub fn write_response(chain: &Chain, bytes: &[u8]) -> Result<Written, ChainError> {
    // Every writable descriptor is checked before the first byte is written.
    let room = each_slice(chain, Permissions::Write, |_| {})?;
    let mut done = 0usize;
    each_slice(chain, Permissions::Write, |slice| {
        let n = slice.len().min(bytes.len() - done);
        if n > 0 {
            slice.copy_from(&bytes[done..done + n]);
            done += n;
        }
    })?;
    Ok(Written {
        // A response is at most a few KiB (capsets are bounded by the limits).
        len: u32::try_from(done).unwrap_or(u32::MAX),
        room,
    })
}

/// Calls `f` with every guest memory slice of the chain's readable (`Permissions::Read`)
/// or writable descriptors, in order; returns their total length. Fails on the first
/// descriptor that is not in guest memory, or when the lengths overflow.
fn each_slice(
    chain: &Chain,
    direction: Permissions,
    mut f: impl FnMut(vm_memory::VolatileSlice<'_>),
) -> Result<usize, ChainError> {
    let mem = chain.memory();
    let descriptors = if direction == Permissions::Write {
        chain.clone().writable()
    } else {
        chain.clone().readable()
    };
    let mut total = 0usize;
    for desc in descriptors {
        total = total
            .checked_add(desc.len() as usize)
            .ok_or(ChainError::Overflow)?;
        for slice in mem
            .get_slices(desc.addr(), desc.len() as usize, direction)
            .map_err(|err| memory_err(&desc, err))?
        {
            f(slice.map_err(|err| memory_err(&desc, err))?);
        }
    }
    Ok(total)
}

fn memory_err(
    desc: &virtio_queue::desc::split::Descriptor,
    err: vm_memory::GuestMemoryError,
) -> ChainError {
    ChainError::Memory {
        addr: desc.addr().0,
        len: desc.len(),
        err,
    }
}
