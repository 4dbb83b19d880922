//! A real QEMU with a real Linux guest, driving a vhost-user-gpu backend (ours, or QEMU's
//! reference backend as a control).
//!
//! - [`guest`]: the static guest program, kernel modules and initramfs.
//! - [`cpio`]: newc archive writer.
//! - [`qmp`]: QMP client (`screendump`, `quit`).
//! - [`ppm`]: P6 reader for screendumps.
//! - [`pattern`]: the pattern the guest draws.
//! - [`lines`]: serial console / log capture with bounded waits.
//! - [`boot`]: one boot of QEMU + guest against a backend, checked end to end.
//!
//! Prerequisites come from `scripts/setup-qemu-tests.sh`; `VGPU_SKIP_QEMU_TESTS=1` skips.

pub mod boot;
pub mod cpio;
pub mod guest;
pub mod lines;
pub mod pattern;
pub mod ppm;
pub mod qmp;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Set to `1` to skip the QEMU tests (for hosts without QEMU); CI never sets it.
pub const SKIP_ENV: &str = "VGPU_SKIP_QEMU_TESTS";
/// Overrides the cache directory (default `<workspace>/target/qemu-test-cache`).
pub const CACHE_ENV: &str = "VGPU_QEMU_CACHE";
/// Overrides the QEMU binary (default `qemu-system-x86_64` from PATH).
pub const QEMU_ENV: &str = "VGPU_QEMU";
/// The script that installs everything these tests need.
pub const SETUP_SCRIPT: &str = "scripts/setup-qemu-tests.sh";
/// QEMU's own vhost-user-gpu backend (Debian package qemu-system-gui).
pub const REFERENCE_BACKEND: &str = "/usr/lib/qemu/vhost-user-gpu";
/// The oldest QEMU major version the tests accept.
pub const MIN_QEMU_MAJOR: u32 = 10;

/// Whether `VGPU_SKIP_QEMU_TESTS=1` is set.
pub fn skip_requested() -> bool {
    std::env::var(SKIP_ENV).is_ok_and(|v| v == "1")
}

/// The cache directory: `$VGPU_QEMU_CACHE`, else `<workspace>/target/qemu-test-cache`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os(CACHE_ENV) {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/qemu-test-cache"),
    }
}

/// The guest kernel unpacked by the setup script.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// Release, e.g. "6.12.95+deb12-amd64".
    pub release: String,
    /// The bzImage: `<cache>/kernel/vmlinuz`, a link to `root/boot/vmlinuz-<release>`.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>/kernel`.
    pub modules_dir: PathBuf,
    /// Debian package and version it came from.
    pub package: String,
}

fn missing(what: &str) -> String {
    format!(
        "{what}; run `{SETUP_SCRIPT}` as root first (or set {SKIP_ENV}=1 to skip the QEMU tests)"
    )
}

/// Finds the kernel in the cache.
pub fn find_kernel(cache: &Path) -> Result<Kernel, String> {
    let dir = cache.join("kernel");
    let release = std::fs::read_to_string(dir.join("VERSION"))
        .map_err(|e| missing(&format!("no guest kernel in {} ({e})", dir.display())))?
        .trim()
        .to_string();
    let root = dir.join("root");
    // The stable name the setup script links to boot/vmlinuz-<release>.
    let vmlinuz = dir.join("vmlinuz");
    let modules_dir = root.join(format!("lib/modules/{release}/kernel"));
    if !vmlinuz.is_file() || !modules_dir.is_dir() {
        return Err(missing(&format!(
            "the guest kernel in {} is incomplete (no {} or {})",
            dir.display(),
            vmlinuz.display(),
            modules_dir.display()
        )));
    }
    let package = std::fs::read_to_string(dir.join("PACKAGE"))
        .unwrap_or_default()
        .trim()
        .to_string();
    Ok(Kernel {
        release,
        vmlinuz,
        modules_dir,
        package,
    })
}

/// QEMU: `$VGPU_QEMU` or `qemu-system-x86_64` from PATH, version checked (>= 10).
pub fn find_qemu() -> Result<(PathBuf, String), String> {
    let bin = match std::env::var_os(QEMU_ENV) {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("qemu-system-x86_64"))
                    .find(|p| p.is_file())
            })
            .ok_or_else(|| missing("qemu-system-x86_64 is not installed"))?,
    };
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .map_err(|e| missing(&format!("cannot run {}: {e}", bin.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or_default().to_string();
    let major = first
        .split("version ")
        .nth(1)
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok())
        .ok_or_else(|| {
            missing(&format!(
                "cannot read the version of {}: {first:?}",
                bin.display()
            ))
        })?;
    if major < MIN_QEMU_MAJOR {
        return Err(missing(&format!(
            "{} is QEMU {major} ({first}); these tests need QEMU {MIN_QEMU_MAJOR} or newer (bookworm-backports)",
            bin.display()
        )));
    }
    Ok((bin, first))
}

/// Everything a boot needs, found once.
#[derive(Clone, Debug)]
pub struct QemuEnv {
    /// qemu-system-x86_64.
    pub qemu: PathBuf,
    /// Its `--version` first line.
    pub qemu_version: String,
    /// The guest kernel.
    pub kernel: Kernel,
    /// The initramfs built for this run.
    pub initramfs: PathBuf,
    /// Modules in it, in load order.
    pub modules: Vec<String>,
    /// The cache directory.
    pub cache: PathBuf,
}

/// Finds QEMU and the kernel and builds the initramfs; `Err` names what is missing and the
/// script that installs it.
pub fn prepare() -> Result<QemuEnv, String> {
    let cache = cache_dir();
    let (qemu, qemu_version) = find_qemu()?;
    let kernel = find_kernel(&cache)?;
    if !Path::new(REFERENCE_BACKEND).is_file() {
        return Err(missing(&format!(
            "{REFERENCE_BACKEND} (package qemu-system-gui) is not installed"
        )));
    }
    let initramfs = guest::build_initramfs(&kernel, &cache)?;
    Ok(QemuEnv {
        qemu,
        qemu_version,
        kernel,
        initramfs: initramfs.path,
        modules: initramfs.modules,
        cache,
    })
}
