//! The framing of a virgl command stream (the bytes of SUBMIT_3D to a VIRGL or VIRGL2
//! context), checked by the frontend before the stream leaves it and by the renderer again
//! before virglrenderer sees it.
//!
//! A stream is a sequence of commands, each a dword header (bits 0-7 the command, 8-15
//! the object type, 16-31 the payload length in dwords) followed by its payload.
//! virglrenderer's decoder trusted a command's length against the buffer in the past
//! (CVE-2022-0135: an inline write reached past the buffer), so a stream whose last
//! command claims more payload than the submission holds, or whose size is not a whole
//! number of dwords, never reaches the renderer. It matters twice over: once virglrenderer
//! has refused a command in a context it marks the whole context as failed and silently
//! drops everything the guest submits to it afterwards, so a stream refused here gets an
//! error answer and leaves its context usable. The commands' contents are the renderer's
//! business; only the framing is checked here.

use thiserror::Error;

/// Bytes per dword.
const DWORD: usize = 4;

/// Why a stream's framing is broken.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum StreamError {
    /// The stream is not a whole number of dwords.
    #[error("virgl stream of {len} bytes is not a whole number of dwords")]
    Unaligned {
        /// The stream's length in bytes.
        len: usize,
    },
    /// A command's payload runs past the end of the stream.
    #[error(
        "virgl command {cmd} (object {object}) at dword {at} claims {len} payload dwords, \
         but only {left} follow"
    )]
    Truncated {
        /// Dword index of the command's header.
        at: usize,
        /// The command (bits 0-7 of the header).
        cmd: u8,
        /// The object type (bits 8-15).
        object: u8,
        /// The claimed payload length in dwords (bits 16-31).
        len: usize,
        /// Dwords after the header.
        left: usize,
    },
}

/// The fields of a virgl command header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// VIRGL_CCMD_*.
    pub cmd: u8,
    /// VIRGL_OBJECT_* (for the object commands).
    pub object: u8,
    /// Payload length in dwords.
    pub len: usize,
}

impl Header {
    /// Splits a header dword.
    pub fn from_dword(word: u32) -> Header {
        Header {
            cmd: (word & 0xff) as u8,
            object: ((word >> 8) & 0xff) as u8,
            len: (word >> 16) as usize,
        }
    }
}

/// Checks that `stream` is a whole number of dwords and a sequence of complete
/// commands; returns how many commands it holds. The empty stream is valid (nothing to
/// do). Reads each header once, allocates nothing.
pub fn check(stream: &[u8]) -> Result<usize, StreamError> {
    if !stream.len().is_multiple_of(DWORD) {
        return Err(StreamError::Unaligned { len: stream.len() });
    }
    let dwords = stream.len() / DWORD;
    let mut at = 0;
    let mut commands = 0;
    while at < dwords {
        let Some(bytes) = stream.get(at * DWORD..(at + 1) * DWORD) else {
            // at < dwords: the header is there; unreachable, but never a panic.
            return Err(StreamError::Unaligned { len: stream.len() });
        };
        let word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let h = Header::from_dword(word);
        let left = dwords - at - 1;
        if h.len > left {
            return Err(StreamError::Truncated {
                at,
                cmd: h.cmd,
                object: h.object,
                len: h.len,
                left,
            });
        }
        // len <= left < dwords: no overflow.
        at += 1 + h.len;
        commands += 1;
    }
    Ok(commands)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    fn hdr(cmd: u32, object: u32, len: u32) -> u32 {
        cmd | (object << 8) | (len << 16)
    }

    #[test]
    fn well_framed_streams() {
        assert_eq!(check(&[]), Ok(0));
        // A header with no payload.
        assert_eq!(check(&stream(&[hdr(0, 0, 0)])), Ok(1));
        // The clear test stream: create surface (5), framebuffer state (3), clear (8).
        let s = stream(&[
            hdr(1, 8, 5),
            10,
            5,
            2,
            0,
            0,
            hdr(5, 0, 3),
            1,
            0,
            10,
            hdr(7, 0, 8),
            4,
            1.0f32.to_bits(),
            0,
            1.0f32.to_bits(),
            1.0f32.to_bits(),
            0,
            0,
            0,
        ]);
        assert_eq!(check(&s), Ok(3));
    }

    #[test]
    fn sizes_that_are_not_dwords() {
        let whole = stream(&[hdr(7, 0, 1), 4]);
        for cut in [1, 2, 3, 5, 6, 7] {
            assert_eq!(
                check(&whole[..cut]),
                Err(StreamError::Unaligned { len: cut }),
                "{cut} bytes"
            );
        }
        let mut long = whole.clone();
        long.push(0);
        assert_eq!(check(&long), Err(StreamError::Unaligned { len: 9 }));
    }

    #[test]
    fn truncated_commands() {
        // The only command claims one dword more than follows.
        assert_eq!(
            check(&stream(&[hdr(7, 0, 8), 4, 0, 0, 0, 0, 0, 0])),
            Err(StreamError::Truncated {
                at: 0,
                cmd: 7,
                object: 0,
                len: 8,
                left: 7
            })
        );
        // A complete command, then a header at the very end that claims payload.
        assert_eq!(
            check(&stream(&[hdr(5, 0, 1), 0, hdr(1, 8, 5)])),
            Err(StreamError::Truncated {
                at: 2,
                cmd: 1,
                object: 8,
                len: 5,
                left: 0
            })
        );
        // The largest length a header can claim.
        assert_eq!(
            check(&stream(&[u32::MAX])),
            Err(StreamError::Truncated {
                at: 0,
                cmd: 0xff,
                object: 0xff,
                len: 0xffff,
                left: 0
            })
        );
        let e = check(&stream(&[hdr(7, 0, 8)])).unwrap_err();
        assert!(e.to_string().contains("claims 8"), "{e}");
    }

    #[test]
    fn header_fields() {
        assert_eq!(
            Header::from_dword(0x0005_0801),
            Header {
                cmd: 1,
                object: 8,
                len: 5
            }
        );
    }

    mod proptests {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any bytes: no panic, and an accepted stream really is a chain of complete
            /// commands that ends exactly at the end of the stream.
            #[test]
            fn never_panics_and_accepts_only_whole_chains(
                bytes in prop::collection::vec(any::<u8>(), 0..256),
            ) {
                if let Ok(n) = check(&bytes) {
                    prop_assert!(bytes.len().is_multiple_of(4));
                    let mut at = 0;
                    let mut seen = 0;
                    while at < bytes.len() {
                        let w = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
                        at += 4 + 4 * (w >> 16) as usize;
                        seen += 1;
                    }
                    prop_assert_eq!(at, bytes.len());
                    prop_assert_eq!(seen, n);
                }
            }

            /// Streams built from complete commands are accepted; cutting any whole
            /// number of dwords off a non-empty payload is refused.
            #[test]
            fn built_streams(
                cmds in prop::collection::vec((any::<u8>(), any::<u8>(), 0u32..6), 1..8),
                cut in 1usize..6,
            ) {
                let mut words = Vec::new();
                for (cmd, obj, len) in &cmds {
                    words.push(hdr(u32::from(*cmd), u32::from(*obj), *len));
                    words.extend(std::iter::repeat_n(0xdead_beefu32, *len as usize));
                }
                let s = stream(&words);
                prop_assert_eq!(check(&s), Ok(cmds.len()));
                let last = cmds.last().unwrap().2 as usize;
                if cut <= last {
                    let short = &s[..s.len() - 4 * cut];
                    let truncated = matches!(check(short), Err(StreamError::Truncated { .. }));
                    prop_assert!(truncated);
                }
            }
        }
    }
}
