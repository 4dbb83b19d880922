//! The `blob_map` target: event sequences through the blob mapping state machine.
//!
//! Two parts per input:
//! - the scenario the proptest in `device_frontend::blob_map` plays, through the same
//!   reference model ([`device_frontend::blob_map::model::check`]): requests, owed acks
//!   delivered in order, stray (late, duplicate, unknown) acks, renderer death, then every
//!   owed ack; nothing may be unmapped twice, finalized early, or left suspended;
//! - a raw sequence of arbitrary events (any offset, any export, any order) straight into
//!   [`step`], checked against rules that hold whatever the peers send.

use arbitrary::Arbitrary;
use device_frontend::blob_map::model::{self, Input};
use device_frontend::blob_map::{step, Action, Event, Export, MapError, MapState};

/// A step of the model scenario.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum ModelStep {
    /// RESOURCE_MAP_BLOB.
    Map,
    /// RESOURCE_UNMAP_BLOB, UNREF or reset.
    Unmap,
    /// The oldest owed ack.
    Deliver,
    /// Any ack, owed or not.
    Stray(u8),
    /// The renderer dies.
    RendererGone,
}

/// An event of the raw sequence.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum RawEvent {
    /// MAP_BLOB at this window offset.
    MapRequested(u64),
    /// The renderer exported `len` bytes with `map_info`.
    RendererMapReady(u64, u32),
    /// The renderer could not export.
    RendererMapFailed,
    /// The VMM mapped.
    VmmMapAck,
    /// The VMM refused to map.
    VmmMapFailed,
    /// UNMAP_BLOB, UNREF, reset.
    UnmapRequested,
    /// The VMM unmapped.
    VmmUnmapAck,
    /// The renderer unmapped.
    RendererUnmapAck,
    /// The renderer finalized.
    FinalizeAck,
    /// The renderer died.
    RendererGone,
}

impl RawEvent {
    fn event(self) -> Event {
        match self {
            RawEvent::MapRequested(offset) => Event::MapRequested { offset },
            RawEvent::RendererMapReady(len, map_info) => {
                Event::RendererMapReady(Export { len, map_info })
            }
            RawEvent::RendererMapFailed => Event::RendererMapFailed,
            RawEvent::VmmMapAck => Event::VmmMapAck,
            RawEvent::VmmMapFailed => Event::VmmMapFailed,
            RawEvent::UnmapRequested => Event::UnmapRequested,
            RawEvent::VmmUnmapAck => Event::VmmUnmapAck,
            RawEvent::RendererUnmapAck => Event::RendererUnmapAck,
            RawEvent::FinalizeAck => Event::FinalizeAck,
            RawEvent::RendererGone => Event::RendererGone,
        }
    }
}

/// One input of the target.
#[derive(Arbitrary, Debug)]
pub struct BlobMapInput {
    /// Through the reference model.
    pub model: Vec<ModelStep>,
    /// Straight into `step`.
    pub raw: Vec<RawEvent>,
}

/// Runs one input; panics on a broken rule.
pub fn run(input: &BlobMapInput) {
    let steps: Vec<Input> = input
        .model
        .iter()
        .map(|s| match *s {
            ModelStep::Map => Input::Map,
            ModelStep::Unmap => Input::Unmap,
            ModelStep::Deliver => Input::Deliver,
            ModelStep::Stray(n) => Input::Stray(n),
            ModelStep::RendererGone => Input::RendererGone,
        })
        .collect();
    model::check(&steps);
    check_raw(&input.raw);
}

/// What the raw checker remembers about the mapping in progress.
#[derive(Debug, Default)]
struct Obligations {
    /// Offset of the map that was accepted (RendererMap sent) and not yet over.
    offset: Option<u64>,
    /// The accepted map has not been answered yet.
    awaiting_answer: bool,
    /// The range the VMM was asked to map and has not been asked to unmap.
    vmm_asked: Option<(u64, u64)>,
    /// The renderer died while this mapping was alive: it may not be asked for anything.
    renderer_dead: bool,
}

/// Plays arbitrary events through `step`, checking rules that no peer behaviour can
/// excuse breaking.
pub fn check_raw(events: &[RawEvent]) {
    let mut state = MapState::Unmapped;
    let mut o = Obligations::default();
    for (i, raw) in events.iter().enumerate() {
        let event = raw.event();
        let (next, actions) = step(state, event);
        let ctx = || format!("event {i} {event:?} in {state:?} -> {next:?}, {actions:?}");
        let ignored = actions.iter().any(|a| matches!(a, Action::Ignored(_)));
        if ignored {
            assert_eq!(actions.len(), 1, "an ignored event does nothing: {}", ctx());
            assert_eq!(next, state, "an ignored event changes nothing: {}", ctx());
        }
        if matches!(event, Event::VmmMapFailed) && !ignored {
            // The VMM did not map: nothing of it is left to unmap.
            o.vmm_asked = None;
        }
        for a in &actions {
            match *a {
                Action::RendererMap => {
                    let Event::MapRequested { offset } = event else {
                        panic!("RendererMap without a map request: {}", ctx());
                    };
                    assert_eq!(state, MapState::Unmapped, "{}", ctx());
                    assert!(!o.awaiting_answer, "previous map unanswered: {}", ctx());
                    assert!(o.vmm_asked.is_none(), "VMM still holds a range: {}", ctx());
                    o = Obligations {
                        offset: Some(offset),
                        awaiting_answer: true,
                        ..Obligations::default()
                    };
                }
                Action::VmmMap { offset, len } => {
                    let Event::RendererMapReady(export) = event else {
                        panic!("VmmMap not caused by an export: {}", ctx());
                    };
                    assert_eq!(Some(offset), o.offset, "VmmMap offset: {}", ctx());
                    assert_eq!(len, export.len, "VmmMap length: {}", ctx());
                    assert!(o.vmm_asked.is_none(), "VMM asked to map twice: {}", ctx());
                    o.vmm_asked = Some((offset, len));
                }
                Action::AnswerMap(Err(MapError::Busy)) => {
                    assert!(
                        matches!(event, Event::MapRequested { .. }),
                        "Busy answers a map request: {}",
                        ctx()
                    );
                    assert_ne!(state, MapState::Unmapped, "{}", ctx());
                }
                Action::AnswerMap(_) => {
                    assert!(o.awaiting_answer, "map answered twice: {}", ctx());
                    o.awaiting_answer = false;
                }
                Action::VmmUnmap { offset, len } => {
                    assert_eq!(
                        o.vmm_asked.take(),
                        Some((offset, len)),
                        "VMM asked to unmap what it was not asked to map, or twice: {}",
                        ctx()
                    );
                }
                Action::RendererUnmap | Action::RendererFinalize => {
                    assert!(!o.renderer_dead, "a dead renderer asked: {}", ctx());
                }
                Action::Suspend => {
                    assert!(matches!(event, Event::UnmapRequested), "{}", ctx());
                }
                Action::UnmapDone | Action::NothingToUnmap => {
                    assert!(
                        matches!(next, MapState::Unmapped),
                        "done but not unmapped: {}",
                        ctx()
                    );
                }
                Action::Ignored(_) => {}
            }
        }
        if actions.contains(&Action::RendererFinalize) {
            assert!(
                matches!(next, MapState::UnmapCompleted { .. }),
                "Finalize sent outside UnmapCompleted: {}",
                ctx()
            );
        }
        if matches!(event, Event::RendererGone) && state != MapState::Unmapped {
            o.renderer_dead = true;
        }
        match next {
            MapState::Unmapped => {
                assert!(
                    !o.awaiting_answer,
                    "unmapped with the map unanswered: {}",
                    ctx()
                );
                assert!(
                    o.vmm_asked.is_none(),
                    "unmapped, VMM still mapped: {}",
                    ctx()
                );
                o = Obligations::default();
            }
            MapState::Mapped { offset, export, .. } => {
                assert_eq!(Some(offset), o.offset, "{}", ctx());
                assert_eq!(o.vmm_asked, Some((offset, export.len)), "{}", ctx());
                assert!(!o.awaiting_answer, "mapped but unanswered: {}", ctx());
            }
            other => {
                let (offset, _) = other.range().expect("a busy state has a range");
                assert_eq!(Some(offset), o.offset, "range offset: {}", ctx());
            }
        }
        assert_eq!(
            next.unmap_in_flight(),
            matches!(
                next,
                MapState::UnmapStarted { .. } | MapState::UnmapCompleted { .. }
            )
        );
        state = next;
    }
}
