//! The command line, following QEMU's conventions for vhost-user backends
//! (docs/interop/vhost-user.rst: --socket-path / --fd, --print-capabilities) plus the GPU
//! options (--render-node, --virgl) and our own outputs and limits.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use log::LevelFilter;
use protocol::config::{DeviceConfig, Limits, OutputConfig, MAX_SCANOUTS};

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
    /// Use this inherited, already listening unix socket.
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
    /// Most host memory all guest resources together may use, in MiB.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub max_resource_memory: Option<u64>,
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
    /// Log level: off, error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL", default_value = "info", value_parser = crate::logger::parse_level)]
    pub log_level: LevelFilter,
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

/// Parses a byte size with an optional K, M or G suffix (powers of 1024), page aligned.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 256M)"))?;
    let bytes = n
        .checked_mul(1 << shift)
        .filter(|b| (1..=protocol::config::MAX_HOSTMEM).contains(b))
        .ok_or_else(|| format!("'{s}': the size must be 4K..=64G"))?;
    if bytes % 4096 != 0 {
        return Err(format!("'{s}': the size must be a multiple of 4K"));
    }
    Ok(bytes)
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
        let mut config = DeviceConfig::default();
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
        if let Some(mib) = self.max_resource_memory {
            config.limits = Limits {
                max_resource_bytes: mib << 20,
                ..config.limits
            };
        }
        Ok(config)
    }
}

/// The capsets a virgl renderer offers at least (VIRGL and VIRGL2); the probe says how
/// many this host's virglrenderer has.
const VIRGL_CAPSETS: u32 = 2;

/// `--print-capabilities`: what this build really supports on this host, in QEMU's format.
/// "virgl" is listed only when virglrenderer really initialises here.
pub fn capabilities_json() -> String {
    let mut features = vec!["render-node"];
    if virgl_works() {
        features.push("virgl");
    }
    serde_json::json!({
        "type": "gpu",
        "features": features,
    })
    .to_string()
}

fn virgl_works() -> bool {
    probe_virgl().is_ok()
}

/// Initialises virglrenderer in this process, which must exit soon after (Mesa's threads
/// and state stay); returns how many capsets it offers, or why it cannot work.
#[cfg(feature = "virgl")]
pub fn probe_virgl() -> Result<u32, String> {
    use renderer_worker::Renderer;
    let r = renderer_worker::VirglRenderer::new(Limits::default(), None, |_| {})
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
}
