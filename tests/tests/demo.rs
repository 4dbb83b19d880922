//! The `vgpu-sandbox demo` scenario, run through the library entry point.

use vgpu_tests::stack::{default_binary, Role};
use vgpu_tests::{run_demo, DemoOptions};

#[test]
fn demo_verifies_every_frame_and_exits_cleanly() {
    let bin = default_binary().unwrap_or_else(|e| panic!("{e}"));
    let opts = DemoOptions {
        frames: 12,
        width: 320,
        height: 200,
    };
    let mut out = Vec::new();
    let report = run_demo(&bin, &opts, &mut out).unwrap_or_else(|e| {
        panic!(
            "demo failed: {e}\noutput so far:\n{}",
            String::from_utf8_lossy(&out)
        )
    });
    let text = String::from_utf8_lossy(&out);
    assert_eq!(report.frames_verified, 12, "{text}");
    assert_eq!(report.exit_code, Some(0), "{text}");
    let roles: Vec<_> = report.processes.iter().map(|p| p.role.clone()).collect();
    for r in [Role::Broker, Role::DeviceFrontend, Role::RendererWorker] {
        assert!(roles.contains(&r), "{r} missing from {roles:?}");
    }
    assert_eq!(report.commands.get("RESOURCE_FLUSH"), Some(&12), "{text}");
    assert!(text.contains("frames verified: 12"), "{text}");
}

#[test]
fn demo_with_default_options() {
    // The README's first command: 60 frames at 1280x800.
    let bin = default_binary().unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    let report = run_demo(&bin, &DemoOptions::default(), &mut out).unwrap_or_else(|e| {
        panic!(
            "demo failed: {e}\noutput so far:\n{}",
            String::from_utf8_lossy(&out)
        )
    });
    eprintln!("{}", String::from_utf8_lossy(&out));
    assert_eq!(report.frames_verified, 60);
    assert_eq!(report.exit_code, Some(0));
}
