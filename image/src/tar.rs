//! A strict, streaming tar reader for image layers.
//!
//! Layers come from outside, so this reader trusts nothing: every header's checksum is
//! checked, numeric fields must parse, extended headers (PAX records, GNU long names) are
//! bounded in size, sizes are checked against the bytes that actually arrive, and anything
//! it does not understand (GNU sparse files, multi-volume archives) is an error rather than
//! a guess. It understands what the tools that write OCI layers emit: ustar, GNU long names
//! and links, base-256 numbers, and PAX extended headers with xattrs (`SCHILY.xattr.*`, and
//! libarchive's base64 `LIBARCHIVE.xattr.*`).

use std::io::{self, Read};

/// A tar block.
pub const BLOCK: usize = 512;

/// Largest PAX extended header or GNU long name/link accepted. Real ones are a few hundred
/// bytes (a path, some xattrs); 1 MiB leaves room for large xattrs such as ACLs while a
/// hostile layer cannot make us buffer gigabytes.
pub const MAX_EXTENSION_LEN: u64 = 1 << 20;

/// All the extended headers of one entry together: the same 1 MiB. Without it, a run of
/// PAX headers could pile megabytes of xattrs onto one entry.
pub const MAX_EXTENSIONS_PER_ENTRY: u64 = 1 << 20;

/// Longest path or link target accepted (Linux's PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;

/// Xattrs of one entry, names and values together (Linux's XATTR_LIST_MAX).
pub const MAX_XATTR_BYTES: usize = 64 << 10;

/// Largest entry size: what fits an i64, as in Go's archive/tar (what Docker and
/// containerd read layers with), so that we never read an archive differently than they.
const MAX_ENTRY_SIZE: u64 = i64::MAX as u64;

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
    #[error("the archive ends in the middle of {0}")]
    Truncated(&'static str),
    #[error("header checksum mismatch (a corrupt or non-tar stream)")]
    Checksum,
    #[error("header field {field} is not a number: {value:?}")]
    BadNumber { field: &'static str, value: String },
    #[error("{what} of {len} bytes is larger than the {MAX_EXTENSION_LEN}-byte limit")]
    ExtensionTooLarge { what: &'static str, len: u64 },
    #[error("malformed PAX record: {0}")]
    BadPax(String),
    #[error(
        "unsupported entry type {0:?} (GNU sparse files, volume labels and multi-volume archives are not supported)"
    )]
    UnsupportedType(char),
    #[error("an entry has an empty path")]
    EmptyPath,
    #[error("{0}")]
    Invalid(String),
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Regular,
    HardLink,
    Symlink,
    CharDevice,
    BlockDevice,
    Directory,
    Fifo,
}

/// One entry's header, with every extension already applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryHeader {
    /// The path as written in the archive (not yet normalised or checked).
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky (the low 12 bits).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Bytes of data that follow (regular files only; zero for everything else).
    pub size: u64,
    pub mtime: i64,
    /// Nanoseconds of the mtime, from a PAX `mtime` record with a fraction.
    pub mtime_nanos: u32,
    /// Link target for hard and symbolic links.
    pub link: Vec<u8>,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Extended attributes, in the order the archive gave them.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Reads entries from a tar stream. After [`TarReader::next_entry`] returns a header, the
/// entry's data is read with [`TarReader::read_data`]; data left unread is skipped by the
/// next call to `next_entry`.
pub struct TarReader<R> {
    inner: R,
    /// Data bytes of the current entry not yet read.
    remaining: u64,
    /// Padding after the current entry's data.
    padding: u64,
    /// Total bytes consumed from `inner`.
    offset: u64,
    finished: bool,
}

/// PAX fields and GNU long names that override a header's. Each kind may come once per
/// entry: readers disagree on how repeats combine (Go's archive/tar, which Docker and
/// containerd read layers with, keeps only the last PAX header and lets a GNU long name win
/// over a PAX path), so an entry that repeats one is refused rather than read one way.
#[derive(Default)]
struct Overrides {
    seen_pax: bool,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<(i64, u32)>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            remaining: 0,
            padding: 0,
            offset: 0,
            finished: false,
        }
    }

    /// Bytes consumed from the underlying stream so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Gives the underlying stream back (to drain what follows the archive).
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The next entry's header, or `None` at the end of the archive.
    pub fn next_entry(&mut self) -> Result<Option<EntryHeader>, TarError> {
        if self.finished {
            return Ok(None);
        }
        self.skip_rest()?;
        let mut overrides = Overrides::default();
        let mut extension_bytes = 0u64;
        loop {
            let Some(block) = self.read_header_block()? else {
                self.finished = true;
                return Ok(None);
            };
            verify_checksum(&block)?;
            let type_flag = block[156];
            let size = number(&block[124..136], "size")?;
            if size > MAX_ENTRY_SIZE {
                return Err(TarError::Invalid(format!("a size of {size} bytes")));
            }
            if matches!(type_flag, b'x' | b'g' | b'L' | b'K') {
                extension_bytes += size;
                if extension_bytes > MAX_EXTENSIONS_PER_ENTRY {
                    return Err(TarError::ExtensionTooLarge {
                        what: "the extended headers of one entry",
                        len: extension_bytes,
                    });
                }
            }
            let repeated = |what: &str| {
                TarError::Invalid(format!(
                    "an entry with two {what} (tar readers disagree on which one applies)"
                ))
            };
            match type_flag {
                b'x' => {
                    if overrides.seen_pax {
                        return Err(repeated("PAX extended headers"));
                    }
                    overrides.seen_pax = true;
                    let body = self.read_extension(size, "a PAX extended header")?;
                    parse_pax(&body, &mut overrides)?;
                }
                // Global PAX headers set defaults for the rest of the archive. The only keys
                // tools put there are comments and archive-wide times; none of them changes
                // what an entry is, so they are read and ignored. Go's reader returns a
                // global header as an entry of its own and forgets the extended headers
                // before it, so one that splits an entry from its extended headers is refused.
                b'g' => {
                    if overrides.seen_pax
                        || overrides.long_name.is_some()
                        || overrides.long_link.is_some()
                    {
                        return Err(TarError::Invalid(
                            "a PAX global header between an entry's extended headers and the entry"
                                .into(),
                        ));
                    }
                    self.read_extension(size, "a PAX global header")?;
                }
                b'L' => {
                    if overrides.long_name.is_some() {
                        return Err(repeated("GNU long names"));
                    }
                    let mut body = self.read_extension(size, "a GNU long name")?;
                    trim_nul(&mut body);
                    overrides.long_name = Some(body);
                }
                b'K' => {
                    if overrides.long_link.is_some() {
                        return Err(repeated("GNU long links"));
                    }
                    let mut body = self.read_extension(size, "a GNU long link")?;
                    trim_nul(&mut body);
                    overrides.long_link = Some(body);
                }
                _ => return self.entry(&block, type_flag, size, overrides).map(Some),
            }
        }
    }

    fn entry(
        &mut self,
        block: &[u8; BLOCK],
        type_flag: u8,
        size: u64,
        overrides: Overrides,
    ) -> Result<EntryHeader, TarError> {
        if overrides.long_name.is_some() && overrides.path.is_some() {
            return Err(TarError::Invalid(
                "an entry with both a GNU long name and a PAX path (tar readers disagree on which one applies)"
                    .into(),
            ));
        }
        if overrides.long_link.is_some() && overrides.link.is_some() {
            return Err(TarError::Invalid(
                "an entry with both a GNU long link and a PAX linkpath (tar readers disagree on which one applies)"
                    .into(),
            ));
        }
        let kind = match type_flag {
            b'0' | 0 | b'7' => EntryKind::Regular,
            b'1' => EntryKind::HardLink,
            b'2' => EntryKind::Symlink,
            b'3' => EntryKind::CharDevice,
            b'4' => EntryKind::BlockDevice,
            b'5' => EntryKind::Directory,
            b'6' => EntryKind::Fifo,
            other => return Err(TarError::UnsupportedType(char::from(other))),
        };
        let ustar = &block[257..263] == b"ustar\0";
        let path = match overrides.long_name.or(overrides.path) {
            Some(path) => path,
            None => {
                let name = field_bytes(&block[0..100]);
                let prefix = if ustar {
                    field_bytes(&block[345..500])
                } else {
                    &[]
                };
                if prefix.is_empty() {
                    name.to_vec()
                } else {
                    [prefix, b"/", name].concat()
                }
            }
        };
        if path.is_empty() {
            return Err(TarError::EmptyPath);
        }
        // Old archives mark directories with a trailing slash on a regular-file entry of
        // the pre-POSIX type; Go's reader (and GNU tar) read those as directories.
        let kind = if type_flag == 0 && path.ends_with(b"/") {
            EntryKind::Directory
        } else {
            kind
        };
        if path.len() > MAX_PATH_LEN {
            return Err(TarError::Invalid(format!("a path of {} bytes", path.len())));
        }
        let size = overrides.size.unwrap_or(size);
        if size > MAX_ENTRY_SIZE {
            return Err(TarError::Invalid(format!("a size of {size} bytes")));
        }
        // Only regular files carry data. Go's reader (Docker's and containerd's) takes every
        // other entry as a header alone, whatever its size field says, and so does this
        // one: the bytes after a hard link that claims data are read as the next header,
        // as Docker reads them. Skipping them as data would hide entries from us that
        // Docker shows.
        let size = if kind == EntryKind::Regular { size } else { 0 };
        let xattr_bytes: usize = overrides
            .xattrs
            .iter()
            .map(|(n, v)| n.len() + 1 + v.len())
            .sum();
        if xattr_bytes > MAX_XATTR_BYTES {
            return Err(TarError::Invalid(format!(
                "{xattr_bytes} bytes of xattrs, more than Linux's {MAX_XATTR_BYTES}"
            )));
        }
        let data = size;
        let (mtime, mtime_nanos) = match overrides.mtime {
            Some(t) => t,
            None => (signed_number(&block[136..148], "mtime")?, 0),
        };
        let header = EntryHeader {
            path,
            kind,
            mode: (number(&block[100..108], "mode")? & 0o7777) as u32,
            uid: match overrides.uid {
                Some(uid) => uid,
                None => number(&block[108..116], "uid")?,
            },
            gid: match overrides.gid {
                Some(gid) => gid,
                None => number(&block[116..124], "gid")?,
            },
            size,
            mtime,
            mtime_nanos,
            link: {
                let link = overrides
                    .long_link
                    .or(overrides.link)
                    .unwrap_or_else(|| field_bytes(&block[157..257]).to_vec());
                if link.len() > MAX_PATH_LEN {
                    return Err(TarError::Invalid(format!(
                        "a link target of {} bytes",
                        link.len()
                    )));
                }
                link
            },
            dev_major: device_number(&block[329..337], "devmajor")?,
            dev_minor: device_number(&block[337..345], "devminor")?,
            xattrs: overrides.xattrs,
        };
        self.remaining = data;
        self.padding = padding(data);
        Ok(header)
    }

    /// Reads up to `buf.len()` bytes of the current entry's data; 0 at its end. A stream
    /// that ends before the header's size is an error, never a short file.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, TarError> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let got = read_retrying(&mut self.inner, &mut buf[..want])?;
        if got == 0 {
            return Err(TarError::Truncated("an entry's data"));
        }
        self.remaining -= got as u64;
        self.offset += got as u64;
        Ok(got)
    }

    /// Skips what is left of the current entry's data and padding.
    fn skip_rest(&mut self) -> Result<(), TarError> {
        // Both are bounded by MAX_ENTRY_SIZE, so the sum cannot overflow.
        let skip = self.remaining + self.padding;
        if skip > 0 {
            let copied = io::copy(&mut (&mut self.inner).take(skip), &mut io::sink())?;
            self.offset += copied;
            if copied < skip {
                return Err(TarError::Truncated("an entry's data"));
            }
        }
        self.remaining = 0;
        self.padding = 0;
        Ok(())
    }

    /// The next header block, or `None` at the end-of-archive marker (two zero blocks, or
    /// one that ends the stream) or at the end of the stream exactly on a block boundary.
    /// A zero block followed by anything else is an error, as in Go's reader: stopping
    /// there would hide the entries after it.
    fn read_header_block(&mut self) -> Result<Option<[u8; BLOCK]>, TarError> {
        let Some(block) = self.read_block()? else {
            return Ok(None);
        };
        if block.iter().any(|&b| b != 0) {
            return Ok(Some(block));
        }
        match self.read_block()? {
            Some(next) if next.iter().any(|&b| b != 0) => Err(TarError::Invalid(
                "a lone zero block followed by more headers (a damaged archive)".into(),
            )),
            _ => Ok(None),
        }
    }

    /// One whole block, or `None` at the end of the stream exactly on a block boundary.
    fn read_block(&mut self) -> Result<Option<[u8; BLOCK]>, TarError> {
        let mut block = [0u8; BLOCK];
        let got = read_full(&mut self.inner, &mut block)?;
        self.offset += got as u64;
        match got {
            0 => Ok(None),
            BLOCK => Ok(Some(block)),
            _ => Err(TarError::Truncated("a header")),
        }
    }

    fn read_extension(&mut self, size: u64, what: &'static str) -> Result<Vec<u8>, TarError> {
        if size > MAX_EXTENSION_LEN {
            return Err(TarError::ExtensionTooLarge { what, len: size });
        }
        let mut body = vec![0u8; size as usize];
        let got = read_full(&mut self.inner, &mut body)?;
        self.offset += got as u64;
        if got < body.len() {
            return Err(TarError::Truncated(what));
        }
        let pad = padding(size);
        let skipped = io::copy(&mut (&mut self.inner).take(pad), &mut io::sink())?;
        self.offset += skipped;
        if skipped < pad {
            return Err(TarError::Truncated(what));
        }
        Ok(body)
    }
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// One read, retried on EINTR.
pub(crate) fn read_retrying(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match reader.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

fn verify_checksum(block: &[u8; BLOCK]) -> Result<(), TarError> {
    let stored = number(&block[148..156], "checksum")?;
    // The checksum is computed with its own field read as spaces. Historic tars summed
    // signed bytes; both sums are accepted, as GNU tar does.
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &byte) in block.iter().enumerate() {
        let byte = if (148..156).contains(&i) { b' ' } else { byte };
        unsigned += u64::from(byte);
        signed += i64::from(byte as i8);
    }
    if stored == unsigned || i64::try_from(stored).is_ok_and(|s| s == signed) {
        Ok(())
    } else {
        Err(TarError::Checksum)
    }
}

/// The bytes of a NUL-terminated (or full-width) string field.
fn field_bytes(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

fn trim_nul(bytes: &mut Vec<u8>) {
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
}

/// A numeric field: octal ASCII (space or NUL padded), or GNU base-256 when the high bit
/// of the first byte is set.
fn number(field: &[u8], name: &'static str) -> Result<u64, TarError> {
    let bad = || TarError::BadNumber {
        field: name,
        value: String::from_utf8_lossy(field).into_owned(),
    };
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        if field[0] & 0x40 != 0 {
            // Negative base-256 numbers are only meaningful for times.
            return Err(bad());
        }
        let mut value: u64 = u64::from(field[0] & 0x3f);
        for &byte in &field[1..] {
            value = value
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(byte)))
                .ok_or_else(bad)?;
        }
        return Ok(value);
    }
    let text = field_bytes(field);
    let digits: &[u8] = trim_spaces(text);
    if digits.is_empty() {
        return Ok(0);
    }
    let mut value: u64 = 0;
    for &d in digits {
        if !(b'0'..=b'7').contains(&d) {
            return Err(bad());
        }
        value = value
            .checked_mul(8)
            .and_then(|v| v.checked_add(u64::from(d - b'0')))
            .ok_or_else(bad)?;
    }
    Ok(value)
}

/// A time field, which GNU base-256 may make negative (dates before 1970).
fn signed_number(field: &[u8], name: &'static str) -> Result<i64, TarError> {
    if field.first().is_some_and(|&b| b & 0xc0 == 0xc0) {
        // Two's complement base-256: sign-extend from the field's width.
        let mut value: i64 = -1;
        for &byte in field {
            value = value.wrapping_shl(8) | i64::from(byte);
        }
        return Ok(value);
    }
    let value = number(field, name)?;
    i64::try_from(value).map_err(|_| TarError::BadNumber {
        field: name,
        value: value.to_string(),
    })
}

/// Device numbers are only set for device entries; some writers leave garbage-free but
/// empty fields, which read as 0.
fn device_number(field: &[u8], name: &'static str) -> Result<u32, TarError> {
    let value = number(field, name)?;
    u32::try_from(value).map_err(|_| TarError::BadNumber {
        field: name,
        value: value.to_string(),
    })
}

fn trim_spaces(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != b' ').unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|&b| b != b' ')
        .map_or(start, |e| e + 1);
    &bytes[start..end.max(start)]
}

/// Parses PAX records (`"%d %s=%s\n"`, the length counting the whole record).
fn parse_pax(mut body: &[u8], overrides: &mut Overrides) -> Result<(), TarError> {
    let bad = |what: &str| TarError::BadPax(what.to_owned());
    while !body.is_empty() {
        let space = body
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| bad("a record without a length"))?;
        let len: usize = std::str::from_utf8(&body[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("a record length that is not a number"))?;
        if len <= space + 1 || len > body.len() || body[len - 1] != b'\n' {
            return Err(bad("a record length that does not fit the header"));
        }
        let record = &body[space + 1..len - 1];
        body = &body[len..];
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad("a record without '='"))?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        let decimal = |what: &str| -> Result<u64, TarError> {
            std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad(&format!("{what} is not a number")))
        };
        match key {
            b"path" => overrides.path = Some(value.to_vec()),
            b"linkpath" => overrides.link = Some(value.to_vec()),
            b"size" => {
                let size = decimal("size")?;
                if size > MAX_ENTRY_SIZE {
                    return Err(bad("a size beyond 2^63"));
                }
                overrides.size = Some(size);
            }
            b"uid" => overrides.uid = Some(decimal("uid")?),
            b"gid" => overrides.gid = Some(decimal("gid")?),
            b"mtime" => overrides.mtime = Some(parse_pax_time(value).ok_or_else(|| bad("mtime"))?),
            _ if key.starts_with(b"SCHILY.xattr.") => overrides
                .xattrs
                .push((key[b"SCHILY.xattr.".len()..].to_vec(), value.to_vec())),
            _ if key.starts_with(b"LIBARCHIVE.xattr.") => {
                let value = base64_decode(value).ok_or_else(|| bad("a base64 xattr value"))?;
                overrides
                    .xattrs
                    .push((key[b"LIBARCHIVE.xattr.".len()..].to_vec(), value));
            }
            _ if key.starts_with(b"GNU.sparse.") => {
                return Err(TarError::UnsupportedType('S'));
            }
            // atime, ctime, uname, gname, comment, charset and vendor keys do not change
            // the flattened tree.
            _ => {}
        }
    }
    Ok(())
}

/// A PAX time: decimal seconds with an optional fraction, possibly negative.
fn parse_pax_time(value: &[u8]) -> Option<(i64, u32)> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seconds: i64 = whole.parse().ok()?;
    let mut nanos: u32 = 0;
    for (i, digit) in fraction.bytes().take(9).enumerate() {
        nanos += u32::from(digit - b'0') * 10u32.pow(8 - i as u32);
    }
    if negative {
        // -1.25 is 1.25 s before the epoch: seconds -2, nanos 0.75 s.
        if nanos == 0 {
            Some((-seconds, 0))
        } else {
            Some((-seconds - 1, 1_000_000_000 - nanos))
        }
    } else {
        Some((seconds, nanos))
    }
}

fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let text: Vec<u8> = text.iter().copied().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for group in text.chunks(4) {
        if group.len() == 1 {
            return None;
        }
        let mut acc: u32 = 0;
        for (i, &c) in group.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        out.push((acc >> 16) as u8);
        if group.len() > 2 {
            out.push((acc >> 8) as u8);
        }
        if group.len() > 3 {
            out.push(acc as u8);
        }
    }
    Some(out)
}

/// Writes tar archives: the image builder of `slapshot demo` and the tests use it to make
/// layers, so it only needs what those layers hold. PAX records carry long paths, long link
/// targets, xattrs and sub-second times.
pub mod write {
    use super::{BLOCK, EntryHeader, EntryKind, padding};
    use std::io::{self, Write};

    pub struct TarWriter<W: Write> {
        out: W,
    }

    impl<W: Write> TarWriter<W> {
        pub fn new(out: W) -> Self {
            Self { out }
        }

        /// Writes one entry; `data` must be `header.size` bytes for a regular file.
        pub fn append(&mut self, header: &EntryHeader, data: &[u8]) -> io::Result<()> {
            let mut records = Vec::new();
            let mut pax = |key: &[u8], value: &[u8]| {
                // The length prefix counts itself: find the fixed point.
                let body = 3 + key.len() + value.len(); // ' ', '=', '\n'
                let mut len = body + 1;
                while len.to_string().len() + body != len {
                    len = len.to_string().len() + body;
                }
                records.extend_from_slice(len.to_string().as_bytes());
                records.push(b' ');
                records.extend_from_slice(key);
                records.push(b'=');
                records.extend_from_slice(value);
                records.push(b'\n');
            };
            if header.path.len() > 100 {
                pax(b"path", &header.path);
            }
            if header.link.len() > 100 {
                pax(b"linkpath", &header.link);
            }
            if header.mtime_nanos != 0 || header.mtime < 0 {
                pax(
                    b"mtime",
                    format!("{}.{:09}", header.mtime, header.mtime_nanos).as_bytes(),
                );
            }
            for (name, value) in &header.xattrs {
                pax(&[b"SCHILY.xattr.".as_slice(), name].concat(), value);
            }
            if !records.is_empty() {
                let mut pax_header = ustar_block(b"PaxHeaders/entry", b'x', records.len() as u64);
                set_checksum(&mut pax_header);
                self.out.write_all(&pax_header)?;
                self.out.write_all(&records)?;
                self.out
                    .write_all(&vec![0u8; padding(records.len() as u64) as usize])?;
            }
            let type_flag = match header.kind {
                EntryKind::Regular => b'0',
                EntryKind::HardLink => b'1',
                EntryKind::Symlink => b'2',
                EntryKind::CharDevice => b'3',
                EntryKind::BlockDevice => b'4',
                EntryKind::Directory => b'5',
                EntryKind::Fifo => b'6',
            };
            let name = &header.path[..header.path.len().min(100)];
            let mut block = ustar_block(name, type_flag, header.size);
            octal(&mut block[100..108], u64::from(header.mode));
            octal(&mut block[108..116], header.uid);
            octal(&mut block[116..124], header.gid);
            octal(&mut block[136..148], header.mtime.max(0) as u64);
            let link = &header.link[..header.link.len().min(100)];
            block[157..157 + link.len()].copy_from_slice(link);
            octal(&mut block[329..337], u64::from(header.dev_major));
            octal(&mut block[337..345], u64::from(header.dev_minor));
            set_checksum(&mut block);
            self.out.write_all(&block)?;
            self.out.write_all(data)?;
            self.out
                .write_all(&vec![0u8; padding(data.len() as u64) as usize])?;
            Ok(())
        }

        /// Writes the end-of-archive marker and returns the sink.
        pub fn finish(mut self) -> io::Result<W> {
            self.out.write_all(&[0u8; 2 * BLOCK])?;
            Ok(self.out)
        }
    }

    fn ustar_block(name: &[u8], type_flag: u8, size: u64) -> [u8; BLOCK] {
        let mut block = [0u8; BLOCK];
        block[..name.len()].copy_from_slice(name);
        octal(&mut block[100..108], 0o644);
        octal(&mut block[108..116], 0);
        octal(&mut block[116..124], 0);
        octal(&mut block[124..136], size);
        octal(&mut block[136..148], 0);
        block[156] = type_flag;
        block[257..263].copy_from_slice(b"ustar\0");
        block[263..265].copy_from_slice(b"00");
        block
    }

    /// Writes `value` as zero-padded octal with a terminating NUL, as ustar wants.
    fn octal(field: &mut [u8], value: u64) {
        let digits = field.len() - 1;
        let text = format!("{value:0digits$o}");
        assert!(text.len() <= digits, "{value} does not fit a tar field");
        field[..digits].copy_from_slice(text.as_bytes());
        field[digits] = 0;
    }

    fn set_checksum(block: &mut [u8; BLOCK]) {
        block[148..156].copy_from_slice(b"        ");
        let sum: u64 = block.iter().map(|&b| u64::from(b)).sum();
        let text = format!("{sum:06o}\0 ");
        block[148..156].copy_from_slice(text.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::{write::TarWriter, *};

    fn header(path: &str, kind: EntryKind, size: u64) -> EntryHeader {
        EntryHeader {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size,
            mtime: 1_700_000_000,
            mtime_nanos: 0,
            link: Vec::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: Vec::new(),
        }
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<(EntryHeader, Vec<u8>)>, TarError> {
        let mut reader = TarReader::new(bytes);
        let mut out = Vec::new();
        while let Some(h) = reader.next_entry()? {
            let mut data = Vec::new();
            let mut buf = [0u8; 700];
            loop {
                let n = reader.read_data(&mut buf)?;
                if n == 0 {
                    break;
                }
                data.extend_from_slice(&buf[..n]);
            }
            out.push((h, data));
        }
        Ok(out)
    }

    #[test]
    fn round_trip_with_extensions() {
        let long = format!("dir/{}", "x".repeat(150));
        let mut file = header(&long, EntryKind::Regular, 1000);
        file.mode = 0o4755;
        file.uid = 1000;
        file.gid = 2000;
        file.mtime_nanos = 123_456_789;
        file.xattrs = vec![
            (b"user.a".to_vec(), b"1".to_vec()),
            (b"security.capability".to_vec(), vec![1, 0, 0, 2, 0xff]),
        ];
        let mut link = header("l", EntryKind::Symlink, 0);
        link.link = "t".repeat(200).into_bytes();
        let mut dev = header("dev/null", EntryKind::CharDevice, 0);
        dev.dev_major = 1;
        dev.dev_minor = 3;
        let data: Vec<u8> = (0..1000).map(|i| i as u8).collect();
        let mut w = TarWriter::new(Vec::new());
        w.append(&file, &data).unwrap();
        w.append(&link, &[]).unwrap();
        w.append(&dev, &[]).unwrap();
        let bytes = w.finish().unwrap();
        let entries = read_all(&bytes).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].0, file);
        assert_eq!(entries[0].1, data);
        assert_eq!(entries[1].0, link);
        assert_eq!(entries[2].0, dev);
    }

    #[test]
    fn unread_data_is_skipped() {
        let mut w = TarWriter::new(Vec::new());
        w.append(&header("a", EntryKind::Regular, 3000), &[7; 3000])
            .unwrap();
        w.append(&header("b", EntryKind::Regular, 1), &[9]).unwrap();
        let bytes = w.finish().unwrap();
        let mut reader = TarReader::new(&bytes[..]);
        assert_eq!(reader.next_entry().unwrap().unwrap().path, b"a");
        let b = reader.next_entry().unwrap().unwrap();
        assert_eq!(b.path, b"b");
        let mut buf = [0u8; 4];
        assert_eq!(reader.read_data(&mut buf).unwrap(), 1);
        assert_eq!(buf[0], 9);
        assert!(reader.next_entry().unwrap().is_none());
    }

    #[test]
    fn truncation_and_corruption_are_errors() {
        let mut w = TarWriter::new(Vec::new());
        w.append(&header("a", EntryKind::Regular, 3000), &[7; 3000])
            .unwrap();
        let bytes = w.finish().unwrap();
        // Cut in the data: a size that lies.
        assert!(matches!(
            read_all(&bytes[..BLOCK + 1000]),
            Err(TarError::Truncated(_))
        ));
        // Cut in the header.
        assert!(matches!(
            read_all(&bytes[..100]),
            Err(TarError::Truncated(_))
        ));
        // A flipped byte in the header.
        let mut bad = bytes.clone();
        bad[3] ^= 0x20;
        assert!(matches!(read_all(&bad), Err(TarError::Checksum)));
    }

    #[test]
    fn oversized_extensions_are_refused_before_buffering() {
        let mut block = [0u8; BLOCK];
        block[..4].copy_from_slice(b"pax\0");
        block[156] = b'x';
        // A 64 GiB extended header.
        block[124..136].copy_from_slice(b"1000000000000"[..12].as_ref());
        block[148..156].copy_from_slice(b"        ");
        let sum: u64 = block.iter().map(|&b| u64::from(b)).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        assert!(matches!(
            read_all(&block),
            Err(TarError::ExtensionTooLarge { .. })
        ));
    }

    #[test]
    fn numbers_and_times() {
        assert_eq!(number(b"0000644\0", "m").unwrap(), 0o644);
        assert_eq!(number(b"  644 \0", "m").unwrap(), 0o644);
        assert_eq!(number(&[0x80, 0, 0, 0, 0, 0, 1, 0], "s").unwrap(), 256);
        assert!(number(b"12x\0", "m").is_err());
        assert_eq!(parse_pax_time(b"1.5"), Some((1, 500_000_000)));
        assert_eq!(parse_pax_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time(b"x"), None);
        assert_eq!(base64_decode(b"AQID").unwrap(), vec![1, 2, 3]);
        assert_eq!(base64_decode(b"AQ==").unwrap(), vec![1]);
    }

    fn raw_block(name: &[u8], type_flag: u8, size_field: &[u8]) -> [u8; BLOCK] {
        let mut block = [0u8; BLOCK];
        block[..name.len()].copy_from_slice(name);
        block[156] = type_flag;
        block[124..124 + size_field.len()].copy_from_slice(size_field);
        block[257..263].copy_from_slice(b"ustar\0");
        block[148..156].copy_from_slice(b"        ");
        let sum: u64 = block.iter().map(|&b| u64::from(b)).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        block
    }

    fn pax_header(records: &[u8]) -> Vec<u8> {
        let size = format!("{:011o}", records.len());
        let mut out = raw_block(b"pax", b'x', size.as_bytes()).to_vec();
        out.extend_from_slice(records);
        out.resize(out.len() + padding(records.len() as u64) as usize, 0);
        out
    }

    fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
        let body = 3 + key.len() + value.len();
        let mut len = body + 1;
        while len.to_string().len() + body != len {
            len = len.to_string().len() + body;
        }
        [format!("{len} {key}=").as_bytes(), value, b"\n"].concat()
    }

    #[test]
    fn sizes_beyond_i64_are_refused_and_directories_carry_no_data() {
        // A PAX size of 2^64 - 1 on a directory: refused, never an overflow.
        let mut bytes = pax_header(&pax_record("size", b"18446744073709551615"));
        bytes.extend_from_slice(&raw_block(b"d/", b'5', b"00000000000"));
        assert!(read_all(&bytes).is_err());
        // A directory claiming data is a header alone, as Go reads it: what follows is
        // the next header.
        let mut bytes = raw_block(b"d/", b'5', b"00000001000").to_vec();
        bytes.extend_from_slice(&raw_block(b"d/f", b'0', b"00000000000"));
        let entries = read_all(&bytes).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].0.size, 0);
        assert_eq!(entries[1].0.path, b"d/f");
    }

    #[test]
    fn piled_up_extended_headers_are_refused() {
        // Many PAX headers before one entry, each under the per-header limit.
        let value = vec![b'x'; 60_000];
        let mut bytes = Vec::new();
        for i in 0..20 {
            bytes.extend(pax_header(&pax_record(
                &format!("SCHILY.xattr.user.{i}"),
                &value,
            )));
        }
        bytes.extend_from_slice(&raw_block(b"f", b'0', b"00000000000"));
        assert!(read_all(&bytes).is_err());
        // One PAX header with 100 KiB of xattrs: over Linux's limit for one file.
        let mut records = Vec::new();
        for i in 0..2 {
            records.extend(pax_record(
                &format!("SCHILY.xattr.user.{i}"),
                &vec![b'y'; 50_000],
            ));
        }
        let mut bytes = pax_header(&records);
        bytes.extend_from_slice(&raw_block(b"f", b'0', b"00000000000"));
        assert!(matches!(read_all(&bytes), Err(TarError::Invalid(_))));
        // A path longer than PATH_MAX.
        let mut bytes = pax_header(&pax_record("path", &vec![b'p'; 5000]));
        bytes.extend_from_slice(&raw_block(b"f", b'0', b"00000000000"));
        assert!(matches!(read_all(&bytes), Err(TarError::Invalid(_))));
    }

    #[test]
    fn sparse_files_are_refused() {
        let mut block = [0u8; BLOCK];
        block[..1].copy_from_slice(b"s");
        block[156] = b'S';
        block[124..135].copy_from_slice(b"00000000000");
        block[148..156].copy_from_slice(b"        ");
        let sum: u64 = block.iter().map(|&b| u64::from(b)).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        assert!(matches!(
            read_all(&block),
            Err(TarError::UnsupportedType('S'))
        ));
    }
}

#[cfg(test)]
mod properties {
    use super::{write::TarWriter, *};
    use proptest::prelude::*;

    fn archive(sizes: &[usize]) -> Vec<u8> {
        let mut w = TarWriter::new(Vec::new());
        for (i, &size) in sizes.iter().enumerate() {
            let header = EntryHeader {
                path: format!("dir/{}/{}", i, "n".repeat(i * 37 % 180)).into_bytes(),
                kind: EntryKind::Regular,
                mode: 0o644,
                uid: i as u64,
                gid: 0,
                size: size as u64,
                mtime: 1,
                mtime_nanos: (i as u32) * 1000,
                link: Vec::new(),
                dev_major: 0,
                dev_minor: 0,
                xattrs: vec![(b"user.k".to_vec(), vec![i as u8; i % 5])],
            };
            w.append(&header, &vec![i as u8; size]).unwrap();
        }
        w.finish().unwrap()
    }

    /// Reads every entry and its data; returns how many entries were read before an error.
    fn read_everything(bytes: &[u8]) -> (usize, bool) {
        let mut reader = TarReader::new(bytes);
        let mut entries = 0;
        let mut buf = [0u8; 4096];
        loop {
            match reader.next_entry() {
                Ok(Some(_)) => entries += 1,
                Ok(None) => return (entries, true),
                Err(_) => return (entries, false),
            }
            loop {
                match reader.read_data(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(_) => return (entries, false),
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Damage anywhere in a valid archive (flipped bytes, truncation) gives errors or
        /// fewer entries, never a panic; because the input starts valid, the damage is met
        /// past the first header's checks (the test counts that it is).
        #[test]
        fn damaged_archives_never_panic(
            sizes in proptest::collection::vec(0usize..3000, 1..6),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let mut bytes = archive(&sizes);
            let clean = read_everything(&bytes);
            prop_assert_eq!(clean, (sizes.len(), true));
            for (at, mask) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= mask;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len()));
            }
            let (entries, _) = read_everything(&bytes);
            prop_assert!(entries <= sizes.len() + 1);
        }

        /// Arbitrary bytes behind a valid first header.
        #[test]
        fn garbage_after_a_valid_header_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut bytes = archive(&[10]);
            // Keep the whole first entry (its PAX header, header and data), drop the
            // end-of-archive marker.
            bytes.truncate(bytes.len() - 2 * BLOCK);
            bytes.extend_from_slice(&tail);
            let (entries, _) = read_everything(&bytes);
            prop_assert!(entries >= 1, "the valid first entry is read");
        }
    }
}
