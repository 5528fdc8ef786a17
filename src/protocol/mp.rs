//! A minimal, bounds-checked MessagePack reader and infallible writer, shared by the
//! MessagePack hub protocol and the transcoder. Pure, crate-private.
//!
//! Why not `rmp`'s reader: we need byte offsets (to slice argument values out of the frozen
//! message [`bytes::Bytes`] without copying) and a skip that is iterative, so that a deeply
//! nested hostile value cannot overflow the stack. Every read checks bounds and returns a
//! [`MpError`]; nothing here can panic on input.

use rmp::Marker;

/// A malformed or truncated MessagePack input. The text ends up in
/// [`super::ProtocolError::MessagePack`] or [`super::ValueError::Decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MpError(pub String);

impl MpError {
    pub(crate) fn new(msg: impl Into<String>) -> Self {
        MpError(msg.into())
    }

    fn eof() -> Self {
        MpError::new("unexpected end of data")
    }
}

/// What a marker introduces, with its data lengths resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Item<'a> {
    Nil,
    Bool(bool),
    /// Any non-negative integer.
    Uint(u64),
    /// A negative integer.
    Int(i64),
    F32(f32),
    F64(f64),
    /// Raw string bytes (UTF-8 not yet checked).
    Str(&'a [u8]),
    Bin(&'a [u8]),
    Array(u32),
    Map(u32),
    Ext(i8, &'a [u8]),
}

/// A cursor over one MessagePack buffer.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Reader { data, pos: 0 }
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], MpError> {
        let end = self.pos.checked_add(n).ok_or_else(MpError::eof)?;
        let slice = self.data.get(self.pos..end).ok_or_else(MpError::eof)?;
        self.pos = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, MpError> {
        let b = *self.data.get(self.pos).ok_or_else(MpError::eof)?;
        self.pos += 1;
        Ok(b)
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], MpError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, MpError> {
        Ok(u16::from_be_bytes(self.be()?))
    }

    fn u32(&mut self) -> Result<u32, MpError> {
        Ok(u32::from_be_bytes(self.be()?))
    }

    fn u64(&mut self) -> Result<u64, MpError> {
        Ok(u64::from_be_bytes(self.be()?))
    }

    fn len_to_usize(len: u32) -> usize {
        // u32 always fits usize on the 32/64-bit targets we build for.
        usize::try_from(len).unwrap_or(usize::MAX)
    }

    fn ext(&mut self, len: u32) -> Result<Item<'a>, MpError> {
        let tag = self.u8()? as i8;
        let data = self.take(Self::len_to_usize(len))?;
        Ok(Item::Ext(tag, data))
    }

    /// Reads one marker and its scalar data; for arrays and maps only the header.
    pub(crate) fn item(&mut self) -> Result<Item<'a>, MpError> {
        let marker = Marker::from_u8(self.u8()?);
        Ok(match marker {
            Marker::FixPos(n) => Item::Uint(u64::from(n)),
            Marker::FixNeg(n) => Item::Int(i64::from(n)),
            Marker::Null => Item::Nil,
            Marker::True => Item::Bool(true),
            Marker::False => Item::Bool(false),
            Marker::U8 => Item::Uint(u64::from(self.u8()?)),
            Marker::U16 => Item::Uint(u64::from(self.u16()?)),
            Marker::U32 => Item::Uint(u64::from(self.u32()?)),
            Marker::U64 => Item::Uint(self.u64()?),
            Marker::I8 => int_item(i64::from(self.u8()? as i8)),
            Marker::I16 => int_item(i64::from(self.u16()? as i16)),
            Marker::I32 => int_item(i64::from(self.u32()? as i32)),
            Marker::I64 => int_item(self.u64()? as i64),
            Marker::F32 => Item::F32(f32::from_bits(self.u32()?)),
            Marker::F64 => Item::F64(f64::from_bits(self.u64()?)),
            Marker::FixStr(n) => Item::Str(self.take(usize::from(n))?),
            Marker::Str8 => {
                let n = self.u8()?;
                Item::Str(self.take(usize::from(n))?)
            }
            Marker::Str16 => {
                let n = self.u16()?;
                Item::Str(self.take(usize::from(n))?)
            }
            Marker::Str32 => {
                let n = self.u32()?;
                Item::Str(self.take(Self::len_to_usize(n))?)
            }
            Marker::Bin8 => {
                let n = self.u8()?;
                Item::Bin(self.take(usize::from(n))?)
            }
            Marker::Bin16 => {
                let n = self.u16()?;
                Item::Bin(self.take(usize::from(n))?)
            }
            Marker::Bin32 => {
                let n = self.u32()?;
                Item::Bin(self.take(Self::len_to_usize(n))?)
            }
            Marker::FixArray(n) => Item::Array(u32::from(n)),
            Marker::Array16 => Item::Array(u32::from(self.u16()?)),
            Marker::Array32 => Item::Array(self.u32()?),
            Marker::FixMap(n) => Item::Map(u32::from(n)),
            Marker::Map16 => Item::Map(u32::from(self.u16()?)),
            Marker::Map32 => Item::Map(self.u32()?),
            Marker::FixExt1 => self.ext(1)?,
            Marker::FixExt2 => self.ext(2)?,
            Marker::FixExt4 => self.ext(4)?,
            Marker::FixExt8 => self.ext(8)?,
            Marker::FixExt16 => self.ext(16)?,
            Marker::Ext8 => {
                let n = self.u8()?;
                self.ext(u32::from(n))?
            }
            Marker::Ext16 => {
                let n = self.u16()?;
                self.ext(u32::from(n))?
            }
            Marker::Ext32 => {
                let n = self.u32()?;
                self.ext(n)?
            }
            Marker::Reserved => return Err(MpError::new("reserved marker 0xc1")),
        })
    }

    /// Skips exactly one complete value and returns its `(start, end)` byte range.
    ///
    /// Iterative: a counter of values still owed replaces recursion, so nesting depth costs
    /// no stack. Every value takes at least one byte, so a declared count larger than the
    /// bytes left is rejected at once instead of being counted down.
    pub(crate) fn skip_value(&mut self) -> Result<(usize, usize), MpError> {
        let start = self.pos;
        let mut owed: u64 = 1;
        while owed > 0 {
            owed -= 1;
            match self.item()? {
                Item::Array(n) => owed += u64::from(n),
                Item::Map(n) => owed += 2 * u64::from(n),
                _ => {}
            }
            if owed > self.remaining() as u64 {
                return Err(MpError::eof());
            }
        }
        Ok((start, self.pos))
    }

    /// Reads an array header.
    pub(crate) fn array_len(&mut self, what: &str) -> Result<u32, MpError> {
        match self.item()? {
            Item::Array(n) => Ok(n),
            _ => Err(MpError(format!(
                "Reading array length for '{what}' failed."
            ))),
        }
    }

    /// Reads a map header.
    pub(crate) fn map_len(&mut self, what: &str) -> Result<u32, MpError> {
        match self.item()? {
            Item::Map(n) => Ok(n),
            _ => Err(MpError(format!("Reading map length for '{what}' failed."))),
        }
    }

    /// Reads a `str` (UTF-8 checked).
    pub(crate) fn str(&mut self, what: &str) -> Result<&'a str, MpError> {
        match self.item()? {
            Item::Str(s) => std::str::from_utf8(s)
                .map_err(|_| MpError(format!("Reading '{what}' as String failed: invalid UTF-8."))),
            _ => Err(MpError(format!("Reading '{what}' as String failed."))),
        }
    }

    /// Reads a `str` or `nil`.
    pub(crate) fn str_or_nil(&mut self, what: &str) -> Result<Option<&'a str>, MpError> {
        if self.data.get(self.pos) == Some(&0xc0) {
            self.pos += 1;
            return Ok(None);
        }
        self.str(what).map(Some)
    }

    /// Reads a non-negative integer of any width.
    pub(crate) fn uint(&mut self, what: &str) -> Result<u64, MpError> {
        match self.item()? {
            Item::Uint(n) => Ok(n),
            _ => Err(MpError(format!(
                "Reading '{what}' as unsigned integer failed."
            ))),
        }
    }

    /// Reads a bool.
    pub(crate) fn bool(&mut self, what: &str) -> Result<bool, MpError> {
        match self.item()? {
            Item::Bool(b) => Ok(b),
            _ => Err(MpError(format!("Reading '{what}' as Boolean failed."))),
        }
    }
}

/// Normalizes signed-format integers that are non-negative to [`Item::Uint`], so callers
/// see one representation per number.
fn int_item(v: i64) -> Item<'static> {
    match u64::try_from(v) {
        Ok(u) => Item::Uint(u),
        Err(_) => Item::Int(v),
    }
}

// ---- writer: appends to a Vec, cannot fail ----

pub(crate) fn write_nil(out: &mut Vec<u8>) {
    out.push(0xc0);
}

pub(crate) fn write_bool(out: &mut Vec<u8>, b: bool) {
    out.push(if b { 0xc3 } else { 0xc2 });
}

/// The most compact unsigned format (what ASP.NET and the JS client write).
pub(crate) fn write_uint(out: &mut Vec<u8>, n: u64) {
    if n < 0x80 {
        out.push(n as u8);
    } else if let Ok(v) = u8::try_from(n) {
        out.extend_from_slice(&[0xcc, v]);
    } else if let Ok(v) = u16::try_from(n) {
        out.push(0xcd);
        out.extend_from_slice(&v.to_be_bytes());
    } else if let Ok(v) = u32::try_from(n) {
        out.push(0xce);
        out.extend_from_slice(&v.to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

/// The most compact format for a signed integer (unsigned formats for non-negatives).
pub(crate) fn write_int(out: &mut Vec<u8>, n: i64) {
    if let Ok(u) = u64::try_from(n) {
        write_uint(out, u);
    } else if n >= -32 {
        out.push(n as i8 as u8);
    } else if let Ok(v) = i8::try_from(n) {
        out.extend_from_slice(&[0xd0, v as u8]);
    } else if let Ok(v) = i16::try_from(n) {
        out.push(0xd1);
        out.extend_from_slice(&v.to_be_bytes());
    } else if let Ok(v) = i32::try_from(n) {
        out.push(0xd2);
        out.extend_from_slice(&v.to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

pub(crate) fn write_f64(out: &mut Vec<u8>, v: f64) {
    out.push(0xcb);
    out.extend_from_slice(&v.to_bits().to_be_bytes());
}

fn write_len(out: &mut Vec<u8>, len: usize, fix: (u8, usize), m8: Option<u8>, m16: u8, m32: u8) {
    if len < fix.1 {
        out.push(fix.0 | len as u8);
    } else if let (Some(m), Ok(v)) = (m8, u8::try_from(len)) {
        out.extend_from_slice(&[m, v]);
    } else if let Ok(v) = u16::try_from(len) {
        out.push(m16);
        out.extend_from_slice(&v.to_be_bytes());
    } else {
        // Lengths above u32 cannot occur: messages are limited to 2^31 − 1 bytes.
        let v = u32::try_from(len).unwrap_or(u32::MAX);
        out.push(m32);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    write_len(out, s.len(), (0xa0, 32), Some(0xd9), 0xda, 0xdb);
    out.extend_from_slice(s.as_bytes());
}

pub(crate) fn write_array_len(out: &mut Vec<u8>, len: usize) {
    write_len(out, len, (0x90, 16), None, 0xdc, 0xdd);
}

pub(crate) fn write_map_len(out: &mut Vec<u8>, len: usize) {
    write_len(out, len, (0x80, 16), None, 0xde, 0xdf);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_formats() {
        let mut v = Vec::new();
        write_uint(&mut v, 127);
        write_uint(&mut v, 128);
        write_uint(&mut v, 256);
        write_uint(&mut v, 70_000);
        write_uint(&mut v, 1 << 40);
        assert_eq!(
            v,
            [
                0x7f, 0xcc, 0x80, 0xcd, 0x01, 0x00, 0xce, 0x00, 0x01, 0x11, 0x70, 0xcf, 0, 0, 1, 0,
                0, 0, 0, 0
            ]
        );
        let mut v = Vec::new();
        write_int(&mut v, -1);
        write_int(&mut v, -32);
        write_int(&mut v, -33);
        write_int(&mut v, -200);
        assert_eq!(v, [0xff, 0xe0, 0xd0, 0xdf, 0xd1, 0xff, 0x38]);
        let mut v = Vec::new();
        write_str(&mut v, "hi");
        write_str(&mut v, &"x".repeat(32));
        assert_eq!(&v[..5], &[0xa2, b'h', b'i', 0xd9, 32]);
        let mut v = Vec::new();
        write_array_len(&mut v, 15);
        write_array_len(&mut v, 16);
        write_map_len(&mut v, 0);
        write_map_len(&mut v, 70_000);
        assert_eq!(v, [0x9f, 0xdc, 0, 16, 0x80, 0xdf, 0, 1, 0x11, 0x70]);
    }

    #[test]
    fn reader_reads_what_writer_writes() {
        let mut v = Vec::new();
        write_array_len(&mut v, 4);
        write_int(&mut v, -200);
        write_uint(&mut v, 1 << 40);
        write_str(&mut v, "héllo");
        write_f64(&mut v, 1.5);
        let mut r = Reader::new(&v);
        assert_eq!(r.array_len("x").unwrap(), 4);
        assert_eq!(r.item().unwrap(), Item::Int(-200));
        assert_eq!(r.uint("x").unwrap(), 1 << 40);
        assert_eq!(r.str("x").unwrap(), "héllo");
        assert_eq!(r.item().unwrap(), Item::F64(1.5));
        assert_eq!(r.remaining(), 0);
        let mut r = Reader::new(&v);
        assert_eq!(r.skip_value().unwrap(), (0, v.len()));
    }

    #[test]
    fn skip_rejects_truncation_and_huge_counts() {
        assert!(Reader::new(&[0x92, 0x01]).skip_value().is_err());
        assert!(Reader::new(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01])
            .skip_value()
            .is_err());
        assert!(Reader::new(&[0xdf, 0xff, 0xff, 0xff, 0xff])
            .skip_value()
            .is_err());
        assert!(Reader::new(&[0xdb, 0xff, 0xff, 0xff, 0xff])
            .skip_value()
            .is_err());
        assert!(Reader::new(&[0xc1]).skip_value().is_err());
        // Deep nesting costs no stack.
        let mut deep = vec![0x91; 100_000];
        deep.push(0xc0);
        assert_eq!(Reader::new(&deep).skip_value().unwrap(), (0, deep.len()));
    }
}
