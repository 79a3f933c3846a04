//! TFRecord framing, as TensorFlow's `TFRecordWriter` writes it and
//! `tf.data.TFRecordDataset` reads it: per record, the length as a little-endian
//! u64, the masked CRC32C of those 8 bytes, the data, and the masked CRC32C of the
//! data. The reader tells a clean end from a torn tail (a record cut short, as a
//! crash leaves the file being written) and from a corrupt record (a CRC mismatch).

/// Bytes a record adds to its data: length, its CRC, the data's CRC.
pub const RECORD_OVERHEAD: usize = 8 + 4 + 4;

/// The CRC32C as TFRecord stores it, masked so that CRCs of data that holds CRCs
/// stay well distributed.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Appends one framed record to `out`.
pub fn frame_into(out: &mut Vec<u8>, data: &[u8]) {
    let length = (data.len() as u64).to_le_bytes();
    out.reserve(data.len() + RECORD_OVERHEAD);
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
}

/// One framed record.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + RECORD_OVERHEAD);
    frame_into(&mut out, data);
    out
}

/// How a run of records ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// Every byte belongs to a whole record with matching CRCs.
    Clean,
    /// The last record is cut short at this offset: a file still being written, or
    /// one whose writer died. Everything before it is whole.
    Torn { offset: usize },
    /// The record at this offset fails its CRC (or its length CRC): the file is
    /// damaged there. Records after it are not read.
    Corrupt { offset: usize },
}

/// The records of a TFRecord file's bytes, and how they ended.
#[derive(Debug)]
pub struct Records<'a> {
    pub records: Vec<&'a [u8]>,
    pub tail: Tail,
}

impl Records<'_> {
    /// Bytes covered by the whole records: where a damaged file can be cut.
    pub fn valid_len(&self) -> usize {
        match self.tail {
            Tail::Clean => self.records.iter().map(|r| r.len() + RECORD_OVERHEAD).sum(),
            Tail::Torn { offset } | Tail::Corrupt { offset } => offset,
        }
    }
}

/// Reads every record of `bytes`, checking both CRCs of each.
pub fn read(bytes: &[u8]) -> Records<'_> {
    let mut records = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        if rest.len() < 12 {
            return Records { records, tail: Tail::Torn { offset } };
        }
        let (length_bytes, length_crc) = (&rest[..8], u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]));
        if masked_crc32c(length_bytes) != length_crc {
            return Records { records, tail: Tail::Corrupt { offset } };
        }
        let mut length = [0u8; 8];
        length.copy_from_slice(length_bytes);
        let length = u64::from_le_bytes(length);
        let Some(end) = usize::try_from(length).ok().and_then(|l| l.checked_add(RECORD_OVERHEAD)) else {
            return Records { records, tail: Tail::Corrupt { offset } };
        };
        if rest.len() < end {
            return Records { records, tail: Tail::Torn { offset } };
        }
        let data = &rest[12..end - 4];
        let data_crc = u32::from_le_bytes([rest[end - 4], rest[end - 3], rest[end - 2], rest[end - 1]]);
        if masked_crc32c(data) != data_crc {
            return Records { records, tail: Tail::Corrupt { offset } };
        }
        records.push(data);
        offset += end;
    }
    Records { records, tail: Tail::Clean }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_masked_crc_matches_tensorflow() {
        // The iSCSI test vector TensorFlow's crc32c tests use: crc32c of 32 zero bytes
        // is 0x8a9136aa; TFRecord's mask is ((crc >> 15) | (crc << 17)) + 0xa282ead8.
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
        let crc: u32 = 0x8a91_36aa;
        assert_eq!(masked_crc32c(&[0u8; 32]), crc.rotate_right(15).wrapping_add(0xa282_ead8));
    }

    #[test]
    fn records_read_back_in_order() {
        let mut file = frame(b"first");
        frame_into(&mut file, b"");
        frame_into(&mut file, &[7u8; 300]);
        let records = read(&file);
        assert_eq!(records.tail, Tail::Clean);
        assert_eq!(records.records, vec![&b"first"[..], &b""[..], &[7u8; 300][..]]);
        assert_eq!(records.valid_len(), file.len());
    }

    #[test]
    fn a_cut_record_is_a_torn_tail_at_its_start() {
        let mut file = frame(b"whole");
        let whole = file.len();
        frame_into(&mut file, b"cut short by a crash");
        for cut in whole + 1..file.len() {
            let records = read(&file[..cut]);
            assert_eq!(records.records, vec![&b"whole"[..]]);
            assert_eq!(records.tail, Tail::Torn { offset: whole }, "cut at {cut}");
        }
    }

    #[test]
    fn a_flipped_bit_is_corrupt_not_data() {
        let mut file = frame(b"first");
        let second = file.len();
        frame_into(&mut file, b"second");
        file[second + 14] ^= 1;
        let records = read(&file);
        assert_eq!(records.records, vec![&b"first"[..]]);
        assert_eq!(records.tail, Tail::Corrupt { offset: second });
        let mut file = frame(b"x");
        file[3] ^= 0x80;
        assert_eq!(read(&file).tail, Tail::Corrupt { offset: 0 });
    }
}
