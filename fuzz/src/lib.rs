//! The harnesses of vgpu-sandbox's fuzz targets, kept apart from libFuzzer so that the
//! main workspace's tests can replay the committed inputs through exactly the code the
//! fuzzer runs (on stable, without sanitizers).
//!
//! - [`decode`]: bytes through the command decoder.
//! - [`blob_map`]: event sequences through the blob mapping state machine.
//! - [`commands`]: command sequences through the frontend's control actor and the
//!   renderer's executor with the real rutabaga 2D renderer, in one process.

pub mod blob_map;
pub mod commands;
pub mod decode;

use arbitrary::{Arbitrary, Unstructured};

/// The target names, as `cargo fuzz` knows them.
pub const TARGETS: [&str; 3] = ["decode", "blob_map", "commands"];

/// Runs `data` as an input of `target` the way its fuzz target does; panics when the
/// input breaks a rule.
pub fn run(target: &str, data: &[u8]) {
    match target {
        "decode" => decode::run(data),
        "blob_map" => {
            if let Ok(input) = blob_map::BlobMapInput::arbitrary_take_rest(Unstructured::new(data))
            {
                blob_map::run(&input);
            }
        }
        "commands" => {
            if let Ok(input) = commands::CommandsInput::arbitrary_take_rest(Unstructured::new(data))
            {
                commands::run(&input);
            }
        }
        other => panic!("no fuzz target {other}"),
    }
}
