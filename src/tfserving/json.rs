//! A scanner for the JSON that TF Serving's REST API reads and writes.
//!
//! It differs from RFC 8259 JSON where TF Serving does: the bare tokens `NaN`,
//! `Infinity` and `-Infinity` are numbers. It never recurses: nesting is tracked on
//! explicit stacks bounded by a depth limit, so a 10^6-deep body fails with
//! `too_deep` instead of overflowing the stack. Tensors (nested lists of scalars) are
//! parsed straight into flat typed buffers with shape inference, without building a
//! value tree; every element is taken from the exchange's `Budget` before it is stored.

use super::tensor::{Budget, DType, Tensor, TensorValues};
use super::{reason, DecodeError};
use base64::Engine;
use std::borrow::Cow;

/// A number as written: integers stay exact, anything with a fraction, an exponent
/// or a special token is a float.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    pub fn as_f64(self) -> f64 {
        match self {
            Num::Int(v) => v as f64,
            Num::Float(v) => v,
        }
    }
}

/// A position in a JSON document.
pub struct Json<'a> {
    /// The whole document.
    b: &'a [u8],
    /// The next byte to read.
    i: usize,
    /// Deepest nesting accepted, in tensors and in skipped values alike.
    max_depth: usize,
}

/// Powers of ten exactly representable in f64, for the fast float path.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20,
    1e21, 1e22,
];

impl<'a> Json<'a> {
    pub fn new(b: &'a [u8], max_depth: usize) -> Self {
        Json { b, i: 0, max_depth }
    }

    /// The current byte offset, to come back to with `rewind`.
    pub fn position(&self) -> usize {
        self.i
    }

    /// Goes back to an offset returned by `position` (a look-ahead).
    pub fn rewind(&mut self, position: usize) {
        self.i = position.min(self.b.len());
    }

    /// A `bad_json` error at the current position.
    pub fn error(&self, what: &str) -> DecodeError {
        DecodeError::new(reason::BAD_JSON, format!("{what} at byte {}", self.i))
    }

    fn too_deep(&self) -> DecodeError {
        DecodeError::new(reason::TOO_DEEP, format!("nesting deeper than {} at byte {}", self.max_depth, self.i))
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(&c) = self.b.get(self.i) {
            if matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    /// The next non-blank byte, not consumed.
    #[inline]
    pub fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    /// Consumes `c` (after blanks) or fails.
    #[inline]
    pub fn eat(&mut self, c: u8) -> Result<(), DecodeError> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.error(&format!("expected `{}`", c as char)))
        }
    }

    /// Checks that only blanks remain.
    pub fn end(&mut self) -> Result<(), DecodeError> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.error("unexpected data after the document")),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), DecodeError> {
        if self.b.get(self.i..self.i + word.len()) == Some(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(self.error("invalid literal"))
        }
    }

    /// A string's bytes, unescaped (borrowed when it has no escapes). Not checked
    /// for UTF-8: `text` does that.
    pub fn string(&mut self) -> Result<Cow<'a, [u8]>, DecodeError> {
        self.eat(b'"')?;
        let start = self.i;
        let b = self.b;
        let mut j = start;
        while let Some(&c) = b.get(j) {
            match c {
                b'"' => {
                    self.i = j + 1;
                    return Ok(Cow::Borrowed(&b[start..j]));
                }
                b'\\' => break,
                0..=0x1f => {
                    self.i = j;
                    return Err(self.error("control character in string"));
                }
                _ => j += 1,
            }
        }
        let mut out = b[start..j].to_vec();
        self.i = j;
        loop {
            let Some(&c) = b.get(self.i) else {
                return Err(self.error("unterminated string"));
            };
            self.i += 1;
            match c {
                b'"' => return Ok(Cow::Owned(out)),
                b'\\' => {
                    let Some(&e) = b.get(self.i) else {
                        return Err(self.error("unterminated escape"));
                    };
                    self.i += 1;
                    match e {
                        b'"' | b'\\' | b'/' => out.push(e),
                        b'b' => out.push(0x08),
                        b'f' => out.push(0x0c),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            let ch = self.unicode_escape()?;
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                        }
                        _ => return Err(self.error("invalid escape")),
                    }
                }
                0..=0x1f => return Err(self.error("control character in string")),
                _ => out.push(c),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, DecodeError> {
        let digits = self.b.get(self.i..self.i + 4).ok_or_else(|| self.error("short \\u escape"))?;
        let text = std::str::from_utf8(digits).map_err(|_| self.error("invalid \\u escape"))?;
        let v = u32::from_str_radix(text, 16).map_err(|_| self.error("invalid \\u escape"))?;
        self.i += 4;
        Ok(v)
    }

    fn unicode_escape(&mut self) -> Result<char, DecodeError> {
        let first = self.hex4()?;
        let code = if (0xd800..0xdc00).contains(&first) {
            if self.b.get(self.i..self.i + 2) != Some(b"\\u") {
                return Err(self.error("unpaired surrogate"));
            }
            self.i += 2;
            let second = self.hex4()?;
            if !(0xdc00..0xe000).contains(&second) {
                return Err(self.error("unpaired surrogate"));
            }
            0x10000 + ((first - 0xd800) << 10) + (second - 0xdc00)
        } else {
            first
        };
        char::from_u32(code).ok_or_else(|| self.error("invalid code point"))
    }

    /// A string as UTF-8 text.
    pub fn text(&mut self) -> Result<Cow<'a, str>, DecodeError> {
        match self.string()? {
            Cow::Borrowed(b) => std::str::from_utf8(b).map(Cow::Borrowed).map_err(|_| self.error("invalid UTF-8")),
            Cow::Owned(v) => String::from_utf8(v).map(Cow::Owned).map_err(|_| self.error("invalid UTF-8")),
        }
    }

    /// A number, including TF Serving's `NaN`, `Infinity` and `-Infinity`.
    #[inline]
    pub fn number(&mut self) -> Result<Num, DecodeError> {
        self.ws();
        let b = self.b;
        let start = self.i;
        let mut j = start;
        let negative = b.get(j) == Some(&b'-');
        if negative {
            j += 1;
        }
        match b.get(j) {
            Some(b'N') => {
                self.i = j;
                self.literal(b"NaN")?;
                return Ok(Num::Float(f64::NAN));
            }
            Some(b'I') => {
                self.i = j;
                self.literal(b"Infinity")?;
                return Ok(Num::Float(if negative { f64::NEG_INFINITY } else { f64::INFINITY }));
            }
            _ => {}
        }
        // Digits before the point, then after it, accumulated as one mantissa.
        let mut mantissa: u64 = 0;
        let mut significant = 0usize;
        let int_start = j;
        (j, _) = accumulate_digits(b, j, &mut mantissa, &mut significant);
        let int_digits = j - int_start;
        if int_digits == 0 {
            self.i = start;
            return Err(self.error("expected a value"));
        }
        let mut fraction_digits = 0usize;
        let mut is_float = false;
        if b.get(j) == Some(&b'.') {
            is_float = true;
            j += 1;
            let frac_start = j;
            (j, fraction_digits) = accumulate_digits(b, j, &mut mantissa, &mut significant);
            if j == frac_start {
                self.i = j;
                return Err(self.error("expected digits after the decimal point"));
            }
        }
        let mut exponent: i64 = 0;
        if matches!(b.get(j), Some(b'e' | b'E')) {
            is_float = true;
            j += 1;
            let exp_negative = match b.get(j) {
                Some(b'-') => {
                    j += 1;
                    true
                }
                Some(b'+') => {
                    j += 1;
                    false
                }
                _ => false,
            };
            let exp_start = j;
            while let Some(&c) = b.get(j) {
                if !c.is_ascii_digit() {
                    break;
                }
                exponent = (exponent * 10 + i64::from(c - b'0')).min(1 << 20);
                j += 1;
            }
            if j == exp_start {
                self.i = j;
                return Err(self.error("expected exponent digits"));
            }
            if exp_negative {
                exponent = -exponent;
            }
        }
        self.i = j;
        if !is_float {
            if significant <= 18 {
                let v = mantissa as i64;
                return Ok(Num::Int(if negative { -v } else { v }));
            }
            let text = std::str::from_utf8(&b[start..j]).map_err(|_| self.error("invalid number"))?;
            return Ok(match text.parse::<i64>() {
                Ok(v) => Num::Int(v),
                Err(_) => Num::Float(text.parse::<f64>().map_err(|_| self.error("invalid number"))?),
            });
        }
        // Clinger's fast path: an exact mantissa times an exact power of ten is
        // correctly rounded by one IEEE operation.
        let scale = exponent - fraction_digits as i64;
        if significant <= 19 && mantissa < (1u64 << 53) && (-22..=22).contains(&scale) {
            let m = mantissa as f64;
            let v = if scale < 0 { m / POW10[(-scale) as usize] } else { m * POW10[scale as usize] };
            return Ok(Num::Float(if negative { -v } else { v }));
        }
        let text = std::str::from_utf8(&b[start..j]).map_err(|_| self.error("invalid number"))?;
        text.parse::<f64>().map(Num::Float).map_err(|_| self.error("invalid number"))
    }

    /// Starts an object: consumes `{`.
    pub fn begin_object(&mut self) -> Result<(), DecodeError> {
        self.eat(b'{')
    }

    /// The next key of an object begun with `begin_object` (its `:` consumed), or
    /// None at its end. `first` tracks whether a comma is due.
    pub fn next_key(&mut self, first: &mut bool) -> Result<Option<Cow<'a, str>>, DecodeError> {
        match self.peek() {
            Some(b'}') => {
                self.i += 1;
                return Ok(None);
            }
            Some(b',') if !*first => self.i += 1,
            Some(b'"') if *first => {}
            _ => return Err(self.error("expected `,` or `}` in object")),
        }
        *first = false;
        let key = self.text()?;
        self.eat(b':')?;
        Ok(Some(key))
    }

    /// Starts an array: consumes `[`.
    pub fn begin_array(&mut self) -> Result<(), DecodeError> {
        self.eat(b'[')
    }

    /// True when another element follows in an array begun with `begin_array`
    /// (its comma consumed); false at its end (`]` consumed).
    pub fn next_element(&mut self, first: &mut bool) -> Result<bool, DecodeError> {
        match self.peek() {
            Some(b']') => {
                self.i += 1;
                Ok(false)
            }
            Some(b',') if !*first => {
                self.i += 1;
                *first = false;
                Ok(true)
            }
            Some(_) if *first => {
                *first = false;
                Ok(true)
            }
            _ => Err(self.error("expected `,` or `]` in array")),
        }
    }

    /// Skips one value of any kind, checking its syntax, without recursion.
    pub fn skip_value(&mut self) -> Result<(), DecodeError> {
        // true = inside an object, false = inside an array.
        let mut stack: Vec<bool> = Vec::new();
        'value: loop {
            match self.peek() {
                Some(b'{') | Some(b'[') => {
                    if stack.len() >= self.max_depth {
                        return Err(self.too_deep());
                    }
                    let object = self.b[self.i] == b'{';
                    self.i += 1;
                    let close = if object { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        self.i += 1;
                    } else {
                        stack.push(object);
                        if object {
                            self.text()?;
                            self.eat(b':')?;
                        }
                        continue 'value;
                    }
                }
                Some(b'"') => {
                    self.string()?;
                }
                Some(b't') => self.literal(b"true")?,
                Some(b'f') => self.literal(b"false")?,
                Some(b'n') => self.literal(b"null")?,
                Some(_) => {
                    self.number()?;
                }
                None => return Err(self.error("unexpected end of document")),
            }
            // A value is complete: close containers or move to the next element.
            loop {
                let Some(&object) = stack.last() else {
                    return Ok(());
                };
                match self.peek() {
                    Some(b',') => {
                        self.i += 1;
                        if object {
                            self.text()?;
                            self.eat(b':')?;
                        }
                        continue 'value;
                    }
                    Some(b'}') if object => {
                        self.i += 1;
                        stack.pop();
                    }
                    Some(b']') if !object => {
                        self.i += 1;
                        stack.pop();
                    }
                    _ => return Err(self.error("expected `,` or the end of a container")),
                }
            }
        }
    }

    /// Reads `{"b64": "..."}` (the `{` not yet consumed) and returns the decoded
    /// bytes; None, with the position unchanged, when the object is anything else.
    pub fn b64_object(&mut self) -> Result<Option<Vec<u8>>, DecodeError> {
        let save = self.i;
        self.begin_object()?;
        let mut first = true;
        let is_b64 =
            matches!(self.next_key(&mut first), Ok(Some(ref k)) if k == "b64") && self.peek() == Some(b'"') && {
                let at = self.i;
                let ok = self.string().is_ok() && self.peek() == Some(b'}');
                self.i = at;
                ok
            };
        if !is_b64 {
            self.i = save;
            return Ok(None);
        }
        let encoded = self.string()?;
        self.eat(b'}')?;
        decode_b64(&encoded).map(Some)
    }

    /// Parses one value (a scalar or nested lists of scalars) into `tensor`.
    pub fn tensor(&mut self, tensor: &mut TensorBuilder, budget: &mut Budget) -> Result<(), DecodeError> {
        tensor.parts += 1;
        let mut counts: Vec<usize> = Vec::new();
        loop {
            // A value is expected at depth counts.len().
            let depth = counts.len();
            let c = self.peek().ok_or_else(|| self.error("unexpected end of document"))?;
            let mut closed_empty = false;
            if c == b'[' {
                if depth >= self.max_depth {
                    return Err(self.too_deep());
                }
                if tensor.rank.is_some_and(|r| depth >= r) {
                    return Err(tensor.ragged(self.i));
                }
                self.i += 1;
                if self.peek() == Some(b']') {
                    self.i += 1;
                    tensor.close_dim(depth, 0, self.i)?;
                    closed_empty = true;
                } else {
                    counts.push(0);
                    continue;
                }
            }
            if !closed_empty {
                tensor.leaf_at(depth, self.i)?;
                budget.take(1)?;
                match c {
                    b'"' => {
                        let s = self.string()?;
                        tensor.push_bytes(s.into_owned(), self.i)?;
                    }
                    b't' => {
                        self.literal(b"true")?;
                        tensor.push_bool(true, self.i)?;
                    }
                    b'f' => {
                        self.literal(b"false")?;
                        tensor.push_bool(false, self.i)?;
                    }
                    b'n' => {
                        self.literal(b"null")?;
                        tensor.push_num(Num::Float(f64::NAN), self.i)?;
                    }
                    b'{' => match self.b64_object()? {
                        Some(bytes) => tensor.push_bytes(bytes, self.i)?,
                        None => return Err(self.error("object where a tensor element was expected")),
                    },
                    _ => {
                        let n = self.number()?;
                        tensor.push_num(n, self.i)?;
                    }
                }
            }
            // The value at `depth` is complete.
            loop {
                let Some(top) = counts.last_mut() else {
                    return Ok(());
                };
                *top += 1;
                match self.peek() {
                    Some(b',') => {
                        self.i += 1;
                        break;
                    }
                    Some(b']') => {
                        self.i += 1;
                        let n = counts.pop().unwrap_or(0);
                        tensor.close_dim(counts.len(), n, self.i)?;
                    }
                    _ => return Err(self.error("expected `,` or `]` in a tensor")),
                }
            }
        }
    }
}

/// Accumulates the ASCII digits from `j` into `mantissa`, keeping the first 19
/// significant ones (a u64 holds them exactly) and only counting the rest. Returns the
/// index after the digits and how many of them were kept in the mantissa.
#[inline(always)]
fn accumulate_digits(b: &[u8], mut j: usize, mantissa: &mut u64, significant: &mut usize) -> (usize, usize) {
    let mut kept = 0;
    while let Some(&c) = b.get(j) {
        if !c.is_ascii_digit() {
            break;
        }
        if *significant < 19 {
            *mantissa = *mantissa * 10 + u64::from(c - b'0');
            if *mantissa != 0 {
                *significant += 1;
            }
            kept += 1;
        } else {
            *significant += 1;
        }
        j += 1;
    }
    (j, kept)
}

/// Decodes base64 as TF Serving accepts it: standard or URL-safe alphabet, padded or not.
pub fn decode_b64(encoded: &[u8]) -> Result<Vec<u8>, DecodeError> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const CONFIG: GeneralPurposeConfig =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    const STANDARD: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, CONFIG);
    const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, CONFIG);
    STANDARD
        .decode(encoded)
        .or_else(|_| URL_SAFE.decode(encoded))
        .map_err(|e| DecodeError::new(reason::BAD_BASE64, format!("invalid base64: {e}")))
}

/// Values accumulated while parsing; their kind is fixed by the first element,
/// except that integers widen to floats when a float appears.
#[derive(Debug, Default)]
enum Acc {
    #[default]
    Empty,
    Int(Vec<i64>),
    Float(Vec<f64>),
    Bool(Vec<bool>),
    Bytes(Vec<Vec<u8>>),
}

/// A tensor being parsed from JSON, possibly one row at a time (row format with
/// named inputs), with the shape inferred and checked as the values arrive.
#[derive(Debug, Default)]
pub struct TensorBuilder {
    /// The elements so far.
    values: Acc,
    /// Length of the lists at each depth, once the first list at that depth closed.
    dims: Vec<Option<usize>>,
    /// Depth of the scalars, once the first one is seen.
    rank: Option<usize>,
    /// Values parsed into this builder (rows, in row format).
    parts: usize,
}

impl TensorBuilder {
    fn ragged(&self, at: usize) -> DecodeError {
        DecodeError::new(reason::RAGGED, format!("lists of different shapes in one tensor (byte {at})"))
    }

    fn mixed(&self, at: usize) -> DecodeError {
        DecodeError::new(reason::MIXED_TYPES, format!("values of different types in one tensor (byte {at})"))
    }

    #[inline]
    fn leaf_at(&mut self, depth: usize, at: usize) -> Result<(), DecodeError> {
        match self.rank {
            Some(r) if r == depth => Ok(()),
            Some(_) => Err(self.ragged(at)),
            None => {
                if self.dims.iter().skip(depth).any(Option::is_some) {
                    return Err(self.ragged(at));
                }
                self.rank = Some(depth);
                Ok(())
            }
        }
    }

    fn close_dim(&mut self, depth: usize, len: usize, at: usize) -> Result<(), DecodeError> {
        if self.rank.is_some_and(|r| depth >= r) {
            return Err(self.ragged(at));
        }
        if self.dims.len() <= depth {
            self.dims.resize(depth + 1, None);
        }
        match self.dims[depth] {
            Some(d) if d != len => Err(self.ragged(at)),
            Some(_) => Ok(()),
            None => {
                self.dims[depth] = Some(len);
                Ok(())
            }
        }
    }

    #[inline]
    fn push_num(&mut self, n: Num, at: usize) -> Result<(), DecodeError> {
        match (&mut self.values, n) {
            (Acc::Float(v), n) => v.push(n.as_f64()),
            (Acc::Int(v), Num::Int(x)) => v.push(x),
            (Acc::Int(v), Num::Float(x)) => {
                let mut floats: Vec<f64> = v.iter().map(|i| *i as f64).collect();
                floats.push(x);
                self.values = Acc::Float(floats);
            }
            (Acc::Empty, Num::Int(x)) => self.values = Acc::Int(vec![x]),
            (Acc::Empty, Num::Float(x)) => self.values = Acc::Float(vec![x]),
            _ => return Err(self.mixed(at)),
        }
        Ok(())
    }

    fn push_bool(&mut self, b: bool, at: usize) -> Result<(), DecodeError> {
        match &mut self.values {
            Acc::Bool(v) => v.push(b),
            Acc::Empty => self.values = Acc::Bool(vec![b]),
            _ => return Err(self.mixed(at)),
        }
        Ok(())
    }

    fn push_bytes(&mut self, s: Vec<u8>, at: usize) -> Result<(), DecodeError> {
        match &mut self.values {
            Acc::Bytes(v) => v.push(s),
            Acc::Empty => self.values = Acc::Bytes(vec![s]),
            _ => return Err(self.mixed(at)),
        }
        Ok(())
    }

    /// Values parsed into this builder.
    pub fn parts(&self) -> usize {
        self.parts
    }

    /// The tensor of one value (`rows = false`) or of `parts` rows stacked along a
    /// new leading dimension (`rows = true`).
    pub fn finish(self, rows: bool) -> Result<Tensor, DecodeError> {
        let rank = self.rank.unwrap_or(self.dims.len());
        let mut shape = Vec::with_capacity(rank + 1);
        if rows {
            shape.push(self.parts);
        }
        for d in 0..rank {
            match self.dims.get(d).copied().flatten() {
                Some(n) => shape.push(n),
                None => return Err(DecodeError::new(reason::RAGGED, "tensor shape could not be inferred")),
            }
        }
        let (dtype, values) = match self.values {
            Acc::Empty => (DType::Double, TensorValues::Float(Vec::new())),
            Acc::Int(v) => (DType::Int64, TensorValues::Int(v)),
            Acc::Float(v) => (DType::Double, TensorValues::Float(v)),
            Acc::Bool(v) => (DType::Bool, TensorValues::Bool(v)),
            Acc::Bytes(v) => (DType::String, TensorValues::Bytes(v)),
        };
        let expected = shape.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d));
        if expected != Some(values.len()) {
            return Err(DecodeError::new(
                reason::RAGGED,
                format!("{} values do not fill the inferred shape {shape:?}", values.len()),
            ));
        }
        Ok(Tensor { dtype, shape, values })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Tensor, DecodeError> {
        let mut json = Json::new(text.as_bytes(), 64);
        let mut builder = TensorBuilder::default();
        json.tensor(&mut builder, &mut Budget::new(1 << 20))?;
        json.end()?;
        builder.finish(false)
    }

    #[test]
    fn nested_lists_give_shape_and_row_major_values() {
        let t = parse("[[1, 2.5], [3, -4e2]]").unwrap();
        assert_eq!(t.shape, vec![2, 2]);
        assert_eq!(t.values, TensorValues::Float(vec![1.0, 2.5, 3.0, -400.0]));
        let t = parse("7").unwrap();
        assert_eq!(t.shape, Vec::<usize>::new());
        assert_eq!(t.values, TensorValues::Int(vec![7]));
        assert_eq!(parse("[[], []]").unwrap().shape, vec![2, 0]);
    }

    #[test]
    fn ragged_lists_are_rejected() {
        for text in ["[[1], [2, 3]]", "[1, [2]]", "[[1], 2]", "[[], [1]]", "[[[1]], [2]]"] {
            assert_eq!(parse(text).unwrap_err().reason, reason::RAGGED, "{text}");
        }
    }

    #[test]
    fn tf_serving_special_floats_are_numbers() {
        let t = parse("[NaN, Infinity, -Infinity, 0.5]").unwrap();
        let TensorValues::Float(v) = t.values else { panic!() };
        assert!(v[0].is_nan());
        assert_eq!(&v[1..], &[f64::INFINITY, f64::NEG_INFINITY, 0.5]);
    }

    #[test]
    fn floats_round_like_the_standard_library() {
        for text in ["0.2489241510629654", "0.10302313848680769", "1e-300", "123456789012345678901234", "-0.0", "5e22"]
        {
            let t = parse(text).unwrap();
            assert_eq!(t.values.number(0).to_bits(), text.parse::<f64>().unwrap().to_bits(), "{text}");
        }
    }

    #[test]
    fn a_million_deep_body_is_too_deep_without_overflowing_the_stack() {
        let deep = "[".repeat(1_000_000);
        assert_eq!(parse(&deep).unwrap_err().reason, reason::TOO_DEEP);
        let mut json = Json::new(deep.as_bytes(), 64);
        assert_eq!(json.skip_value().unwrap_err().reason, reason::TOO_DEEP);
    }

    #[test]
    fn escapes_and_b64_objects_decode() {
        let t = parse(r#"["a\"b\u00e9\ud83d\ude00", "x"]"#).unwrap();
        assert_eq!(t.values, TensorValues::Bytes(vec!["a\"bé😀".into(), b"x".to_vec()]));
        let t = parse(r#"[{"b64": "aGk="}, {"b64": "aGk"}]"#).unwrap();
        assert_eq!(t.values, TensorValues::Bytes(vec![b"hi".to_vec(), b"hi".to_vec()]));
        assert_eq!(parse(r#"[{"b64": "!!"}]"#).unwrap_err().reason, reason::BAD_BASE64);
    }
}
