//! The command line, following QEMU's conventions for vhost-user backends
//! (docs/interop/vhost-user.rst: --socket-path / --fd, --print-capabilities) plus the GPU
//! options (--render-node, --virgl) and our own outputs and limits.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use log::LevelFilter;
use policy::limits::{self, Bound};
use protocol::config::{DeviceConfig, OutputConfig, MAX_SCANOUTS};

/// A sandboxed virtio-gpu device, served as a vhost-user backend.
#[derive(Debug, Parser)]
#[command(name = "vgpu-sandbox", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Sub>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Options of the backend itself.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Listen for the VMM on this unix socket path (created; a stale socket is replaced).
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,
    /// Use this inherited unix stream socket: a listening one, or one already connected to
    /// the VMM (as libvirt hands it over; one connection then, relayed by the broker).
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,
    /// Print the backend's capabilities as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// DRM render node for the virgl renderer (opened by the renderer-worker before its
    /// jail; without it virgl renders with Mesa's llvmpipe). Checked to exist; the 2D
    /// renderer does not open it.
    #[arg(long, value_name = "PATH")]
    pub render_node: Option<PathBuf>,
    /// virgl 3D: virglrenderer on the host's Mesa (EGL, headless; llvmpipe without a GPU)
    /// serves every command, VIRTIO_GPU_F_VIRGL and the VIRGL / VIRGL2 capsets are
    /// offered. Fails at start-up, naming why, where virglrenderer cannot initialise.
    #[arg(long)]
    pub virgl: bool,
    /// An output of WIDTHxHEIGHT pixels; repeat for more outputs. Without it: one output,
    /// whose size the VMM's display decides (1280x800 when it has no opinion).
    #[arg(long = "output", value_name = "WxH", value_parser = parse_output)]
    pub outputs: Vec<OutputConfig>,
    /// After the VMM disconnects, reset the device and wait for the next connection on the
    /// same socket (default: exit 0, as QEMU's own backends do).
    #[arg(long)]
    pub keep_listening: bool,
    /// Do not offer VIRTIO_GPU_F_EDID.
    #[arg(long)]
    pub no_edid: bool,
    /// Most live resources (2D, 3D and blobs together); beyond it a create gets
    /// ERR_OUT_OF_MEMORY. Default 16384.
    #[arg(long, value_name = "N", value_parser = parse_max_resources)]
    pub max_resources: Option<u32>,
    /// Most host memory all guest resources, blobs and the scanout buffers showing them
    /// may use together, in MiB; beyond it ERR_OUT_OF_MEMORY. Default 1024.
    #[arg(long, value_name = "MIB", value_parser = parse_max_resource_memory)]
    pub max_resource_memory: Option<u64>,
    /// Most live contexts (CTX_CREATE); beyond it ERR_OUT_OF_MEMORY. Default 64.
    #[arg(long, value_name = "N", value_parser = parse_max_contexts)]
    pub max_contexts: Option<u32>,
    /// Largest SUBMIT_3D command stream (bytes, or with a K or M suffix); a larger one
    /// gets ERR_OUT_OF_MEMORY. Default 1M (a virgl guest sends up to 256K).
    #[arg(long, value_name = "SIZE", value_parser = parse_max_submit_size)]
    pub max_submit_size: Option<u32>,
    /// Most blobs mapped into the host-visible window at once (RESOURCE_MAP_BLOB until
    /// the unmap completed); beyond it ERR_OUT_OF_MEMORY. Default 4096.
    #[arg(long, value_name = "N", value_parser = parse_max_mappings)]
    pub max_mappings: Option<u32>,
    /// Offer blobs and contexts with a host-visible memory region of this size (bytes,
    /// or with a K, M or G suffix; page aligned), mapped through the VMM with
    /// VHOST_USER_BACKEND_SHMEM_MAP.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub hostmem: Option<u64>,
    /// What a seccomp violation in a child does: kill (default: the process dies of
    /// SIGSYS), trap (it prints the offending system call and exits 159) or log (the call
    /// is allowed and the kernel logs it: development only, to derive an allowlist).
    #[arg(long, value_name = "MODE", value_parser = ["kill", "trap", "log"])]
    pub seccomp: Option<String>,
    /// How many times within any 60 seconds a renderer-worker that died is replaced by a
    /// fresh one (the guest's 2D state is rebuilt, its 3D contexts are lost); one more
    /// death stops the device. 0: a renderer death stops the device.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub max_renderer_restarts: u32,
    /// Write the device's metrics to this file every 2 seconds, in Prometheus' text format
    /// (for node_exporter's textfile collector; replaced atomically). Its directory must
    /// exist and be writable.
    #[arg(long, value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,
    /// Log level: off, error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL", default_value = "info", value_parser = crate::logger::parse_level)]
    pub log_level: LevelFilter,
    /// The VM's name, on every log line of every process (1..=64 of A-Z a-z 0-9 . _ -).
    /// Default: from the socket: /run/vgpu-sandbox/vm1/vgpu.sock gives vm1, /run/vm1.sock
    /// gives vm1, --fd 3 gives fd-3.
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    pub name: Option<String>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Sub {
    /// Run the whole stack against the built-in test VMM and report what happened.
    Demo(DemoArgs),
    /// Check what this host supports of what the sandbox uses, one line each; exit 1 if
    /// something vgpu-sandbox cannot run without is missing.
    CheckHost,
    /// Internal: initialise virglrenderer in this (short-lived) process and say why not
    /// when it fails; the broker runs it before it starts anything with --virgl.
    #[command(hide = true)]
    ProbeVirgl,
    /// Internal, for packaging: write the man pages and the bash, zsh and fish completions
    /// into DIR (scripts/build-deb.sh runs it before cargo-deb).
    #[command(hide = true)]
    GenAssets {
        /// Directory to write the man pages and completion files into (created).
        dir: PathBuf,
    },
}

/// Options of `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Frames to draw and verify.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=100000))]
    pub frames: u32,
    /// Output size.
    #[arg(long, value_name = "WxH", default_value = "640x480", value_parser = parse_output)]
    pub output: OutputConfig,
}

/// Parses a byte count with an optional K, M or G suffix (powers of 1024); the product
/// is overflow-checked.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 256M)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Parses a byte size with an optional K, M or G suffix (powers of 1024), page aligned.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bytes = parse_bytes(s)
        .ok()
        .filter(|b| (1..=protocol::config::MAX_HOSTMEM).contains(b))
        .ok_or_else(|| format!("'{s}': the size must be 4K..=64G"))?;
    if bytes % 4096 != 0 {
        return Err(format!("'{s}': the size must be a multiple of 4K"));
    }
    Ok(bytes)
}

/// A byte count as the options take it: with the largest K, M or G suffix that is exact.
fn with_suffix(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}K", b >> 10),
        b => b.to_string(),
    }
}

/// A count option within its per-VM limit's [`Bound`].
fn parse_count(s: &str, bound: &Bound) -> Result<u32, String> {
    let range = || format!("'{s}': must be {}..={}", bound.min, bound.max);
    let n: u64 = s.parse().map_err(|_| range())?;
    let n = bound.check(n).map_err(|_| range())?;
    u32::try_from(n).map_err(|_| range())
}

/// `--max-resources N`.
pub fn parse_max_resources(s: &str) -> Result<u32, String> {
    parse_count(s, &limits::RESOURCES)
}

/// `--max-contexts N`.
pub fn parse_max_contexts(s: &str) -> Result<u32, String> {
    parse_count(s, &limits::CONTEXTS)
}

/// `--max-mappings N`.
pub fn parse_max_mappings(s: &str) -> Result<u32, String> {
    parse_count(s, &limits::MAPPINGS)
}

/// `--max-resource-memory MIB`, returned in MiB.
pub fn parse_max_resource_memory(s: &str) -> Result<u64, String> {
    let (min, max) = (
        limits::RESOURCE_BYTES.min >> 20,
        limits::RESOURCE_BYTES.max >> 20,
    );
    let range = || format!("'{s}': must be {min}..={max} (MiB)");
    let mib: u64 = s.parse().map_err(|_| range())?;
    mib.checked_mul(1 << 20)
        .and_then(|bytes| limits::RESOURCE_BYTES.check(bytes).ok())
        .map(|_| mib)
        .ok_or_else(range)
}

/// `--max-submit-size SIZE`, returned in bytes.
pub fn parse_max_submit_size(s: &str) -> Result<u32, String> {
    let bound = &limits::SUBMIT_BYTES;
    let range = || {
        format!(
            "'{s}': the size must be {}..={}",
            with_suffix(bound.min),
            with_suffix(bound.max)
        )
    };
    parse_bytes(s)
        .ok()
        .and_then(|bytes| bound.check(bytes).ok())
        .and_then(|bytes| u32::try_from(bytes).ok())
        .ok_or_else(range)
}

/// Parses `WIDTHxHEIGHT`.
pub fn parse_output(s: &str) -> Result<OutputConfig, String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("'{s}' is not WIDTHxHEIGHT"))?;
    let parse = |v: &str| -> Result<u32, String> {
        let n: u32 = v
            .parse()
            .map_err(|_| format!("'{s}' is not WIDTHxHEIGHT"))?;
        if !(16..=16384).contains(&n) {
            return Err(format!("'{s}': each side must be 16..=16384 pixels"));
        }
        Ok(n)
    };
    Ok(OutputConfig {
        width: parse(w)?,
        height: parse(h)?,
    })
}

impl ServeArgs {
    /// The device configuration these options describe.
    pub fn device_config(&self) -> Result<DeviceConfig, String> {
        let mut config = DeviceConfig::with_limits(self.limits()?);
        if !self.outputs.is_empty() {
            if self.outputs.len() > MAX_SCANOUTS {
                return Err(format!(
                    "{} outputs given, virtio-gpu supports at most {MAX_SCANOUTS}",
                    self.outputs.len()
                ));
            }
            config.outputs = self.outputs.clone();
            config.display_from_vmm = false;
        }
        config.edid = !self.no_edid;
        config.keep_listening = self.keep_listening;
        config.hostmem = self.hostmem;
        config.render_node = self
            .render_node
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned());
        if self.virgl {
            config.virgl = true;
            config.num_capsets = VIRGL_CAPSETS;
        } else if self.hostmem.is_some() {
            config.num_capsets = renderer_worker::NUM_CAPSETS;
        }
        Ok(config)
    }

    /// The per-VM limits: the policy's defaults, with what the options change. The
    /// options' parsers already bounded each value; `validate` is the policy's last word.
    pub fn limits(&self) -> Result<protocol::config::Limits, String> {
        let mut l = limits::DEFAULT;
        if let Some(n) = self.max_resources {
            l.max_resources = n;
        }
        if let Some(mib) = self.max_resource_memory {
            l.max_resource_bytes = mib
                .checked_mul(1 << 20)
                .ok_or_else(|| format!("--max-resource-memory {mib}: too large"))?;
        }
        if let Some(n) = self.max_contexts {
            l.max_contexts = n;
        }
        if let Some(bytes) = self.max_submit_size {
            l.max_submit_bytes = bytes;
        }
        if let Some(n) = self.max_mappings {
            l.max_mappings = n;
        }
        limits::validate(&l).map_err(|e| e.to_string())?;
        Ok(l)
    }
}

/// The capsets a virgl renderer offers at least (VIRGL and VIRGL2); the probe says how
/// many this host's virglrenderer has.
const VIRGL_CAPSETS: u32 = 2;

/// `--print-capabilities`: what this build really supports on this host, in QEMU's format.
/// "virgl" is listed only when virglrenderer really initialises here.
pub fn capabilities_json() -> String {
    let mut features = Vec::new();
    // libvirt, when a backend lists it and the domain names no node, picks one from
    // /dev/dri and refuses to start the domain where there is none: list it only where
    // there is one to pick.
    if has_render_node() {
        features.push("render-node");
    }
    if virgl_works() {
        features.push("virgl");
    }
    serde_json::json!({
        "type": "gpu",
        "features": features,
    })
    .to_string()
}

/// Whether `/dev/dri` holds a render node (`renderD*`).
fn has_render_node() -> bool {
    std::fs::read_dir("/dev/dri").is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("renderD"))
    })
}

fn virgl_works() -> bool {
    probe_virgl().is_ok()
}

/// Initialises virglrenderer in this process, which must exit soon after (Mesa's threads
/// and state stay); returns how many capsets it offers, or why it cannot work.
#[cfg(feature = "virgl")]
pub fn probe_virgl() -> Result<u32, String> {
    use renderer_worker::Renderer;
    let r = renderer_worker::VirglRenderer::new(limits::DEFAULT, None, |_| {})
        .map_err(|e| e.to_string())?;
    match r.num_capsets() {
        n if n >= VIRGL_CAPSETS => Ok(n),
        n => Err(format!(
            "virglrenderer offers {n} of the {VIRGL_CAPSETS} virgl capsets here"
        )),
    }
}

/// This build has no virgl renderer.
#[cfg(not(feature = "virgl"))]
pub fn probe_virgl() -> Result<u32, String> {
    Err("this build has no virgl renderer (built without the `virgl` feature)".into())
}

/// `gen-assets DIR`: the man pages and shell completions, derived from this very command
/// line so that they cannot drift from `--help`.
pub fn gen_assets(dir: &std::path::Path) -> Result<(), String> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let failed = |what: &str, e: std::io::Error| format!("{what} in {}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(|e| failed("creating the directory", e))?;
    let cmd = Cli::command();
    // vgpu-sandbox.1 plus one page per public subcommand, which it refers to.
    clap_mangen::generate_to(cmd.clone(), dir).map_err(|e| failed("writing the man pages", e))?;
    // clap_complete offers hidden subcommands too; the internal ones are no one's to type.
    let mut public = clap::Command::new("vgpu-sandbox")
        .version(env!("CARGO_PKG_VERSION"))
        .args(cmd.get_arguments().cloned())
        .subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut public, "vgpu-sandbox", dir)
            .map_err(|e| failed(&format!("writing the {shell} completions"), e))?;
    }
    Ok(())
}

/// Longest `--name`.
const MAX_NAME: usize = 64;

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// `--name NAME`: it lands inside every log line's prefix, so nothing that could break
/// the line apart or pass for another field there (spaces, brackets, control characters).
pub fn parse_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > MAX_NAME || !s.chars().all(name_char) {
        let shown: String = s.chars().flat_map(char::escape_default).take(80).collect();
        return Err(format!(
            "'{shown}': a name is 1..={MAX_NAME} characters of A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(s.to_owned())
}

impl ServeArgs {
    /// The VM's name: `--name`, else derived from where the VMM connects. Every instance
    /// of the systemd unit listens on `<instance>/vgpu.sock`, so that generic file name
    /// says nothing and its directory names the VM. A derived name is made valid rather
    /// than refused: an odd socket path was never an error.
    pub fn vm_name(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        let derived = match (&self.socket_path, self.fd) {
            (Some(path), _) if path.file_name() == Some("vgpu.sock".as_ref()) => path
                .parent()
                .and_then(|d| d.file_name())
                .map(|d| d.to_string_lossy().into_owned()),
            (Some(path), _) => path.file_stem().map(|s| s.to_string_lossy().into_owned()),
            (None, Some(fd)) => Some(format!("fd-{fd}")),
            (None, None) => None,
        };
        let name: String = derived
            .unwrap_or_default()
            .chars()
            .map(|c| if name_char(c) { c } else { '_' })
            .take(MAX_NAME)
            .collect();
        if name.is_empty() {
            "vgpu-sandbox".into()
        } else {
            name
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_parse_and_reject() {
        assert_eq!(
            parse_output("1024x768"),
            Ok(OutputConfig {
                width: 1024,
                height: 768
            })
        );
        for bad in [
            "1024",
            "x768",
            "0x10",
            "1024x99999",
            "axb",
            "1024x768x2",
            "",
        ] {
            assert!(parse_output(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn sizes_parse_and_reject() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        for bad in [
            "",
            "M",
            "0",
            "100",
            "65G",
            "-1M",
            "1.5G",
            "99999999999999999999G",
        ] {
            assert!(parse_size(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn limit_options_parse_and_reject() {
        assert_eq!(parse_max_resources("1"), Ok(1));
        assert_eq!(parse_max_resources("1048576"), Ok(1 << 20));
        assert_eq!(parse_max_contexts("1024"), Ok(1024));
        assert_eq!(parse_max_mappings("32768"), Ok(32768));
        assert_eq!(parse_max_resource_memory("65536"), Ok(65536));
        assert_eq!(parse_max_submit_size("4K"), Ok(4096));
        assert_eq!(parse_max_submit_size("64M"), Ok(64 << 20));
        assert_eq!(parse_max_submit_size("8192"), Ok(8192));
        type Parse = fn(&str) -> Result<u64, String>;
        let bad: [(Parse, &[&str]); 5] = [
            (
                |s| parse_max_resources(s).map(u64::from),
                &["0", "1048577", "-1", "x", ""],
            ),
            (
                |s| parse_max_contexts(s).map(u64::from),
                &["0", "1025", "1.5", "99999999999999999999"],
            ),
            (|s| parse_max_mappings(s).map(u64::from), &["0", "32769"]),
            (
                parse_max_resource_memory,
                &["0", "65537", "18446744073709551615", "1G"],
            ),
            (
                |s| parse_max_submit_size(s).map(u64::from),
                &["0", "4095", "64M1", "65M", "1G", "99999999999G"],
            ),
        ];
        for (parse, values) in bad {
            for v in values {
                let err = parse(v).expect_err(v);
                assert!(
                    err.contains(&format!("'{v}'")) && !err.contains('\n'),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn limit_options_reach_the_device_config() {
        let cli = Cli::try_parse_from([
            "vgpu-sandbox",
            "--max-resources",
            "7",
            "--max-resource-memory",
            "3",
            "--max-contexts",
            "5",
            "--max-submit-size",
            "16K",
            "--max-mappings",
            "9",
        ])
        .unwrap();
        let l = cli.serve.device_config().unwrap().limits;
        assert_eq!(
            (
                l.max_resources,
                l.max_resource_bytes,
                l.max_contexts,
                l.max_submit_bytes,
                l.max_mappings
            ),
            (7, 3 << 20, 5, 16 << 10, 9)
        );
        let defaults = Cli::try_parse_from(["vgpu-sandbox"]).unwrap();
        assert_eq!(
            defaults.serve.device_config().unwrap().limits,
            limits::DEFAULT
        );
    }

    #[test]
    fn socket_and_fd_are_exclusive() {
        let r = Cli::try_parse_from(["vgpu-sandbox", "--socket-path", "/tmp/x", "--fd", "3"]);
        assert!(r.is_err());
    }

    #[test]
    fn capabilities_are_json_of_type_gpu() {
        let v: serde_json::Value = serde_json::from_str(&capabilities_json()).unwrap();
        assert_eq!(v["type"], "gpu");
        assert!(v["features"].is_array());
    }

    #[test]
    fn vm_name_from_option_or_socket() {
        let name = |args: &[&str]| {
            let mut argv = vec!["vgpu-sandbox"];
            argv.extend(args);
            Cli::try_parse_from(argv).map(|c| c.serve.vm_name())
        };
        let cases: [(&[&str], &str); 7] = [
            (&["--socket-path", "/run/vgpu-sandbox/vm1/vgpu.sock"], "vm1"),
            (&["--socket-path", "/run/vgpu/vm2.sock"], "vm2"),
            (&["--socket-path", "/tmp/my vm [1].sock"], "my_vm__1_"),
            (&["--socket-path", "vgpu.sock"], "vgpu-sandbox"),
            (&["--fd", "3"], "fd-3"),
            (&["--fd", "3", "--name", "db.prod_2"], "db.prod_2"),
            (&[], "vgpu-sandbox"),
        ];
        for (args, want) in cases {
            assert_eq!(name(args).unwrap(), want, "{args:?}");
        }
        let long = "a".repeat(65);
        for bad in ["", "a b", "vm[1]", "x\ny", "ü", long.as_str()] {
            let err = name(&["--name", bad]).expect_err(bad).to_string();
            assert!(err.contains("1..=64 characters"), "{err}");
        }
        assert_eq!(name(&["--name", &long[..64]]).unwrap(), &long[..64]);
    }
}
