//! Replication frames as a test peer writes and reads them, over any tokio stream, with the
//! one frame codec of [`meridian_replication::wire::frame`].

use meridian_replication::wire::{Message, frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Write one frame. Panics if the stream refuses it (a test failure).
pub async fn write<W: AsyncWrite + Unpin>(send: &mut W, msg: &Message) {
    send.write_all(&frame::encode(msg))
        .await
        .expect("write frame");
}

/// Read one frame; `None` when the stream ends, the length is over the frame limit or the
/// body does not decode.
pub async fn read<R: AsyncRead + Unpin>(recv: &mut R) -> Option<Message> {
    let mut header = [0u8; frame::HEADER_BYTES];
    recv.read_exact(&mut header).await.ok()?;
    let len = frame::body_len(header).ok()?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.ok()?;
    Message::decode(&body).ok()
}
