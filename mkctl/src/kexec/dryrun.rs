//! `--dry-run`: every call the engine would make, printed in order with its
//! exact arguments (files and the DTS of each blob written, syscalls with
//! decoded flags), answered by a [`ScriptedKernel`] model of the host so
//! the sequence goes on as it would on a multikernel kernel. Nothing
//! reaches the real kernel: the model is seeded from a read-only probe.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::dtb;
use crate::units::InstanceId;

use super::fake::ScriptedKernel;
use super::iface::{Call, Errno, KernelIface, KexecLoad, RebootCmd};

/// Prints each call to `out` and forwards it to the model.
pub struct DryRun<W: Write> {
    pub model: ScriptedKernel,
    out: W,
    n: usize,
    /// Consecutive polls of one file are printed once.
    last_read: Option<std::path::PathBuf>,
}

impl<W: Write> std::fmt::Debug for DryRun<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DryRun")
            .field("calls", &self.n)
            .finish_non_exhaustive()
    }
}

impl<W: Write> DryRun<W> {
    pub fn new(model: ScriptedKernel, out: W) -> Self {
        Self {
            model,
            out,
            n: 0,
            last_read: None,
        }
    }

    /// The writer back.
    pub fn into_inner(self) -> W {
        self.out
    }

    fn print(&mut self, call: &Call, answer: &str) {
        if let Call::Read(p) = call {
            if self.last_read.as_ref() == Some(p) {
                return;
            }
            self.last_read = Some(p.clone());
        } else if !matches!(call, Call::Sleep(_)) {
            self.last_read = None;
        }
        if matches!(call, Call::Sleep(_)) {
            return;
        }
        self.n += 1;
        let _ = writeln!(self.out, "{:3}. {call}{answer}", self.n);
        if let Call::Write(_, bytes) = call {
            if let Ok(tree) = dtb::parse_dtb(bytes) {
                for line in tree.to_dts().lines().skip(2) {
                    let _ = writeln!(self.out, "       {line}");
                }
            } else {
                let _ = writeln!(self.out, "       {:?}", String::from_utf8_lossy(bytes));
            }
        }
    }

    fn answer<T>(r: &Result<T, Errno>) -> String {
        match r {
            Ok(_) => String::new(),
            Err(e) => format!("  -> {e} (modelled)"),
        }
    }
}

impl<W: Write> KernelIface for DryRun<W> {
    fn mount_multikernel(&mut self, target: &Path) -> Result<(), Errno> {
        let r = self.model.mount_multikernel(target);
        self.print(&Call::Mount(target.into()), &Self::answer(&r));
        r
    }
    fn umount(&mut self, target: &Path) -> Result<(), Errno> {
        let r = self.model.umount(target);
        self.print(&Call::Umount(target.into()), &Self::answer(&r));
        r
    }
    fn write_file(&mut self, path: &Path, data: &[u8]) -> Result<(), Errno> {
        let r = self.model.write_file(path, data);
        self.print(&Call::Write(path.into(), data.to_vec()), &Self::answer(&r));
        r
    }
    fn read_file(&mut self, path: &Path) -> Result<Vec<u8>, Errno> {
        let r = self.model.read_file(path);
        let ans = match &r {
            Ok(b) if b.len() < 64 && !b.contains(&0) => {
                format!("  -> {:?}", String::from_utf8_lossy(b).trim())
            }
            Ok(b) => format!("  -> {} bytes", b.len()),
            Err(e) => format!("  -> {e}"),
        };
        self.print(&Call::Read(path.into()), &ans);
        r
    }
    fn read_dir(&mut self, path: &Path) -> Result<Vec<String>, Errno> {
        let r = self.model.read_dir(path);
        let ans = match &r {
            Ok(v) => format!("  -> [{}]", v.join(", ")),
            Err(e) => format!("  -> {e}"),
        };
        self.print(&Call::ReadDir(path.into()), &ans);
        r
    }
    fn rmdir(&mut self, path: &Path) -> Result<(), Errno> {
        let r = self.model.rmdir(path);
        self.print(&Call::Rmdir(path.into()), &Self::answer(&r));
        r
    }
    fn kexec_file_load(&mut self, load: &KexecLoad) -> Result<(), Errno> {
        let r = self.model.kexec_file_load(load);
        self.print(&Call::KexecFileLoad(load.to_string()), &Self::answer(&r));
        r
    }
    fn reboot(&mut self, cmd: RebootCmd, id: InstanceId) -> Result<(), Errno> {
        let r = self.model.reboot(cmd, id);
        self.print(&Call::Reboot(cmd, id), &Self::answer(&r));
        r
    }
    fn sleep(&mut self, d: Duration) {
        self.model.sleep(d);
        self.print(&Call::Sleep(d), "");
    }
    fn kernel_log_tail(&mut self, lines: usize) -> Vec<String> {
        self.model.kernel_log_tail(lines)
    }
}
