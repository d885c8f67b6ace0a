//! A small tar reader and writer for the layer tests: the reader understands what an OCI image
//! layer may hold (ustar headers with their prefix, PAX extended headers with `path`, `linkpath`,
//! `size`, `mtime`, `uid`, `gid` and `SCHILY.xattr.*` records, GNU long names), so the tests can
//! check an export entry by entry without the `tar` crate; the writer makes hand-crafted
//! (hostile) archives for `apply`.
//!
//! Loaded with `#[path]` by the test files that use it (`tests/layers.rs`), not from `mod.rs`.

use std::collections::BTreeMap;

pub const REGULAR: u8 = b'0';
pub const HARDLINK: u8 = b'1';
pub const SYMLINK: u8 = b'2';
pub const CHARDEV: u8 = b'3';
pub const BLOCKDEV: u8 = b'4';
pub const DIRECTORY: u8 = b'5';
pub const FIFO: u8 = b'6';

/// One archive member, with its PAX records already applied.
#[derive(Clone, Debug)]
pub struct TarEntry {
    pub name: String,
    /// The type flag (`'0'` regular, `'1'` hard link, `'2'` symlink, `'3'` char device, ...);
    /// an old-style `'\0'` regular file is reported as `'0'`.
    pub typeflag: u8,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    /// Whole seconds (a PAX `mtime` with a fraction is cut to its integer part).
    pub mtime: i64,
    /// The PAX `mtime` record as written, if any.
    pub pax_mtime: Option<String>,
    pub linkname: String,
    pub devmajor: u64,
    pub devminor: u64,
    /// `SCHILY.xattr.NAME` records: NAME -> value.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Every PAX record of this entry (xattrs included), key -> value.
    pub pax: BTreeMap<String, Vec<u8>>,
    pub data: Vec<u8>,
}

impl TarEntry {
    pub fn kind_name(&self) -> &'static str {
        match self.typeflag {
            REGULAR => "regular file",
            HARDLINK => "hard link",
            SYMLINK => "symlink",
            CHARDEV => "char device",
            BLOCKDEV => "block device",
            DIRECTORY => "directory",
            FIFO => "fifo",
            _ => "other",
        }
    }
}

fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    &field[..end]
}

fn text(field: &[u8]) -> Result<String, String> {
    String::from_utf8(cstr(field).to_vec()).map_err(|_| format!("non-UTF-8 header field {field:?}"))
}

/// A numeric header field: octal (NUL/space terminated), or GNU base-256 when the top bit is set.
fn number(field: &[u8]) -> Result<u64, String> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for b in &field[1..] {
            v = v.checked_mul(256).ok_or("base-256 number overflows")? + *b as u64;
        }
        return Ok(v);
    }
    let s = String::from_utf8_lossy(cstr(field));
    let s = s.trim_matches(|c: char| c == ' ' || c == '\0');
    if s.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(s, 8).map_err(|e| format!("bad octal field {s:?}: {e}"))
}

/// The PAX records of an extended header's data: `LEN KEY=VALUE\n`, binary-safe values.
fn pax_records(mut data: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    while !data.is_empty() && data[0] != 0 {
        let sp = data
            .iter()
            .position(|b| *b == b' ')
            .ok_or("PAX record without a length")?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("PAX record with a bad length")?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(format!("PAX record of length {len} does not fit"));
        }
        let rec = &data[sp + 1..len - 1];
        let eq = rec
            .iter()
            .position(|b| *b == b'=')
            .ok_or("PAX record without '='")?;
        let key = String::from_utf8(rec[..eq].to_vec()).map_err(|_| "non-UTF-8 PAX key")?;
        out.push((key, rec[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

fn padded(n: u64) -> usize {
    (n as usize).div_ceil(512) * 512
}

/// Every member of an uncompressed tar archive, in archive order.
pub fn read_tar(bytes: &[u8]) -> Result<Vec<TarEntry>, String> {
    let mut entries = Vec::new();
    let mut pos = 0;
    let mut pending_pax: Vec<(String, Vec<u8>)> = Vec::new();
    let mut long_name: Option<String> = None;
    let mut long_link: Option<String> = None;
    loop {
        if pos + 512 > bytes.len() {
            return Err(format!(
                "archive ends at byte {pos} without the two zero blocks that close a tar"
            ));
        }
        let h = &bytes[pos..pos + 512];
        if h.iter().all(|b| *b == 0) {
            return Ok(entries);
        }
        let stored: u64 = number(&h[148..156])?;
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    *b as u64
                }
            })
            .sum();
        if stored != sum {
            return Err(format!("bad header checksum at byte {pos}"));
        }
        let typeflag = if h[156] == 0 { REGULAR } else { h[156] };
        let size = number(&h[124..136])?;
        let data_start = pos + 512;
        let data_end = data_start + size as usize;
        if data_end > bytes.len() {
            return Err(format!("member at byte {pos} runs past the end"));
        }
        let data = &bytes[data_start..data_end];
        pos = data_start + padded(size);
        match typeflag {
            b'x' => {
                pending_pax.extend(pax_records(data)?);
                continue;
            }
            b'g' => continue,
            b'L' => {
                long_name = Some(text(data)?);
                continue;
            }
            b'K' => {
                long_link = Some(text(data)?);
                continue;
            }
            _ => {}
        }
        let mut name = text(&h[0..100])?;
        if &h[257..263] == b"ustar\0" {
            let prefix = text(&h[345..500])?;
            if !prefix.is_empty() {
                name = format!("{prefix}/{name}");
            }
        }
        let mut e = TarEntry {
            name: long_name.take().unwrap_or(name),
            typeflag,
            mode: number(&h[100..108])? as u32,
            uid: number(&h[108..116])?,
            gid: number(&h[116..124])?,
            size,
            mtime: number(&h[136..148])? as i64,
            pax_mtime: None,
            linkname: long_link.take().map_or_else(|| text(&h[157..257]), Ok)?,
            devmajor: number(&h[329..337])?,
            devminor: number(&h[337..345])?,
            xattrs: BTreeMap::new(),
            pax: BTreeMap::new(),
            data: data.to_vec(),
        };
        for (k, v) in pending_pax.drain(..) {
            let s = String::from_utf8_lossy(&v).into_owned();
            match k.as_str() {
                "path" => e.name = s,
                "linkpath" => e.linkname = s,
                "uid" => e.uid = s.parse().map_err(|_| format!("bad PAX uid {s:?}"))?,
                "gid" => e.gid = s.parse().map_err(|_| format!("bad PAX gid {s:?}"))?,
                "size" => e.size = s.parse().map_err(|_| format!("bad PAX size {s:?}"))?,
                "mtime" => {
                    let whole = s.split('.').next().unwrap_or("");
                    e.mtime = whole.parse().map_err(|_| format!("bad PAX mtime {s:?}"))?;
                    e.pax_mtime = Some(s.clone());
                }
                _ => {}
            }
            if let Some(x) = k.strip_prefix("SCHILY.xattr.") {
                e.xattrs.insert(x.to_string(), v.clone());
            }
            e.pax.insert(k, v);
        }
        entries.push(e);
    }
}

/// Builds a ustar archive member by member, with no checks at all: the point is to write what a
/// hostile archive would hold.
#[derive(Default)]
pub struct TarBuilder {
    buf: Vec<u8>,
}

fn put(field: &mut [u8], s: &[u8]) {
    assert!(s.len() <= field.len(), "{s:?} does not fit a header field");
    field[..s.len()].copy_from_slice(s);
}

fn octal(field: &mut [u8], v: u64) {
    let s = format!("{v:0width$o}", width = field.len() - 1);
    put(field, s.as_bytes());
}

impl TarBuilder {
    pub fn new() -> TarBuilder {
        TarBuilder::default()
    }

    #[allow(clippy::too_many_arguments)]
    fn member(
        &mut self,
        name: &str,
        typeflag: u8,
        mode: u32,
        data: &[u8],
        linkname: &str,
        dev: (u64, u64),
    ) -> &mut Self {
        let mut h = [0u8; 512];
        put(&mut h[0..100], name.as_bytes());
        octal(&mut h[100..108], mode as u64);
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], data.len() as u64);
        octal(&mut h[136..148], 1_600_000_000);
        h[156] = typeflag;
        put(&mut h[157..257], linkname.as_bytes());
        put(&mut h[257..263], b"ustar\0");
        put(&mut h[263..265], b"00");
        put(&mut h[265..269], b"root");
        put(&mut h[297..301], b"root");
        octal(&mut h[329..337], dev.0);
        octal(&mut h[337..345], dev.1);
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|b| *b as u64).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        self.buf.extend_from_slice(&h);
        self.buf.extend_from_slice(data);
        self.buf.resize(self.buf.len().div_ceil(512) * 512, 0);
        self
    }

    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.member(name, REGULAR, 0o644, data, "", (0, 0))
    }

    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.member(name, DIRECTORY, 0o755, b"", "", (0, 0))
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.member(name, SYMLINK, 0o777, b"", target, (0, 0))
    }

    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.member(name, HARDLINK, 0o644, b"", target, (0, 0))
    }

    pub fn chardev(&mut self, name: &str, major: u64, minor: u64) -> &mut Self {
        self.member(name, CHARDEV, 0o644, b"", "", (major, minor))
    }

    /// The archive, closed by two zero blocks.
    pub fn finish(&self) -> Vec<u8> {
        let mut out = self.buf.clone();
        out.resize(out.len() + 1024, 0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_what_it_writes() {
        let bytes = TarBuilder::new()
            .dir("d/")
            .file("d/f", b"hello")
            .symlink("s", "/x")
            .hardlink("h", "d/f")
            .chardev("c", 1, 3)
            .finish();
        let e = read_tar(&bytes).expect("parse");
        let names: Vec<&str> = e.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["d/", "d/f", "s", "h", "c"]);
        assert_eq!(e[1].data, b"hello");
        assert_eq!(e[2].linkname, "/x");
        assert_eq!((e[4].devmajor, e[4].devminor), (1, 3));
    }

    #[test]
    fn pax_records_parse() {
        let recs = pax_records(b"27 SCHILY.xattr.user.a=b\x00c\n14 path=a/b/c\n").expect("pax");
        assert_eq!(
            recs[0],
            ("SCHILY.xattr.user.a".to_string(), b"b\x00c".to_vec())
        );
        assert_eq!(recs[1], ("path".to_string(), b"a/b/c".to_vec()));
    }
}
