//! The little-endian byte codec under every format an agent reads from
//! another kernel: the wire messages ([`crate::wire`]) and the process
//! image ([`crate::migrate::image`]).
//!
//! [`Writer`] appends fixed-width integers to a buffer; [`Reader`] takes
//! them back from a byte slice, checking every length against what is
//! left, so a short or forged input is a [`Short`] error and never a panic
//! or an out-of-bounds read. The formats above it add their own envelope
//! (kind and version, record tags, checksums, bounds) and turn `Short` into
//! their own error with their own context.
//!
//! [`Field`] is how a value of some type is laid out in a wire message: the
//! message table in `wire.rs` derives each message's encoding from its
//! fields' types, so a layout is written once per type, not once per
//! message.

/// The input ended before a value did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Short {
    /// Length of the input.
    pub at: usize,
    /// How many more bytes the value needed.
    pub need: usize,
}

/// Appends little-endian values to a buffer (which it never clears, so a
/// caller can encode into a reused one).
#[derive(Debug)]
pub struct Writer<'a>(pub &'a mut Vec<u8>);

impl Writer<'_> {
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Any fixed-width integer, by its type.
    pub fn le<T: Field>(&mut self, v: T) {
        v.put(self);
    }
    pub fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    /// Lengths and counts in wire messages are `u32`: a frame never
    /// approaches 4 GiB (rings are far smaller), so this cannot truncate in
    /// practice; it saturates rather than wraps if it ever did, and the
    /// decoder then reports a short frame instead of misreading.
    pub fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
}

/// Takes little-endian values from a byte slice, front to back.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, at: 0 }
    }

    /// Bytes not yet taken.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }

    /// Bytes taken so far.
    pub fn position(&self) -> usize {
        self.at
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Short> {
        let left = self.remaining();
        if n > left {
            return Err(Short {
                at: self.buf.len(),
                need: n - left,
            });
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Short> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8, Short> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, Short> {
        self.array().map(u16::from_le_bytes)
    }
    pub fn u32(&mut self) -> Result<u32, Short> {
        self.array().map(u32::from_le_bytes)
    }
    pub fn i32(&mut self) -> Result<i32, Short> {
        self.array().map(i32::from_le_bytes)
    }
    pub fn u64(&mut self) -> Result<u64, Short> {
        self.array().map(u64::from_le_bytes)
    }

    /// A `u32` count of items that take at least `min_item` bytes each,
    /// refused when the rest of the input cannot hold that many (so a
    /// forged count cannot make the caller reserve memory).
    pub fn count(&mut self, min_item: usize) -> Result<usize, Short> {
        // u32 always fits usize on the 64-bit targets we build for.
        let n = self.u32()? as usize;
        let need = n.saturating_mul(min_item);
        let left = self.remaining();
        if need > left {
            return Err(Short {
                at: self.buf.len(),
                need: need - left,
            });
        }
        Ok(n)
    }
}

/// Why a field of a wire message could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldError {
    Short(Short),
    /// A value outside the field's set (an enum code, a flag).
    BadValue {
        field: &'static str,
        value: u64,
    },
    /// A string field that is not UTF-8.
    Utf8(&'static str),
}

impl From<Short> for FieldError {
    fn from(s: Short) -> Self {
        FieldError::Short(s)
    }
}

/// How a value is laid out in a wire message.
///
/// Integers are fixed width; `bool` is one byte, 0 or 1; strings and byte
/// strings are a `u32` length and the bytes; lists a `u32` count and the
/// items; `Option` a byte 0 (none) or 1 and the value; tuples and structs
/// their fields in order.
pub trait Field: Sized {
    /// The fewest bytes an encoding takes (bounds list counts).
    const MIN: usize;
    fn put(&self, w: &mut Writer<'_>);
    /// `field` names the message field, for errors.
    fn get(r: &mut Reader<'_>, field: &'static str) -> Result<Self, FieldError>;

    /// A list of these: the count, then each. Bytes override it with one
    /// copy.
    fn put_list(items: &[Self], w: &mut Writer<'_>) {
        w.count(items.len());
        for i in items {
            i.put(w);
        }
    }
    fn get_list(r: &mut Reader<'_>, field: &'static str) -> Result<Vec<Self>, FieldError> {
        let n = r.count(Self::MIN.max(1))?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(Self::get(r, field)?);
        }
        Ok(v)
    }
}

macro_rules! int_field {
    ($($t:ident),*) => {$(
        impl Field for $t {
            const MIN: usize = std::mem::size_of::<$t>();
            fn put(&self, w: &mut Writer<'_>) {
                w.$t(*self);
            }
            fn get(r: &mut Reader<'_>, _: &'static str) -> Result<Self, FieldError> {
                Ok(r.$t()?)
            }
        }
    )*};
}
int_field!(u16, u32, i32, u64);

impl Field for u8 {
    const MIN: usize = 1;
    fn put(&self, w: &mut Writer<'_>) {
        w.u8(*self);
    }
    fn get(r: &mut Reader<'_>, _: &'static str) -> Result<Self, FieldError> {
        Ok(r.u8()?)
    }
    fn put_list(items: &[Self], w: &mut Writer<'_>) {
        w.count(items.len());
        w.raw(items);
    }
    fn get_list(r: &mut Reader<'_>, _: &'static str) -> Result<Vec<Self>, FieldError> {
        let n = r.count(1)?;
        Ok(r.take(n)?.to_vec())
    }
}

impl Field for bool {
    const MIN: usize = 1;
    fn put(&self, w: &mut Writer<'_>) {
        w.u8(u8::from(*self));
    }
    fn get(r: &mut Reader<'_>, field: &'static str) -> Result<Self, FieldError> {
        match r.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(FieldError::BadValue {
                field,
                value: u64::from(v),
            }),
        }
    }
}

impl Field for String {
    const MIN: usize = 4;
    fn put(&self, w: &mut Writer<'_>) {
        u8::put_list(self.as_bytes(), w);
    }
    fn get(r: &mut Reader<'_>, field: &'static str) -> Result<Self, FieldError> {
        let n = r.count(1)?;
        std::str::from_utf8(r.take(n)?)
            .map(str::to_owned)
            .map_err(|_| FieldError::Utf8(field))
    }
}

impl<T: Field> Field for Vec<T> {
    const MIN: usize = 4;
    fn put(&self, w: &mut Writer<'_>) {
        T::put_list(self, w);
    }
    fn get(r: &mut Reader<'_>, field: &'static str) -> Result<Self, FieldError> {
        T::get_list(r, field)
    }
}

impl<T: Field> Field for Option<T> {
    const MIN: usize = 1;
    fn put(&self, w: &mut Writer<'_>) {
        match self {
            Some(v) => {
                w.u8(1);
                v.put(w);
            }
            None => w.u8(0),
        }
    }
    fn get(r: &mut Reader<'_>, field: &'static str) -> Result<Self, FieldError> {
        match r.u8()? {
            0 => Ok(None),
            1 => Ok(Some(T::get(r, field)?)),
            v => Err(FieldError::BadValue {
                field,
                value: u64::from(v),
            }),
        }
    }
}

impl<A: Field, B: Field> Field for (A, B) {
    const MIN: usize = A::MIN + B::MIN;
    fn put(&self, w: &mut Writer<'_>) {
        self.0.put(w);
        self.1.put(w);
    }
    fn get(r: &mut Reader<'_>, field: &'static str) -> Result<Self, FieldError> {
        Ok((A::get(r, field)?, B::get(r, field)?))
    }
}

/// Declares a struct whose wire layout is its fields in order.
macro_rules! field_struct {
    (
        $(#[$m:meta])*
        pub struct $name:ident {
            $( $(#[$fm:meta])* pub $f:ident : $t:ty ),* $(,)?
        }
    ) => {
        $(#[$m])*
        pub struct $name {
            $( $(#[$fm])* pub $f: $t ),*
        }

        impl $crate::codec::Field for $name {
            const MIN: usize = 0 $( + <$t as $crate::codec::Field>::MIN )*;
            fn put(&self, w: &mut $crate::codec::Writer<'_>) {
                $( self.$f.put(w); )*
            }
            fn get(
                r: &mut $crate::codec::Reader<'_>,
                _: &'static str,
            ) -> Result<Self, $crate::codec::FieldError> {
                Ok($name {
                    $( $f: <$t as $crate::codec::Field>::get(r, stringify!($f))? ),*
                })
            }
        }

        #[cfg(test)]
        impl proptest::arbitrary::Arbitrary for $name {
            type Parameters = ();
            type Strategy = proptest::strategy::BoxedStrategy<Self>;
            fn arbitrary_with(_: ()) -> Self::Strategy {
                use proptest::prelude::*;
                // Nested pairs: a struct may have more fields than the
                // largest tuple proptest knows.
                any::<$crate::codec::nest_ty!($($t),*)>()
                    .prop_map(|$crate::codec::nest_pat!($($f),*)| $name { $($f),* })
                    .boxed()
            }
        }
    };
}
pub(crate) use field_struct;

/// `(A, (B, (C, ())))` for types `A, B, C` (the tests' strategies).
#[cfg(test)]
macro_rules! nest_ty {
    () => { () };
    ($t:ty $(, $rest:ty)*) => { ($t, $crate::codec::nest_ty!($($rest),*)) };
}
#[cfg(test)]
pub(crate) use nest_ty;

/// The pattern that takes `nest_ty!` apart.
#[cfg(test)]
macro_rules! nest_pat {
    () => { () };
    ($f:ident $(, $rest:ident)*) => { ($f, $crate::codec::nest_pat!($($rest),*)) };
}
#[cfg(test)]
pub(crate) use nest_pat;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_little_endian_and_read_back() {
        let mut v = Vec::new();
        let mut w = Writer(&mut v);
        w.u8(1);
        w.u16(0x0203);
        w.u32(0x0405_0607);
        w.i32(-2);
        w.u64(0x0809_0a0b_0c0d_0e0f);
        assert_eq!(
            &v[..11],
            &[1, 3, 2, 7, 6, 5, 4, 0xfe, 0xff, 0xff, 0xff],
            "little-endian, in order"
        );
        let mut r = Reader::new(&v);
        assert_eq!(r.u8(), Ok(1));
        assert_eq!(r.u16(), Ok(0x0203));
        assert_eq!(r.u32(), Ok(0x0405_0607));
        assert_eq!(r.i32(), Ok(-2));
        assert_eq!(r.u64(), Ok(0x0809_0a0b_0c0d_0e0f));
        assert_eq!(r.remaining(), 0);
        assert_eq!(r.u8(), Err(Short { at: 19, need: 1 }));
    }

    #[test]
    fn a_short_input_says_how_much_is_missing() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u64(), Err(Short { at: 3, need: 5 }));
        // Nothing was taken by the failed read.
        assert_eq!(r.u16(), Ok(0x0201));
    }

    #[test]
    fn a_forged_count_is_refused_before_any_allocation() {
        let mut v = Vec::new();
        Writer(&mut v).u32(u32::MAX);
        v.extend_from_slice(&[0; 8]);
        let mut r = Reader::new(&v);
        assert_eq!(
            r.clone().count(4),
            Err(Short {
                at: 12,
                need: (u32::MAX as usize) * 4 - 8
            })
        );
        assert!(Vec::<u64>::get(&mut r, "list").is_err());
    }

    #[test]
    fn composite_fields_round_trip() {
        let v: (Vec<String>, Option<(u8, bool)>) =
            (vec!["a".into(), "béta".into()], Some((7, true)));
        let mut buf = Vec::new();
        v.put(&mut Writer(&mut buf));
        let mut r = Reader::new(&buf);
        assert_eq!(<(Vec<String>, Option<(u8, bool)>)>::get(&mut r, "x"), Ok(v));
        assert_eq!(r.remaining(), 0);
        // A bool other than 0 or 1 names its field.
        assert_eq!(
            bool::get(&mut Reader::new(&[2]), "lazy"),
            Err(FieldError::BadValue {
                field: "lazy",
                value: 2
            })
        );
    }
}
