//! What must hold for any input: frames read exactly, buffers grown only with what arrives, bounded decode cost, round trips, the channel agreeing with `read_frame`.

#![allow(clippy::unwrap_used)]

use super::*;

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    // One thread: the control channel's reader task runs here too, and allocations are
    // counted per thread.
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// The input as a stream, counting what is taken from it and the largest read asked for.
pub(crate) struct Metered<'a> {
    pub(crate) data: &'a [u8],
    pub(crate) taken: usize,
    pub(crate) largest_read: usize,
}

impl AsyncRead for Metered<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        this.largest_read = this.largest_read.max(buf.remaining());
        let n = buf.remaining().min(this.data.len() - this.taken);
        buf.put_slice(&this.data[this.taken..this.taken + n]);
        this.taken += n;
        Poll::Ready(Ok(()))
    }
}

/// A message with no fields: decoding it skips every field, so that reading a frame as one
/// costs only the frame's buffer.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Skip {}

/// How one frame ended, to compare what the control channel made of the same bytes.
#[derive(Debug, PartialEq)]
pub(crate) enum End {
    Clean,
    TooLarge,
    Torn,
    Decode,
}

pub(crate) fn end_of(err: &FrameError) -> End {
    match err {
        FrameError::TooLarge { .. } => End::TooLarge,
        FrameError::Torn { .. } => End::Torn,
        FrameError::Decode(_) => End::Decode,
        FrameError::Io(_) => unreachable!("reading a slice does not fail"),
    }
}

/// Reads every frame of `input` as the agents do, checking each, then the same bytes through
/// a control channel and as a data stream's header.
pub(crate) fn check(rt: &tokio::runtime::Runtime, input: &[u8]) -> Result<(), TestCaseError> {
    let (messages, end) = frames(rt, input)?;
    channel(rt, input, &messages, &end)?;
    header(rt, input)
}

pub(crate) fn frames(
    rt: &tokio::runtime::Runtime,
    input: &[u8],
) -> Result<(Vec<ControlMessage>, End), TestCaseError> {
    let mut messages = Vec::new();
    let mut start = 0;
    loop {
        let rest = &input[start..];
        let prefix = rest
            .get(..4)
            .map(|p| u32::from_be_bytes(p.try_into().unwrap()) as usize);
        // The frame alone, with a message that keeps nothing: the buffer's cost.
        let mut skim = Metered {
            data: rest,
            taken: 0,
            largest_read: 0,
        };
        let (skimmed, buffer) = peak_of(|| rt.block_on(read_frame::<_, Skip>(&mut skim)));
        let arrived = skim.taken.saturating_sub(4);
        let buffer_bound = 2 * FIRST_READ.max(arrived) + 4096;
        ensure!(
            buffer <= buffer_bound,
            "a frame whose prefix says {prefix:?} with {arrived} bytes after it held {buffer} bytes, over {buffer_bound}"
        );
        // The same frame as a control message.
        let mut metered = Metered {
            data: rest,
            taken: 0,
            largest_read: 0,
        };
        let (read, peak) = peak_of(|| rt.block_on(read_frame::<_, ControlMessage>(&mut metered)));
        let taken = metered.taken;
        ensure!(
            taken == skim.taken,
            "decoding as a control message took {taken} bytes, skimming took {}",
            skim.taken
        );
        let decoded_bound = buffer_bound + DECODE_AMPLIFICATION * arrived;
        ensure!(
            peak <= decoded_bound,
            "decoding a frame of {arrived} bytes held {peak} bytes, over {decoded_bound}"
        );
        // What the reader asks the stream for is room it has allocated.
        ensure!(
            metered.largest_read <= buffer_bound,
            "a read asked for {} bytes, over {buffer_bound}",
            metered.largest_read
        );
        match (read, prefix) {
            (Ok(None), _) => {
                ensure!(
                    rest.is_empty(),
                    "a clean end with {} bytes left",
                    rest.len()
                );
                return Ok((messages, End::Clean));
            }
            (Ok(Some(msg)), Some(len)) => {
                ensure!(
                    skimmed.is_ok(),
                    "the frame decodes as a message but not skimmed"
                );
                ensure!(len <= MAX_FRAME_LEN, "a frame of {len} bytes was accepted");
                ensure!(
                    taken == 4 + len,
                    "a frame of {len} bytes took {taken} bytes of the stream"
                );
                reencode(rt, &msg)?;
                messages.push(msg);
                start += taken;
            }
            (Ok(Some(_)), None) => return Err(TestCaseError::fail("a frame without a prefix")),
            (Err(err), prefix) => {
                let end = end_of(&err);
                match (&err, prefix) {
                    (FrameError::TooLarge { len, max }, Some(claimed)) => {
                        ensure!(
                            *len == claimed && *max == MAX_FRAME_LEN && claimed > MAX_FRAME_LEN,
                            "{err} for a prefix of {claimed}"
                        );
                        ensure!(
                            taken == 4,
                            "a refused frame took {taken} bytes, not its prefix alone"
                        );
                    }
                    (FrameError::Torn { got, expected }, None) => ensure!(
                        (*got, *expected) == (rest.len(), 4),
                        "{err} with {} bytes left",
                        rest.len()
                    ),
                    (FrameError::Torn { got, expected }, Some(claimed)) => ensure!(
                        *expected == claimed && *got == rest.len() - 4 && *got < claimed,
                        "{err} for a prefix of {claimed} with {} bytes after it",
                        rest.len() - 4
                    ),
                    (FrameError::Decode(_), Some(claimed)) => ensure!(
                        taken == 4 + claimed,
                        "a malformed frame of {claimed} bytes took {taken}"
                    ),
                    _ => return Err(TestCaseError::fail(format!("{err} at byte {start}"))),
                }
                // Skimming keeps no field, so only the framing can fail it.
                let skim_end = skimmed.as_ref().err().map(end_of);
                let framing_agrees = match end {
                    End::Decode => skim_end.is_none() || skim_end == Some(End::Decode),
                    _ => skim_end.as_ref() == Some(&end),
                };
                ensure!(
                    framing_agrees,
                    "skimming ended {skim_end:?}, decoding {end:?}"
                );
                return Ok((messages, end));
            }
        }
    }
}

/// A decoded message encodes to bytes that decode to it again, and those bytes are a fixed
/// point: encoding the copy gives them back.
pub(crate) fn reencode(
    rt: &tokio::runtime::Runtime,
    msg: &ControlMessage,
) -> Result<(), TestCaseError> {
    let mut wire = Vec::new();
    match rt.block_on(write_frame(&mut wire, msg)) {
        Ok(()) => {}
        // Negative enumeration values take ten bytes however they arrived: a message can
        // grow past the limit; it is then not written.
        Err(FrameError::TooLarge { len, .. }) if len == prost::Message::encoded_len(msg) => {
            return Ok(())
        }
        Err(e) => {
            return Err(TestCaseError::fail(format!(
                "re-encoding {}: {e}",
                msg.kind()
            )))
        }
    }
    let again: ControlMessage = rt
        .block_on(read_frame(&mut wire.as_slice()))
        .map_err(|e| {
            TestCaseError::fail(format!("{} re-encoded does not decode: {e}", msg.kind()))
        })?
        .ok_or_else(|| TestCaseError::fail("re-encoded to nothing"))?;
    ensure!(
        again == *msg,
        "{} changes through re-encoding: {msg:?} became {again:?}",
        msg.kind()
    );
    let mut twice = Vec::new();
    rt.block_on(write_frame(&mut twice, &again)).unwrap();
    ensure!(
        twice == wire,
        "{} does not encode to a fixed point",
        msg.kind()
    );
    Ok(())
}

/// The control channel, reading the same bytes, hands out the same messages, then the same
/// ending.
pub(crate) fn channel(
    rt: &tokio::runtime::Runtime,
    input: &[u8],
    messages: &[ControlMessage],
    end: &End,
) -> Result<(), TestCaseError> {
    rt.block_on(async {
        let mut channel = ControlChannel::new(Cursor::new(input.to_vec()), tokio::io::sink());
        for (i, expected) in messages.iter().enumerate() {
            match channel.recv().await {
                Ok(msg) => ensure!(msg == *expected, "the channel's message {i} differs"),
                Err(e) => {
                    return Err(TestCaseError::fail(format!(
                        "the channel's message {i}: {e}"
                    )))
                }
            }
        }
        let last = channel.recv().await;
        let agrees = match (&last, end) {
            (Err(ControlError::Closed), End::Clean) => true,
            (Err(ControlError::Frame(e)), end) => end_of(e) == *end,
            _ => false,
        };
        ensure!(
            agrees,
            "the channel ended with {last:?}, read_frame with {end:?}"
        );
        Ok(())
    })
}

/// The input as the first frame of a data stream: a header with a kind, or an error.
pub(crate) fn header(rt: &tokio::runtime::Runtime, input: &[u8]) -> Result<(), TestCaseError> {
    let mut stream = input;
    match rt.block_on(transfer::read_header(&mut stream)) {
        Ok(header) => {
            ensure!(
                header.id.kind != StreamKind::Invalid,
                "a header of kind {:?}",
                header.id.kind
            );
            ensure!(
                header.id.offset == 0 || header.id.kind == StreamKind::Image,
                "a {:?} header with offset {}",
                header.id.kind,
                header.id.offset
            );
        }
        // A segment of anything but an image.
        Err(transfer::TransferError::Declaration {
            problem: "only images come in segments",
            ..
        })
        | Err(transfer::TransferError::Header(_))
        | Err(transfer::TransferError::NoHeader)
        | Err(transfer::TransferError::UnknownKind(_))
        | Err(transfer::TransferError::UnknownCodec(_)) => {}
        Err(e) => return Err(TestCaseError::fail(format!("reading a header: {e}"))),
    }
    Ok(())
}

// --- The targets -----------------------------------------------------------------------
