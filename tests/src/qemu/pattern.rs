//! The test pattern the guest program draws (tests/guest/vgpu-guest.c computes the same).
//!
//! For frame `k`: r = (3x + y + 37k) & 255, g = (5y + (x >> 2) + 91k) & 255,
//! b = ((x ^ y) + 53k) & 255. Every pixel differs between any two frames 1..=6, so a
//! stale frame can never pass for a new one.

/// The RGB value of pixel (x, y) of frame `k`.
pub fn pixel(x: u32, y: u32, k: u32) -> [u8; 3] {
    [
        (3u32
            .wrapping_mul(x)
            .wrapping_add(y)
            .wrapping_add(37u32.wrapping_mul(k))) as u8,
        (5u32
            .wrapping_mul(y)
            .wrapping_add(x >> 2)
            .wrapping_add(91u32.wrapping_mul(k))) as u8,
        ((x ^ y).wrapping_add(53u32.wrapping_mul(k))) as u8,
    ]
}

/// Frame `k` at `width` x `height`, packed RGB rows (the layout of a P6 PPM).
pub fn frame_rgb(width: u32, height: u32, k: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..height {
        for x in 0..width {
            out.extend_from_slice(&pixel(x, y, k));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_differ_everywhere() {
        for k in 1..=3 {
            for j in (k + 1)..=3 {
                for (x, y) in [(0, 0), (1023, 767), (77, 500), (1279, 799)] {
                    assert_ne!(pixel(x, y, k), pixel(x, y, j));
                }
            }
        }
    }
}
