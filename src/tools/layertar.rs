//! Writing an OCI image layer: a POSIX tar (ustar headers, PAX records for long names and
//! extended attributes) with every field fixed by the input alone, so the same upper gives the
//! same bytes and the same digest every time. No user or group names, no access or change
//! times, nothing from the clock or the environment.

use std::io::{self, Write};

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

/// The metadata of one entry, as the layer records it.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    /// Permission bits, with setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch; earlier times are recorded as 0.
    pub mtime: i64,
    /// Extended attributes, already stripped of the overlay's private ones, in a fixed order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What an entry is, with what its header or body needs.
pub enum Body<'a> {
    Dir,
    File {
        size: u64,
        data: &'a mut dyn io::Read,
    },
    Symlink(&'a [u8]),
    /// A second name of a file already in the layer at the given path.
    HardLink(&'a [u8]),
    Char {
        major: u32,
        minor: u32,
    },
    Block {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// How the layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// The written blob's identity: what an OCI manifest records for a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobId {
    /// `sha256:<hex>` of the bytes written.
    pub digest: String,
    pub size: u64,
}

/// Hashes and counts everything written through it.
struct Counted<W: Write> {
    inner: W,
    hash: Sha256,
    size: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Compressor<W: Write> {
    Plain(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::Plain(w) => w.write(buf),
            Compressor::Gzip(w) => w.write(buf),
            Compressor::Zstd(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::Plain(w) => w.flush(),
            Compressor::Gzip(w) => w.flush(),
            Compressor::Zstd(w) => w.flush(),
        }
    }
}

impl<W: Write> Compressor<W> {
    fn new(inner: W, how: Compression) -> io::Result<Compressor<W>> {
        Ok(match how {
            Compression::None => Compressor::Plain(inner),
            // GzBuilder's defaults write no file name and a zero mtime: deterministic.
            Compression::Gzip => Compressor::Gzip(
                flate2::GzBuilder::new().write(inner, flate2::Compression::default()),
            ),
            Compression::Zstd => Compressor::Zstd(zstd::stream::write::Encoder::new(inner, 3)?),
        })
    }

    fn finish(self) -> io::Result<W> {
        match self {
            Compressor::Plain(w) => Ok(w),
            Compressor::Gzip(w) => w.finish(),
            Compressor::Zstd(w) => w.finish(),
        }
    }
}

/// A layer being written.
pub struct LayerTar<W: Write> {
    tar: tar::Builder<Compressor<Counted<W>>>,
}

impl<W: Write> LayerTar<W> {
    pub fn new(out: W, how: Compression) -> io::Result<LayerTar<W>> {
        let counted = Counted {
            inner: out,
            hash: Sha256::new(),
            size: 0,
        };
        Ok(LayerTar {
            tar: tar::Builder::new(Compressor::new(counted, how)?),
        })
    }

    /// Appends one entry at `path` (relative, '/'-separated, no trailing '/').
    pub fn append(&mut self, path: &[u8], meta: &Meta, body: Body<'_>) -> io::Result<()> {
        let mut header = Header::new_ustar();
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut name = path.to_vec();
        let (kind, size) = match &body {
            Body::Dir => {
                name.push(b'/');
                (EntryType::Directory, 0)
            }
            Body::File { size, .. } => (EntryType::Regular, *size),
            Body::Symlink(_) => (EntryType::Symlink, 0),
            Body::HardLink(_) => (EntryType::Link, 0),
            Body::Char { .. } => (EntryType::Char, 0),
            Body::Block { .. } => (EntryType::Block, 0),
            Body::Fifo => (EntryType::Fifo, 0),
        };
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(meta.mode & 0o7777);
        header.set_uid(u64::from(meta.uid));
        header.set_gid(u64::from(meta.gid));
        header.set_mtime(u64::try_from(meta.mtime).unwrap_or(0));
        // Every entry carries device numbers (0 unless a device), as GNU tar writes them:
        // readers that parse the fields for every entry then find numbers, not blanks.
        let (major, minor) = match body {
            Body::Char { major, minor } | Body::Block { major, minor } => (major, minor),
            _ => (0, 0),
        };
        header.set_device_major(major)?;
        header.set_device_minor(minor)?;
        let ustar = header
            .as_ustar_mut()
            .ok_or_else(|| io::Error::other("ustar header expected"))?;
        if !set_ustar_name(&mut ustar.name, &mut ustar.prefix, &name) {
            pax.push((b"path".to_vec(), name.clone()));
            fill(&mut ustar.name, &name[..name.len().min(99)]);
        }
        if let Body::Symlink(target) | Body::HardLink(target) = body {
            if target.len() <= ustar.linkname.len() && !target.contains(&0) {
                fill(&mut ustar.linkname, target);
            } else {
                pax.push((b"linkpath".to_vec(), target.to_vec()));
                fill(&mut ustar.linkname, &target[..target.len().min(99)]);
            }
        }
        for (k, v) in &meta.xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            pax.push((key, v.clone()));
        }
        if !pax.is_empty() {
            self.append_pax(&pax)?;
        }
        header.set_cksum();
        match body {
            Body::File { data, .. } => {
                let exact = <&mut dyn io::Read as io::Read>::take(data, size);
                self.tar.append(&header, exact)
            }
            _ => self.tar.append(&header, io::empty()),
        }
    }

    fn append_pax(&mut self, records: &[(Vec<u8>, Vec<u8>)]) -> io::Result<()> {
        let mut data = Vec::new();
        for (k, v) in records {
            data.extend_from_slice(&pax_record(k, v));
        }
        let mut header = Header::new_ustar();
        header.set_entry_type(EntryType::XHeader);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        let ustar = header
            .as_ustar_mut()
            .ok_or_else(|| io::Error::other("ustar header expected"))?;
        fill(&mut ustar.name, b"PaxHeader");
        header.set_cksum();
        self.tar.append(&header, data.as_slice())
    }

    /// Ends the archive and the compression stream; returns the blob's digest and size.
    pub fn finish(self) -> io::Result<(BlobId, W)> {
        let compressor = self.tar.into_inner()?;
        let mut counted = compressor.finish()?;
        counted.flush()?;
        let hex: String = counted
            .hash
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let id = BlobId {
            digest: format!("sha256:{hex}"),
            size: counted.size,
        };
        Ok((id, counted.inner))
    }
}

fn fill(slot: &mut [u8], bytes: &[u8]) {
    slot.fill(0);
    slot[..bytes.len()].copy_from_slice(bytes);
}

/// Puts `name` in the ustar name field, or split at a '/' into prefix and name; false when it
/// fits neither way (or holds a NUL) and needs a PAX `path` record.
fn set_ustar_name(name_slot: &mut [u8; 100], prefix_slot: &mut [u8; 155], name: &[u8]) -> bool {
    if name.contains(&0) {
        return false;
    }
    if name.len() <= name_slot.len() {
        fill(name_slot, name);
        return true;
    }
    // The split '/' is dropped; a directory's trailing '/' stays with the name part.
    let body = name.strip_suffix(b"/").unwrap_or(name);
    for (i, &b) in body.iter().enumerate().rev() {
        if b != b'/' {
            continue;
        }
        let (prefix, rest) = (&name[..i], &name[i + 1..]);
        if rest.len() > name_slot.len() {
            return false;
        }
        if prefix.len() <= prefix_slot.len() && !prefix.is_empty() {
            fill(prefix_slot, prefix);
            fill(name_slot, rest);
            return true;
        }
    }
    false
}

/// One PAX record, `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    let mut v = format!("{len} ").into_bytes();
    v.extend_from_slice(key);
    v.push(b'=');
    v.extend_from_slice(value);
    v.push(b'\n');
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_count_their_own_length() {
        for (k, v) in [("path", 5usize), ("SCHILY.xattr.user.x", 200), ("a", 0)] {
            let rec = pax_record(k.as_bytes(), &vec![b'v'; v]);
            let (len, _) =
                std::str::from_utf8(&rec[..rec.iter().position(|&b| b == b' ').unwrap()])
                    .map(|s| (s.parse::<usize>().unwrap(), ()))
                    .unwrap();
            assert_eq!(len, rec.len(), "{k}");
        }
    }

    #[test]
    fn long_names_split_or_go_to_pax() {
        let mut name = [0u8; 100];
        let mut prefix = [0u8; 155];
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(90));
        assert!(set_ustar_name(&mut name, &mut prefix, long.as_bytes()));
        assert_eq!(&prefix[..120], "d".repeat(120).as_bytes());
        assert_eq!(&name[..90], "f".repeat(90).as_bytes());
        let too_long = "x".repeat(300);
        assert!(!set_ustar_name(&mut name, &mut prefix, too_long.as_bytes()));
    }

    #[test]
    fn the_same_entries_give_the_same_digest() {
        let write = |how| {
            let mut t = LayerTar::new(Vec::new(), how).unwrap();
            let meta = Meta {
                mode: 0o644,
                mtime: 1_700_000_000,
                xattrs: vec![(b"user.k".to_vec(), b"v".to_vec())],
                ..Meta::default()
            };
            let mut data: &[u8] = b"hello";
            t.append(b"a", &meta, Body::Dir).unwrap();
            t.append(
                b"a/f",
                &meta,
                Body::File {
                    size: 5,
                    data: &mut data,
                },
            )
            .unwrap();
            t.finish().unwrap()
        };
        for how in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let (a, bytes) = write(how);
            let (b, _) = write(how);
            assert_eq!(a, b);
            assert_eq!(a.size, bytes.len() as u64);
        }
    }
}
