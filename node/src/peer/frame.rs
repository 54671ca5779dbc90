//! Messages over QUIC streams: length-prefixed frames, checked before they are read, and the
//! way a link says goodbye.

use std::time::Duration;

use meridian_replication::protocol::Frontier;
use meridian_replication::wire::{Message, PROTOCOL_VERSION, frame};

use super::LinkError;
use crate::engine::Engine;
use crate::observe::clock_offset::ClockSample;

pub(super) async fn write_msg(
    send: &mut quinn::SendStream,
    msg: &Message,
) -> Result<(), LinkError> {
    send.write_all(&frame::encode(msg)).await?;
    Ok(())
}

pub(super) async fn read_msg(recv: &mut quinn::RecvStream) -> Result<Message, LinkError> {
    let mut header = [0u8; frame::HEADER_BYTES];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Err(LinkError::StreamEnded),
        Err(e) => return Err(e.into()),
    }
    let len = frame::body_len(header)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(Message::decode(&body)?)
}

/// Reasons a node gives when it closes a link for ordinary causes.
const BENIGN_CLOSE_REASONS: [&str; 2] = ["node shutting down", "connection age limit"];

/// The reason, when a link ended because the peer closed it on purpose (shutdown, connection
/// age, refusal) rather than because something failed.
pub(super) fn peer_said_goodbye(e: &LinkError) -> Option<String> {
    let conn_err = match e {
        // A refusal (identity, cluster, version) also arrives as a Close: it is a failure.
        LinkError::PeerClosed(reason) => {
            return BENIGN_CLOSE_REASONS
                .contains(&reason.as_str())
                .then(|| reason.clone());
        }
        LinkError::Connection(c) => c,
        LinkError::Read(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c))) => c,
        LinkError::Write(quinn::WriteError::ConnectionLost(c)) => c,
        _ => return None,
    };
    match conn_err {
        quinn::ConnectionError::ApplicationClosed(close) if close.error_code == 0u32.into() => {
            Some(String::from_utf8_lossy(&close.reason).into_owned())
        }
        _ => None,
    }
}

/// Say why we close, let the peer read it (briefly), then close the connection with the same
/// reason, so both sides can log it.
pub(super) async fn close_link(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: u32,
    reason: &str,
) {
    let _ = write_msg(
        send,
        &Message::Close {
            reason: reason.to_string(),
        },
    )
    .await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    conn.close(code.into(), reason.as_bytes());
}

/// Aborts a task when dropped, so a link's reader never outlives the link.
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Our `Hello`, stating `frontier`, with our clock reading.
pub(super) fn hello(engine: &Engine, frontier: &Frontier) -> Message {
    Message::Hello {
        protocol: PROTOCOL_VERSION,
        cluster: engine.topology.cluster.clone(),
        node: engine.node_id.clone(),
        region: engine.region.clone(),
        frontier: frontier.entries(),
        clock_ntp64: engine.clock.now().time_ntp64,
    }
}

/// Our acknowledgement of batch `seq`, with our clock reading.
pub(super) fn ack(engine: &Engine, seq: u64) -> Message {
    Message::Ack {
        seq,
        clock_ntp64: engine.clock.now().time_ntp64,
    }
}

/// The clock reading a message carries (0, "unknown", for those that carry none).
pub(super) fn clock_of(msg: &Message) -> u64 {
    match msg {
        Message::Hello { clock_ntp64, .. } | Message::Ack { clock_ntp64, .. } => *clock_ntp64,
        _ => 0,
    }
}

/// Keep `peer_ntp64`, the clock reading of a message that just arrived from `peer`, for the
/// clock-offset estimate; `our_ntp64` is the reading in our message it answers (the peer's
/// `Hello` answers ours), if any.
pub(super) fn note_peer_clock(
    engine: &Engine,
    peer: &str,
    peer_ntp64: u64,
    our_ntp64: Option<u64>,
) {
    let sample = ClockSample {
        peer_ntp64,
        local_sent_ntp64: our_ntp64.filter(|t| *t != 0),
        local_received_ntp64: engine.clock.now().time_ntp64,
    };
    engine
        .health
        .clock
        .record(peer, sample, std::time::Instant::now());
}
