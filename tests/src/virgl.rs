//! A guest-side builder of virgl command streams (the bytes of SUBMIT_3D to a VIRGL
//! context), for the few commands the end-to-end tests need: create a surface on a
//! resource, bind it as the framebuffer, clear it.
//!
//! Written from virglrenderer's protocol header (virgl_protocol.h), independently of the
//! device's framing check: each command is a dword header `cmd | object << 8 | len << 16`
//! followed by `len` payload dwords.

/// VIRGL_CCMD_* command numbers.
pub mod ccmd {
    /// VIRGL_CCMD_NOP
    pub const NOP: u32 = 0;
    /// VIRGL_CCMD_CREATE_OBJECT
    pub const CREATE_OBJECT: u32 = 1;
    /// VIRGL_CCMD_SET_FRAMEBUFFER_STATE
    pub const SET_FRAMEBUFFER_STATE: u32 = 5;
    /// VIRGL_CCMD_CLEAR
    pub const CLEAR: u32 = 7;
}

/// VIRGL_OBJECT_* types.
pub mod object {
    /// VIRGL_OBJECT_SURFACE
    pub const SURFACE: u32 = 8;
}

/// PIPE_CLEAR_COLOR0: clear the first colour buffer.
pub const PIPE_CLEAR_COLOR0: u32 = 1 << 2;

/// Payload dwords of VIRGL_OBJECT_SURFACE creation: handle, resource, format, level,
/// layers.
const SURFACE_LEN: u32 = 5;
/// Payload dwords of VIRGL_CCMD_CLEAR: buffers, RGBA, depth (two dwords), stencil.
const CLEAR_LEN: u32 = 8;

/// A command header dword.
pub fn header(cmd: u32, object: u32, len: u32) -> u32 {
    cmd | (object << 8) | (len << 16)
}

/// A virgl command stream under construction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stream {
    words: Vec<u32>,
}

impl Stream {
    /// An empty stream.
    pub fn new() -> Stream {
        Stream::default()
    }

    /// VIRGL_CCMD_CREATE_OBJECT of a SURFACE: object `handle` on level `level`, layers
    /// `first_layer..=last_layer` of resource `res_handle`, seen as virgl `format`.
    pub fn create_surface(
        mut self,
        handle: u32,
        res_handle: u32,
        format: u32,
        level: u32,
        (first_layer, last_layer): (u32, u32),
    ) -> Stream {
        self.words.extend([
            header(ccmd::CREATE_OBJECT, object::SURFACE, SURFACE_LEN),
            handle,
            res_handle,
            format,
            level,
            first_layer | (last_layer << 16),
        ]);
        self
    }

    /// VIRGL_CCMD_SET_FRAMEBUFFER_STATE: depth/stencil surface `zsurf` (0: none) and
    /// colour buffers `cbufs`.
    pub fn set_framebuffer_state(mut self, zsurf: u32, cbufs: &[u32]) -> Stream {
        let nr = cbufs.len() as u32;
        self.words
            .extend([header(ccmd::SET_FRAMEBUFFER_STATE, 0, nr + 2), nr, zsurf]);
        self.words.extend_from_slice(cbufs);
        self
    }

    /// VIRGL_CCMD_CLEAR of `buffers` (PIPE_CLEAR_* bits) to colour `rgba`, `depth` and
    /// `stencil`.
    pub fn clear(mut self, buffers: u32, rgba: [f32; 4], depth: f64, stencil: u32) -> Stream {
        let d = depth.to_bits();
        self.words.push(header(ccmd::CLEAR, 0, CLEAR_LEN));
        self.words.push(buffers);
        self.words.extend(rgba.map(f32::to_bits));
        self.words.extend([d as u32, (d >> 32) as u32, stencil]);
        self
    }

    /// Appends raw dwords (a header that lies about its length, say).
    pub fn raw(mut self, words: &[u32]) -> Stream {
        self.words.extend_from_slice(words);
        self
    }

    /// The stream's dwords.
    pub fn words(&self) -> &[u32] {
        &self.words
    }

    /// The stream as SUBMIT_3D carries it (little-endian dwords).
    pub fn bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

/// The stream that clears colour buffer 0 of `resource_id` (a 2D texture in virgl
/// `format`) to `rgba`: surface `surface` on it, a framebuffer with that one colour
/// buffer, a clear.
pub fn clear_resource(resource_id: u32, format: u32, surface: u32, rgba: [f32; 4]) -> Stream {
    Stream::new()
        .create_surface(surface, resource_id, format, 0, (0, 0))
        .set_framebuffer_state(0, &[surface])
        .clear(PIPE_CLEAR_COLOR0, rgba, 1.0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clear_stream_as_laid_out_by_hand() {
        let s = clear_resource(5, 2, 10, [1.0, 0.0, 1.0, 1.0]);
        let one = 1.0f32.to_bits();
        let depth = 1.0f64.to_bits();
        assert_eq!(
            s.words(),
            [
                // CREATE_OBJECT SURFACE, 5 dwords.
                0x0005_0801,
                10,
                5,
                2,
                0,
                0,
                // SET_FRAMEBUFFER_STATE, 1 cbuf: 3 dwords.
                0x0003_0005,
                1,
                0,
                10,
                // CLEAR, 8 dwords.
                0x0008_0007,
                4,
                one,
                0,
                one,
                one,
                depth as u32,
                (depth >> 32) as u32,
                0,
            ]
        );
        assert_eq!(s.bytes().len(), 19 * 4);
        assert_eq!(&s.bytes()[..4], &[1, 8, 5, 0]);
    }

    #[test]
    fn layers_and_raw_words() {
        let s = Stream::new()
            .create_surface(1, 2, 3, 4, (5, 6))
            .raw(&[header(ccmd::NOP, 0, 0)]);
        assert_eq!(s.words()[5], 5 | (6 << 16));
        assert_eq!(s.words()[6], 0);
        assert_eq!(
            Stream::new().set_framebuffer_state(7, &[]).words(),
            [header(5, 0, 2), 0, 7]
        );
    }
}
