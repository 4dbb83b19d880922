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
