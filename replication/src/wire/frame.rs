//! Frames: how messages travel on a stream.
//!
//! A frame is a 4-byte big-endian length, then that many bytes of one encoded [`Message`].
//! Invariant: a reader checks the length against [`MAX_FRAME_BYTES`] ([`body_len`]) before it
//! allocates or reads the body, so a peer cannot make it buffer more than that.
//!
//! The functions are pure; the caller owns the stream:
//!
//! ```text
//! write: stream.write_all(&frame::encode(&msg))
//! read:  header = read_exact(frame::HEADER_BYTES)
//!        len    = frame::body_len(header)?
//!        body   = read_exact(len)
//!        msg    = Message::decode(&body)?
//! ```

use super::{MAX_FRAME_BYTES, Message};

/// Bytes of the length prefix.
pub const HEADER_BYTES: usize = 4;

/// A frame header announced a body longer than [`MAX_FRAME_BYTES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
pub struct FrameTooLarge {
    /// The announced body length.
    pub len: usize,
}

/// `msg` as one frame: the length prefix and the encoded message, in one buffer.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut frame = Vec::with_capacity(64);
    frame.extend_from_slice(&[0; HEADER_BYTES]);
    msg.encode_into(&mut frame);
    let len = (frame.len() - HEADER_BYTES) as u32;
    frame[..HEADER_BYTES].copy_from_slice(&len.to_be_bytes());
    frame
}

/// The body length a frame header announces, refused above [`MAX_FRAME_BYTES`].
pub fn body_len(header: [u8; HEADER_BYTES]) -> Result<usize, FrameTooLarge> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameTooLarge { len });
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_the_big_endian_length_then_the_message() {
        let msg = Message::Close {
            reason: "bye".into(),
        };
        let frame = encode(&msg);
        let body = msg.encode();
        assert_eq!(&frame[..HEADER_BYTES], &(body.len() as u32).to_be_bytes());
        assert_eq!(&frame[HEADER_BYTES..], &body[..]);
        let mut header = [0; HEADER_BYTES];
        header.copy_from_slice(&frame[..HEADER_BYTES]);
        assert_eq!(body_len(header), Ok(body.len()));
        assert_eq!(Message::decode(&frame[HEADER_BYTES..]), Ok(msg));
    }

    #[test]
    fn a_header_over_the_limit_is_refused() {
        let at_limit = (MAX_FRAME_BYTES as u32).to_be_bytes();
        assert_eq!(body_len(at_limit), Ok(MAX_FRAME_BYTES));
        let over = (MAX_FRAME_BYTES as u32 + 1).to_be_bytes();
        let err = body_len(over).unwrap_err();
        assert_eq!(
            err,
            FrameTooLarge {
                len: MAX_FRAME_BYTES + 1
            }
        );
        assert_eq!(
            err.to_string(),
            format!(
                "frame of {} bytes exceeds the limit of {MAX_FRAME_BYTES}",
                MAX_FRAME_BYTES + 1
            )
        );
        assert!(body_len([0xff; HEADER_BYTES]).is_err());
    }
}
