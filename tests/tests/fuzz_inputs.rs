//! The fuzz targets' committed inputs, replayed on stable through the very harnesses
//! `cargo fuzz` runs (fuzz/src): the small seed corpus of each target, and every input
//! that once broke a rule (fuzz/regressions), so a fixed bug stays fixed without nightly.
//! Also checks that the `commands` harness really drives the device: a valid scenario
//! must be answered with OK responses and reach the display and the VMM.

use std::path::{Path, PathBuf};

use vgpu_sandbox_fuzz::commands::{
    BlobIdSpec, Cmd, Dim, EntrySpec, Harness, Header, Id, OffsetSpec, RectSpec, Scanout, Setup,
    Shape, SizeSpec, Step, VmmAcks,
};
use vgpu_sandbox_fuzz::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files directly in `dir` (none if it does not exist), sorted.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn committed_fuzz_inputs_replay_cleanly() {
    let mut seeds = 0;
    for target in TARGETS {
        for kind in ["seeds", "regressions"] {
            for file in inputs(&fuzz_dir().join(kind).join(target)) {
                let data = std::fs::read(&file).unwrap();
                let name = file.display().to_string();
                let outcome = std::panic::catch_unwind(|| vgpu_sandbox_fuzz::run(target, &data));
                assert!(outcome.is_ok(), "{target}: {name} breaks a rule again");
                if kind == "seeds" {
                    seeds += 1;
                }
            }
        }
    }
    assert!(seeds > 0, "no seed corpus under {}", fuzz_dir().display());
}

fn cmd(c: Cmd) -> Step {
    let hdr = Header {
        fence: Some(7),
        ctx: 0,
        ring: None,
    };
    Step::Cmd(c, hdr, Shape::default())
}

#[test]
fn commands_harness_drives_frontend_renderer_display_and_vmm() {
    let setup = Setup {
        display: true,
        display_from_vmm: true,
        edid: true,
        outputs: 1,
        vmm: true,
        vmm_acks: VmmAcks::Normal,
    };
    let mut h = Harness::new(&setup);
    let (r, blob, fb) = (Id(1), Id(2), Id(3));
    let steps = [
        cmd(Cmd::GetDisplayInfo),
        cmd(Cmd::GetEdid(Scanout(0))),
        cmd(Cmd::Create2d(r, 1, Dim(16), Dim(8))),
        cmd(Cmd::Attach(r, vec![EntrySpec::Covering(0)])),
        Step::GuestWrite(0, (0..=255u8).cycle().take(16 * 8 * 4).collect()),
        cmd(Cmd::Transfer(r, RectSpec::Full, OffsetSpec::Zero)),
        cmd(Cmd::SetScanout(Scanout(0), r, RectSpec::Full)),
        cmd(Cmd::Flush(r, RectSpec::Inside(2, 2, 3, 3))),
        // The scanout's buffer is in step now: the frontend applies these transfers to it
        // itself, and the harness compares it with the renderer's resource after each step.
        Step::GuestWrite(0, (0..=255u8).rev().cycle().take(16 * 8 * 4).collect()),
        cmd(Cmd::Transfer(r, RectSpec::Full, OffsetSpec::Zero)),
        cmd(Cmd::Flush(r, RectSpec::Full)),
        Step::GuestWrite(0, (0..=250u8).step_by(5).cycle().take(16 * 8 * 4).collect()),
        // A 6x5 rect at (1, 1), from its natural offset (one row of 64 bytes, one pixel).
        cmd(Cmd::Transfer(
            r,
            RectSpec::Inside(1, 1, 5, 4),
            OffsetSpec::Small(68),
        )),
        cmd(Cmd::Flush(r, RectSpec::Inside(0, 0, 7, 7))),
        cmd(Cmd::UpdateCursor(Scanout(0), r, 4, 4, 0, 0)),
        cmd(Cmd::MoveCursor(Scanout(0), 9, 9)),
        // A framebuffer in a guest blob, shown on the second output.
        cmd(Cmd::CreateBlob {
            id: fb,
            mem: 0,
            flags: 0,
            blob_id: BlobIdSpec::Any(0),
            size: SizeSpec::Pages(3),
            entries: vec![EntrySpec::Covering(8)],
        }),
        cmd(Cmd::SetScanoutBlob {
            scanout: Scanout(1),
            id: fb,
            rect: RectSpec::Full,
            size: (Dim(16), Dim(16)),
            format: 1,
            stride: Ok(0),
            offset: Ok(1),
        }),
        cmd(Cmd::Flush(fb, RectSpec::Full)),
        cmd(Cmd::Unref(fb)),
        Step::MappableBlob(blob, Dim(32), Dim(32)),
        // The VMM acks the map twice; the device must take the duplicate for what it is.
        Step::VmmNext {
            unmap: false,
            duplicate: true,
        },
        cmd(Cmd::MapBlob(blob, Ok(16))),
        Step::VmmNext {
            unmap: true,
            duplicate: true,
        },
        cmd(Cmd::UnmapBlob(blob)),
        cmd(Cmd::MapBlob(blob, Ok(0))),
        // Unref of a mapped blob: unmapped first, then gone.
        cmd(Cmd::Unref(blob)),
        cmd(Cmd::SetScanout(
            Scanout(0),
            Id(0),
            RectSpec::Any(0, 0, 0, 0),
        )),
        cmd(Cmd::Unref(r)),
        Step::Reset,
        cmd(Cmd::GetDisplayInfo),
    ];
    for (i, step) in steps.iter().enumerate() {
        h.step(step);
        h.check(&format!("step {i}: {step:?}"));
    }
    let updates = h.display().map(|d| {
        d.events()
            .all_events()
            .iter()
            .filter(|e| matches!(e, vgpu_tests::DisplayEvent::Update { .. }))
            .count()
    });
    let answers = h.finish();
    let refused: Vec<_> = answers.iter().filter(|(_, t)| *t >= 0x1200).collect();
    assert!(
        refused.is_empty(),
        "refused: {refused:#?}\nall: {answers:#?}"
    );
    // Six commands make the mappable blob; 24 more are single commands.
    assert_eq!(answers.len(), 6 + 24, "{answers:#?}");
    let maps: Vec<_> = answers
        .iter()
        .filter(|(what, _)| what.starts_with("MapBlob"))
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(maps, [0x1106, 0x1106], "MAP_BLOB answers OK_MAP_INFO");
    assert!(updates >= Some(3), "the display saw {updates:?} updates");
}

/// A VMM that acks every request twice, and one that refuses every map: the device must
/// drain the duplicates (no later request may take one for its own answer) and answer a
/// refused map with an error, and neither may hang or confuse the window.
#[test]
fn commands_harness_survives_duplicated_and_refused_vmm_acks() {
    for (acks, map_answer) in [
        (VmmAcks::DuplicateAll, 0x1106),
        (VmmAcks::RefuseMaps, 0x1200),
    ] {
        let setup = Setup {
            display: false,
            display_from_vmm: false,
            edid: false,
            outputs: 0,
            vmm: true,
            vmm_acks: acks,
        };
        let mut h = Harness::new(&setup);
        let blob = Id(2);
        h.step(&Step::MappableBlob(blob, Dim(16), Dim(16)));
        for _ in 0..3 {
            h.step(&cmd(Cmd::MapBlob(blob, Ok(0))));
            h.step(&cmd(Cmd::UnmapBlob(blob)));
        }
        h.step(&cmd(Cmd::MapBlob(blob, Ok(4))));
        h.step(&cmd(Cmd::Unref(blob)));
        let answers = h.finish();
        let maps: Vec<u32> = answers
            .iter()
            .filter(|(what, _)| what.starts_with("MapBlob"))
            .map(|(_, t)| *t)
            .collect();
        assert_eq!(maps, [map_answer; 4], "{acks:?}: {answers:#?}");
        assert!(
            answers
                .iter()
                .filter(|(what, _)| !what.starts_with("MapBlob"))
                .all(|(_, t)| *t < 0x1200),
            "{acks:?}: {answers:#?}"
        );
    }
}

/// Found by the `commands` target (in the harness, not the device): a resource created
/// with sizes near `u32::MAX` made the harness overflow computing the backing that would
/// cover it. The device must refuse such resources and everything that names them.
#[test]
fn commands_harness_names_huge_resources() {
    let setup = Setup {
        display: true,
        display_from_vmm: false,
        edid: true,
        outputs: 2,
        vmm: false,
        vmm_acks: VmmAcks::Normal,
    };
    let mut h = Harness::new(&setup);
    let r = Id(1);
    for step in [
        cmd(Cmd::Create2d(r, 0, Dim(u32::MAX), Dim(u32::MAX))),
        cmd(Cmd::Attach(r, vec![EntrySpec::Covering(0)])),
        cmd(Cmd::Transfer(r, RectSpec::Full, OffsetSpec::Row(255))),
        cmd(Cmd::SetScanout(Scanout(0), r, RectSpec::Full)),
        cmd(Cmd::Create2d(r, 0, Dim(16384), Dim(16384))),
        cmd(Cmd::Attach(r, vec![EntrySpec::Covering(0)])),
    ] {
        h.step(&step);
    }
    let answers = h.finish();
    assert_eq!(answers.len(), 6);
    assert!(answers.iter().all(|(_, t)| *t >= 0x1200), "{answers:#?}");
}

/// Unfenced transfers are quiet renderer requests (replied only if refused); with nothing
/// else sent, every 257th asks for a reply, which settles those before it: the frontend's
/// list of unsettled ones stays bounded however long the guest keeps transferring.
#[test]
fn quiet_renderer_requests_stay_bounded() {
    let setup = Setup {
        display: false,
        display_from_vmm: false,
        edid: false,
        outputs: 1,
        vmm: false,
        vmm_acks: VmmAcks::Normal,
    };
    let mut h = Harness::new(&setup);
    let r = Id(1);
    h.step(&Step::unfenced(Cmd::Create2d(r, 1, Dim(16), Dim(8))));
    h.step(&Step::unfenced(Cmd::Attach(
        r,
        vec![EntrySpec::Covering(0)],
    )));
    let mut most = 0;
    for i in 0..1000 {
        h.step(&Step::unfenced(Cmd::Transfer(
            r,
            RectSpec::Full,
            OffsetSpec::Zero,
        )));
        h.check(&format!("transfer {i}"));
        most = most.max(h.control().quiet_in_flight());
    }
    assert!(
        (1..=256).contains(&most),
        "{most} quiet requests unsettled at most (expected 1 to 256)"
    );
    let answers = h.finish();
    assert!(answers.iter().all(|(_, t)| *t == 0x1100), "{answers:?}");
}
