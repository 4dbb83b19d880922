//! The blob mapping state machine: one blob's way into and out of the guest's host-visible
//! window, every transition in the one `match` of [`step`].
//!
//! Source: QEMU's "virtio-gpu: Replace finish_unmapping with mapping_state" (see
//! shared/reference/qemu-virtio-gpu-mapping-state.patch). There the unmap is asynchronous
//! and a bool could not tell "unmap started" from "unmap done", so re-entering the unmap
//! (reset, unref) started it twice: a second queue block never undone, and a double free.
//! Here the asynchrony is real message passing and completion is an explicit
//! acknowledgment from both peers:
//!
//! ```text
//!  Unmapped --Map--> MapPending --renderer MapReady + VMM map ack--> Mapped
//!  Mapped --Unmap (UNMAP_BLOB | UNREF | reset)--> UnmapStarted     (command suspended)
//!  UnmapStarted --VMM unmap ack + renderer UnmapAck--> UnmapCompleted
//!  UnmapCompleted --FinalizeAck--> Unmapped                          (suspended answered)
//!  Re-entry in UnmapStarted/UnmapCompleted only re-suspends; nothing is unmapped twice.
//! ```
//!
//! `step` is pure: the frontend executes the [`Action`]s it returns (messages to the
//! renderer and the VMM, answers to the guest), which keeps the machine testable against
//! a reference model with arbitrary interleavings of late, duplicated and missing acks.

pub mod model;

/// Where a blob is in the host-visible window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapState {
    /// Not in the window.
    Unmapped,
    /// RESOURCE_MAP_BLOB accepted for `offset`: the renderer is exporting the blob, then
    /// the VMM maps it. `unmap_requested` records an unmap (unref, reset) that arrived
    /// meanwhile and runs as soon as the map has settled.
    MapPending {
        /// Window offset asked for.
        offset: u64,
        /// The renderer's export, once it arrived (the VMM has been asked to map).
        exported: Option<Export>,
        /// An unmap is waiting for the map to settle.
        unmap_requested: bool,
        /// The renderer that is exporting it is still there.
        renderer_alive: bool,
    },
    /// In the window.
    Mapped {
        /// Window offset.
        offset: u64,
        /// What the renderer exported.
        export: Export,
        /// The renderer that exported it is still there (its pages outlive it: the VMM
        /// holds the fd's mapping).
        renderer_alive: bool,
    },
    /// Being taken out: waiting for both peers' acknowledgments. The window range stays
    /// reserved until [`MapState::Unmapped`].
    UnmapStarted {
        /// Window offset.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// The VMM acknowledged its SHMEM_UNMAP (or never mapped).
        vmm_done: bool,
        /// The renderer acknowledged `Unmap` (or died).
        renderer_done: bool,
        /// The renderer that exported the blob is still there to be told `Finalize`.
        renderer_alive: bool,
    },
    /// Both acknowledged; the renderer is releasing its mapping (`Finalize`).
    UnmapCompleted {
        /// Window offset.
        offset: u64,
        /// Length of the range.
        len: u64,
    },
}

/// What the renderer exported for a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Export {
    /// Bytes mapped.
    pub len: u64,
    /// VIRTIO_GPU_MAP_CACHE_* for the guest.
    pub map_info: u32,
}

/// Something that happened to a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// RESOURCE_MAP_BLOB at `offset` (already checked against the window).
    MapRequested {
        /// Window offset.
        offset: u64,
    },
    /// The renderer exported the blob.
    RendererMapReady(Export),
    /// The renderer could not export it.
    RendererMapFailed,
    /// The VMM acknowledged SHMEM_MAP.
    VmmMapAck,
    /// The VMM refused SHMEM_MAP (or the request could not be sent).
    VmmMapFailed,
    /// RESOURCE_UNMAP_BLOB, RESOURCE_UNREF of the blob, or a device reset.
    UnmapRequested,
    /// The VMM acknowledged SHMEM_UNMAP.
    VmmUnmapAck,
    /// The renderer acknowledged `Unmap`.
    RendererUnmapAck,
    /// The renderer acknowledged `Finalize`.
    FinalizeAck,
    /// The renderer is gone: every acknowledgment it owed is moot.
    RendererGone,
}

/// What the frontend must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send `Map` to the renderer.
    RendererMap,
    /// Send SHMEM_MAP to the VMM with the exported fd.
    VmmMap {
        /// Window offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Answer the MAP_BLOB command: Ok(map_info) or an error.
    AnswerMap(Result<u32, MapError>),
    /// Send SHMEM_UNMAP to the VMM.
    VmmUnmap {
        /// Window offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Send `Unmap` to the renderer.
    RendererUnmap,
    /// Send `Finalize` to the renderer.
    RendererFinalize,
    /// The command that caused this event waits for the unmap to complete (and the
    /// control queue takes nothing new meanwhile).
    Suspend,
    /// The unmap is complete: answer every command suspended on this blob, release its
    /// window range, and let the queue go on.
    UnmapDone,
    /// An unmap request for a blob that was not mapped: answer at once (no-op).
    NothingToUnmap,
    /// The event does not apply in this state (late, duplicate or unknown ack): log it
    /// and change nothing.
    Ignored(&'static str),
}

/// Why a map did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// The blob is already mapped or on its way in or out.
    Busy,
    /// The renderer could not export it.
    ExportFailed,
    /// The VMM refused to map it.
    VmmRefused,
    /// An unmap (unref, reset) overtook the map.
    Cancelled,
}

impl MapState {
    /// The window range the blob occupies (reserved from map request to final unmap).
    pub fn range(&self) -> Option<(u64, u64)> {
        match *self {
            MapState::Unmapped => None,
            MapState::MapPending {
                offset, exported, ..
            } => Some((offset, exported.map_or(0, |e| e.len))),
            MapState::Mapped { offset, export, .. } => Some((offset, export.len)),
            MapState::UnmapStarted { offset, len, .. }
            | MapState::UnmapCompleted { offset, len } => Some((offset, len)),
        }
    }

    /// Whether an unmap is in flight (commands are suspended on it).
    pub fn unmap_in_flight(&self) -> bool {
        matches!(
            self,
            MapState::UnmapStarted { .. } | MapState::UnmapCompleted { .. }
        )
    }
}

/// One transition: the new state and what to do.
pub fn step(state: MapState, event: Event) -> (MapState, Vec<Action>) {
    use Action as A;
    use Event as E;
    use MapState as S;

    // Where an unmap goes once `vmm_done` and `renderer_done` say what is still owed.
    let unmapping = |offset, len, vmm_done: bool, renderer_done: bool, renderer_alive| match (
        vmm_done && renderer_done,
        renderer_alive,
    ) {
        (true, true) => (S::UnmapCompleted { offset, len }, vec![A::RendererFinalize]),
        (true, false) => (S::Unmapped, vec![A::UnmapDone]),
        (false, _) => (
            S::UnmapStarted {
                offset,
                len,
                vmm_done,
                renderer_done,
                renderer_alive,
            },
            vec![],
        ),
    };
    // Starting an unmap: ask whoever holds the blob, then wait for what is owed.
    let start_unmap = |offset, len, vmm_mapped: bool, renderer_alive: bool| {
        let mut actions = Vec::new();
        if vmm_mapped {
            actions.push(A::VmmUnmap { offset, len });
        }
        if renderer_alive {
            actions.push(A::RendererUnmap);
        }
        let (s, more) = unmapping(offset, len, !vmm_mapped, !renderer_alive, renderer_alive);
        actions.extend(more);
        (s, actions)
    };

    match (state, event) {
        // ---- mapping
        (S::Unmapped, E::MapRequested { offset }) => (
            S::MapPending {
                offset,
                exported: None,
                unmap_requested: false,
                renderer_alive: true,
            },
            vec![A::RendererMap],
        ),
        (s, E::MapRequested { .. }) => (s, vec![A::AnswerMap(Err(MapError::Busy))]),

        (
            S::MapPending {
                offset,
                exported: None,
                unmap_requested: false,
                renderer_alive: true,
            },
            E::RendererMapReady(export),
        ) => (
            S::MapPending {
                offset,
                exported: Some(export),
                unmap_requested: false,
                renderer_alive: true,
            },
            vec![A::VmmMap {
                offset,
                len: export.len,
            }],
        ),
        // Cancelled before the VMM was asked: only the renderer has something to undo.
        (
            S::MapPending {
                offset,
                exported: None,
                unmap_requested: true,
                renderer_alive: true,
            },
            E::RendererMapReady(export),
        ) => {
            let (s, mut actions) = start_unmap(offset, export.len, false, true);
            actions.insert(0, A::AnswerMap(Err(MapError::Cancelled)));
            (s, actions)
        }
        (
            S::MapPending {
                exported: None,
                unmap_requested,
                renderer_alive: true,
                ..
            },
            E::RendererMapFailed,
        )
        | (
            S::MapPending {
                exported: None,
                unmap_requested,
                ..
            },
            E::RendererGone,
        ) => {
            let mut actions = vec![A::AnswerMap(Err(MapError::ExportFailed))];
            if unmap_requested {
                actions.push(A::UnmapDone);
            }
            (S::Unmapped, actions)
        }
        (
            S::MapPending {
                offset,
                exported: Some(export),
                unmap_requested,
                renderer_alive,
            },
            E::VmmMapAck,
        ) => {
            if unmap_requested || !renderer_alive {
                // Mapped, but it must come out again at once (an unmap overtook the map,
                // or its renderer died): the map is answered, then undone.
                let answer = if renderer_alive {
                    A::AnswerMap(Ok(export.map_info))
                } else {
                    A::AnswerMap(Err(MapError::ExportFailed))
                };
                let (s, mut actions) = start_unmap(offset, export.len, true, renderer_alive);
                actions.insert(0, answer);
                if !unmap_requested {
                    // Nobody is suspended on this unmap: the guest never sees it.
                    actions.retain(|a| *a != A::UnmapDone);
                }
                (s, actions)
            } else {
                (
                    S::Mapped {
                        offset,
                        export,
                        renderer_alive: true,
                    },
                    vec![A::AnswerMap(Ok(export.map_info))],
                )
            }
        }
        // The VMM did not map: the renderer's export is released through the usual
        // unmap path (nothing for the VMM to undo).
        (
            S::MapPending {
                offset,
                exported: Some(export),
                unmap_requested,
                renderer_alive,
            },
            E::VmmMapFailed,
        ) => {
            let error = if unmap_requested {
                MapError::Cancelled
            } else {
                MapError::VmmRefused
            };
            let (s, mut actions) = start_unmap(offset, export.len, false, renderer_alive);
            actions.insert(0, A::AnswerMap(Err(error)));
            if !unmap_requested {
                actions.retain(|a| *a != A::UnmapDone);
            }
            (s, actions)
        }

        // ---- unmapping
        (S::Unmapped, E::UnmapRequested) => (S::Unmapped, vec![A::NothingToUnmap]),
        (
            S::MapPending {
                offset,
                exported,
                renderer_alive,
                ..
            },
            E::UnmapRequested,
        ) => (
            S::MapPending {
                offset,
                exported,
                unmap_requested: true,
                renderer_alive,
            },
            vec![A::Suspend],
        ),
        (
            S::Mapped {
                offset,
                export,
                renderer_alive,
            },
            E::UnmapRequested,
        ) => {
            let (s, mut actions) = start_unmap(offset, export.len, true, renderer_alive);
            actions.insert(0, A::Suspend);
            (s, actions)
        }
        // Re-entry (the bug class of the QEMU patch): only suspend, start nothing again.
        (s @ (S::UnmapStarted { .. } | S::UnmapCompleted { .. }), E::UnmapRequested) => {
            (s, vec![A::Suspend])
        }
        (
            S::UnmapStarted {
                offset,
                len,
                vmm_done: false,
                renderer_done,
                renderer_alive,
            },
            E::VmmUnmapAck,
        ) => unmapping(offset, len, true, renderer_done, renderer_alive),
        (
            S::UnmapStarted {
                offset,
                len,
                vmm_done,
                renderer_done: false,
                renderer_alive: true,
            },
            E::RendererUnmapAck,
        ) => unmapping(offset, len, vmm_done, true, true),
        (S::UnmapCompleted { .. }, E::FinalizeAck) => (S::Unmapped, vec![A::UnmapDone]),

        // ---- the renderer died: nothing it owed will come
        (
            S::MapPending {
                offset,
                exported: exported @ Some(_),
                unmap_requested,
                ..
            },
            E::RendererGone,
        ) => (
            S::MapPending {
                offset,
                exported,
                unmap_requested,
                renderer_alive: false,
            },
            vec![],
        ),
        (S::Mapped { offset, export, .. }, E::RendererGone) => (
            S::Mapped {
                offset,
                export,
                renderer_alive: false,
            },
            vec![],
        ),
        (
            S::UnmapStarted {
                offset,
                len,
                vmm_done,
                ..
            },
            E::RendererGone,
        ) => unmapping(offset, len, vmm_done, true, false),
        (S::UnmapCompleted { .. }, E::RendererGone) => (S::Unmapped, vec![A::UnmapDone]),
        (S::Unmapped, E::RendererGone) => (S::Unmapped, vec![]),

        // ---- everything else is late, duplicated or unknown
        (s, e) => (s, vec![A::Ignored(ignored_reason(e))]),
    }
}

fn ignored_reason(e: Event) -> &'static str {
    match e {
        Event::RendererMapReady(_) => "renderer MapReady without a map in flight",
        Event::RendererMapFailed => "renderer map failure without a map in flight",
        Event::VmmMapAck => "VMM map ack without a map in flight",
        Event::VmmMapFailed => "VMM map failure without a map in flight",
        Event::VmmUnmapAck => "VMM unmap ack without an unmap in flight (late or duplicate)",
        Event::RendererUnmapAck => {
            "renderer UnmapAck without an unmap in flight (late or duplicate)"
        }
        Event::FinalizeAck => "renderer FinalizeAck without a finalize in flight",
        Event::MapRequested { .. } | Event::UnmapRequested | Event::RendererGone => {
            "event does not apply"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPORT: Export = Export {
        len: 4096,
        map_info: 1,
    };

    fn run(events: &[Event]) -> (MapState, Vec<Action>) {
        let mut state = MapState::Unmapped;
        let mut all = Vec::new();
        for e in events {
            let (s, a) = step(state, *e);
            state = s;
            all.extend(a);
        }
        (state, all)
    }

    fn mapped() -> Vec<Event> {
        vec![
            Event::MapRequested { offset: 0x1000 },
            Event::RendererMapReady(EXPORT),
            Event::VmmMapAck,
        ]
    }

    #[test]
    fn map_then_unmap_round_trip() {
        let mut ev = mapped();
        let (s, a) = run(&ev);
        assert_eq!(
            s,
            MapState::Mapped {
                offset: 0x1000,
                export: EXPORT,
                renderer_alive: true,
            }
        );
        assert_eq!(
            a,
            vec![
                Action::RendererMap,
                Action::VmmMap {
                    offset: 0x1000,
                    len: 4096
                },
                Action::AnswerMap(Ok(1))
            ]
        );
        ev.extend([
            Event::UnmapRequested,
            Event::VmmUnmapAck,
            Event::RendererUnmapAck,
            Event::FinalizeAck,
        ]);
        let (s, a) = run(&ev);
        assert_eq!(s, MapState::Unmapped);
        assert_eq!(
            a.iter()
                .filter(|a| matches!(a, Action::VmmUnmap { .. }))
                .count(),
            1
        );
        assert_eq!(a.last(), Some(&Action::UnmapDone));
    }

    #[test]
    fn reentered_unmap_starts_nothing_twice() {
        let mut ev = mapped();
        ev.extend([
            Event::UnmapRequested,
            Event::UnmapRequested,
            Event::UnmapRequested,
        ]);
        let (s, a) = run(&ev);
        assert!(s.unmap_in_flight());
        assert_eq!(
            a.iter()
                .filter(|a| matches!(a, Action::VmmUnmap { .. }))
                .count(),
            1
        );
        assert_eq!(a.iter().filter(|a| **a == Action::RendererUnmap).count(), 1);
        assert_eq!(a.iter().filter(|a| **a == Action::Suspend).count(), 3);
        // Acks in the other order, then a duplicate: still one finalize, one completion.
        ev.extend([
            Event::RendererUnmapAck,
            Event::VmmUnmapAck,
            Event::VmmUnmapAck,
            Event::FinalizeAck,
            Event::FinalizeAck,
        ]);
        let (s, a) = run(&ev);
        assert_eq!(s, MapState::Unmapped);
        assert_eq!(
            a.iter().filter(|a| **a == Action::RendererFinalize).count(),
            1
        );
        assert_eq!(a.iter().filter(|a| **a == Action::UnmapDone).count(), 1);
        assert_eq!(
            a.iter().filter(|a| matches!(a, Action::Ignored(_))).count(),
            2
        );
    }

    #[test]
    fn unmap_waits_for_both_acks() {
        let mut ev = mapped();
        ev.extend([Event::UnmapRequested, Event::VmmUnmapAck]);
        let (s, _) = run(&ev);
        assert!(matches!(
            s,
            MapState::UnmapStarted {
                vmm_done: true,
                renderer_done: false,
                ..
            }
        ));
    }

    #[test]
    fn unmap_during_map_runs_after_it_settles() {
        let (s, a) = run(&[
            Event::MapRequested { offset: 0 },
            Event::UnmapRequested,
            Event::RendererMapReady(EXPORT),
        ]);
        assert!(matches!(s, MapState::UnmapStarted { vmm_done: true, .. }));
        assert!(a.contains(&Action::AnswerMap(Err(MapError::Cancelled))));
        assert!(!a.iter().any(|a| matches!(a, Action::VmmMap { .. })));
        let (s, a) = run(&[
            Event::MapRequested { offset: 0 },
            Event::RendererMapReady(EXPORT),
            Event::UnmapRequested,
            Event::VmmMapAck,
        ]);
        assert!(matches!(
            s,
            MapState::UnmapStarted {
                vmm_done: false,
                ..
            }
        ));
        assert!(a.contains(&Action::VmmUnmap {
            offset: 0,
            len: 4096
        }));
    }

    #[test]
    fn failures_release_and_answer() {
        let (s, a) = run(&[Event::MapRequested { offset: 0 }, Event::RendererMapFailed]);
        assert_eq!(s, MapState::Unmapped);
        assert_eq!(
            a.last(),
            Some(&Action::AnswerMap(Err(MapError::ExportFailed)))
        );
        let (s, a) = run(&[
            Event::MapRequested { offset: 0 },
            Event::RendererMapReady(EXPORT),
            Event::VmmMapFailed,
            Event::RendererUnmapAck,
            Event::FinalizeAck,
        ]);
        assert_eq!(s, MapState::Unmapped);
        assert!(a.contains(&Action::AnswerMap(Err(MapError::VmmRefused))));
        assert!(!a.iter().any(|a| matches!(a, Action::VmmUnmap { .. })));
    }

    #[test]
    fn renderer_death_completes_what_it_owed() {
        let mut ev = mapped();
        ev.extend([
            Event::UnmapRequested,
            Event::VmmUnmapAck,
            Event::RendererGone,
        ]);
        let (s, a) = run(&ev);
        assert_eq!(s, MapState::Unmapped);
        assert_eq!(a.last(), Some(&Action::UnmapDone));
        // The VMM's ack is still needed when it has not come.
        let mut ev = mapped();
        ev.extend([Event::UnmapRequested, Event::RendererGone]);
        let (s, _) = run(&ev);
        assert!(s.unmap_in_flight());
        let (s, a) = run(&[ev.as_slice(), &[Event::VmmUnmapAck]].concat());
        assert_eq!(s, MapState::Unmapped, "no Finalize to a dead renderer");
        assert_eq!(a.last(), Some(&Action::UnmapDone));
        assert!(!a.contains(&Action::RendererFinalize));
    }

    #[test]
    fn busy_blob_refuses_a_second_map() {
        let mut ev = mapped();
        ev.push(Event::MapRequested { offset: 0x8000 });
        let (_, a) = run(&ev);
        assert_eq!(a.last(), Some(&Action::AnswerMap(Err(MapError::Busy))));
    }

    /// Random interleavings through the reference model in [`super::model`].
    mod model {
        use super::super::model::{check, Input};
        use proptest::prelude::*;

        fn input() -> impl Strategy<Value = Input> {
            prop_oneof![
                2 => Just(Input::Map),
                2 => Just(Input::Unmap),
                6 => Just(Input::Deliver),
                2 => (0u8..7).prop_map(Input::Stray),
                1 => Just(Input::RendererGone),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
            #[test]
            fn random_interleavings_keep_the_rules(inputs in proptest::collection::vec(input(), 0..60)) {
                check(&inputs);
            }
        }
    }
}
