//! bzImage → ELF vmlinux: the real Debian kernel the QEMU backend uses,
//! synthetic images in every compression we decode, and corrupted images
//! (a clear error, never a panic).

use std::io::Write;
use std::path::PathBuf;

use mkctl::kexec::image::{self, Compression, ImageError, ImageKind};
use proptest::prelude::*;

/// The stock kernel qemu/setup.sh downloads (or `MKCTL_KERNEL`); fails
/// loudly when it is missing.
fn debian_kernel() -> PathBuf {
    if let Some(p) = std::env::var_os("MKCTL_KERNEL") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("MKCTL_CACHE").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache"),
        PathBuf::from,
    );
    let p = cache.join("kernel/vmlinuz");
    assert!(
        p.is_file(),
        "no guest kernel at {} (or $MKCTL_KERNEL); run scripts/setup.sh, which downloads it",
        p.display()
    );
    p
}

#[test]
fn debian_bzimage_yields_its_elf_vmlinux() {
    let path = debian_kernel();
    let data = std::fs::read(&path).unwrap();
    assert_eq!(image::classify(&data).unwrap(), ImageKind::BzImage);
    let payload = image::payload(&data).unwrap();
    let format = Compression::detect(payload).expect("a known compression");
    let elf = image::extract_vmlinux(&data).unwrap();
    let parsed = goblin::elf::Elf::parse(&elf).expect("goblin reads the vmlinux");
    assert!(parsed.is_64 && parsed.little_endian);
    assert_eq!(parsed.header.e_machine, goblin::elf::header::EM_X86_64);
    let loads: Vec<_> = parsed
        .program_headers
        .iter()
        .filter(|p| p.p_type == goblin::elf::program_header::PT_LOAD)
        .collect();
    assert!(!loads.is_empty(), "no PT_LOAD segment");
    // The kernel links at __START_KERNEL_map (0xffffffff80000000 + ...).
    assert!(parsed.entry >= 0xffff_ffff_8000_0000 || loads[0].p_paddr < 0x1_0000_0000);
    // Trimmed to the ELF: nothing after the last table or segment.
    assert_eq!(image::elf_size(&elf).unwrap(), elf.len());
    assert!(
        elf.len() > data.len(),
        "{format:?} vmlinux should be larger than the bzImage"
    );
    // prepare_elf agrees, and passes an ELF file through untouched.
    let again = image::prepare_elf(&path).unwrap().unwrap();
    assert_eq!(again.len(), elf.len());
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("vmlinux");
    std::fs::write(&raw, &elf).unwrap();
    assert!(image::prepare_elf(&raw).unwrap().is_none());
}

/// A minimal ELF64 x86-64 image with one PT_LOAD segment of `body` bytes,
/// followed by junk the trimming must drop.
fn tiny_elf_with_tail(body: usize) -> (Vec<u8>, usize) {
    let mut h = vec![0u8; 64 + 56];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2;
    h[5] = 1;
    h[6] = 1;
    h[16] = 2;
    h[18] = 62;
    h[20] = 1;
    h[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    h[52] = 64; // e_ehsize
    h[54] = 56; // e_phentsize
    h[56] = 1; // e_phnum
    h[58] = 64; // e_shentsize
    let ph = 64;
    h[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    h[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
    h[ph + 32..ph + 40].copy_from_slice(&(body as u64).to_le_bytes()); // p_filesz
    h.extend(std::iter::repeat_n(0x90u8, body));
    let size = h.len();
    h.extend_from_slice(b"RELOCS-AND-SIZE");
    (h, size)
}

/// A bzImage around `payload`: boot protocol 2.15, 4 setup sectors.
fn bzimage(payload: &[u8]) -> Vec<u8> {
    let setup_sects = 4u8;
    let mut d = vec![0u8; (setup_sects as usize + 1) * 512];
    d[0x1f1] = setup_sects;
    d[0x202..0x206].copy_from_slice(b"HdrS");
    d[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    d[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes()); // payload_offset
    d[0x24c..0x250].copy_from_slice(&(payload.len() as u32 + 4).to_le_bytes());
    d.extend_from_slice(&[0u8; 16]);
    d.extend_from_slice(payload);
    d.extend_from_slice(&0u32.to_le_bytes()); // the appended size
    d
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn xz(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    lzma_rs::xz_compress(&mut &b[..], &mut out).unwrap();
    out
}

fn lzma(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    lzma_rs::lzma_compress(&mut &b[..], &mut out).unwrap();
    out
}

/// `xz --x86 --lzma2 --check=crc32`, as the kernel's `scripts/xz_wrap.sh`
/// compresses x86 kernels (the `xz` tool; scripts/setup.sh installs it).
fn xz_x86(b: &[u8]) -> Vec<u8> {
    let mut child = std::process::Command::new("xz")
        .args([
            "--format=xz",
            "--check=crc32",
            "--x86",
            "--lzma2=dict=1MiB",
            "-c",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run xz (apt-get install xz-utils)");
    let mut stdin = child.stdin.take().unwrap();
    let input = b.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input).unwrap());
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// x86 code-like bytes: CALL/JMP opcodes with near operands, data between.
fn code_like(n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n);
    let mut x: u32 = 0x1234_5678;
    while v.len() < n {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        match x >> 29 {
            0 | 1 => {
                v.push(if x & 1 == 0 { 0xe8 } else { 0xe9 });
                let rel = (x >> 8) as i32 % 0x40000 - 0x20000;
                v.extend_from_slice(&rel.to_le_bytes());
            }
            2 => v.extend_from_slice(&[0xe8, 0xe8, 0xff, 0x00]),
            _ => v.push((x >> 16) as u8),
        }
    }
    v.truncate(n);
    v
}

#[test]
fn xz_kernels_with_the_x86_filter_decode() {
    let (mut elf, size) = tiny_elf_with_tail(0);
    elf.truncate(size);
    let body = code_like(200_000);
    // One PT_LOAD holding the code.
    elf[64 + 32..64 + 40].copy_from_slice(&(body.len() as u64).to_le_bytes());
    elf.extend_from_slice(&body);
    let img = bzimage(&xz_x86(&elf));
    let out = image::extract_vmlinux(&img).expect("x86-filtered xz payload");
    assert_eq!(out.len(), elf.len());
    assert!(out == elf, "decoded bytes differ from the original");
    // A flipped byte in the compressed data is caught, not returned.
    let mut bad = xz_x86(&elf);
    let n = bad.len();
    bad[n / 2] ^= 0x40;
    assert!(image::extract_vmlinux(&bzimage(&bad)).is_err());
}

#[test]
fn synthetic_images_in_each_compression() {
    let (elf, size) = tiny_elf_with_tail(3000);
    for (name, payload) in [("gzip", gzip(&elf)), ("xz", xz(&elf)), ("lzma", lzma(&elf))] {
        let img = bzimage(&payload);
        let out = image::extract_vmlinux(&img).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(out, elf[..size], "{name}");
    }
}

#[test]
fn unsupported_and_unknown_compressions_are_named() {
    let e = image::extract_vmlinux(&bzimage(b"\x89LZO\0\0\0")).unwrap_err();
    assert!(e.to_string().contains("lzo is not supported"), "{e}");
    let e = image::extract_vmlinux(&bzimage(b"BZh91AY")).unwrap_err();
    assert!(e.to_string().contains("bzip2 is not supported"), "{e}");
    let e = image::extract_vmlinux(&bzimage(b"\xde\xad\xbe\xef")).unwrap_err();
    assert!(
        matches!(e, ImageError::UnknownCompression(ref m) if m == "deadbeef"),
        "{e}"
    );
}

#[test]
fn header_errors_are_clear() {
    assert!(matches!(
        image::extract_vmlinux(&[0u8; 100]),
        Err(ImageError::Truncated { len: 100 })
    ));
    let mut img = bzimage(&gzip(b"x"));
    img[0x206..0x208].copy_from_slice(&0x0207u16.to_le_bytes());
    assert_eq!(
        image::extract_vmlinux(&img).unwrap_err().to_string(),
        "boot protocol 2.07 is too old: the payload fields need 2.08 or later"
    );
    let mut img = bzimage(&gzip(b"x"));
    img[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        image::extract_vmlinux(&img),
        Err(ImageError::PayloadBounds { .. })
    ));
    let img = bzimage(&gzip(b"not an elf at all"));
    assert!(matches!(
        image::extract_vmlinux(&img),
        Err(ImageError::NotElf)
    ));
    let e = image::classify(&[0u8; 4096]).unwrap_err();
    assert!(e.to_string().contains("not a bzImage"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Any bytes: an answer, never a panic.
    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = image::classify(&data);
        let _ = image::extract_vmlinux(&data);
        let _ = image::elf_size(&data);
    }

    /// A valid image with bytes flipped or cut short anywhere.
    #[test]
    fn corrupted_images_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        xz_payload in any::<bool>(),
    ) {
        let (elf, _) = tiny_elf_with_tail(512);
        let mut img = bzimage(&if xz_payload { xz(&elf) } else { gzip(&elf) });
        for (at, v) in flips {
            let i = at.index(img.len());
            img[i] ^= v;
        }
        let _ = image::extract_vmlinux(&img);
        let n = cut.index(img.len());
        let _ = image::extract_vmlinux(&img[..n]);
    }

    /// Header fields forged to any value.
    #[test]
    fn forged_header_fields_never_panic(sects in any::<u8>(), off in any::<u32>(), len in any::<u32>(), ver in any::<u16>()) {
        let (elf, _) = tiny_elf_with_tail(64);
        let mut img = bzimage(&gzip(&elf));
        img[0x1f1] = sects;
        img[0x206..0x208].copy_from_slice(&ver.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&off.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&len.to_le_bytes());
        let _ = image::extract_vmlinux(&img);
    }
}
