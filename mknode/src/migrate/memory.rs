//! Another process's memory, as both ends of a move see it: what its
//! mappings are (a `/proc/pid/maps` line as an image [`Mapping`]), reading
//! and writing its pages from outside, and the fingerprint of the running
//! kernel. Capture, restore and the lazy page server all stand on these;
//! none of them owns them.

use std::fs::File;
use std::io::IoSliceMut;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;

use super::image::{
    KernelFingerprint, Mapping, MappingKind, MAPF_GROWSDOWN, MAPF_SHARED, PAGE, PROT_R, PROT_W,
    PROT_X, USER_TOP,
};
use super::procfs::MapsEntry;

/// Shared memory carried with its pages: anonymous, or a memfd's.
fn carried_shared(m: &MapsEntry) -> bool {
    super::precheck::shared_anon(m) || super::precheck::memfd_shared(m)
}

fn map_kind(m: &MapsEntry) -> Option<MappingKind> {
    if carried_shared(m) {
        return Some(MappingKind::Anon);
    }
    Some(match m.name.as_str() {
        "[vsyscall]" => return None,
        "[heap]" => MappingKind::Heap,
        "[stack]" => MappingKind::Stack,
        "[vdso]" => MappingKind::Vdso,
        "[vvar]" => MappingKind::Vvar,
        "[vvar_vclock]" => MappingKind::VvarVclock,
        _ if m.inode != 0 || m.name.starts_with('/') => MappingKind::File,
        _ => MappingKind::Anon,
    })
}

/// A maps line as an image mapping (`None` for `[vsyscall]` and anything
/// above user space).
pub(crate) fn to_mapping(m: &MapsEntry) -> Option<Mapping> {
    let kind = map_kind(m)?;
    if m.end > USER_TOP {
        return None;
    }
    let prot = if m.read { PROT_R } else { 0 }
        | if m.write { PROT_W } else { 0 }
        | if m.exec { PROT_X } else { 0 };
    Some(Mapping {
        start: m.start,
        end: m.end,
        prot,
        flags: if kind == MappingKind::Stack {
            MAPF_GROWSDOWN
        } else if carried_shared(m) {
            MAPF_SHARED
        } else {
            0
        },
        kind,
        offset: m.offset,
        resident: 0,
        name: m.name.clone(),
    })
}

fn xxh3(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(b)
}

/// The fingerprint of the running kernel, from `uname` and the vDSO bytes
/// read out of `pid` (any process of this kernel has the same).
pub(crate) fn fingerprint(vdso: &[u8]) -> KernelFingerprint {
    let u = nix::sys::utsname::uname().ok();
    let s = |f: fn(&nix::sys::utsname::UtsName) -> &std::ffi::OsStr| {
        u.as_ref()
            .map(|u| f(u).to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    KernelFingerprint {
        release: s(nix::sys::utsname::UtsName::release),
        version: s(nix::sys::utsname::UtsName::version),
        vdso_hash: xxh3(vdso),
        vdso_len: vdso.len() as u32,
    }
}

/// Reads `len` bytes at `addr` of `pid` with `process_vm_readv`.
pub(crate) fn read_remote(pid: Pid, addr: u64, buf: &mut [u8]) -> nix::Result<usize> {
    let len = buf.len();
    let mut local = [IoSliceMut::new(buf)];
    process_vm_readv(
        pid,
        &mut local,
        &[RemoteIoVec {
            base: addr as usize,
            len,
        }],
    )
}

/// Writes `buf` at `addr` of `pid` with `process_vm_writev`.
pub(crate) fn write_remote(pid: Pid, addr: u64, buf: &[u8]) -> nix::Result<usize> {
    process_vm_writev(
        pid,
        &[std::io::IoSlice::new(buf)],
        &[RemoteIoVec {
            base: addr as usize,
            len: buf.len(),
        }],
    )
}

/// Fills `chunk` with the bytes of `pid` at `addr` (inside mapping `m`):
/// `process_vm_readv` first, then `/proc/pid/mem` (which may read
/// non-readable, e.g. execute-only, pages) for what it refused; a page
/// neither can read is carried as zero (it would fault on the origin too,
/// e.g. past the end of a file).
pub(crate) fn read_pages(
    pid: Pid,
    mem: &mut Option<File>,
    m: &Mapping,
    addr: u64,
    chunk: &mut [u8],
) -> std::io::Result<()> {
    // A process that is gone is an error, not a page of zeros.
    let remote = |addr: u64, buf: &mut [u8]| match read_remote(pid, addr, buf) {
        Ok(n) => Ok(n),
        Err(Errno::ESRCH) => Err(std::io::Error::from(Errno::ESRCH)),
        Err(_) => Ok(0),
    };
    let mut done = 0usize;
    if m.prot & PROT_R != 0 {
        done = remote(addr, chunk)?;
    }
    while done < chunk.len() {
        let page = &mut chunk[done..done + PAGE as usize];
        if mem.is_none() {
            *mem = Some(File::open(format!("/proc/{pid}/mem"))?);
        }
        let ok = mem
            .as_ref()
            .map(|f| f.read_exact_at(page, addr + done as u64).is_ok())
            .unwrap_or(false);
        if !ok {
            page.fill(0);
        }
        done += PAGE as usize;
        if m.prot & PROT_R != 0 && done < chunk.len() {
            done += remote(addr + done as u64, &mut chunk[done..])?;
        }
    }
    Ok(())
}

/// True when `p` (a page, or any multiple of 64 bytes) holds only zeros.
pub fn is_zero(p: &[u8]) -> bool {
    p.chunks_exact(64)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        let m = |name: &str, inode| MapsEntry {
            start: 0x1000,
            end: 0x2000,
            read: true,
            write: false,
            exec: false,
            shared: false,
            offset: 0,
            inode,
            name: name.into(),
        };
        assert_eq!(to_mapping(&m("[vsyscall]", 0)), None);
        assert_eq!(
            to_mapping(&m("/lib/x.so", 5)).unwrap().kind,
            MappingKind::File
        );
        assert_eq!(to_mapping(&m("", 0)).unwrap().kind, MappingKind::Anon);
        assert_eq!(to_mapping(&m("[stack]", 0)).unwrap().flags, MAPF_GROWSDOWN);
        assert_eq!(
            to_mapping(&m("[vvar_vclock]", 0)).unwrap().kind,
            MappingKind::VvarVclock
        );
    }
}
