//! EDID 1.4 base blocks for the virtual scanouts (answers VIRTIO_GPU_CMD_GET_EDID).
//!
//! The block advertises one preferred detailed timing of the scanout's size at 60 Hz,
//! with CVT reduced-blanking (v1) style blanking, so a guest picks exactly that mode.

/// Size of an EDID base block.
pub const EDID_BLOCK_SIZE: usize = 128;

/// The largest width or height a detailed timing descriptor can carry (12-bit fields).
pub const MAX_DTD_DIMENSION: u32 = 4095;

/// Manufacturer id, three letters A..Z.
const MANUFACTURER: [u8; 3] = *b"VGS";
/// Product code; one product.
const PRODUCT_CODE: u16 = 0x0001;
/// Year of manufacture minus 1990 (2024). EDID 1.4 requires 2006 or later.
const YEAR_SINCE_1990: u8 = 34;
const MONITOR_NAME: &[u8] = b"vgpu-sandbox";

const REFRESH_HZ: u64 = 60;

// CVT reduced blanking v1: fixed horizontal blanking, 460 us minimum vertical blanking.
const RB_H_BLANK: u32 = 160;
const RB_H_FRONT_PORCH: u32 = 48;
const RB_H_SYNC: u32 = 32;
const RB_V_FRONT_PORCH: u32 = 3;
const RB_MIN_V_BACK_PORCH: u32 = 6;
const RB_MIN_V_BLANK_NS: u64 = 460_000;

/// Pixel pitch assumed for the physical size fields: 96 DPI, in micrometres.
const PIXEL_PITCH_UM: u64 = 265; // 25.4 mm / 96

/// A detailed timing, before encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Timing {
    h_active: u32,
    v_active: u32,
    h_blank: u32,
    v_blank: u32,
    h_sync_offset: u32,
    h_sync_width: u32,
    v_sync_offset: u32,
    v_sync_width: u32,
    /// Pixel clock in units of 10 kHz, 1..=65535.
    clock_10khz: u32,
}

impl Timing {
    fn h_total(&self) -> u64 {
        u64::from(self.h_active) + u64::from(self.h_blank)
    }

    fn v_total(&self) -> u64 {
        u64::from(self.v_active) + u64::from(self.v_blank)
    }

    fn clock_hz(&self) -> u64 {
        u64::from(self.clock_10khz) * 10_000
    }

    /// Vertical refresh in millihertz.
    fn refresh_mhz(&self) -> u64 {
        self.clock_hz() * 1000 / (self.h_total() * self.v_total()).max(1)
    }

    /// Horizontal frequency in Hz.
    fn h_freq_hz(&self) -> u64 {
        self.clock_hz() / self.h_total().max(1)
    }
}

/// The size actually advertised for a requested scanout size: zero dimensions become 1,
/// and a size beyond [`MAX_DTD_DIMENSION`] is scaled down, keeping its aspect ratio, to
/// the largest that fits (8192x4320 becomes 4095x2159). Guests then pick that smaller
/// mode; the display info response still reports the real size.
pub fn advertised_size(width: u32, height: u32) -> (u32, u32) {
    let (w, h) = (u64::from(width.max(1)), u64::from(height.max(1)));
    let largest = w.max(h);
    let max = u64::from(MAX_DTD_DIMENSION);
    if largest <= max {
        return (w as u32, h as u32);
    }
    // Both results are <= max, so the casts are lossless.
    let scale = |v: u64| (v * max / largest).max(1) as u32;
    (scale(w), scale(h))
}

/// Vertical sync width CVT assigns to an aspect ratio.
fn cvt_v_sync_width(w: u32, h: u32) -> u32 {
    let (w, h) = (u64::from(w), u64::from(h));
    if w * 3 == h * 4 {
        4
    } else if w * 9 == h * 16 {
        5
    } else if w * 10 == h * 16 {
        6
    } else if w * 4 == h * 5 || w * 9 == h * 15 {
        7
    } else {
        10
    }
}

fn timing_for(width: u32, height: u32) -> Timing {
    let (w, h) = advertised_size(width, height);
    let v_sync_width = cvt_v_sync_width(w, h);
    let frame_ns = 1_000_000_000 / REFRESH_HZ;
    // h >= 1 and frame_ns > the minimum blanking, so this is never 0.
    let h_period_est_ns = ((frame_ns - RB_MIN_V_BLANK_NS) / u64::from(h)).max(1);
    let vbi_lines = RB_MIN_V_BLANK_NS / h_period_est_ns + 1;
    let min_vbi = u64::from(RB_V_FRONT_PORCH + v_sync_width + RB_MIN_V_BACK_PORCH);
    // At most a few hundred lines; the 12-bit field holds it.
    let v_blank = vbi_lines.max(min_vbi).min(4095) as u32;
    let total = (u64::from(w) + u64::from(RB_H_BLANK)) * (u64::from(h) + u64::from(v_blank));
    // Rounded to the DTD's 10 kHz unit rather than CVT's 0.25 MHz step so that tiny
    // modes keep a non-zero clock; huge modes are capped at the 16-bit field's maximum,
    // which lowers their refresh below 60 Hz.
    let clock_10khz = ((total * REFRESH_HZ + 5_000) / 10_000).clamp(1, 65_535) as u32;
    Timing {
        h_active: w,
        v_active: h,
        h_blank: RB_H_BLANK,
        v_blank,
        h_sync_offset: RB_H_FRONT_PORCH,
        h_sync_width: RB_H_SYNC,
        v_sync_offset: RB_V_FRONT_PORCH,
        v_sync_width,
        clock_10khz,
    }
}

/// Low 8 bits of a value, for the packed EDID fields.
fn lo8(v: u32) -> u8 {
    (v & 0xff) as u8
}

/// Bits 8..12 of a value.
fn hi4(v: u32) -> u8 {
    ((v >> 8) & 0x0f) as u8
}

fn physical_mm(px: u32) -> u32 {
    // px <= 4095, so this is at most ~1085 mm, well inside the 12-bit field.
    (u64::from(px) * PIXEL_PITCH_UM / 1000).min(4095) as u32
}

fn encode_dtd(t: &Timing) -> [u8; 18] {
    let mut d = [0u8; 18];
    d[0..2].copy_from_slice(&(t.clock_10khz as u16).to_le_bytes());
    d[2] = lo8(t.h_active);
    d[3] = lo8(t.h_blank);
    d[4] = (hi4(t.h_active) << 4) | hi4(t.h_blank);
    d[5] = lo8(t.v_active);
    d[6] = lo8(t.v_blank);
    d[7] = (hi4(t.v_active) << 4) | hi4(t.v_blank);
    d[8] = lo8(t.h_sync_offset);
    d[9] = lo8(t.h_sync_width);
    d[10] = ((t.v_sync_offset as u8 & 0x0f) << 4) | (t.v_sync_width as u8 & 0x0f);
    d[11] = (((t.h_sync_offset >> 8) as u8 & 0x03) << 6)
        | (((t.h_sync_width >> 8) as u8 & 0x03) << 4)
        | (((t.v_sync_offset >> 4) as u8 & 0x03) << 2)
        | ((t.v_sync_width >> 4) as u8 & 0x03);
    let (w_mm, h_mm) = (physical_mm(t.h_active), physical_mm(t.v_active));
    d[12] = lo8(w_mm);
    d[13] = lo8(h_mm);
    d[14] = (hi4(w_mm) << 4) | hi4(h_mm);
    // Non-interlaced, no stereo, digital separate sync; CVT-RB uses +hsync, -vsync.
    d[17] = 0b0001_1010;
    d
}

/// A display descriptor carrying up to 13 bytes of text: newline-terminated and
/// space-padded when shorter, as EDID asks.
fn text_descriptor(tag: u8, text: &[u8]) -> [u8; 18] {
    let mut d = [0u8; 18];
    d[3] = tag;
    let n = text.len().min(13);
    d[5..5 + n].copy_from_slice(&text[..n]);
    if n < 13 {
        d[5 + n] = 0x0a;
        for b in &mut d[6 + n..] {
            *b = 0x20;
        }
    }
    d
}

fn range_limits_descriptor(t: &Timing) -> [u8; 18] {
    let clamp8 = |v: u64| v.clamp(1, 255) as u8;
    let refresh = t.refresh_mhz();
    let h_freq = t.h_freq_hz();
    let mut d = [0u8; 18];
    d[3] = 0xfd;
    // Ranges wide enough for common modes and always containing the preferred timing.
    d[5] = clamp8((refresh / 1000).min(24));
    d[6] = clamp8(refresh.div_ceil(1000).max(75));
    d[7] = clamp8((h_freq / 1000).min(15));
    d[8] = clamp8(h_freq.div_ceil(1000).max(135));
    d[9] = clamp8(t.clock_hz().div_ceil(10_000_000).max(60));
    // Video timing support: range limits only, no secondary timing formula.
    d[10] = 0x01;
    d[11] = 0x0a;
    for b in &mut d[12..] {
        *b = 0x20;
    }
    d
}

/// sRGB primaries and D65 white point as 10-bit CIE xy fractions, in EDID order:
/// red x, red y, green x, green y, blue x, blue y, white x, white y.
const CHROMATICITY: [u16; 8] = [655, 338, 307, 614, 154, 61, 320, 337];

fn write_chromaticity(block: &mut [u8; EDID_BLOCK_SIZE]) {
    let c = CHROMATICITY;
    let lo2 = |v: u16| (v & 0x03) as u8;
    block[25] = (lo2(c[0]) << 6) | (lo2(c[1]) << 4) | (lo2(c[2]) << 2) | lo2(c[3]);
    block[26] = (lo2(c[4]) << 6) | (lo2(c[5]) << 4) | (lo2(c[6]) << 2) | lo2(c[7]);
    for (i, v) in c.iter().enumerate() {
        block[27 + i] = (v >> 2) as u8;
    }
}

/// An EDID 1.4 base block for a `width` x `height` scanout at 60 Hz.
///
/// Sizes beyond what a detailed timing can carry are scaled down (see
/// [`advertised_size`]); any input, including 0 and `u32::MAX`, gives a valid block.
/// `serial` goes into the serial number field and a serial string descriptor, so that
/// guests can tell scanouts apart.
pub fn edid_for(width: u32, height: u32, serial: u32) -> [u8; EDID_BLOCK_SIZE] {
    let t = timing_for(width, height);
    let mut e = [0u8; EDID_BLOCK_SIZE];
    e[0..8].copy_from_slice(&[0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]);
    // Three 5-bit letters, 'A' = 1, big-endian.
    let [a, b, c] = MANUFACTURER.map(|l| u16::from(l - b'A' + 1));
    e[8..10].copy_from_slice(&((a << 10) | (b << 5) | c).to_be_bytes());
    e[10..12].copy_from_slice(&PRODUCT_CODE.to_le_bytes());
    e[12..16].copy_from_slice(&serial.to_le_bytes());
    e[16] = 0; // week unspecified
    e[17] = YEAR_SINCE_1990;
    e[18] = 1;
    e[19] = 4;
    // Digital input, 8 bits per colour, DisplayPort.
    e[20] = 0b1010_0101;
    let cm = |px: u32| ((physical_mm(px) + 5) / 10).clamp(1, 255) as u8;
    e[21] = cm(t.h_active);
    e[22] = cm(t.v_active);
    e[23] = 120; // gamma 2.2, stored as (gamma * 100) - 100
                 // RGB 4:4:4, sRGB is the default colour space, the preferred timing is native.
    e[24] = 0b0000_0110;
    write_chromaticity(&mut e);
    // No established timings (35..38 stay 0); all eight standard timings unused.
    for slot in e[38..54].chunks_exact_mut(2) {
        slot.copy_from_slice(&[0x01, 0x01]);
    }
    e[54..72].copy_from_slice(&encode_dtd(&t));
    e[72..90].copy_from_slice(&text_descriptor(0xfc, MONITOR_NAME));
    e[90..108].copy_from_slice(&range_limits_descriptor(&t));
    e[108..126].copy_from_slice(&text_descriptor(0xff, serial.to_string().as_bytes()));
    e[126] = 0; // no extension blocks
    let sum = e[..127].iter().fold(0u8, |s, &b| s.wrapping_add(b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the preferred DTD back: (h_active, v_active, h_blank, v_blank, clock).
    fn parse_dtd(e: &[u8; EDID_BLOCK_SIZE]) -> (u32, u32, u32, u32, u32) {
        let d = &e[54..72];
        let hi = |b: u8, shift: u32| u32::from((b >> shift) & 0x0f) << 8;
        (
            u32::from(d[2]) | hi(d[4], 4),
            u32::from(d[5]) | hi(d[7], 4),
            u32::from(d[3]) | hi(d[4], 0),
            u32::from(d[6]) | hi(d[7], 0),
            u32::from(u16::from_le_bytes([d[0], d[1]])),
        )
    }

    fn checksum_ok(e: &[u8; EDID_BLOCK_SIZE]) -> bool {
        e.iter().fold(0u8, |s, &b| s.wrapping_add(b)) == 0
    }

    #[test]
    fn header_version_and_checksum() {
        let e = edid_for(1024, 768, 7);
        assert_eq!(&e[0..8], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
        assert_eq!((e[18], e[19]), (1, 4));
        assert!(e[20] & 0x80 != 0, "digital input");
        assert_eq!(u32::from_le_bytes([e[12], e[13], e[14], e[15]]), 7);
        assert_eq!(e[126], 0);
        assert!(checksum_ok(&e));
    }

    #[test]
    fn manufacturer_id_decodes() {
        let e = edid_for(640, 480, 0);
        let v = u16::from_be_bytes([e[8], e[9]]);
        assert_eq!(v & 0x8000, 0);
        let letter = |shift: u16| (((v >> shift) & 0x1f) as u8 + b'A' - 1) as char;
        assert_eq!(
            [letter(10), letter(5), letter(0)]
                .iter()
                .collect::<String>(),
            "VGS"
        );
    }

    #[test]
    fn dtd_roundtrips_size() {
        for (w, h) in [
            (640, 480),
            (1024, 768),
            (1280, 800),
            (1920, 1080),
            (4095, 4095),
            (1, 1),
        ] {
            let e = edid_for(w, h, 1);
            let (hw, vh, _, _, clock) = parse_dtd(&e);
            assert_eq!((hw, vh), (w, h));
            assert!(clock > 0);
            assert!(checksum_ok(&e));
        }
    }

    #[test]
    fn cvt_rb_1080p_blanking() {
        // VESA CVT-RB 1920x1080@60: 2080 x 1111 total, about 138.5 MHz.
        let (_, _, hb, vb, clock) = parse_dtd(&edid_for(1920, 1080, 0));
        assert_eq!((1920 + hb, 1080 + vb), (2080, 1111));
        assert!((13_850..=13_870).contains(&clock), "{clock}");
    }

    #[test]
    fn refresh_is_60hz_for_common_modes() {
        for (w, h) in [
            (640, 480),
            (1280, 720),
            (1920, 1080),
            (2560, 1440),
            (3840, 2160),
        ] {
            let t = timing_for(w, h);
            let r = t.refresh_mhz();
            assert!((59_900..=60_100).contains(&r), "{w}x{h}: {r} mHz");
        }
    }

    #[test]
    fn oversized_scales_down_keeping_aspect() {
        assert_eq!(advertised_size(8192, 4320), (4095, 2159));
        assert_eq!(advertised_size(4320, 8192), (2159, 4095));
        assert_eq!(advertised_size(5000, 100), (4095, 81));
        assert_eq!(advertised_size(0, 0), (1, 1));
        assert_eq!(advertised_size(u32::MAX, 1), (4095, 1));
        let e = edid_for(8192, 4320, 0);
        let (w, h, _, _, _) = parse_dtd(&e);
        assert_eq!((w, h), (4095, 2159));
        assert!(checksum_ok(&e));
    }

    #[test]
    fn extreme_inputs_give_valid_blocks() {
        for (w, h) in [
            (0, 0),
            (u32::MAX, u32::MAX),
            (1, 4095),
            (4095, 1),
            (0, 9999),
        ] {
            let e = edid_for(w, h, u32::MAX);
            assert!(checksum_ok(&e));
            let (_, _, _, _, clock) = parse_dtd(&e);
            assert!(
                clock >= 1,
                "a zero clock would turn the DTD into a descriptor"
            );
            // Range limits are sane: min <= max for both rates.
            let r = &e[90..108];
            assert_eq!(r[3], 0xfd);
            assert!(r[5] <= r[6] && r[7] <= r[8] && r[9] > 0);
        }
    }

    #[test]
    fn range_limits_contain_preferred_timing() {
        for (w, h) in [(1, 1), (640, 480), (1920, 1080), (4095, 4095), (160, 4095)] {
            let t = timing_for(w, h);
            let e = edid_for(w, h, 0);
            let r = &e[90..108];
            let refresh = t.refresh_mhz();
            assert!(u64::from(r[5]) * 1000 <= refresh && refresh <= u64::from(r[6]) * 1000);
            let hf = t.h_freq_hz();
            assert!(
                u64::from(r[7]) * 1000 <= hf && hf <= u64::from(r[8]) * 1000,
                "{w}x{h}"
            );
            assert!(t.clock_hz() <= u64::from(r[9]) * 10_000_000);
        }
    }

    #[test]
    fn descriptors() {
        let e = edid_for(800, 600, 123);
        let name = &e[72..90];
        assert_eq!(&name[..5], &[0, 0, 0, 0xfc, 0]);
        assert_eq!(&name[5..18], b"vgpu-sandbox\n");
        let serial = &e[108..126];
        assert_eq!(serial[3], 0xff);
        assert_eq!(&serial[5..18], b"123\n         ");
        // The DTD comes first and is a timing, not a descriptor.
        assert_ne!(&e[54..56], &[0, 0]);
    }
}
