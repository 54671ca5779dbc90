//! The subscriber's side of a link: batches are numbered and must arrive in order.

use super::ProtocolError;

/// The subscriber's side of one link: batches must arrive in order.
pub struct Inbound {
    expected_seq: u64,
}

impl Default for Inbound {
    fn default() -> Self {
        Inbound { expected_seq: 1 }
    }
}

impl Inbound {
    /// Accept batch `seq` if it is the next one.
    pub fn accept(&mut self, seq: u64) -> Result<(), ProtocolError> {
        if seq != self.expected_seq {
            return Err(ProtocolError::UnexpectedBatch {
                got: seq,
                expected: self.expected_seq,
            });
        }
        self.expected_seq += 1;
        Ok(())
    }
}
