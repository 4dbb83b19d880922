//! What operators install: the vhost-user backend descriptor and `--print-capabilities`
//! checked against QEMU's schema for them, and the Debian package (scripts/build-deb.sh,
//! from the debug binary `cargo build` made) unpacked with `dpkg -x` into a scratch
//! directory: every file where Debian, QEMU, libvirt, systemd and the shells look for it,
//! and the unpacked binary, man pages, completions and systemd unit working.
//!
//! Needs cargo-deb (scripts/setup-qemu-tests.sh installs it) and dpkg-deb.

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use vgpu_tests::stack::default_binary;

// What QEMU's docs/interop/vhost-user.json says about the two JSON documents (its enum
// values and member names only).

/// `VHostUserBackendType`.
const BACKEND_TYPES: &[&str] = &[
    "9p",
    "balloon",
    "block",
    "caif",
    "console",
    "crypto",
    "gpu",
    "input",
    "net",
    "rng",
    "rpmsg",
    "rproc-serial",
    "scsi",
    "vsock",
    "fs",
];
/// `VHostUserBackendGPUFeature`: the features a "gpu" backend may report.
const GPU_FEATURES: &[&str] = &["render-node", "virgl"];
/// `VhostUserBackend` (the descriptor file): its mandatory members.
const DESCRIPTOR_REQUIRED: &[&str] = &["description", "type", "binary"];
/// `VhostUserBackend`: its optional members (`*tags` there).
const DESCRIPTOR_OPTIONAL: &[&str] = &["tags"];

/// Where the package installs the descriptor: the distribution's directory of the three
/// that QEMU's schema tells management software (libvirt) to search.
const DESCRIPTOR_PATH: &str = "usr/share/qemu/vhost-user/50-vgpu-sandbox.json";
const BINARY_PATH: &str = "usr/bin/vgpu-sandbox";
const UNIT_PATH: &str = "lib/systemd/system/vgpu-sandbox@.service";
const MAN_PAGES: &[&str] = &[
    "usr/share/man/man1/vgpu-sandbox.1.gz",
    "usr/share/man/man1/vgpu-sandbox-demo.1.gz",
    "usr/share/man/man1/vgpu-sandbox-check-host.1.gz",
];
const BASH_COMPLETION: &str = "usr/share/bash-completion/completions/vgpu-sandbox";
const ZSH_COMPLETION: &str = "usr/share/zsh/vendor-completions/_vgpu-sandbox";
const FISH_COMPLETION: &str = "usr/share/fish/vendor_completions.d/vgpu-sandbox.fish";
const DOCS: &[&str] = &[
    "usr/share/doc/vgpu-sandbox/README.md",
    "usr/share/doc/vgpu-sandbox/OPERATORS.md",
    "usr/share/doc/vgpu-sandbox/SECURITY.md",
    "usr/share/doc/vgpu-sandbox/copyright",
    "usr/share/doc/vgpu-sandbox/examples/libvirt-domain-example.xml",
];
/// What the binary needs at run time beyond what it links (virglrenderer loads EGL and
/// Mesa's llvmpipe itself).
const DEPENDS: &[&str] = &["libegl-mesa0", "libgl1-mesa-dri"];
/// What a virgl build links, which only cargo-deb's `$auto` (dpkg-shlibdeps) finds.
#[cfg(feature = "virgl")]
const LINKED: &[&str] = &["libvirglrenderer1"];
#[cfg(not(feature = "virgl"))]
const LINKED: &[&str] = &[];

/// Bound on one run of the binary that ends by itself.
const RUN_BOUND: Duration = Duration::from_secs(20);
/// Bound on building the package: stripping and compressing the debug binary on a busy
/// machine (about 2 s on an idle one).
const BUILD_BOUND: Duration = Duration::from_secs(240);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the workspace")
        .to_path_buf()
}

// ---------------------------------------------------------------- schema checks

fn string_in<'a>(v: &'a Value, what: &str, allowed: &[&str]) -> Result<&'a str, String> {
    let s = v
        .as_str()
        .ok_or_else(|| format!("{what} is not a string: {v}"))?;
    if !allowed.contains(&s) {
        return Err(format!("{what} '{s}' is not one of {allowed:?}"));
    }
    Ok(s)
}

/// A `VhostUserBackend`, the descriptor file, for a "gpu" backend.
fn check_descriptor(v: &Value) -> Result<(), String> {
    let fields = v.as_object().ok_or("the descriptor is not a JSON object")?;
    for key in fields.keys() {
        if !DESCRIPTOR_REQUIRED.contains(&key.as_str())
            && !DESCRIPTOR_OPTIONAL.contains(&key.as_str())
        {
            return Err(format!("member '{key}' is not in VhostUserBackend"));
        }
    }
    for key in DESCRIPTOR_REQUIRED {
        if !fields.contains_key(*key) {
            return Err(format!("mandatory member '{key}' is missing"));
        }
    }
    if !fields["description"].is_string() {
        return Err("'description' is not a string".into());
    }
    if string_in(&fields["type"], "'type'", BACKEND_TYPES)? != "gpu" {
        return Err(format!("'type' is {}, not \"gpu\"", fields["type"]));
    }
    let binary = fields["binary"]
        .as_str()
        .ok_or("'binary' is not a string")?;
    if !binary.starts_with('/') {
        return Err(format!("'binary' {binary} is not an absolute path"));
    }
    if let Some(tags) = fields.get("tags") {
        let tags = tags.as_array().ok_or("'tags' is not an array")?;
        if !tags.iter().all(Value::is_string) {
            return Err("'tags' has a member that is not a string".into());
        }
    }
    Ok(())
}

/// A `VHostUserBackendCapabilities` of a "gpu" backend (`--print-capabilities`).
fn check_capabilities(v: &Value) -> Result<(), String> {
    let fields = v
        .as_object()
        .ok_or("the capabilities are not a JSON object")?;
    for key in fields.keys() {
        if key != "type" && key != "features" {
            return Err(format!(
                "member '{key}' is not in VHostUserBackendCapabilitiesGPU"
            ));
        }
    }
    let ty = fields
        .get("type")
        .ok_or("mandatory member 'type' is missing")?;
    if string_in(ty, "'type'", BACKEND_TYPES)? != "gpu" {
        return Err(format!("'type' is {ty}, not \"gpu\""));
    }
    let features = fields
        .get("features")
        .ok_or("mandatory member 'features' is missing")?
        .as_array()
        .ok_or("'features' is not an array")?;
    let mut seen = HashSet::new();
    for f in features {
        let f = string_in(f, "feature", GPU_FEATURES)?;
        if !seen.insert(f) {
            return Err(format!("feature '{f}' is listed twice"));
        }
    }
    Ok(())
}

#[test]
fn schema_checks_refuse_what_qemus_schema_refuses() {
    let good = json!({"description": "d", "type": "gpu", "binary": "/usr/bin/x"});
    check_descriptor(&good).unwrap();
    let mut tagged = good.clone();
    tagged["tags"] = json!(["a"]);
    check_descriptor(&tagged).unwrap();
    let bad_descriptors = [
        json!({"type": "gpu", "binary": "/usr/bin/x"}),
        json!({"description": "d", "binary": "/usr/bin/x"}),
        json!({"description": "d", "type": "gpu"}),
        json!({"description": "d", "type": "net", "binary": "/usr/bin/x"}),
        json!({"description": "d", "type": "display", "binary": "/usr/bin/x"}),
        json!({"description": "d", "type": "gpu", "binary": "usr/bin/x"}),
        json!({"description": "d", "type": "gpu", "binary": "/x", "features": ["virgl"]}),
        json!({"description": "d", "type": "gpu", "binary": "/x", "tags": [1]}),
        json!(["gpu"]),
    ];
    for bad in bad_descriptors {
        assert!(check_descriptor(&bad).is_err(), "accepted {bad}");
    }
    check_capabilities(&json!({"type": "gpu", "features": ["render-node", "virgl"]})).unwrap();
    check_capabilities(&json!({"type": "gpu", "features": []})).unwrap();
    let bad_capabilities = [
        json!({"type": "gpu"}),
        json!({"features": ["virgl"]}),
        json!({"type": "input", "features": ["evdev-path"]}),
        json!({"type": "gpu", "features": ["vulkan"]}),
        json!({"type": "gpu", "features": ["virgl", "virgl"]}),
        json!({"type": "gpu", "features": "virgl"}),
        json!({"type": "gpu", "features": [], "binary": "/x"}),
    ];
    for bad in bad_capabilities {
        assert!(check_capabilities(&bad).is_err(), "accepted {bad}");
    }
}

#[test]
fn descriptor_follows_qemus_schema_and_names_the_installed_binary() {
    let path = repo_root().join("packaging/50-vgpu-sandbox.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    check_descriptor(&v).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(v["binary"], json!(format!("/{BINARY_PATH}")));
}

#[test]
fn print_capabilities_follows_qemus_schema() {
    let mut cmd = Command::new(default_binary().expect("vgpu-sandbox binary"));
    cmd.arg("--print-capabilities");
    let o = run(cmd, RUN_BOUND);
    assert!(o.status.success(), "{}", o.describe());
    let v: Value = serde_json::from_str(o.stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", o.describe()));
    check_capabilities(&v).unwrap_or_else(|e| panic!("{e}: {}", o.describe()));
    // "render-node" only where there is one: libvirt fails a domain on a backend that
    // lists it when /dev/dri has no render node.
    let has_node = fs::read_dir("/dev/dri").is_ok_and(|d| {
        d.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("renderD"))
    });
    assert_eq!(
        v["features"]
            .as_array()
            .unwrap()
            .contains(&json!("render-node")),
        has_node,
        "{}",
        o.describe()
    );
}

#[test]
fn libvirt_example_is_a_valid_domain_with_what_vhost_user_needs() {
    let path = repo_root().join("packaging/libvirt-domain-example.xml");
    let xml = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for needed in [
        "<driver name='vhostuser'/>",
        "<model type='virtio'",
        "<source type='memfd'/>",
        "<access mode='shared'/>",
    ] {
        assert!(xml.contains(needed), "{} lacks {needed}", path.display());
    }
    // libvirt's own RELAX NG schema (libvirt-clients; scripts/setup-qemu-tests.sh).
    let mut validate = Command::new("virt-xml-validate");
    validate.arg(&path).arg("domain");
    let o = run_ok(validate, RUN_BOUND);
    assert!(
        format!("{}{}", o.stdout, o.stderr).contains("validates"),
        "{}",
        o.describe()
    );
}

// ---------------------------------------------------------------- the package

struct Outcome {
    what: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn describe(&self) -> String {
        format!(
            "`{}` -> {}\nstdout: {}\nstderr: {}",
            self.what, self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` in its own process group to completion within `bound`; past it, kills the
/// group (cargo-deb and strip are grandchildren) and fails.
fn run(mut cmd: Command, bound: Duration) -> Outcome {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let pgid = Pid::from_raw(child.id() as i32);
    let (tx, rx) = mpsc::channel();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let mut stdout = String::new();
        let mut stderr = String::new();
        let reader = std::thread::spawn(move || {
            let _ = err.read_to_string(&mut stderr);
            stderr
        });
        let _ = out.read_to_string(&mut stdout);
        let stderr = reader.join().unwrap_or_default();
        let status = child.wait();
        let _ = tx.send((status, stdout, stderr));
    });
    match rx.recv_timeout(bound) {
        Ok((status, stdout, stderr)) => Outcome {
            status: status.unwrap_or_else(|e| panic!("waiting for {what}: {e}")),
            what,
            stdout,
            stderr,
        },
        Err(_) => {
            let _ = killpg(pgid, Signal::SIGKILL);
            panic!("{what} did not finish within {bound:?}");
        }
    }
}

fn with_arg(bin: &Path, arg: &str) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg(arg);
    cmd
}

fn run_ok(cmd: Command, bound: Duration) -> Outcome {
    let o = run(cmd, bound);
    assert!(o.status.success(), "{}", o.describe());
    o
}

/// Builds the package with the debug binary and unpacks it into `dir`/root.
fn build_and_unpack(dir: &Path) -> (PathBuf, PathBuf) {
    let mut build = Command::new(repo_root().join("scripts/build-deb.sh"));
    build
        .arg("--dev")
        .arg("--output")
        .arg(dir.join("deb"))
        .current_dir(repo_root());
    let o = run_ok(build, BUILD_BOUND);
    let deb = PathBuf::from(o.stdout.lines().last().unwrap_or_default());
    assert!(
        deb.is_file() && deb.starts_with(dir.join("deb")),
        "no .deb where --output said: {}",
        o.describe()
    );
    let root = dir.join("root");
    let mut unpack = Command::new("dpkg-deb");
    unpack.arg("-x").arg(&deb).arg(&root);
    run_ok(unpack, RUN_BOUND);
    (deb, root)
}

fn read(root: &Path, rel: &str) -> String {
    fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("/{rel} in the package: {e}"))
}

/// The man page as `man` formats it, or, where there is no `man`, its roff source.
fn check_man_page(path: &Path, name: &str) {
    let mut gunzip = Command::new("gzip");
    gunzip.arg("-dc").arg(path);
    let roff = run_ok(gunzip, RUN_BOUND).stdout;
    assert!(
        roff.lines()
            .any(|l| l.starts_with(&format!(".TH {name} 1"))),
        "{} has no .TH {name} 1 line:\n{roff}",
        path.display()
    );
    if Command::new("man").arg("--version").output().is_ok() {
        let mut man = Command::new("man");
        man.args(["-P", "cat", "-l"])
            .arg(path)
            .env("MANWIDTH", "100");
        let o = run_ok(man, RUN_BOUND);
        assert!(
            o.stdout.contains("NAME") && o.stdout.contains(name),
            "{}",
            o.describe()
        );
    }
}

/// The unit as systemd reads it, with ExecStart pointing at the unpacked binary (systemd
/// checks that it exists): no unknown key, no value it cannot parse.
fn check_unit_with_systemd(root: &Path, dir: &Path) {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        // Not every build machine has systemd; the structural checks still ran.
        eprintln!("systemd-analyze not installed: the unit was not verified by systemd");
        return;
    }
    let unit = read(root, UNIT_PATH).replace(
        &format!("/{BINARY_PATH}"),
        &root.join(BINARY_PATH).to_string_lossy(),
    );
    let instance = dir.join("vgpu-sandbox@vm1.service");
    fs::write(&instance, unit).unwrap();
    let mut verify = Command::new("systemd-analyze");
    verify.args(["verify", "--man=no"]).arg(&instance);
    let o = run_ok(verify, RUN_BOUND);
    // systemd-analyze exits 0 after "Unknown key" and parse warnings: its stderr says.
    assert!(o.stderr.trim().is_empty(), "{}", o.describe());
}

#[test]
fn debian_package_installs_everything_where_operators_expect_it() {
    let dir = tempfile::tempdir().unwrap();
    let (deb, root) = build_and_unpack(dir.path());

    // Control: the run-time libraries.
    let mut field = Command::new("dpkg-deb");
    field.arg("-f").arg(&deb).args(["Package", "Depends"]);
    let control = run_ok(field, RUN_BOUND).stdout;
    assert!(control.contains("Package: vgpu-sandbox"), "{control}");
    for dep in DEPENDS.iter().chain(LINKED) {
        assert!(control.contains(dep), "Depends lacks {dep}: {control}");
    }

    // The binary works where it was installed.
    let bin = root.join(BINARY_PATH);
    let mode = fs::metadata(&bin)
        .unwrap_or_else(|e| panic!("/{BINARY_PATH}: {e}"))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755, "/{BINARY_PATH} mode {mode:o}");
    let o = run_ok(with_arg(&bin, "--version"), RUN_BOUND);
    assert_eq!(
        o.stdout.trim(),
        format!("vgpu-sandbox {}", env!("CARGO_PKG_VERSION")),
        "{}",
        o.describe()
    );
    let o = run_ok(with_arg(&bin, "--print-capabilities"), RUN_BOUND);
    let caps: Value = serde_json::from_str(o.stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", o.describe()));
    check_capabilities(&caps).unwrap_or_else(|e| panic!("{e}: {}", o.describe()));
    let o = run_ok(with_arg(&bin, "check-host"), RUN_BOUND);
    assert!(o.stdout.contains("seccomp-filter: ok"), "{}", o.describe());

    // The descriptor, as shipped, names the binary the package installs.
    let descriptor = read(&root, DESCRIPTOR_PATH);
    assert_eq!(
        descriptor,
        fs::read_to_string(repo_root().join("packaging/50-vgpu-sandbox.json")).unwrap()
    );
    let v: Value = serde_json::from_str(&descriptor).unwrap();
    check_descriptor(&v).unwrap_or_else(|e| panic!("/{DESCRIPTOR_PATH}: {e}"));
    let named = v["binary"].as_str().unwrap().trim_start_matches('/');
    assert!(
        root.join(named).is_file(),
        "the descriptor names {} which the package does not install",
        v["binary"]
    );

    // Man pages.
    check_man_page(&root.join(MAN_PAGES[0]), "vgpu-sandbox");
    check_man_page(&root.join(MAN_PAGES[1]), "vgpu-sandbox-demo");
    check_man_page(&root.join(MAN_PAGES[2]), "vgpu-sandbox-check-host");

    // Completions: the public options and subcommands, not the internal ones.
    for path in [BASH_COMPLETION, ZSH_COMPLETION, FISH_COMPLETION] {
        let text = read(&root, path);
        for word in ["socket-path", "print-capabilities", "check-host", "demo"] {
            assert!(text.contains(word), "/{path} lacks {word}");
        }
        for word in ["gen-assets", "probe-virgl", "internal-role"] {
            assert!(!text.contains(word), "/{path} offers {word}");
        }
    }
    let mut syntax = Command::new("bash");
    syntax.arg("-n").arg(root.join(BASH_COMPLETION));
    run_ok(syntax, RUN_BOUND);

    // The systemd unit: the socket path docs/OPERATORS.md gives QEMU, options the binary
    // has, and the hardening docs/OPERATORS.md describes.
    let unit = read(&root, UNIT_PATH);
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("no ExecStart= in /{UNIT_PATH}"));
    assert_eq!(
        exec,
        "/usr/bin/vgpu-sandbox --socket-path /run/vgpu-sandbox/%i/vgpu.sock"
    );
    let help = run_ok(with_arg(&bin, "--help"), RUN_BOUND).stdout;
    for flag in exec.split_whitespace().filter(|w| w.starts_with("--")) {
        assert!(
            help.contains(flag),
            "ExecStart uses {flag}, unknown to --help"
        );
    }
    for line in [
        "RuntimeDirectory=vgpu-sandbox/%i",
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateNetwork=yes",
        "RestrictAddressFamilies=AF_UNIX",
        "RestrictNamespaces=user mnt pid net ipc",
        "CapabilityBoundingSet=",
        "DevicePolicy=closed",
        "Restart=on-failure",
    ] {
        assert!(unit.lines().any(|l| l == line), "/{UNIT_PATH} lacks {line}");
    }
    check_unit_with_systemd(&root, dir.path());

    for doc in DOCS {
        assert!(root.join(doc).is_file(), "/{doc} missing");
    }
}
