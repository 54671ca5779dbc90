//! The one bounds-checked reader over encoded bytes, shared by the wire codec and the node's
//! store codecs.
//!
//! Invariant: no method panics or allocates on behalf of its input. Every read checks what is
//! left first and fails with [`Truncated`]; a count of elements is checked against what is left
//! ([`Reader::count`]) before a caller allocates room for them. Encodings are the callers':
//! this module only reads fixed-width integers (big- or little-endian, as named), raw slices
//! and length-prefixed strings and byte strings.

/// Fewer bytes were left than a read needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("truncated: wanted {wanted} bytes at offset {at}")]
pub struct Truncated {
    /// Bytes the read needed.
    pub wanted: usize,
    /// Offset of the read from the start of the input.
    pub at: usize,
}

/// Why a read of a string or of a count failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Truncated(#[from] Truncated),
    #[error("string is not UTF-8")]
    NotUtf8,
    #[error("{count} elements cannot fit in {left} bytes")]
    CountTooLarge { count: usize, left: usize },
}

// The node's store codecs report errors as text; these let them keep `?`.
impl From<Truncated> for String {
    fn from(e: Truncated) -> String {
        e.to_string()
    }
}

impl From<ReadError> for String {
    fn from(e: ReadError) -> String {
        e.to_string()
    }
}

/// Reads values front to back from a byte slice.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }

    /// Offset of the next read from the start of the input.
    pub fn position(&self) -> usize {
        self.at
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    /// Whether everything has been read.
    pub fn is_at_end(&self) -> bool {
        self.remaining() == 0
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(Truncated {
                wanted: n,
                at: self.at,
            })?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    /// Everything not read yet (possibly nothing).
    pub fn rest(&mut self) -> &'a [u8] {
        let slice = &self.bytes[self.at..];
        self.at = self.bytes.len();
        slice
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, Truncated> {
        Ok(self.take(1)?[0])
    }

    pub fn u16_be(&mut self) -> Result<u16, Truncated> {
        self.array().map(u16::from_be_bytes)
    }

    pub fn u32_be(&mut self) -> Result<u32, Truncated> {
        self.array().map(u32::from_be_bytes)
    }

    pub fn u64_be(&mut self) -> Result<u64, Truncated> {
        self.array().map(u64::from_be_bytes)
    }

    pub fn u32_le(&mut self) -> Result<u32, Truncated> {
        self.array().map(u32::from_le_bytes)
    }

    pub fn u64_le(&mut self) -> Result<u64, Truncated> {
        self.array().map(u64::from_le_bytes)
    }

    /// Bytes after a big-endian `u16` length.
    pub fn bytes16(&mut self) -> Result<&'a [u8], Truncated> {
        let len = usize::from(self.u16_be()?);
        self.take(len)
    }

    /// Bytes after a big-endian `u32` length.
    pub fn bytes32(&mut self) -> Result<&'a [u8], Truncated> {
        let len = self.u32_be()? as usize;
        self.take(len)
    }

    /// A UTF-8 string after a big-endian `u16` length.
    pub fn str16(&mut self) -> Result<&'a str, ReadError> {
        std::str::from_utf8(self.bytes16()?).map_err(|_| ReadError::NotUtf8)
    }

    /// A big-endian `u32` count of elements that take at least `min_bytes` each, refused when
    /// that many cannot fit in what is left: a caller may allocate for the count.
    pub fn count(&mut self, min_bytes: usize) -> Result<usize, ReadError> {
        let count = self.u32_be()? as usize;
        let left = self.remaining();
        if count.saturating_mul(min_bytes) > left {
            return Err(ReadError::CountTooLarge { count, left });
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_integers_in_the_named_byte_order() {
        let mut bytes = vec![7u8];
        bytes.extend_from_slice(&0x0102u16.to_be_bytes());
        bytes.extend_from_slice(&0x0102_0304u32.to_be_bytes());
        bytes.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        bytes.extend_from_slice(&0x0102_0304u32.to_le_bytes());
        bytes.extend_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u8(), Ok(7));
        assert_eq!(r.u16_be(), Ok(0x0102));
        assert_eq!(r.u32_be(), Ok(0x0102_0304));
        assert_eq!(r.u64_be(), Ok(0x0102_0304_0506_0708));
        assert_eq!(r.u32_le(), Ok(0x0102_0304));
        assert_eq!(r.u64_le(), Ok(0x0102_0304_0506_0708));
        assert!(r.is_at_end());
        assert_eq!(r.position(), bytes.len());
    }

    #[test]
    fn a_short_input_is_truncated_and_says_where() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u8(), Ok(1));
        let err = r.u32_be().unwrap_err();
        assert_eq!(err, Truncated { wanted: 4, at: 1 });
        assert_eq!(err.to_string(), "truncated: wanted 4 bytes at offset 1");
        assert_eq!(r.remaining(), 2, "a failed read consumes nothing");
        assert_eq!(
            r.take(usize::MAX),
            Err(Truncated {
                wanted: usize::MAX,
                at: 1
            })
        );
        assert_eq!(r.rest(), &[2, 3]);
        assert_eq!(r.rest(), &[] as &[u8]);
    }

    #[test]
    fn length_prefixed_strings_and_bytes() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&2u16.to_be_bytes());
        bytes.extend_from_slice("é".as_bytes());
        bytes.extend_from_slice(&3u32.to_be_bytes());
        bytes.extend_from_slice(&[9, 8, 7]);
        bytes.extend_from_slice(&1u16.to_be_bytes());
        bytes.push(0xff);
        let mut r = Reader::new(&bytes);
        assert_eq!(r.str16(), Ok("é"));
        assert_eq!(r.bytes32(), Ok(&[9u8, 8, 7][..]));
        let err = r.str16().unwrap_err();
        assert_eq!(err, ReadError::NotUtf8);
        assert_eq!(err.to_string(), "string is not UTF-8");
        assert_eq!(
            Reader::new(&[0, 5, b'a']).str16(),
            Err(ReadError::Truncated(Truncated { wanted: 5, at: 2 }))
        );
    }

    #[test]
    fn counts_are_checked_against_what_is_left() {
        let mut bytes = 3u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 6]);
        assert_eq!(Reader::new(&bytes).count(2), Ok(3));
        let err = Reader::new(&bytes).count(3).unwrap_err();
        assert_eq!(err, ReadError::CountTooLarge { count: 3, left: 6 });
        assert_eq!(err.to_string(), "3 elements cannot fit in 6 bytes");
        let huge = u32::MAX.to_be_bytes();
        assert!(Reader::new(&huge).count(usize::MAX).is_err());
    }

    #[test]
    fn errors_become_the_text_the_node_reports() {
        let text: String = Truncated { wanted: 2, at: 0 }.into();
        assert_eq!(text, "truncated: wanted 2 bytes at offset 0");
        let text: String = ReadError::NotUtf8.into();
        assert_eq!(text, "string is not UTF-8");
    }

    proptest! {
        /// Fixed-width reads succeed exactly when enough is left and then advance by their
        /// width; no read of any kind panics or moves past the end.
        #[test]
        fn arbitrary_reads_never_panic_or_overrun(
            bytes in prop::collection::vec(any::<u8>(), 0..64),
            reads in prop::collection::vec(0u8..10, 0..16),
        ) {
            let mut r = Reader::new(&bytes);
            for read in reads {
                let before = r.position();
                let left = r.remaining();
                let fixed = match read {
                    0 => Some((1, r.u8().is_ok())),
                    1 => Some((2, r.u16_be().is_ok())),
                    2 => Some((4, r.u32_be().is_ok())),
                    3 => Some((8, r.u64_be().is_ok())),
                    4 => Some((4, r.u32_le().is_ok())),
                    5 => Some((8, r.u64_le().is_ok())),
                    6 => { let _ = r.bytes16(); None }
                    7 => { let _ = r.bytes32(); None }
                    8 => { let _ = r.str16(); None }
                    _ => { let _ = r.count(1); None }
                };
                if let Some((width, ok)) = fixed {
                    prop_assert_eq!(ok, left >= width);
                    prop_assert_eq!(r.position(), if ok { before + width } else { before });
                }
                prop_assert!(r.position() <= bytes.len());
                prop_assert_eq!(r.position() + r.remaining(), bytes.len());
            }
        }
    }
}
