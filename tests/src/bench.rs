//! What the benchmarks under `benches/` share: where the binaries are, and how figures are
//! summarised and printed.

use std::path::{Path, PathBuf};

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Our binary: `explicit`, else `VGPU_SANDBOX_BIN`, else the release build; an error
/// saying how to build it when it is not there.
pub fn our_binary(explicit: Option<&Path>) -> Result<PathBuf, String> {
    let bin = match (explicit, std::env::var_os("VGPU_SANDBOX_BIN")) {
        (Some(b), _) => b.to_path_buf(),
        (None, Some(p)) => PathBuf::from(p),
        (None, None) => workspace_root().join("target/release/vgpu-sandbox"),
    };
    if !bin.is_file() {
        return Err(format!(
            "{} not found: run `cargo build --release -p vgpu-sandbox` (or set VGPU_SANDBOX_BIN)",
            bin.display()
        ));
    }
    Ok(bin)
}

/// QEMU's reference backend: `VGPU_REFERENCE_BACKEND`, else a copy cached by
/// scripts/fetch-reference-backend.sh, else the system's /usr/lib/qemu/vhost-user-gpu.
/// None if there is none (with a line on stderr when the variable names no file).
pub fn reference_binary() -> Option<PathBuf> {
    let cache = workspace_root().join("target/reference-backend");
    let bin = match std::env::var_os("VGPU_REFERENCE_BACKEND") {
        Some(p) => PathBuf::from(p),
        None => ["bookworm-backports", "bookworm"]
            .iter()
            .map(|s| cache.join(s).join("root/usr/lib/qemu/vhost-user-gpu"))
            .chain([PathBuf::from("/usr/lib/qemu/vhost-user-gpu")])
            .find(|p| p.is_file())?,
    };
    if !bin.is_file() {
        eprintln!(
            "VGPU_REFERENCE_BACKEND={} is not a file; running without the baseline",
            bin.display()
        );
        return None;
    }
    Some(bin)
}

/// The value at fraction `p` (0 to 1) of `sorted`; NaN when it is empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A figure with as many decimals as its size deserves; `-` when there is none.
pub fn fmt(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x >= 1000.0 {
        format!("{x:.0}")
    } else if x >= 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// A bench's command line: `--key value` or `--key=value`, option by option.
pub struct Args<I> {
    rest: I,
}

impl<I: Iterator<Item = String>> Args<I> {
    /// The arguments after the program name.
    pub fn new(args: impl IntoIterator<IntoIter = I>) -> Self {
        Args {
            rest: args.into_iter(),
        }
    }

    /// The next option's key (before any `=`) and its value, read on demand.
    pub fn next_option(&mut self) -> Option<(String, Opt<'_, I>)> {
        let a = self.rest.next()?;
        let (key, inline) = match a.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (a, None),
        };
        Some((
            key.clone(),
            Opt {
                key,
                inline,
                rest: &mut self.rest,
            },
        ))
    }
}

/// One option of [`Args`]; its value is the text after `=` or the next argument.
pub struct Opt<'a, I> {
    key: String,
    inline: Option<String>,
    rest: &'a mut I,
}

impl<I: Iterator<Item = String>> Opt<'_, I> {
    /// The option's value.
    pub fn value(&mut self) -> Result<String, String> {
        self.inline
            .take()
            .or_else(|| self.rest.next())
            .ok_or_else(|| format!("{} needs a value", self.key))
    }

    /// The option's value as a number.
    pub fn num(&mut self) -> Result<u64, String> {
        let s = self.value()?;
        s.parse::<u64>()
            .map_err(|_| format!("{}: not a number: {s}", self.key))
    }

    /// `--backend ours|reference|both`.
    pub fn backends(&mut self) -> Result<String, String> {
        let v = self.value()?;
        if !["ours", "reference", "both"].contains(&v.as_str()) {
            return Err(format!(
                "--backend must be ours, reference or both, not {v}"
            ));
        }
        Ok(v)
    }

    /// `--size WxH`, each side within `min..=max`.
    pub fn size(&mut self, min: u32, max: u32) -> Result<(u32, u32), String> {
        let v = self.value()?;
        let (w, h) = v
            .split_once('x')
            .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
            .ok_or_else(|| format!("--size wants WxH, not {v}"))?;
        if !(min..=max).contains(&w) || !(min..=max).contains(&h) {
            return Err(format!("--size {v}: each side must be {min}..{max}"));
        }
        Ok((w, h))
    }
}

/// `ours / other`, turned so that >1 means ours is better.
pub fn turned_ratio(ours: f64, other: f64, higher_is_better: bool) -> f64 {
    if higher_is_better {
        ours / other
    } else {
        other / ours
    }
}

/// A ratio as `1.23x`; `-` when there is none.
pub fn fmt_ratio(r: f64) -> String {
    if r.is_finite() && r > 0.0 {
        format!("{r:.2}x")
    } else {
        "-".into()
    }
}

/// A Markdown table row: the first cell left-aligned, the others right-aligned, each
/// padded to its width in `widths`.
pub fn table_row(cells: &[&str], widths: &[usize]) -> String {
    let mut s = String::from("|");
    for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
        if i == 0 {
            s.push_str(&format!(" {c:<w$} |"));
        } else {
            s.push_str(&format!(" {c:>w$} |"));
        }
    }
    s
}

/// The rule under a [`table_row`] header with the same `widths`.
pub fn table_rule(widths: &[usize]) -> String {
    let mut s = String::from("|");
    for w in widths {
        s.push_str(&"-".repeat(w + 2));
        s.push('|');
    }
    s
}

/// The guest's update of resource 1: TRANSFER_TO_HOST_2D of `rect` from backing byte
/// `offset`, then RESOURCE_FLUSH of it, queued back to back (as the Linux driver does),
/// both answers awaited and required to be OK_NODATA.
pub fn transfer_and_flush(
    gpu: &mut crate::gpu::GpuDriver,
    rect: crate::gpu::Rect,
    offset: u64,
) -> Result<(), String> {
    use crate::gpu::{resp, Command};
    let tr = gpu
        .submit(
            &Command::TransferToHost2d {
                resource_id: 1,
                rect,
                offset,
            },
            None,
        )
        .map_err(|e| e.to_string())?;
    let fl = gpu
        .submit(
            &Command::ResourceFlush {
                resource_id: 1,
                rect,
            },
            None,
        )
        .map_err(|e| e.to_string())?;
    for (what, pending) in [("TRANSFER_TO_HOST_2D", tr), ("RESOURCE_FLUSH", fl)] {
        let r = gpu.wait(pending).map_err(|e| format!("{what}: {e}"))?;
        if r.kind != resp::OK_NODATA {
            return Err(format!("{what}: expected OK_NODATA, got {}", r.kind_name()));
        }
    }
    Ok(())
}

/// Damage sample `i` of a `w` x `h` frame with `stride` bytes per row: a `side` x `side`
/// rectangle at a new cell each time (row by row), the backing offset of its first pixel
/// (its natural offset) and the row of pixels the guest draws into each of its lines.
pub fn damage_sample(
    i: usize,
    (w, h): (u32, u32),
    stride: u64,
    side: u32,
) -> (crate::gpu::Rect, u64, Vec<u8>) {
    let (cols, rows) = ((w / side).max(1), (h / side).max(1));
    let cell = i as u32 % (cols * rows);
    let rect = crate::gpu::Rect::new((cell % cols) * side, (cell / cols) * side, side, side);
    let offset = u64::from(rect.y) * stride + u64::from(rect.x) * 4;
    let shade = (i as u8).wrapping_mul(37);
    let row = (0..side)
        .flat_map(|x| [shade, (x as u8).wrapping_add(shade), !shade, 0xff])
        .collect();
    (rect, offset, row)
}
