//! initramfs images built by mkctl itself: an uncompressed cpio `newc`
//! archive (the format the kernel unpacks into its rootfs) holding a static
//! `guest-init` as `/init`, the few nodes it needs before it mounts devtmpfs,
//! and any extra files a topology lists.
//!
//! The output is deterministic: entries are written sorted by path (so every
//! directory comes before what it holds), inode numbers are assigned in that
//! order, and mtime, uid and gid are 0. The same inputs give the same bytes,
//! which keeps images cacheable and comparable.
//!
//! This module builds archives; what goes in a guest's is decided by
//! [`Initramfs::base`], [`Initramfs::for_guest`] and
//! [`Initramfs::for_topology`] (guest-init, a topology's `files`, and the
//! host's static busybox when there is one).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Mode bits of a directory created implicitly as the parent of an entry.
const IMPLICIT_DIR_MODE: u32 = 0o755;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFBLK: u32 = 0o060_000;
const _: () = {
    assert!(S_IFDIR == libc::S_IFDIR);
    assert!(S_IFREG == libc::S_IFREG);
    assert!(S_IFLNK == libc::S_IFLNK);
    assert!(S_IFCHR == libc::S_IFCHR);
    assert!(S_IFBLK == libc::S_IFBLK);
};

/// Longest path the kernel's unpacker accepts (`PATH_MAX`, NUL included).
const MAX_NAME: usize = 4096;

/// An error while building or writing an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// A guest path that cannot go into the archive.
    #[error("bad initramfs path {path:?}: {reason}")]
    BadPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Mode with bits outside `0o7777`.
    #[error(
        "bad mode 0o{mode:o} for initramfs path {path:?}: only permission bits (0o7777) may be set"
    )]
    BadMode {
        /// The guest path.
        path: String,
        /// The mode given.
        mode: u32,
    },
    /// The same path added twice.
    #[error("initramfs path {0:?} is added twice")]
    Duplicate(String),
    /// A path whose parent is not a directory.
    #[error("initramfs path {path:?} needs {parent:?} to be a directory, but it is not")]
    NotADirectory {
        /// The path being added.
        path: String,
        /// Its parent that is a file, symlink or device.
        parent: String,
    },
    /// A file larger than the newc format's 4 GiB limit.
    #[error("initramfs file {path:?} has {size} bytes; cpio newc holds at most 4 GiB - 1")]
    TooLarge {
        /// The guest path.
        path: String,
        /// Its size.
        size: u64,
    },
    /// A host file that could not be read.
    #[error("cannot read {} for the initramfs", .0.display())]
    ReadHost(PathBuf, #[source] io::Error),
    /// Writing the archive failed.
    #[error("cannot write initramfs {}", .0.display())]
    Write(PathBuf, #[source] io::Error),
}

/// What an archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    CharDev { major: u32, minor: u32 },
    BlockDev { major: u32, minor: u32 },
}

#[derive(Debug, Clone)]
struct Entry {
    node: Node,
    /// Permission bits only (`0o7777`).
    perm: u32,
    /// Created as the parent of another entry, not added by name.
    implicit: bool,
}

/// Where [`Initramfs::kernel_modules`] puts modules (guest-init's
/// `doorbell::MODULE_DIR`).
pub const GUEST_MODULE_DIR: &str = "/lib/modules/mkctl";

/// A set of files to pack as a cpio `newc` initramfs. Paths are absolute guest
/// paths (`/init`, `/etc/x`); a leading `/` is optional. Parent directories are
/// created as needed (mode 0755).
#[derive(Debug, Clone, Default)]
pub struct Initramfs {
    /// Keyed by path without the leading `/`; sorted order is write order.
    entries: BTreeMap<String, Entry>,
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// The skeleton every guest needs before its init has mounted anything:
    /// mount points (`/dev`, `/proc`, `/sys`, `/tmp`, `/run`, `/root`) and
    /// `/dev/console` (char 5:1), which the kernel opens as PID 1's stdio.
    pub fn base() -> Self {
        let mut ir = Self::new();
        let built = (|| -> Result<(), InitramfsError> {
            for d in ["/dev", "/proc", "/sys", "/run", "/root"] {
                ir.dir(d, 0o755)?;
            }
            ir.dir("/tmp", 0o1777)?;
            ir.char_dev("/dev/console", 0o600, 5, 1)?;
            Ok(())
        })();
        // Fixed, valid paths: this cannot fail.
        built.expect("the base initramfs layout is valid");
        ir
    }

    /// [`Initramfs::base`] plus the given `guest-init` binary as `/init`.
    pub fn for_guest(guest_init: &Path) -> Result<Self, InitramfsError> {
        let mut ir = Self::base();
        ir.host_file("/init", guest_init, Some(0o755))?;
        Ok(ir)
    }

    /// What a topology's guests boot with: [`Initramfs::for_guest`], the
    /// topology's `files` (guest path, host path), and — when the host has
    /// a static `/bin/busybox` — busybox and its common applets, so a guest
    /// can be poked at with `mkctl exec alpha -- sh`.
    pub fn for_topology(
        guest_init: &Path,
        files: &[(String, PathBuf)],
    ) -> Result<Self, InitramfsError> {
        let mut ir = Self::for_guest(guest_init)?;
        for (guest, host) in files {
            ir.host_file(guest, host, None)?;
        }
        let busybox = Path::new(HOST_BUSYBOX);
        if is_static(busybox) {
            ir.host_file("/bin/busybox", busybox, Some(0o755))?;
            for applet in BUSYBOX_APPLETS {
                ir.symlink(&format!("/bin/{applet}"), "busybox")?;
            }
        }
        Ok(ir)
    }

    /// Adds every `*.ko` in `dir` (the guest kernel's modules `qemu/setup.sh`
    /// copies out of its package) under [`GUEST_MODULE_DIR`], where
    /// guest-init loads them from (the virtio console driver for the
    /// doorbell port). A missing `dir` adds nothing. Returns how many.
    pub fn kernel_modules(&mut self, dir: &Path) -> Result<usize, InitramfsError> {
        let Ok(entries) = fs::read_dir(dir) else {
            return Ok(0);
        };
        let mut kos: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "ko"))
            .collect();
        kos.sort();
        for ko in &kos {
            let name = ko.file_name().unwrap_or_default().to_string_lossy();
            self.host_file(&format!("{GUEST_MODULE_DIR}/{name}"), ko, Some(0o644))?;
        }
        Ok(kos.len())
    }

    /// Adds a directory. Adding one that exists only as the parent of an
    /// earlier entry sets its mode.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self, InitramfsError> {
        self.insert(path, Node::Dir, mode)
    }

    /// Adds a regular file with the given contents.
    pub fn file(
        &mut self,
        path: &str,
        data: impl Into<Vec<u8>>,
        mode: u32,
    ) -> Result<&mut Self, InitramfsError> {
        self.insert(path, Node::File(data.into()), mode)
    }

    /// Adds a regular file read now from `host`; `mode` `None` keeps the host
    /// file's permission bits. This is how a topology's extra files go in.
    pub fn host_file(
        &mut self,
        path: &str,
        host: &Path,
        mode: Option<u32>,
    ) -> Result<&mut Self, InitramfsError> {
        let read_err = |e| InitramfsError::ReadHost(host.to_path_buf(), e);
        let data = fs::read(host).map_err(read_err)?;
        let mode = match mode {
            Some(m) => m,
            None => fs::metadata(host).map_err(read_err)?.permissions().mode() & 0o7777,
        };
        self.file(path, data, mode)
    }

    /// Adds a symbolic link to `target` (stored as written).
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, InitramfsError> {
        if target.is_empty() || target.contains('\0') {
            return Err(InitramfsError::BadPath {
                path: path.into(),
                reason: "symlink target is empty or holds a NUL byte",
            });
        }
        self.insert(path, Node::Symlink(target.into()), 0o777)
    }

    /// Adds a character device node.
    pub fn char_dev(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self, InitramfsError> {
        self.insert(path, Node::CharDev { major, minor }, mode)
    }

    /// Adds a block device node.
    pub fn block_dev(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self, InitramfsError> {
        self.insert(path, Node::BlockDev { major, minor }, mode)
    }

    /// The guest paths in the archive, in write order (with leading `/`).
    pub fn paths(&self) -> impl Iterator<Item = String> + '_ {
        self.entries.keys().map(|k| format!("/{k}"))
    }

    fn insert(&mut self, path: &str, node: Node, perm: u32) -> Result<&mut Self, InitramfsError> {
        let key = normalise(path)?;
        if perm & !0o7777 != 0 {
            return Err(InitramfsError::BadMode {
                path: path.into(),
                mode: perm,
            });
        }
        if let Node::File(data) = &node {
            if u32::try_from(data.len()).is_err() {
                return Err(InitramfsError::TooLarge {
                    path: path.into(),
                    size: data.len() as u64,
                });
            }
        }
        // Parents: each must be a directory; missing ones are created.
        let mut parents = Vec::new();
        for (i, _) in key.match_indices('/') {
            let parent = &key[..i];
            match self.entries.get(parent) {
                Some(e) if e.node == Node::Dir => {}
                Some(_) => {
                    return Err(InitramfsError::NotADirectory {
                        path: path.into(),
                        parent: format!("/{parent}"),
                    })
                }
                None => parents.push(parent.to_string()),
            }
        }
        match self.entries.get_mut(&key) {
            Some(e) if e.implicit && node == Node::Dir => {
                e.perm = perm;
                e.implicit = false;
                return Ok(self);
            }
            Some(_) => return Err(InitramfsError::Duplicate(format!("/{key}"))),
            None => {}
        }
        for p in parents {
            self.entries.insert(
                p,
                Entry {
                    node: Node::Dir,
                    perm: IMPLICIT_DIR_MODE,
                    implicit: true,
                },
            );
        }
        self.entries.insert(
            key,
            Entry {
                node,
                perm,
                implicit: false,
            },
        );
        Ok(self)
    }

    /// Writes the archive (entries, then the `TRAILER!!!` record).
    pub fn write_to(&self, mut out: impl Write) -> io::Result<()> {
        // Inode numbers in write order, from 1 (0 marks the trailer).
        for (ino, (name, e)) in (1u32..).zip(&self.entries) {
            let (kind, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match &e.node {
                Node::Dir => (S_IFDIR, 2, &[], (0, 0)),
                Node::File(d) => (S_IFREG, 1, d, (0, 0)),
                Node::Symlink(t) => (S_IFLNK, 1, t.as_bytes(), (0, 0)),
                Node::CharDev { major, minor } => (S_IFCHR, 1, &[], (*major, *minor)),
                Node::BlockDev { major, minor } => (S_IFBLK, 1, &[], (*major, *minor)),
            };
            let h = Header {
                ino,
                mode: kind | e.perm,
                nlink,
                // Checked against u32 when the entry was added.
                filesize: data.len() as u32,
                rdev,
            };
            write_entry(&mut out, &h, name, data)?;
        }
        let trailer = Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            filesize: 0,
            rdev: (0, 0),
        };
        write_entry(&mut out, &trailer, "TRAILER!!!", &[])?;
        out.flush()
    }

    /// The archive as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write_to(&mut v).expect("writing to a Vec cannot fail");
        v
    }

    /// Writes the archive to `path` (through a temporary file in the same
    /// directory, renamed into place, so a reader never sees half of it).
    pub fn write_file(&self, path: &Path) -> Result<(), InitramfsError> {
        let fail = |e| InitramfsError::Write(path.to_path_buf(), e);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = fs::File::create(&tmp).map_err(fail)?;
        let mut w = io::BufWriter::new(file);
        self.write_to(&mut w).map_err(fail)?;
        w.into_inner()
            .map_err(|e| fail(e.into_error()))?
            .sync_all()
            .map_err(fail)?;
        fs::rename(&tmp, path).map_err(fail)
    }
}

/// `/a/b` or `a/b` → `a/b`; refuses what the kernel's unpacker would not take
/// or what would escape the root.
fn normalise(path: &str) -> Result<String, InitramfsError> {
    let bad = |reason| InitramfsError::BadPath {
        path: path.into(),
        reason,
    };
    let p = path.strip_prefix('/').unwrap_or(path);
    let p = p.strip_suffix('/').unwrap_or(p);
    if p.is_empty() {
        return Err(bad("empty path or the root itself"));
    }
    if p.contains('\0') {
        return Err(bad("holds a NUL byte"));
    }
    if p.len() + 1 > MAX_NAME {
        return Err(bad("longer than PATH_MAX"));
    }
    if p == "TRAILER!!!" {
        return Err(bad("is the cpio end marker"));
    }
    for c in p.split('/') {
        match c {
            "" => return Err(bad("has an empty component (`//`)")),
            "." | ".." => return Err(bad("has a `.` or `..` component")),
            _ => {}
        }
    }
    Ok(p.to_string())
}

/// The fields of a newc header that vary here; the rest are fixed
/// (uid, gid, mtime, dev and check are 0).
struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdev: (u32, u32),
}

/// One entry: the 110-byte header `070701` + 13 fields of 8 hex digits, the
/// name with its NUL padded to a multiple of 4 (counting the header), then the
/// data padded to a multiple of 4.
fn write_entry(out: &mut impl Write, h: &Header, name: &str, data: &[u8]) -> io::Result<()> {
    let namesize = name.len() + 1;
    let fields: [u32; 13] = [
        h.ino,
        h.mode,
        0, // uid
        0, // gid
        h.nlink,
        0, // mtime
        h.filesize,
        0, // devmajor
        0, // devminor
        h.rdev.0,
        h.rdev.1,
        // Below MAX_NAME, checked by `normalise`.
        namesize as u32,
        0, // check (only for the 070702 "crc" format)
    ];
    let mut head = String::with_capacity(110);
    head.push_str("070701");
    for f in fields {
        head.push_str(&format!("{f:08X}"));
    }
    debug_assert_eq!(head.len(), 110);
    out.write_all(head.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0u8; 4][..1 + pad4(110 + namesize)])?;
    out.write_all(data)?;
    out.write_all(&[0u8; 3][..pad4(data.len())])
}

/// Bytes needed to bring `n` to a multiple of 4.
fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// Applets linked into the guest's /bin when busybox is included.
const BUSYBOX_APPLETS: &[&str] = &[
    "sh",
    "cat",
    "ls",
    "echo",
    "uname",
    "head",
    "tail",
    "dd",
    "sha256sum",
    "md5sum",
    "wc",
    "grep",
    "sleep",
    "ps",
    "free",
    "nproc",
    "mount",
    "dmesg",
    "true",
    "false",
    "env",
    "od",
    "seq",
    "kill",
    "pidof",
    "hostname",
    "tr",
    "sed",
    "rm",
];

/// The host's busybox that guests get when it is static (Debian's
/// `busybox-static`): their shell for `mkctl exec`.
pub const HOST_BUSYBOX: &str = "/bin/busybox";

/// True for a 64-bit ELF executable with no program interpreter (a static
/// binary runs in a guest with no libc); false for anything else, or
/// anything unreadable.
pub fn is_static(path: &Path) -> bool {
    let Ok(bytes) = fs::read(path) else {
        return false;
    };
    match goblin::elf::Elf::parse(&bytes) {
        Ok(elf) => elf.is_64 && elf.interpreter.is_none(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One entry as a minimal newc reader sees it.
    #[derive(Debug, PartialEq)]
    struct Read {
        ino: u32,
        mode: u32,
        uid: u32,
        gid: u32,
        nlink: u32,
        mtime: u32,
        rdev: (u32, u32),
        name: String,
        data: Vec<u8>,
    }

    /// An independent newc reader: parses the whole archive, checks alignment
    /// and the trailer, returns entries without it.
    fn read_newc(mut b: &[u8]) -> Vec<Read> {
        let total = b.len();
        let mut out = Vec::new();
        loop {
            assert_eq!((total - b.len()) % 4, 0, "header not 4-aligned");
            assert_eq!(&b[..6], b"070701", "bad magic");
            let field = |i: usize| {
                let s = std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let namesize = field(11) as usize;
            let filesize = field(6) as usize;
            let name_end = 110 + namesize;
            assert_eq!(b[name_end - 1], 0, "name not NUL-terminated");
            let name = std::str::from_utf8(&b[110..name_end - 1])
                .unwrap()
                .to_string();
            let data_start = name_end.div_ceil(4) * 4;
            let data = b[data_start..data_start + filesize].to_vec();
            let r = Read {
                ino: field(0),
                mode: field(1),
                uid: field(2),
                gid: field(3),
                nlink: field(4),
                mtime: field(5),
                rdev: (field(9), field(10)),
                name,
                data,
            };
            b = &b[(data_start + filesize).div_ceil(4) * 4..];
            if r.name == "TRAILER!!!" {
                assert!(b.is_empty(), "bytes after the trailer");
                return out;
            }
            out.push(r);
        }
    }

    fn sample() -> Initramfs {
        let mut ir = Initramfs::base();
        ir.file("/init", b"#!/bin/sh\necho hi\n".to_vec(), 0o755)
            .unwrap()
            .file("/etc/mk/topology.toml", "x = 1\n", 0o644)
            .unwrap()
            .symlink("/bin/sh", "/init")
            .unwrap()
            .file("/a", "", 0o600)
            .unwrap();
        ir
    }

    #[test]
    fn round_trips_through_a_reader() {
        let entries = read_newc(&sample().to_bytes());
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "a",
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "etc",
                "etc/mk",
                "etc/mk/topology.toml",
                "init",
                "proc",
                "root",
                "run",
                "sys",
                "tmp"
            ]
        );
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e.ino as usize, i + 1, "inodes in write order");
            assert_eq!((e.uid, e.gid, e.mtime), (0, 0, 0));
        }
        let get = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(get("init").mode, 0o100755);
        assert_eq!(get("init").data, b"#!/bin/sh\necho hi\n");
        assert_eq!(get("init").nlink, 1);
        assert_eq!(get("etc/mk").mode, 0o040755, "implicit parent");
        assert_eq!(get("tmp").mode, 0o041777);
        assert_eq!(get("dev").nlink, 2);
        assert_eq!(get("bin/sh").mode, 0o120777);
        assert_eq!(get("bin/sh").data, b"/init");
        assert_eq!(get("dev/console").mode, 0o020600);
        assert_eq!(get("dev/console").rdev, (5, 1));
        assert_eq!(get("a").data, b"");
    }

    #[test]
    fn same_inputs_same_bytes_whatever_the_order() {
        let mut a = Initramfs::new();
        a.file("/z/y", "1", 0o644).unwrap();
        a.dir("/z", 0o700).unwrap();
        a.file("/b", "2", 0o644).unwrap();
        let mut b = Initramfs::new();
        b.file("b", "2", 0o644).unwrap();
        b.dir("z/", 0o700).unwrap();
        b.file("z/y", "1", 0o644).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        assert_eq!(sample().to_bytes(), sample().to_bytes());
        assert_eq!(sample().to_bytes().len() % 4, 0);
    }

    #[test]
    fn refuses_bad_input() {
        let mut ir = Initramfs::base();
        for p in ["", "/", "a//b", "../x", "/a/./b", "a\0b", "TRAILER!!!"] {
            assert!(
                matches!(ir.file(p, "", 0o644), Err(InitramfsError::BadPath { .. })),
                "{p:?}"
            );
        }
        assert!(matches!(
            ir.file("/x", "", 0o100644),
            Err(InitramfsError::BadMode { .. })
        ));
        ir.file("/f", "", 0o644).unwrap();
        assert!(matches!(
            ir.file("/f", "", 0o644),
            Err(InitramfsError::Duplicate(_))
        ));
        assert!(matches!(
            ir.dir("/dev", 0o755),
            Err(InitramfsError::Duplicate(_))
        ));
        let e = ir.file("/f/g", "", 0o644).unwrap_err();
        assert!(matches!(e, InitramfsError::NotADirectory { .. }), "{e}");
        assert!(e.to_string().contains("\"/f\""), "{e}");
        let e = ir
            .host_file("/h", Path::new("/nonexistent/guest-init"), None)
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/guest-init"), "{e}");
    }

    #[test]
    fn host_file_keeps_or_sets_mode() {
        let t = tempfile::tempdir().unwrap();
        let h = t.path().join("tool");
        fs::write(&h, "bin").unwrap();
        fs::set_permissions(&h, fs::Permissions::from_mode(0o750)).unwrap();
        let mut ir = Initramfs::new();
        ir.host_file("/usr/bin/tool", &h, None).unwrap();
        ir.host_file("/usr/bin/tool2", &h, Some(0o700)).unwrap();
        let e = read_newc(&ir.to_bytes());
        assert_eq!(e[2].name, "usr/bin/tool");
        assert_eq!(e[2].mode, 0o100750);
        assert_eq!(e[3].mode, 0o100700);
        let g = Initramfs::for_guest(&h).unwrap();
        assert!(g.paths().any(|p| p == "/init"));
    }

    #[test]
    fn kernel_modules_takes_the_ko_files_only() {
        let t = tempfile::tempdir().unwrap();
        for f in ["virtio.ko", "virtio_console.ko", "release"] {
            fs::write(t.path().join(f), f).unwrap();
        }
        let mut ir = Initramfs::new();
        assert_eq!(ir.kernel_modules(t.path()).unwrap(), 2);
        let paths: Vec<String> = ir.paths().collect();
        assert!(
            paths.contains(&"/lib/modules/mkctl/virtio.ko".to_string()),
            "{paths:?}"
        );
        assert!(
            paths.contains(&"/lib/modules/mkctl/virtio_console.ko".to_string()),
            "{paths:?}"
        );
        assert!(!paths.iter().any(|p| p.ends_with("release")), "{paths:?}");
        // No directory (setup not run, or a kernel with the driver built in).
        assert_eq!(ir.kernel_modules(&t.path().join("none")).unwrap(), 0);
    }

    /// GNU cpio (Debian package `cpio`, installed by qemu/setup.sh) must
    /// unpack the archive to exactly what went in.
    #[test]
    fn system_cpio_extracts_it() {
        let cpio = Path::new("/usr/bin/cpio");
        assert!(
            cpio.exists() || which("cpio"),
            "cpio is not installed: run qemu/setup.sh first"
        );
        let t = tempfile::tempdir().unwrap();
        let mut ir = Initramfs::new();
        ir.file("/init", vec![0xAAu8; 5000], 0o755)
            .unwrap()
            .file("/etc/hostname", "alpha\n", 0o644)
            .unwrap()
            .dir("/tmp", 0o1777)
            .unwrap()
            .symlink("/sbin/init", "../init")
            .unwrap()
            .file("/odd", "abc", 0o600)
            .unwrap();
        let archive = t.path().join("initrd.cpio");
        ir.write_file(&archive).unwrap();
        let out = t.path().join("out");
        fs::create_dir(&out).unwrap();
        let status = std::process::Command::new("cpio")
            .args(["-idm", "--quiet", "--no-absolute-filenames"])
            .current_dir(&out)
            .stdin(fs::File::open(&archive).unwrap())
            .status()
            .expect("run cpio");
        assert!(status.success(), "cpio -idm failed: {status}");
        let mode = |p: &str| {
            fs::symlink_metadata(out.join(p))
                .unwrap()
                .permissions()
                .mode()
        };
        assert_eq!(fs::read(out.join("init")).unwrap(), vec![0xAA; 5000]);
        assert_eq!(mode("init") & 0o7777, 0o755);
        assert_eq!(
            fs::read_to_string(out.join("etc/hostname")).unwrap(),
            "alpha\n"
        );
        assert_eq!(fs::read_to_string(out.join("odd")).unwrap(), "abc");
        assert_eq!(mode("odd") & 0o7777, 0o600);
        assert!(out.join("tmp").is_dir());
        assert_eq!(mode("tmp") & 0o7777, 0o1777);
        assert_eq!(
            fs::read_link(out.join("sbin/init")).unwrap(),
            Path::new("../init")
        );
        let mtime = fs::metadata(out.join("etc/hostname"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(mtime, std::time::UNIX_EPOCH, "-m keeps mtime 0");
    }

    fn which(prog: &str) -> bool {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
            .unwrap_or(false)
    }
}
