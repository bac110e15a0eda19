//! Kernel images for `kexec_file_load`: the multikernel loader of the
//! current interface takes an ELF `vmlinux`, while distributions ship a
//! bzImage whose payload is that ELF, compressed. This module finds the
//! payload from the x86 boot-protocol header, decompresses it and trims
//! what the build appended after the ELF image (the relocation table and
//! the 4-byte size), as kerf 0.4.0 does (`kerf/vmlinuz.py`).
//!
//! Everything here reads bytes a file gave us: every offset is checked, and
//! a corrupt image is a [`ImageError`], never a panic or an unbounded
//! allocation.

use std::io::Read;
use std::path::Path;

/// x86 boot protocol setup header fields (`Documentation/arch/x86/boot.rst`,
/// `arch/x86/include/uapi/asm/bootparam.h` `struct setup_header`).
const SETUP_SECTS: usize = 0x1f1;
const HDR_MAGIC: usize = 0x202; // "HdrS"
const HDR_VERSION: usize = 0x206;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
const HEADER_END: usize = 0x250;
/// `payload_offset`/`payload_length` exist from boot protocol 2.08 on.
const MIN_PROTOCOL: u16 = 0x0208;
/// A vmlinux larger than this is not a kernel (Debian's is ~60 MiB); the
/// cap keeps a forged size field from asking for an absurd allocation.
pub const MAX_VMLINUX: usize = 1 << 30;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// Why a kernel image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a bzImage (no \"HdrS\" boot-protocol magic at 0x202) and not an ELF vmlinux")]
    NotAKernel,
    #[error("image is {len} bytes, too short for the boot-protocol header (0x250 bytes)")]
    Truncated { len: usize },
    #[error("boot protocol {major}.{minor:02} is too old: the payload fields need 2.08 or later")]
    OldProtocol { major: u8, minor: u8 },
    #[error(
        "bzImage payload [0x{start:x}, +0x{len:x}) runs past the end of the {file_len}-byte file"
    )]
    PayloadBounds {
        start: u64,
        len: u64,
        file_len: usize,
    },
    #[error("payload compression {0} is not supported; build the kernel with gzip, xz, lzma, zstd or lz4, or give the vmlinux")]
    Unsupported(&'static str),
    #[error("unknown payload compression (magic {0})")]
    UnknownCompression(String),
    #[error("{format} payload does not decompress")]
    Decompress {
        format: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("decompressed payload grows past {MAX_VMLINUX} bytes")]
    TooLarge,
    #[error("decompressed payload is not an ELF image")]
    NotElf,
    #[error("embedded vmlinux is not a valid ELF64 little-endian image: {0}")]
    BadElf(String),
}

/// The compression of a bzImage payload, told by its leading magic (the
/// formats `arch/x86/boot/compressed/Makefile` can build).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Xz,
    Lzma,
    Zstd,
    /// `lz4 -l`: the legacy frame the kernel build uses.
    Lz4Legacy,
    Lz4Frame,
    Bzip2,
    Lzo,
}

impl Compression {
    /// Tells the format from the first bytes of a payload.
    pub fn detect(payload: &[u8]) -> Option<Compression> {
        const TABLE: &[(&[u8], Compression)] = &[
            (b"\x1f\x8b", Compression::Gzip),
            (b"\xfd7zXZ\x00", Compression::Xz),
            (b"\x28\xb5\x2f\xfd", Compression::Zstd),
            (b"\x02\x21\x4c\x18", Compression::Lz4Legacy),
            (b"\x04\x22\x4d\x18", Compression::Lz4Frame),
            (b"BZh", Compression::Bzip2),
            (b"\x89LZO", Compression::Lzo),
            (b"\x5d\x00", Compression::Lzma),
        ];
        TABLE
            .iter()
            .find(|(magic, _)| payload.starts_with(magic))
            .map(|(_, c)| *c)
    }

    /// The name people know the format by.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Lzma => "lzma",
            Compression::Zstd => "zstd",
            Compression::Lz4Legacy => "lz4 (legacy frame)",
            Compression::Lz4Frame => "lz4 (frame)",
            Compression::Bzip2 => "bzip2",
            Compression::Lzo => "lzo",
        }
    }
}

/// What a kernel file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Elf,
    BzImage,
}

/// Tells an ELF vmlinux from a bzImage by their magics.
pub fn classify(data: &[u8]) -> Result<ImageKind, ImageError> {
    if data.starts_with(ELF_MAGIC) {
        return Ok(ImageKind::Elf);
    }
    if data.len() >= HDR_MAGIC + 4 && &data[HDR_MAGIC..HDR_MAGIC + 4] == b"HdrS" {
        return Ok(ImageKind::BzImage);
    }
    if data.len() < HEADER_END {
        return Err(ImageError::Truncated { len: data.len() });
    }
    Err(ImageError::NotAKernel)
}

/// The compressed payload of a bzImage: `(setup_sects + 1) * 512 +
/// payload_offset`, `payload_length` bytes (`setup_sects` 0 means 4).
pub fn payload(data: &[u8]) -> Result<&[u8], ImageError> {
    if data.len() < HEADER_END {
        return Err(ImageError::Truncated { len: data.len() });
    }
    if &data[HDR_MAGIC..HDR_MAGIC + 4] != b"HdrS" {
        return Err(ImageError::NotAKernel);
    }
    let version = u16::from_le_bytes([data[HDR_VERSION], data[HDR_VERSION + 1]]);
    if version < MIN_PROTOCOL {
        let [minor, major] = version.to_le_bytes();
        return Err(ImageError::OldProtocol { major, minor });
    }
    let sects = match data[SETUP_SECTS] {
        0 => 4u64,
        n => u64::from(n),
    };
    let le32 = |at: usize| u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
    let off = u64::from(le32(PAYLOAD_OFFSET));
    let len = u64::from(le32(PAYLOAD_LENGTH));
    // (sects + 1) * 512 <= 256 * 512, and off < 2^32: no overflow in u64.
    let start = (sects + 1) * 512 + off;
    let end = start + len;
    let bounds = ImageError::PayloadBounds {
        start,
        len,
        file_len: data.len(),
    };
    let (Ok(s), Ok(e)) = (usize::try_from(start), usize::try_from(end)) else {
        return Err(bounds);
    };
    data.get(s..e).ok_or(bounds)
}

/// The ELF vmlinux inside a bzImage, decompressed and trimmed to the ELF
/// image itself.
pub fn extract_vmlinux(data: &[u8]) -> Result<Vec<u8>, ImageError> {
    let payload = payload(data)?;
    let format = Compression::detect(payload).ok_or_else(|| {
        ImageError::UnknownCompression(payload.iter().take(4).map(|b| format!("{b:02x}")).collect())
    })?;
    let raw = decompress(format, payload)?;
    if !raw.starts_with(ELF_MAGIC) {
        return Err(ImageError::NotElf);
    }
    let size = elf_size(&raw)?;
    let mut raw = raw;
    raw.truncate(size);
    Ok(raw)
}

/// What `kexec_file_load` is given for a kernel file: the file itself when
/// it is ELF already, else the vmlinux extracted from the bzImage.
pub fn prepare_elf(path: &Path) -> Result<Option<Vec<u8>>, ImageError> {
    let data = std::fs::read(path).map_err(|source| ImageError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    match classify(&data)? {
        ImageKind::Elf => {
            elf_size(&data)?;
            Ok(None)
        }
        ImageKind::BzImage => extract_vmlinux(&data).map(Some),
    }
}

fn decompress(format: Compression, payload: &[u8]) -> Result<Vec<u8>, ImageError> {
    let err = |source: Box<dyn std::error::Error + Send + Sync>| ImageError::Decompress {
        format: format.name(),
        source,
    };
    let limit = MAX_VMLINUX as u64 + 1;
    let mut out = Vec::new();
    match format {
        // The payload ends with the 4-byte decompressed size the build
        // appends; every decoder below stops at the end of its stream.
        Compression::Gzip => {
            flate2::read::GzDecoder::new(payload)
                .take(limit)
                .read_to_end(&mut out)
                .map_err(|e| err(Box::new(e)))?;
        }
        Compression::Xz => {
            // The stream ends with its footer magic "YZ"; the 4-byte size
            // the build appends after it would read as a second stream.
            let stream = match payload.len().checked_sub(4) {
                Some(n) if !payload.ends_with(b"YZ") && payload[..n].ends_with(b"YZ") => {
                    &payload[..n]
                }
                _ => payload,
            };
            // x86 kernels built with CONFIG_KERNEL_XZ put the x86 branch
            // filter before LZMA2, which lzma-rs does not read.
            if super::xz::first_block_filters(stream).is_some_and(|f| f.contains(&0x04)) {
                out = super::xz::decode_x86_lzma2(stream, MAX_VMLINUX + 1)
                    .map_err(|e| err(Box::new(e)))?;
            } else {
                let mut r = std::io::BufReader::new(stream);
                let mut w = Capped::new(&mut out);
                lzma_rs::xz_decompress(&mut r, &mut w)
                    .map_err(|e| capped_or(&w, err(Box::new(e))))?;
            }
        }
        Compression::Lzma => {
            // .lzma has no footer: try without the appended 4-byte size
            // first, then the whole payload.
            let short = &payload[..payload.len().saturating_sub(4)];
            let mut last = None;
            for input in [short, payload] {
                out.clear();
                let mut r = std::io::BufReader::new(input);
                let mut w = Capped::new(&mut out);
                match lzma_rs::lzma_decompress(&mut r, &mut w) {
                    Ok(()) => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(capped_or(&w, err(Box::new(e)))),
                }
            }
            if let Some(e) = last {
                return Err(e);
            }
        }
        Compression::Zstd => {
            let dec =
                ruzstd::decoding::StreamingDecoder::new(payload).map_err(|e| err(Box::new(e)))?;
            dec.take(limit)
                .read_to_end(&mut out)
                .map_err(|e| err(Box::new(e)))?;
        }
        Compression::Lz4Frame => {
            lz4_flex::frame::FrameDecoder::new(payload)
                .take(limit)
                .read_to_end(&mut out)
                .map_err(|e| err(Box::new(e)))?;
        }
        Compression::Lz4Legacy => lz4_legacy(payload, &mut out).map_err(err)?,
        Compression::Bzip2 | Compression::Lzo => {
            return Err(ImageError::Unsupported(format.name()))
        }
    }
    if out.len() > MAX_VMLINUX {
        return Err(ImageError::TooLarge);
    }
    Ok(out)
}

fn capped_or(w: &Capped<'_>, e: ImageError) -> ImageError {
    if w.over {
        ImageError::TooLarge
    } else {
        e
    }
}

/// A writer that refuses to grow past [`MAX_VMLINUX`].
struct Capped<'a> {
    out: &'a mut Vec<u8>,
    over: bool,
}

impl<'a> Capped<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        Self { out, over: false }
    }
}

impl std::io::Write for Capped<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len().saturating_add(buf.len()) > MAX_VMLINUX {
            self.over = true;
            return Err(std::io::Error::other("decompressed payload too large"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The lz4 legacy frame (`lib/decompress_unlz4.c`): a magic, then blocks of
/// `[le32 compressed size][lz4 block]`, each decoding to at most 8 MiB. The
/// kernel build appends the le32 decompressed size, which ends the stream.
fn lz4_legacy(
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    const MAGIC: u32 = 0x184c_2102;
    const CHUNK: usize = 8 << 20;
    let le32 = |at: usize| -> Option<u32> {
        let s = payload.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let mut pos = 4; // past the magic, checked by the caller
    let mut buf = vec![0u8; CHUNK];
    while let Some(size) = le32(pos) {
        if pos + 4 == payload.len() && !out.is_empty() {
            break; // the appended le32 size, not a block
        }
        pos += 4;
        if size == MAGIC {
            continue; // concatenated streams restart with the magic
        }
        let size = size as usize;
        let block = pos
            .checked_add(size)
            .and_then(|end| payload.get(pos..end))
            .ok_or("lz4 block runs past the end of the payload")?;
        let n = lz4_flex::block::decompress_into(block, &mut buf)?;
        if out.len() + n > MAX_VMLINUX {
            return Err("decompressed payload too large".into());
        }
        out.extend_from_slice(&buf[..n]);
        pos += size;
        if pos == payload.len() {
            break;
        }
    }
    if out.is_empty() {
        return Err("no lz4 block in the payload".into());
    }
    Ok(())
}

/// The size of the ELF image at the start of `data`: the furthest end of
/// its headers, program segments and section table (anything after is what
/// the build appended).
pub fn elf_size(data: &[u8]) -> Result<usize, ImageError> {
    use goblin::elf::Elf;
    if data.len() < 6 || data[4] != 2 || data[5] != 1 {
        return Err(ImageError::BadElf("not ELF64 little-endian".into()));
    }
    let elf = Elf::parse_header(data).map_err(|e| ImageError::BadElf(e.to_string()))?;
    let bad = |what: &str| ImageError::BadElf(what.to_string());
    let table = |off: u64, size: u16, num: u16| -> Result<u64, ImageError> {
        u64::from(size)
            .checked_mul(u64::from(num))
            .and_then(|n| n.checked_add(off))
            .ok_or_else(|| bad("table size overflows"))
    };
    let mut end = u64::from(elf.e_ehsize);
    end = end.max(table(elf.e_phoff, elf.e_phentsize, elf.e_phnum)?);
    end = end.max(table(elf.e_shoff, elf.e_shentsize, elf.e_shnum)?);
    if end > data.len() as u64 {
        return Err(bad("header tables run past the end of the image"));
    }
    let ctx = goblin::container::Ctx::new(
        goblin::container::Container::Big,
        goblin::container::Endian::Little,
    );
    let phdrs =
        goblin::elf::ProgramHeader::parse(data, elf.e_phoff as usize, elf.e_phnum as usize, ctx)
            .map_err(|e| ImageError::BadElf(e.to_string()))?;
    for ph in &phdrs {
        let seg_end = ph
            .p_offset
            .checked_add(ph.p_filesz)
            .ok_or_else(|| bad("segment end overflows"))?;
        end = end.max(seg_end);
    }
    if end > data.len() as u64 {
        return Err(bad("a segment runs past the end of the image"));
    }
    // end <= data.len(), so it fits in usize.
    Ok(end as usize)
}
