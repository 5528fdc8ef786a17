//! The two hub-protocol framings, with the max-message-size guard. Pure.
//!
//! - Text (JSON, and the handshake on every connection): each message ends with the record
//!   separator 0x1E.
//! - Binary (MessagePack): each message is prefixed by its length as a VarInt
//!   (7 bits per byte, least-significant group first, at most 5 bytes, at most 2^31 − 1).
//!
//! `split_*` take inbound transport bytes (as buffered by the session) and return one
//! message body at a time as a frozen [`Bytes`] that shares the buffer's allocation (no
//! copy). They return `Ok(None)` until a whole message is buffered and never consume a
//! partial one. A message larger than the limit is rejected as soon as that is certain, so
//! a peer cannot make us buffer without bound. Pass `usize::MAX` as the limit for
//! "unlimited" (ASP.NET's `MaximumReceiveMessageSize = null`).

use bytes::{Bytes, BytesMut};

use super::{ProtocolError, RECORD_SEPARATOR};

/// The largest length a VarInt prefix may carry (ASP.NET and the JS client agree on 31 bits).
pub const MAX_VARINT_LENGTH: usize = 0x7FFF_FFFF;

/// The longest VarInt prefix, in bytes.
pub const MAX_VARINT_BYTES: usize = 5;

/// Takes the next 0x1E-terminated record off the front of `buf`; the separator is consumed
/// and not returned.
///
/// The framed record (with its separator) may be at most `max_message_size` bytes long:
/// ASP.NET parses within a window of `MaximumReceiveMessageSize` bytes, so the separator
/// counts. Only the first `max_message_size` bytes are ever scanned, so a slow drip of a
/// huge record costs at most that much per call and is rejected with
/// [`ProtocolError::TooLarge`] as soon as `max_message_size` bytes are buffered with no
/// separator.
pub fn split_text(
    buf: &mut BytesMut,
    max_message_size: usize,
) -> Result<Option<Bytes>, ProtocolError> {
    let window = buf.len().min(max_message_size);
    let Some(window_bytes) = buf.get(..window) else {
        return Ok(None);
    };
    match find_byte(window_bytes, RECORD_SEPARATOR) {
        Some(end) => {
            // `end` < buf.len(), so both splits are in range.
            let mut record = buf.split_to(end + 1);
            record.truncate(end);
            Ok(Some(record.freeze()))
        }
        None if buf.len() >= max_message_size => Err(ProtocolError::TooLarge {
            limit: max_message_size,
        }),
        None => Ok(None),
    }
}

/// The index of the first `needle` in `hay`.
///
/// Eight bytes at a time (the classic "has zero byte" bit trick on `x ^ needle`), since a
/// byte-by-byte `position` loop does not vectorize and this scan runs over every JSON
/// message. In the little-endian view the lowest flagged byte is always a true match
/// (false positives can only appear above a real one), so `trailing_zeros` is exact.
pub(crate) fn find_byte(hay: &[u8], needle: u8) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let pattern = LO.wrapping_mul(u64::from(needle));
    let mut chunks = hay.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word) ^ pattern;
        let found = x.wrapping_sub(LO) & !x & HI;
        if found != 0 {
            return Some(offset + (found.trailing_zeros() / 8) as usize);
        }
        offset += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == needle)
        .map(|i| offset + i)
}

/// Reads a VarInt length prefix from the front of `input` without consuming anything.
///
/// `Ok(None)`: the prefix is incomplete. `Ok(Some((length, prefix_len)))` otherwise.
pub fn read_varint(input: &[u8]) -> Result<Option<(usize, usize)>, ProtocolError> {
    let mut value: usize = 0;
    for i in 0..MAX_VARINT_BYTES {
        let Some(&b) = input.get(i) else {
            return Ok(None);
        };
        // The 5th byte may only carry the top 3 bits of a 31-bit length; a higher value or a
        // continue bit means a length of 2 GiB or more, which both peers refuse.
        if i == MAX_VARINT_BYTES - 1 && b > 0x07 {
            return Err(ProtocolError::LengthPrefixOverflow);
        }
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    // Unreachable: the 5th byte either ends the prefix or is rejected above.
    Err(ProtocolError::LengthPrefixOverflow)
}

/// Takes the next VarInt-length-prefixed record off the front of `buf`; the prefix is
/// consumed and not returned.
///
/// A framed length (prefix plus body) above `max_message_size` is
/// [`ProtocolError::TooLarge`] at once, before the body arrives (the prefix counts, as in
/// ASP.NET's parsing window). Nothing is consumed when `Ok(None)` is returned.
pub fn split_binary(
    buf: &mut BytesMut,
    max_message_size: usize,
) -> Result<Option<Bytes>, ProtocolError> {
    let Some((len, prefix_len)) = read_varint(buf)? else {
        return Ok(None);
    };
    if len.saturating_add(prefix_len) > max_message_size {
        return Err(ProtocolError::TooLarge {
            limit: max_message_size,
        });
    }
    // len ≤ 2^31 − 1 and prefix_len ≤ 5: no overflow on any target with ≥ 32-bit usize
    // beyond what checked_add guards.
    let Some(total) = prefix_len.checked_add(len) else {
        return Err(ProtocolError::LengthPrefixOverflow);
    };
    if buf.len() < total {
        return Ok(None);
    }
    let mut record = buf.split_to(total);
    let body = record.split_off(prefix_len);
    Ok(Some(body.freeze()))
}

/// Appends `len` as a VarInt (7 bits per byte, least-significant group first).
///
/// Callers keep `len` ≤ [`MAX_VARINT_LENGTH`]; larger values are still written faithfully
/// (in more than 5 bytes) but no peer will accept them.
pub fn write_varint(len: usize, out: &mut Vec<u8>) {
    let mut n = len;
    loop {
        let low = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(low);
            return;
        }
        out.push(low | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn varint(n: usize) -> Vec<u8> {
        let mut v = Vec::new();
        write_varint(n, &mut v);
        v
    }

    #[test]
    fn varint_examples_from_spec() {
        assert_eq!(varint(0), [0x00]);
        assert_eq!(varint(11), [0x0b]);
        assert_eq!(varint(127), [0x7f]);
        assert_eq!(varint(128), [0x80, 0x01]);
        assert_eq!(varint(5248), [0x80, 0x29]);
        assert_eq!(varint(MAX_VARINT_LENGTH), [0xff, 0xff, 0xff, 0xff, 0x07]);
    }

    #[test]
    fn varint_reads_back() {
        for n in [
            0usize,
            1,
            127,
            128,
            300,
            5248,
            16_383,
            16_384,
            1 << 21,
            MAX_VARINT_LENGTH,
        ] {
            let v = varint(n);
            assert_eq!(read_varint(&v).unwrap(), Some((n, v.len())), "n = {n}");
        }
    }

    #[test]
    fn varint_overflow() {
        // 5th byte above 7.
        assert!(matches!(
            read_varint(&[0xff, 0xff, 0xff, 0xff, 0x08]),
            Err(ProtocolError::LengthPrefixOverflow)
        ));
        // Continue bit on the 5th byte.
        assert!(matches!(
            read_varint(&[0x80, 0x80, 0x80, 0x80, 0x81, 0x00]),
            Err(ProtocolError::LengthPrefixOverflow)
        ));
        // Incomplete prefix is not an error yet.
        assert_eq!(read_varint(&[0xff, 0xff, 0xff, 0xff]).unwrap(), None);
        assert_eq!(read_varint(&[]).unwrap(), None);
    }

    #[test]
    fn split_text_records() {
        let mut buf = BytesMut::from(&b"{\"type\":6}\x1e{\"type\":7}\x1e{\"ty"[..]);
        assert_eq!(
            split_text(&mut buf, 100).unwrap().unwrap(),
            &b"{\"type\":6}"[..]
        );
        assert_eq!(
            split_text(&mut buf, 100).unwrap().unwrap(),
            &b"{\"type\":7}"[..]
        );
        assert_eq!(split_text(&mut buf, 100).unwrap(), None);
        assert_eq!(&buf[..], b"{\"ty");
    }

    #[test]
    fn split_text_limit() {
        // Exactly at the limit (separator included) is fine.
        let mut buf = BytesMut::from(&b"abc\x1e"[..]);
        assert_eq!(split_text(&mut buf, 4).unwrap().unwrap(), &b"abc"[..]);
        // One more byte than the limit with the separator after it.
        let mut buf = BytesMut::from(&b"abcd\x1e"[..]);
        assert!(matches!(
            split_text(&mut buf, 4),
            Err(ProtocolError::TooLarge { limit: 4 })
        ));
        // The limit buffered, no separator yet: rejected without waiting.
        let mut buf = BytesMut::from(&b"abcd"[..]);
        assert!(matches!(
            split_text(&mut buf, 4),
            Err(ProtocolError::TooLarge { limit: 4 })
        ));
        // Below the limit without separator: wait.
        let mut buf = BytesMut::from(&b"abc"[..]);
        assert_eq!(split_text(&mut buf, 4).unwrap(), None);
        // Unlimited.
        let mut buf = BytesMut::from(&b"abcd\x1e"[..]);
        assert_eq!(
            split_text(&mut buf, usize::MAX).unwrap().unwrap(),
            &b"abcd"[..]
        );
    }

    #[test]
    fn split_binary_records() {
        let mut buf = BytesMut::from(&[0x02, 0x91, 0x06, 0x03, 0x92, 0x08, 0x01, 0x05][..]);
        assert_eq!(
            split_binary(&mut buf, 100).unwrap().unwrap(),
            &[0x91, 0x06][..]
        );
        assert_eq!(
            split_binary(&mut buf, 100).unwrap().unwrap(),
            &[0x92, 0x08, 0x01][..]
        );
        assert_eq!(split_binary(&mut buf, 100).unwrap(), None);
        assert_eq!(&buf[..], &[0x05]);
        // Empty body.
        let mut buf = BytesMut::from(&[0x00][..]);
        assert_eq!(split_binary(&mut buf, 100).unwrap().unwrap(), &[][..]);
    }

    #[test]
    fn split_binary_too_large_before_body() {
        // Declares 5248 bytes with only the prefix buffered.
        let mut buf = BytesMut::from(&[0x80, 0x29][..]);
        assert!(matches!(
            split_binary(&mut buf, 1024),
            Err(ProtocolError::TooLarge { limit: 1024 })
        ));
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0x07][..]);
        assert!(matches!(split_binary(&mut buf, usize::MAX - 1), Ok(None)));
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0x0f][..]);
        assert!(matches!(
            split_binary(&mut buf, usize::MAX),
            Err(ProtocolError::LengthPrefixOverflow)
        ));
    }

    proptest! {
        #[test]
        fn varint_round_trip(n in 0usize..=MAX_VARINT_LENGTH) {
            let v = varint(n);
            prop_assert!(v.len() <= MAX_VARINT_BYTES);
            prop_assert_eq!(read_varint(&v).unwrap(), Some((n, v.len())));
        }

        #[test]
        fn binary_prefixes_are_incomplete(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut framed = Vec::new();
            write_varint(body.len(), &mut framed);
            framed.extend_from_slice(&body);
            for cut in 0..framed.len() {
                let mut buf = BytesMut::from(&framed[..cut]);
                prop_assert_eq!(split_binary(&mut buf, 1000).unwrap(), None);
                prop_assert_eq!(&buf[..], &framed[..cut]);
            }
            let mut buf = BytesMut::from(&framed[..]);
            prop_assert_eq!(split_binary(&mut buf, 1000).unwrap().unwrap(), &body[..]);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn binary_oversize_rejected(len in 1usize..100_000, extra in 1usize..1000) {
            let mut framed = Vec::new();
            write_varint(len + extra, &mut framed);
            let mut buf = BytesMut::from(&framed[..]);
            let rejected = matches!(split_binary(&mut buf, len), Err(ProtocolError::TooLarge { .. }));
            prop_assert!(rejected);
        }

        #[test]
        fn text_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200), max in 0usize..64) {
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(record)) = split_text(&mut buf, max) {
                prop_assert!(record.len() < max);
            }
        }

        #[test]
        fn find_byte_matches_position(hay in proptest::collection::vec(prop_oneof![Just(0x1eu8), Just(0x1f), Just(0x9e), Just(0x00), any::<u8>()], 0..70)) {
            prop_assert_eq!(find_byte(&hay, 0x1e), hay.iter().position(|&b| b == 0x1e));
            prop_assert_eq!(find_byte(&hay, 0x00), hay.iter().position(|&b| b == 0x00));
        }

        #[test]
        fn binary_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200), max in 0usize..64) {
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(record)) = split_binary(&mut buf, max) {
                prop_assert!(record.len() < max);
            }
        }
    }
}
