//! Length-prefixed replication frames, as a peer writes and reads them: a 4-byte big-endian
//! length, then the encoded [`Message`].

use meridian_replication::wire::{MAX_FRAME_BYTES, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Write one frame. Panics if the stream refuses it (a test failure).
pub async fn write<W: AsyncWrite + Unpin>(send: &mut W, msg: &Message) {
    let bytes = msg.encode();
    let len = u32::try_from(bytes.len()).expect("a frame fits a u32 length");
    send.write_all(&len.to_be_bytes())
        .await
        .expect("write frame length");
    send.write_all(&bytes).await.expect("write frame body");
}

/// Read one frame; `None` when the stream ends, the length is over [`MAX_FRAME_BYTES`] or
/// the body does not decode.
pub async fn read<R: AsyncRead + Unpin>(recv: &mut R) -> Option<Message> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.ok()?;
    let n = usize::try_from(u32::from_be_bytes(len)).ok()?;
    if n > MAX_FRAME_BYTES {
        return None;
    }
    let mut buf = vec![0u8; n];
    recv.read_exact(&mut buf).await.ok()?;
    Message::decode(&buf).ok()
}
