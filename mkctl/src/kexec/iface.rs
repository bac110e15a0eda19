//! The one narrow door to the kernel: every call the kexec backend makes
//! that could change the machine goes through [`KernelIface`]. Three
//! implementations exist: [`RealKernel`] (the syscalls and files),
//! [`super::fake::ScriptedKernel`] (a model of the multikernel kernel that
//! records calls and fails on cue, for tests), and
//! [`super::dryrun::DryRun`] (prints the exact sequence and does nothing).
//!
//! The only `unsafe` of the backend lives here, in the two syscall wrappers.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use nix::errno::Errno;

use crate::units::InstanceId;

/// `kexec_file_load` flags (`include/uapi/linux/kexec.h`; the multikernel
/// bits as added by the multikernel/linux tree and RFC v2 patch 09/16).
pub const KEXEC_FILE_UNLOAD: u64 = 0x1;
pub const KEXEC_FILE_NO_INITRAMFS: u64 = 0x4;
pub const KEXEC_MULTIKERNEL: u64 = 0x10;
pub const KEXEC_MK_ID_MASK: u64 = 0xffe0;
pub const KEXEC_MK_ID_SHIFT: u32 = 5;

// The upstream flags as the libc crate has them; the multikernel ones are
// not upstream: their ID field is the 11 bits above the flags.
const _: () = {
    assert!(KEXEC_FILE_UNLOAD == libc::KEXEC_FILE_UNLOAD as u64);
    assert!(KEXEC_FILE_NO_INITRAMFS == libc::KEXEC_FILE_NO_INITRAMFS as u64);
    assert!(KEXEC_MK_ID_MASK == 0x7ff << KEXEC_MK_ID_SHIFT);
    assert!(KEXEC_MULTIKERNEL < 1 << KEXEC_MK_ID_SHIFT);
    assert!(LINUX_REBOOT_MAGIC1 as i32 == libc::LINUX_REBOOT_MAGIC1);
    assert!(LINUX_REBOOT_MAGIC2 as i32 == libc::LINUX_REBOOT_MAGIC2);
    assert!(SYS_KEXEC_FILE_LOAD == libc::SYS_kexec_file_load);
    assert!(SYS_REBOOT == libc::SYS_reboot);
};

/// `KEXEC_MK_ID(id)` of `include/uapi/linux/kexec.h`.
pub fn kexec_mk_id(id: InstanceId) -> u64 {
    (u64::from(id.0) << KEXEC_MK_ID_SHIFT) & KEXEC_MK_ID_MASK
}

/// `reboot(2)` magics (`include/uapi/linux/reboot.h`).
pub const LINUX_REBOOT_MAGIC1: u32 = 0xfee1_dead;
pub const LINUX_REBOOT_MAGIC2: u32 = 672_274_793;

/// Syscall numbers (`arch/x86/entry/syscalls/syscall_64.tbl`,
/// `include/uapi/asm-generic/unistd.h` for arm64).
#[cfg(target_arch = "x86_64")]
pub const SYS_KEXEC_FILE_LOAD: i64 = 320;
#[cfg(target_arch = "aarch64")]
pub const SYS_KEXEC_FILE_LOAD: i64 = 294;
#[cfg(target_arch = "x86_64")]
pub const SYS_REBOOT: i64 = 169;
#[cfg(target_arch = "aarch64")]
pub const SYS_REBOOT: i64 = 142;

/// The multikernel `reboot(2)` commands (`include/uapi/linux/reboot.h` of
/// the multikernel tree; kerf 0.4.0 `start/main.py`, `kill/main.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootCmd {
    /// `LINUX_REBOOT_CMD_MULTIKERNEL`: start a loaded instance.
    Start,
    /// `LINUX_REBOOT_CMD_MULTIKERNEL_HALT`: ask it to shut down.
    Halt,
    /// `LINUX_REBOOT_CMD_MULTIKERNEL_HALT_FORCE`: stop it without asking.
    HaltForce,
}

impl RebootCmd {
    pub fn value(self) -> u32 {
        match self {
            RebootCmd::Start => 0x4d4b_4c49,
            RebootCmd::Halt => 0x4d4b_4c48,
            RebootCmd::HaltForce => 0x4d4b_4c46,
        }
    }

    fn name(self) -> &'static str {
        match self {
            RebootCmd::Start => "LINUX_REBOOT_CMD_MULTIKERNEL",
            RebootCmd::Halt => "LINUX_REBOOT_CMD_MULTIKERNEL_HALT",
            RebootCmd::HaltForce => "LINUX_REBOOT_CMD_MULTIKERNEL_HALT_FORCE",
        }
    }
}

/// The kernel image handed to `kexec_file_load`.
#[derive(Debug, Clone)]
pub struct KernelSource {
    /// The file the user named.
    pub path: PathBuf,
    /// The ELF vmlinux extracted from it, when it was a bzImage (passed in
    /// a memfd); `None` passes the file itself.
    pub extracted: Option<Arc<Vec<u8>>>,
}

impl fmt::Display for KernelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.extracted {
            None => write!(f, "open({:?})", self.path),
            Some(b) => write!(
                f,
                "memfd(vmlinux extracted from {:?}, {} bytes)",
                self.path,
                b.len()
            ),
        }
    }
}

/// One `kexec_file_load(kernel_fd, initrd_fd, cmdline_len, cmdline, flags)`.
#[derive(Debug, Clone)]
pub struct KexecLoad {
    /// `None` is the unload form (`kernel_fd = -1`).
    pub kernel: Option<KernelSource>,
    pub initrd: Option<PathBuf>,
    /// Without the NUL; `cmdline_len` passed is this plus one, or 0 when
    /// there is no command line.
    pub cmdline: Option<String>,
    pub flags: u64,
}

impl KexecLoad {
    /// Loading `kernel` for instance `id` (`KEXEC_FILE_NO_INITRAMFS` added
    /// when there is no initrd).
    pub fn load(
        id: InstanceId,
        kernel: KernelSource,
        initrd: Option<PathBuf>,
        cmdline: String,
    ) -> Self {
        let mut flags = KEXEC_MULTIKERNEL | kexec_mk_id(id);
        if initrd.is_none() {
            flags |= KEXEC_FILE_NO_INITRAMFS;
        }
        Self {
            kernel: Some(kernel),
            initrd,
            cmdline: Some(cmdline),
            flags,
        }
    }

    /// Unloading instance `id`: `kexec_file_load(-1, -1, 0, NULL,
    /// KEXEC_FILE_UNLOAD | KEXEC_MULTIKERNEL | KEXEC_MK_ID(id))`.
    pub fn unload(id: InstanceId) -> Self {
        Self {
            kernel: None,
            initrd: None,
            cmdline: None,
            flags: KEXEC_FILE_UNLOAD | KEXEC_MULTIKERNEL | kexec_mk_id(id),
        }
    }

    /// The id the flags carry (`KEXEC_GET_MK_ID`).
    pub fn mk_id(&self) -> InstanceId {
        // Masked to 11 bits: fits u32.
        InstanceId(((self.flags & KEXEC_MK_ID_MASK) >> KEXEC_MK_ID_SHIFT) as u32)
    }

    /// `cmdline_len` as passed: length with the NUL, 0 for none.
    pub fn cmdline_len(&self) -> usize {
        self.cmdline.as_ref().map_or(0, |c| c.len() + 1)
    }

    fn flag_names(&self) -> String {
        let mut v = Vec::new();
        if self.flags & KEXEC_FILE_UNLOAD != 0 {
            v.push("KEXEC_FILE_UNLOAD".to_string());
        }
        if self.flags & KEXEC_FILE_NO_INITRAMFS != 0 {
            v.push("KEXEC_FILE_NO_INITRAMFS".to_string());
        }
        if self.flags & KEXEC_MULTIKERNEL != 0 {
            v.push("KEXEC_MULTIKERNEL".to_string());
        }
        v.push(format!("KEXEC_MK_ID({})", self.mk_id()));
        v.join("|")
    }
}

impl fmt::Display for KexecLoad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kernel = self
            .kernel
            .as_ref()
            .map_or_else(|| "-1".to_string(), ToString::to_string);
        let initrd = self
            .initrd
            .as_ref()
            .map_or_else(|| "-1".to_string(), |p| format!("open({p:?})"));
        let cmdline = self
            .cmdline
            .as_ref()
            .map_or_else(|| "NULL".to_string(), |c| format!("{c:?}"));
        write!(
            f,
            "kexec_file_load(kernel_fd={kernel}, initrd_fd={initrd}, cmdline_len={}, cmdline={cmdline}, flags={:#x} [{}])",
            self.cmdline_len(),
            self.flags,
            self.flag_names()
        )
    }
}

/// Every kernel-touching call, as recorded by the fake and printed by the
/// dry run. `Display` gives one line per call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Mount(PathBuf),
    Umount(PathBuf),
    Write(PathBuf, Vec<u8>),
    Read(PathBuf),
    ReadDir(PathBuf),
    Rmdir(PathBuf),
    /// Stored as its printed form (the image bytes are not compared).
    KexecFileLoad(String),
    Reboot(RebootCmd, InstanceId),
    Sleep(Duration),
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Call::Mount(t) => write!(f, "mount(\"none\", {t:?}, \"multikernel\", 0, NULL)"),
            Call::Umount(t) => write!(f, "umount({t:?})"),
            Call::Write(p, b) => write!(f, "write({p:?}, {} bytes)", b.len()),
            Call::Read(p) => write!(f, "read({p:?})"),
            Call::ReadDir(p) => write!(f, "readdir({p:?})"),
            Call::Rmdir(p) => write!(f, "rmdir({p:?})"),
            Call::KexecFileLoad(s) => f.write_str(s),
            Call::Reboot(cmd, id) => write!(
                f,
                "reboot({LINUX_REBOOT_MAGIC1:#x}, {LINUX_REBOOT_MAGIC2}, {:#x} [{}], &{{mk_id={id}}})",
                cmd.value(),
                cmd.name()
            ),
            Call::Sleep(d) => write!(f, "sleep({}ms)", d.as_millis()),
        }
    }
}

/// Everything the kexec backend does to the kernel. Paths are absolute
/// (the sysroot already joined in).
pub trait KernelIface {
    /// `mount("none", target, "multikernel", 0, NULL)`.
    fn mount_multikernel(&mut self, target: &Path) -> Result<(), Errno>;
    /// `umount(target)`.
    fn umount(&mut self, target: &Path) -> Result<(), Errno>;
    /// The whole of `data` in one `write(2)` at offset 0 (kernfs files
    /// take a blob only that way).
    fn write_file(&mut self, path: &Path, data: &[u8]) -> Result<(), Errno>;
    fn read_file(&mut self, path: &Path) -> Result<Vec<u8>, Errno>;
    /// The names in a directory, sorted.
    fn read_dir(&mut self, path: &Path) -> Result<Vec<String>, Errno>;
    fn rmdir(&mut self, path: &Path) -> Result<(), Errno>;
    fn kexec_file_load(&mut self, load: &KexecLoad) -> Result<(), Errno>;
    fn reboot(&mut self, cmd: RebootCmd, id: InstanceId) -> Result<(), Errno>;
    /// Waits between polls of a status file (which does not notify).
    fn sleep(&mut self, d: Duration);
    /// The last `lines` kernel log messages, where readable (for error
    /// reports; never fails).
    fn kernel_log_tail(&mut self, lines: usize) -> Vec<String>;
}

/// The real kernel. Only for hosts that passed [`super::preflight`].
#[derive(Debug, Default)]
pub struct RealKernel;

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

impl KernelIface for RealKernel {
    fn mount_multikernel(&mut self, target: &Path) -> Result<(), Errno> {
        nix::mount::mount(
            Some("none"),
            target,
            Some("multikernel"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
    }

    fn umount(&mut self, target: &Path) -> Result<(), Errno> {
        nix::mount::umount(target)
    }

    fn write_file(&mut self, path: &Path, data: &[u8]) -> Result<(), Errno> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| io_errno(&e))?;
        let n = f.write(data).map_err(|e| io_errno(&e))?;
        if n != data.len() {
            // A short write would hand the kernel half a blob.
            return Err(Errno::EIO);
        }
        Ok(())
    }

    fn read_file(&mut self, path: &Path) -> Result<Vec<u8>, Errno> {
        std::fs::read(path).map_err(|e| io_errno(&e))
    }

    fn read_dir(&mut self, path: &Path) -> Result<Vec<String>, Errno> {
        let mut v: Vec<String> = std::fs::read_dir(path)
            .map_err(|e| io_errno(&e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        Ok(v)
    }

    fn rmdir(&mut self, path: &Path) -> Result<(), Errno> {
        std::fs::remove_dir(path).map_err(|e| io_errno(&e))
    }

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn kexec_file_load(&mut self, load: &KexecLoad) -> Result<(), Errno> {
        use std::ffi::CString;
        use std::os::fd::{AsRawFd, OwnedFd};

        let kernel: Option<OwnedFd> = match &load.kernel {
            None => None,
            Some(KernelSource {
                extracted: Some(bytes),
                ..
            }) => {
                let fd = nix::sys::memfd::memfd_create(
                    c"mkctl-vmlinux",
                    nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
                )?;
                let mut file = std::fs::File::from(fd);
                std::io::Write::write_all(&mut file, bytes).map_err(|e| io_errno(&e))?;
                std::io::Seek::rewind(&mut file).map_err(|e| io_errno(&e))?;
                Some(OwnedFd::from(file))
            }
            Some(KernelSource { path, .. }) => Some(OwnedFd::from(
                std::fs::File::open(path).map_err(|e| io_errno(&e))?,
            )),
        };
        let initrd: Option<OwnedFd> = match &load.initrd {
            None => None,
            Some(p) => Some(OwnedFd::from(
                std::fs::File::open(p).map_err(|e| io_errno(&e))?,
            )),
        };
        let cmdline = match &load.cmdline {
            None => None,
            Some(c) => Some(CString::new(c.as_str()).map_err(|_| Errno::EINVAL)?),
        };
        let kfd = kernel.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        let ifd = initrd.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        let (len, ptr) = match &cmdline {
            None => (0usize, std::ptr::null()),
            Some(c) => (c.as_bytes_with_nul().len(), c.as_ptr()),
        };
        // SAFETY: kexec_file_load(2) takes two fds (or -1), a length and a
        // pointer to that many bytes, and flags. `kfd`/`ifd` are open fds
        // owned by `kernel`/`initrd`, alive until after the call, or -1;
        // `ptr` is NULL with `len` 0, or points at `cmdline`'s `len` bytes
        // (NUL included), alive until after the call. The kernel only reads
        // them; no memory of ours is written.
        let rc = unsafe {
            libc::syscall(
                SYS_KEXEC_FILE_LOAD,
                libc::c_long::from(kfd),
                libc::c_long::from(ifd),
                len as libc::c_ulong,
                ptr,
                load.flags as libc::c_ulong,
            )
        };
        if rc < 0 {
            return Err(Errno::last());
        }
        Ok(())
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fn kexec_file_load(&mut self, _load: &KexecLoad) -> Result<(), Errno> {
        Err(Errno::ENOSYS)
    }

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn reboot(&mut self, cmd: RebootCmd, id: InstanceId) -> Result<(), Errno> {
        /// `struct multikernel_boot_args { int mk_id; }` (kernel/reboot.c).
        #[repr(C)]
        struct BootArgs {
            mk_id: libc::c_int,
        }
        let args = BootArgs {
            mk_id: libc::c_int::try_from(id.0).map_err(|_| Errno::EINVAL)?,
        };
        // SAFETY: reboot(2) with the multikernel commands copies
        // sizeof(struct multikernel_boot_args) = one int from `arg`
        // (copy_from_user in kernel/reboot.c). `&args` points at a live,
        // properly aligned `#[repr(C)]` struct of exactly one c_int that
        // outlives the call; the kernel does not write through it.
        let rc = unsafe {
            libc::syscall(
                SYS_REBOOT,
                libc::c_long::from(LINUX_REBOOT_MAGIC1 as i32),
                libc::c_long::from(LINUX_REBOOT_MAGIC2 as i32),
                libc::c_ulong::from(cmd.value()),
                &args as *const BootArgs,
            )
        };
        if rc < 0 {
            return Err(Errno::last());
        }
        Ok(())
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fn reboot(&mut self, _cmd: RebootCmd, _id: InstanceId) -> Result<(), Errno> {
        Err(Errno::ENOSYS)
    }

    fn sleep(&mut self, d: Duration) {
        std::thread::sleep(d);
    }

    fn kernel_log_tail(&mut self, lines: usize) -> Vec<String> {
        read_kmsg_tail(Path::new("/dev/kmsg"), lines)
    }
}

/// The last `lines` records of `/dev/kmsg` (`Documentation/ABI/testing/
/// dev-kmsg`: `prio,seq,ts,flags;message`), read without blocking.
pub fn read_kmsg_tail(path: &Path, lines: usize) -> Vec<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    else {
        return Vec::new();
    };
    let mut out: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let rec = String::from_utf8_lossy(&buf[..n]);
                let msg = rec.split_once(';').map_or(&*rec, |(_, m)| m);
                let msg = msg.lines().next().unwrap_or("").to_string();
                if out.len() == lines.max(1) {
                    out.pop_front();
                }
                out.push_back(msg);
            }
            // EPIPE: a record was overwritten while reading; keep going.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    out.into_iter().collect()
}
