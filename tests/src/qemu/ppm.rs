//! A binary PPM (P6, maxval 255) reader: what QMP `screendump` writes with `format: ppm`.

/// A decoded P6 image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ppm {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Packed RGB rows, `width * height * 3` bytes.
    pub rgb: Vec<u8>,
}

/// Parses a P6 image with maxval 255 (comments in the header allowed).
pub fn parse(data: &[u8]) -> Result<Ppm, String> {
    let mut pos = 0usize;
    let mut fields = Vec::with_capacity(4);
    while fields.len() < 4 {
        // Skip whitespace and comments.
        loop {
            match data.get(pos) {
                Some(b' ' | b'\t' | b'\n' | b'\r') => pos += 1,
                Some(b'#') => {
                    while !matches!(data.get(pos), None | Some(b'\n')) {
                        pos += 1;
                    }
                }
                Some(_) => break,
                None => return Err("PPM header ends early".into()),
            }
        }
        let start = pos;
        while matches!(data.get(pos), Some(c) if !c.is_ascii_whitespace() && *c != b'#') {
            pos += 1;
        }
        fields.push(String::from_utf8_lossy(&data[start..pos]).into_owned());
    }
    if fields[0] != "P6" {
        return Err(format!("not a P6 PPM (magic {:?})", fields[0]));
    }
    let num = |i: usize, what: &str| -> Result<u32, String> {
        fields[i]
            .parse::<u32>()
            .map_err(|_| format!("bad PPM {what} {:?}", fields[i]))
    };
    let (width, height, maxval) = (num(1, "width")?, num(2, "height")?, num(3, "maxval")?);
    if maxval != 255 {
        return Err(format!("PPM maxval {maxval}, want 255"));
    }
    // Exactly one whitespace byte separates the header from the raster.
    if !matches!(data.get(pos), Some(c) if c.is_ascii_whitespace()) {
        return Err("PPM header not followed by whitespace".into());
    }
    pos += 1;
    let len = width as usize * height as usize * 3;
    let rgb = data
        .get(pos..pos + len)
        .ok_or_else(|| {
            format!(
                "PPM raster is {} bytes, want {len} for {width}x{height}",
                data.len() - pos
            )
        })?
        .to_vec();
    Ok(Ppm { width, height, rgb })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_comment() {
        let mut d = b"P6\n# made by a test\n2 1\n255\n".to_vec();
        d.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        let p = parse(&d).unwrap();
        assert_eq!((p.width, p.height, p.rgb), (2, 1, vec![1, 2, 3, 4, 5, 6]));
    }

    #[test]
    fn rejects_short_raster_and_other_formats() {
        assert!(parse(b"P6 2 1 255\n\x01\x02").is_err());
        assert!(parse(b"P5 1 1 255\n\x00").is_err());
        assert!(parse(b"P6 1 1 65535\n\x00\x00\x00\x00\x00\x00").is_err());
    }
}
