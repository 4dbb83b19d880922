//! Whether `--virgl` can work on this host, asked of a throw-away child.

/// Initialises virglrenderer once in a throw-away child (`probe-virgl`), so that neither
/// Mesa's threads nor its state end up in the broker; returns how many capsets a virgl
/// renderer will offer here, or why it cannot work.
pub fn run() -> Result<u32, String> {
    let out = std::process::Command::new("/proc/self/exe")
        .arg("probe-virgl")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("running the virgl probe: {e}"))?;
    let said = String::from_utf8_lossy(&out.stdout);
    if out.status.success() {
        return said
            .trim()
            .strip_prefix("capsets ")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("the virgl probe said {said:?}"));
    }
    let why = said;
    let why = why.lines().next().unwrap_or("the probe failed");
    Err(why.to_string())
}
