//! The guest side: the static guest program (tests/guest/vgpu-guest.c), the kernel
//! modules virtio_gpu needs (resolved from each module's `.modinfo` `depends=`, since
//! Debian's kernel package has no modules.dep), and the initramfs holding them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::cpio::Cpio;
use super::{Kernel, SETUP_SCRIPT};

/// Where the busybox-static package puts its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// The applets /init and the guest use, as /bin symlinks to busybox.
const APPLETS: &[&str] = &[
    "sh", "mount", "insmod", "dmesg", "grep", "cat", "echo", "poweroff", "sync", "ls", "mkdir",
];

/// 64-bit FNV-1a: a stable content hash for cache file names.
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(&[0xffu8]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Writes `data` to `path` unless a file with that content is already there (via a
/// temporary name and rename, so a concurrent reader never sees half a file).
fn write_cached(path: &Path, data: &[u8]) -> Result<(), String> {
    if fs::read(path).map(|d| d == data).unwrap_or(false) {
        return Ok(());
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, data).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("renaming to {}: {e}", path.display()))
}

/// Compiles the guest program with `gcc -static -O2` into `cache` (reused while the source
/// is unchanged); returns its path.
pub fn build_guest_program(cache: &Path) -> Result<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/vgpu-guest.c");
    let text = fs::read(&src).map_err(|e| format!("reading {}: {e}", src.display()))?;
    let flags = ["-static", "-O2", "-Wall", "-Wextra", "-Werror"];
    let key = fnv1a(&[&text, flags.join(" ").as_bytes()]);
    let out = cache.join(format!("vgpu-guest-{key:016x}"));
    if out.is_file() {
        return Ok(out);
    }
    fs::create_dir_all(cache).map_err(|e| format!("creating {}: {e}", cache.display()))?;
    let tmp = cache.join(format!("vgpu-guest.tmp{}", std::process::id()));
    let res = Command::new("gcc")
        .args(flags)
        .arg("-o")
        .arg(&tmp)
        .arg(&src)
        .output()
        .map_err(|e| format!("cannot run gcc: {e}; run {SETUP_SCRIPT} as root"))?;
    if !res.status.success() {
        let _ = fs::remove_file(&tmp);
        return Err(format!(
            "gcc -static failed ({}) for {}; run {SETUP_SCRIPT} as root (it installs gcc, \
             libc6-dev, linux-libc-dev and libdrm-dev):\n{}",
            res.status,
            src.display(),
            String::from_utf8_lossy(&res.stderr)
        ));
    }
    fs::rename(&tmp, &out).map_err(|e| format!("renaming to {}: {e}", out.display()))?;
    // Builds of older sources are of no further use.
    if let Ok(dir) = fs::read_dir(cache) {
        for e in dir.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("vgpu-guest-") && e.path() != out {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    Ok(out)
}

fn u16_at(d: &[u8], off: usize) -> Option<u64> {
    Some(u64::from(u16::from_le_bytes(
        d.get(off..off + 2)?.try_into().ok()?,
    )))
}
fn u32_at(d: &[u8], off: usize) -> Option<u64> {
    Some(u64::from(u32::from_le_bytes(
        d.get(off..off + 4)?.try_into().ok()?,
    )))
}
fn u64_at(d: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(d.get(off..off + 8)?.try_into().ok()?))
}

fn is_elf64_le(d: &[u8]) -> bool {
    d.len() >= 64 && &d[..4] == b"\x7fELF" && d[4] == 2 && d[5] == 1
}

/// The bytes of the ELF64 (little-endian) section called `name`.
pub fn elf_section<'a>(d: &'a [u8], name: &str) -> Option<&'a [u8]> {
    if !is_elf64_le(d) {
        return None;
    }
    let shoff = u64_at(d, 0x28)? as usize;
    let shentsize = u16_at(d, 0x3a)? as usize;
    let shnum = u16_at(d, 0x3c)? as usize;
    let shstrndx = u16_at(d, 0x3e)? as usize;
    let sh = |i: usize| shoff.checked_add(i.checked_mul(shentsize)?);
    let strtab = sh(shstrndx)?;
    let str_off = u64_at(d, strtab + 0x18)? as usize;
    for i in 0..shnum {
        let h = sh(i)?;
        let name_off = str_off.checked_add(u32_at(d, h)? as usize)?;
        let end = name_off + d.get(name_off..)?.iter().position(|b| *b == 0)?;
        if &d[name_off..end] == name.as_bytes() {
            let off = u64_at(d, h + 0x18)? as usize;
            let size = u64_at(d, h + 0x20)? as usize;
            return d.get(off..off.checked_add(size)?);
        }
    }
    None
}

/// Whether the ELF64 executable asks for a dynamic loader (has a PT_INTERP header).
pub fn elf_is_dynamic(d: &[u8]) -> Option<bool> {
    if !is_elf64_le(d) {
        return None;
    }
    let phoff = u64_at(d, 0x20)? as usize;
    let phentsize = u16_at(d, 0x36)? as usize;
    let phnum = u16_at(d, 0x38)? as usize;
    for i in 0..phnum {
        if u32_at(d, phoff + i * phentsize)? == 3 {
            return Some(true);
        }
    }
    Some(false)
}

/// The `depends=` module names from a module's `.modinfo` section.
pub fn module_depends(ko: &[u8]) -> Result<Vec<String>, String> {
    let info = elf_section(ko, ".modinfo").ok_or("no .modinfo section")?;
    Ok(info
        .split(|b| *b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect())
}

/// A kernel module ready for the initramfs (decompressed).
pub struct Module {
    /// Canonical name (underscores), e.g. "virtio_gpu".
    pub name: String,
    /// Where it came from in the unpacked kernel.
    pub source: PathBuf,
    /// The plain ELF object.
    pub data: Vec<u8>,
}

fn index_modules(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> std::io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        if e.file_type()?.is_dir() {
            index_modules(&p, out)?;
        } else if let Some(file) = p.file_name().and_then(|f| f.to_str()) {
            if let Some(stem) = file
                .strip_suffix(".ko.xz")
                .or_else(|| file.strip_suffix(".ko"))
            {
                out.insert(stem.replace('-', "_"), p.clone());
            }
        }
    }
    Ok(())
}

fn read_module(path: &Path) -> Result<Vec<u8>, String> {
    if path.extension().is_some_and(|e| e == "xz") {
        let out = Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run xz: {e}; run {SETUP_SCRIPT} (installs xz-utils)"))?;
        if !out.status.success() {
            return Err(format!(
                "xz -dc {} failed: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(out.stdout)
    } else {
        fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))
    }
}

/// `root` and every module it depends on, recursively, in load order (dependencies first).
pub fn resolve_modules(kernel: &Kernel, root: &str) -> Result<Vec<Module>, String> {
    let mut index = BTreeMap::new();
    index_modules(&kernel.modules_dir, &mut index)
        .map_err(|e| format!("listing {}: {e}", kernel.modules_dir.display()))?;
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    let mut visiting = BTreeSet::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        done: &mut BTreeSet<String>,
        visiting: &mut BTreeSet<String>,
        order: &mut Vec<Module>,
    ) -> Result<(), String> {
        if done.contains(name) {
            return Ok(());
        }
        if !visiting.insert(name.to_string()) {
            return Err(format!("module dependency cycle at {name}"));
        }
        let path = index
            .get(name)
            .ok_or_else(|| format!("module {name} not found in the unpacked kernel"))?;
        let data = read_module(path)?;
        let deps = module_depends(&data).map_err(|e| format!("{}: {e}", path.display()))?;
        for d in &deps {
            visit(d, index, done, visiting, order)?;
        }
        visiting.remove(name);
        done.insert(name.to_string());
        order.push(Module {
            name: name.to_string(),
            source: path.clone(),
            data,
        });
        Ok(())
    }
    visit(root, &index, &mut done, &mut visiting, &mut order)?;
    Ok(order)
}

/// The guest's /init. Every line it prints for the host starts with "VGPU: ".
pub const INIT_SCRIPT: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "VGPU: init started"
while read m; do
    insmod "/lib/modules/$m.ko" || echo "VGPU: error: insmod $m failed"
done < /etc/vgpu-modules
dmesg | grep -E 'virtio_gpu|virtio-pci|\[drm\]' | while read l; do echo "VGPU: dmesg: $l"; done
echo "VGPU: modules loaded"
/bin/vgpu-guest
echo "VGPU: error: vgpu-guest returned $?"
sync
poweroff -f
"#;

/// A built initramfs.
pub struct Initramfs {
    /// The archive (uncompressed newc cpio) in the cache directory.
    pub path: PathBuf,
    /// The modules in it, in load order.
    pub modules: Vec<String>,
}

/// Builds (or reuses, when the content is the same) the initramfs: busybox-static as
/// /bin/busybox with applet symlinks, /init, the guest program, virtio_gpu and its
/// dependencies (decompressed).
pub fn build_initramfs(kernel: &Kernel, cache: &Path) -> Result<Initramfs, String> {
    let busybox = fs::read(BUSYBOX).map_err(|e| {
        format!("reading {BUSYBOX}: {e}; run {SETUP_SCRIPT} as root (installs busybox-static)")
    })?;
    if elf_is_dynamic(&busybox) != Some(false) {
        return Err(format!(
            "{BUSYBOX} is not a static x86-64 executable; install busybox-static ({SETUP_SCRIPT})"
        ));
    }
    let program =
        fs::read(build_guest_program(cache)?).map_err(|e| format!("reading guest program: {e}"))?;
    let modules = resolve_modules(kernel, "virtio_gpu")?;

    let mut c = Cpio::new();
    for d in [
        "/bin",
        "/dev",
        "/proc",
        "/sys",
        "/etc",
        "/lib",
        "/lib/modules",
        "/tmp",
        "/root",
    ] {
        c.dir(d);
    }
    c.char_dev("/dev/console", 0o600, 5, 1);
    c.file("/bin/busybox", 0o755, &busybox);
    for a in APPLETS {
        c.symlink(&format!("/bin/{a}"), "busybox");
    }
    c.file("/init", 0o755, INIT_SCRIPT.as_bytes());
    c.file("/bin/vgpu-guest", 0o755, &program);
    let mut list = String::new();
    for m in &modules {
        c.file(&format!("/lib/modules/{}.ko", m.name), 0o644, &m.data);
        list.push_str(&m.name);
        list.push('\n');
    }
    c.file("/etc/vgpu-modules", 0o644, list.as_bytes());
    let archive = c.finish();
    fs::create_dir_all(cache).map_err(|e| format!("creating {}: {e}", cache.display()))?;
    // A stable name (README.md's command line uses it); rewritten only when it changes.
    let path = cache.join("initramfs.cpio");
    write_cached(&path, &archive)?;
    Ok(Initramfs {
        path,
        modules: modules.into_iter().map(|m| m.name).collect(),
    })
}
