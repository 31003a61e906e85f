//! Fuzzing the control-message decoder: what arrives on a control stream (and the header
//! frame of a data stream) goes through the agents' own entry points, [`read_frame`],
//! [`ControlChannel`] and [`transfer::read_header`]: arbitrary bytes, mutations of the seed
//! corpus (`common/fuzz/corpus/control/`) and of generated messages, with their length
//! prefixes rewritten.
//!
//! Every input must decode without panicking; a frame must be read exactly (its prefix and
//! body, never a byte beyond), refused as too large right after its prefix, or be torn at the
//! end of the input; the buffer must grow with the bytes that arrive, not with what the prefix
//! claims; and every message decoded must encode to bytes that decode to the same message.
//!
//! `MIGRATE_FUZZ_SECS` sets how long each target runs (see `common/fuzz/README.md`).

#![allow(clippy::unwrap_used)]

#[macro_use]
#[path = "../fuzz_support/mod.rs"]
mod fuzz_support;

mod checks;
mod seeds;
mod strategies;

use std::io::Cursor;
use std::pin::Pin;
use std::task::{Context, Poll};

use migrate_common::protocol::*;
use migrate_common::transfer;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use tokio::io::{AsyncRead, ReadBuf};

use fuzz_support::{peak_of, Bytes, Mutation};

/// What a frame's buffer starts at in `read_frame`; it grows with what arrives.
pub(crate) const FIRST_READ: usize = 64 << 10;

/// Bytes a decoded message may take per byte of its frame: prost gives each element of a
/// repeated field its own struct (two bytes on the wire, an empty `FileDigest`, become a
/// 72-byte struct, 36 times as many), and a `Vec` may hold up to twice the room its elements
/// take. So a 4 MiB frame can cost up to about 300 MiB decoded (140 MiB measured); a new
/// repeated field of a larger struct would show here first.
pub(crate) const DECODE_AMPLIFICATION: usize = 80;

// --- The seed corpus -------------------------------------------------------------------

use checks::*;
use seeds::*;
use strategies::*;

#[test]
fn fuzz_control_frames() {
    let seeds: Vec<Vec<u8>> = fuzz_support::corpus("control")
        .into_iter()
        .map(|(_, bytes)| bytes)
        .collect();
    let rt = runtime();
    fuzz_support::fuzz("control-frames", control_input(), |input| {
        let bytes = input.build(&seeds);
        check(&rt, &bytes).inspect_err(|_| {
            fuzz_support::keep_failure("control", &bytes);
        })
    });
}

/// Every message, whatever its fields hold, arrives as it was sent, through the same frames
/// and the same channel.
#[test]
fn fuzz_messages_round_trip() {
    let rt = runtime();
    fuzz_support::fuzz("control-round-trip", vec(message(), 1..6), |messages| {
        let mut wire = Vec::new();
        for msg in &messages {
            rt.block_on(write_frame(&mut wire, msg)).unwrap();
        }
        let (got, end) = frames(&rt, &wire)?;
        ensure!(end == End::Clean, "the frames ended {end:?}");
        ensure!(got == messages, "the messages changed on the way");
        channel(&rt, &wire, &messages, &End::Clean)
    });
}

/// A prefix that claims more than the limit is refused before anything is buffered, and
/// one that claims up to the limit but is followed by little holds little: the regression
/// kept as `regression-length-prefix-allocates.bin`.
#[test]
fn prefixes_claiming_much_hold_little() {
    let rt = runtime();
    for claimed in [
        MAX_FRAME_LEN as u32,
        MAX_FRAME_LEN as u32 + 1,
        u32::MAX,
        1 << 24,
    ] {
        let mut wire = claimed.to_be_bytes().to_vec();
        wire.extend_from_slice(&[0x52, 0x00]);
        let mut input = wire.as_slice();
        let (result, peak) = peak_of(|| rt.block_on(read_frame::<_, ControlMessage>(&mut input)));
        assert!(result.is_err());
        assert!(
            peak <= FIRST_READ + 4096,
            "a prefix of {claimed} held {peak} bytes"
        );
    }
}

/// A frame as large as the limit that costs the most to decode: `LayersSent` holding nothing
/// but empty `FileDigest`s, two bytes each.
fn costly_frame(len: usize) -> Vec<u8> {
    let mut files = Vec::new();
    while files.len() + 2 <= len - 8 {
        files.extend_from_slice(&[0x0a, 0x00]);
    }
    let mut body = vec![0x1a];
    let mut n = files.len() as u64;
    while n >= 0x80 {
        body.push(n as u8 | 0x80);
        n >>= 7;
    }
    body.push(n as u8);
    body.extend(files);
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// A peer that sends costly frames faster than they are taken: the control channel reads
/// ahead one frame, not a queue of them (with sixteen, twenty 4 MiB frames held 2.3 GiB).
#[test]
fn a_control_channel_reads_ahead_one_frame() {
    let rt = runtime();
    let frame = costly_frame(1 << 20);
    let (_, one) = peak_of(|| {
        rt.block_on(read_frame::<_, ControlMessage>(&mut frame.as_slice()))
            .unwrap()
            .unwrap()
            .kind()
    });
    let wire: Vec<u8> = (0..12).flat_map(|_| frame.clone()).collect();
    let (_, peak) = peak_of(|| {
        rt.block_on(async {
            let mut channel = ControlChannel::new(Cursor::new(wire), tokio::io::sink());
            // Let the reader run ahead as far as it will.
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
            let msg = channel.recv().await.unwrap();
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
            msg.kind()
        })
    });
    assert!(
        peak <= 4 * one,
        "the channel held {peak} bytes for frames that cost {one} bytes each"
    );
}
