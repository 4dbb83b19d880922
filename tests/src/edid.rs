//! EDID 1.4 base blocks: a small generator (for the VMM's GET_EDID answers) and a checker
//! (for the EDID the device returns to the guest).

/// The fixed 8-byte EDID header.
pub const HEADER: [u8; 8] = [0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00];

/// Generates a 128-byte EDID whose preferred (first detailed) timing is `width`x`height`.
pub fn generate(width: u32, height: u32) -> [u8; 128] {
    let mut e = [0u8; 128];
    e[..8].copy_from_slice(&HEADER);
    // Manufacturer "TST" in 5-bit letters, big-endian.
    let id: u16 = (20 << 10) | (19 << 5) | 20;
    e[8..10].copy_from_slice(&id.to_be_bytes());
    e[16] = 1; // week
    e[17] = 34; // 2024
    e[18] = 1; // version 1
    e[19] = 4; // revision 4
    e[20] = 0x80; // digital input
    e[23] = 120; // gamma 2.2
    e[24] = 0x0a; // RGB, preferred timing is native
                  // Unused standard timings are 0x01 0x01.
    e[38..54].fill(1);
    let (w, h) = (width.min(4095), height.min(4095));
    let (hblank, vblank) = (160u32, 30u32);
    // 60 Hz, in 10 kHz units.
    let clock =
        ((w + hblank) as u64 * (h + vblank) as u64 * 60 / 10_000).min(u16::MAX as u64) as u16;
    let d = &mut e[54..72];
    d[0..2].copy_from_slice(&clock.to_le_bytes());
    d[2] = (w & 0xff) as u8;
    d[3] = (hblank & 0xff) as u8;
    d[4] = (((w >> 8) & 0xf) << 4 | ((hblank >> 8) & 0xf)) as u8;
    d[5] = (h & 0xff) as u8;
    d[6] = (vblank & 0xff) as u8;
    d[7] = (((h >> 8) & 0xf) << 4 | ((vblank >> 8) & 0xf)) as u8;
    d[8] = 48; // hsync offset
    d[9] = 32; // hsync width
    d[10] = (3 << 4) | 5; // vsync offset 3, width 5
    d[17] = 0x18; // digital separate sync
                  // Descriptors 2..4: dummy (tag 0x10).
    for k in 1..4 {
        e[54 + 18 * k + 3] = 0x10;
    }
    e[127] = checksum_byte(&e[..127]);
    e
}

fn checksum_byte(bytes: &[u8]) -> u8 {
    let sum = bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    0u8.wrapping_sub(sum)
}

/// What a valid EDID base block says about its preferred mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdidInfo {
    /// Preferred mode width from the first detailed timing descriptor (0 if none).
    pub preferred_width: u32,
    /// Preferred mode height (0 if none).
    pub preferred_height: u32,
    /// Number of extension blocks announced.
    pub extensions: u8,
}

/// Checks the header and every 128-byte block's checksum; parses the preferred mode.
pub fn check(edid: &[u8]) -> Result<EdidInfo, String> {
    if edid.len() < 128 || !edid.chunks_exact(128).remainder().is_empty() {
        return Err(format!(
            "EDID is {} bytes, not a multiple of 128",
            edid.len()
        ));
    }
    if edid[..8] != HEADER {
        return Err(format!("EDID header is {:02x?}", &edid[..8]));
    }
    for (i, block) in edid.chunks(128).enumerate() {
        let sum = block.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        if sum != 0 {
            return Err(format!("EDID block {i} checksum is off by {sum}"));
        }
    }
    let extensions = edid[126];
    if 128 * (1 + usize::from(extensions)) != edid.len() {
        return Err(format!(
            "EDID announces {extensions} extension blocks but is {} bytes",
            edid.len()
        ));
    }
    let d = &edid[54..72];
    let (w, h) = if d[0] != 0 || d[1] != 0 {
        (
            u32::from(d[2]) | (u32::from(d[4] >> 4) << 8),
            u32::from(d[5]) | (u32::from(d[7] >> 4) << 8),
        )
    } else {
        (0, 0)
    };
    Ok(EdidInfo {
        preferred_width: w,
        preferred_height: h,
        extensions,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn generated_edid_checks() {
        let e = super::generate(1280, 800);
        let info = super::check(&e).expect("valid");
        assert_eq!((info.preferred_width, info.preferred_height), (1280, 800));
    }
}
