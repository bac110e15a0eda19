//! Where things live: the run directory the daemon owns (socket, pid file,
//! log, window, one directory per instance) and the cache `qemu/setup.sh`
//! fills (the stock guest kernels and their modules, static guest-init).

use std::io::BufRead;
use std::path::{Path, PathBuf};

use crate::topology::KernelSeries;

/// The daemon's run directory: `$MKCTL_RUN_DIR`, or `/run/mkctl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir(pub PathBuf);

impl RunDir {
    /// From the environment.
    pub fn from_env() -> RunDir {
        RunDir(
            std::env::var_os("MKCTL_RUN_DIR")
                .map_or_else(|| PathBuf::from("/run/mkctl"), PathBuf::from),
        )
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The control socket the CLI connects to.
    pub fn socket(&self) -> PathBuf {
        self.0.join("mkctl.sock")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.0.join("daemon.pid")
    }

    /// What a restarted daemon adopts the running instances from
    /// ([`super::saved`]).
    pub fn state(&self) -> PathBuf {
        self.0.join("state.json")
    }

    /// The daemon's own log (its stdout and stderr).
    pub fn log(&self) -> PathBuf {
        self.0.join("daemon.log")
    }

    /// The shared window file (ivshmem memory backend for every guest).
    pub fn window(&self) -> PathBuf {
        self.0.join("window")
    }

    /// Where the host kernel's processes reach its agent for the DSM
    /// (`libmk` finds it through `$MKCTL_RUN_DIR`).
    pub fn agent_socket(&self) -> PathBuf {
        self.0.join("agent.sock")
    }

    /// The initramfs built for this run's guests of the default stock
    /// kernel (or of a kernel given by path), with its modules.
    pub fn initramfs(&self) -> PathBuf {
        self.0.join("initramfs.cpio")
    }

    /// The initramfs for guests of another stock kernel: the same files
    /// with that kernel's modules (`initramfs-6.12.cpio`).
    pub fn series_initramfs(&self, k: KernelSeries) -> PathBuf {
        self.0.join(format!("initramfs-{}.cpio", k.as_str()))
    }

    /// One instance's directory: console log and socket, QMP.
    pub fn instance(&self, name: &str) -> InstanceDir {
        InstanceDir(self.0.join(name))
    }

    /// Where an instance's RAM files go: `$MKCTL_RAM_DIR/<name>`, or
    /// `/dev/shm/mkctl-<hash of the run dir>/<name>` — guest RAM must be
    /// RAM: backing files on a disk filesystem make every guest page fault
    /// a filesystem operation (boots take twice as long).
    pub fn ram(&self, name: &str) -> PathBuf {
        if let Some(d) = std::env::var_os("MKCTL_RAM_DIR") {
            return PathBuf::from(d).join(name);
        }
        match self.ram_tree() {
            Some(tree) => tree.join(name),
            None => self.instance(name).0,
        }
    }

    /// The `/dev/shm` directory this daemon owns for RAM files (removed
    /// when it exits), when it uses one.
    pub fn ram_tree(&self) -> Option<PathBuf> {
        if std::env::var_os("MKCTL_RAM_DIR").is_some() {
            return None;
        }
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            // FNV-1a of the run dir: one RAM tree per daemon.
            let h = self
                .0
                .as_os_str()
                .as_encoded_bytes()
                .iter()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                });
            return Some(shm.join(format!("mkctl-{h:016x}")));
        }
        None
    }
}

/// Files of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceDir(pub PathBuf);

impl InstanceDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn console_log(&self) -> PathBuf {
        self.0.join("console.log")
    }
    pub fn console_socket(&self) -> PathBuf {
        self.0.join("console.sock")
    }
    pub fn qmp(&self) -> PathBuf {
        self.0.join("qmp.sock")
    }
    /// The host end of the guest's doorbell port (QEMU listens, the
    /// daemon's relay connects).
    pub fn doorbell(&self) -> PathBuf {
        self.0.join("doorbell.sock")
    }
    /// Where QEMU's own stderr goes.
    pub fn qemu_stderr(&self) -> PathBuf {
        self.0.join("qemu.stderr")
    }

    /// The last `n` lines of the console log.
    pub fn console_tail(&self, n: usize) -> String {
        let log = self.console_log();
        let Ok(f) = std::fs::File::open(&log) else {
            return format!("(no console log at {})", log.display());
        };
        let lines: Vec<String> = std::io::BufReader::new(f)
            .split(b'\n')
            .map_while(Result::ok)
            .map(|l| {
                String::from_utf8_lossy(&l)
                    .trim_end_matches('\r')
                    .to_string()
            })
            .collect();
        let start = lines.len().saturating_sub(n);
        lines[start..].join("\n")
    }

    /// Why a boot went wrong, as far as the files tell: what QEMU said on
    /// stderr, and the console's last lines.
    pub fn boot_evidence(&self) -> String {
        let stderr = std::fs::read_to_string(self.qemu_stderr()).unwrap_or_default();
        let mut out = String::new();
        if !stderr.trim().is_empty() {
            out.push_str(&format!("QEMU said: {}\n", stderr.trim()));
        }
        out.push_str(&format!(
            "console tail ({}):\n{}",
            self.console_log().display(),
            self.console_tail(25)
        ));
        out
    }
}

/// The cache `qemu/setup.sh` fills: `$MKCTL_CACHE`, else the `.cache` of
/// the source tree this binary was built in (found by walking up from the
/// executable), else `/var/cache/mkctl`.
pub fn cache_dir() -> PathBuf {
    if let Some(c) = std::env::var_os("MKCTL_CACHE") {
        return PathBuf::from(c);
    }
    // The checkout mkctl was built in (its binary under target/), or the one
    // it is run from (a target dir elsewhere, CARGO_TARGET_DIR).
    let exe = std::env::current_exe().ok();
    let cwd = std::env::current_dir().ok();
    for start in [exe.as_deref(), cwd.as_deref()].into_iter().flatten() {
        for dir in start.ancestors() {
            let c = dir.join(".cache");
            if c.join("kernel").is_dir() || c.join("guest-init").is_file() {
                return c;
            }
        }
    }
    PathBuf::from("/var/cache/mkctl")
}

/// Why `instances` cannot boot here, if one of them asks for a stock
/// kernel (`"auto"`, `"auto-<series>"`) or the initramfs (`"auto"`) and
/// `qemu/setup.sh` has not made it.
pub fn missing_auto_images<'a>(
    instances: impl IntoIterator<Item = &'a crate::topology::Instance>,
) -> Option<String> {
    use crate::topology::ImageSpec;
    let init = guest_init();
    for i in instances {
        match i.kernel {
            ImageSpec::Auto => {
                let kernel = auto_kernel();
                if !kernel.is_file() {
                    return Some(format!(
                        "kernel = \"auto\" needs {}, which does not exist: run qemu/setup.sh first, or set MKCTL_CACHE to the cache it filled (MKCTL_KERNEL to a kernel image)",
                        kernel.display()
                    ));
                }
            }
            ImageSpec::AutoSeries(k) => {
                let kernel = series_kernel(k);
                if !kernel.is_file() {
                    return Some(format!(
                        "kernel = \"{}\" ({}) needs the {} kernel at {}, which does not exist: run qemu/setup.sh first (it fetches it), or set MKCTL_CACHE to the cache it filled",
                        k.spelling(),
                        i.name,
                        k.as_str(),
                        kernel.display()
                    ));
                }
            }
            ImageSpec::Path(_) => {}
        }
        if i.initrd == ImageSpec::Auto && !init.is_file() {
            return Some(format!(
                "initrd = \"auto\" needs the static guest-init at {}, which does not exist: run qemu/setup.sh first, or set MKCTL_CACHE to the cache it filled (MKCTL_GUEST_INIT to a guest-init binary)",
                init.display()
            ));
        }
    }
    None
}

/// The stock guest kernel (`kernel = "auto"`): `$MKCTL_KERNEL` or the cache's.
pub fn auto_kernel() -> PathBuf {
    std::env::var_os("MKCTL_KERNEL")
        .map_or_else(|| cache_dir().join("kernel/vmlinuz"), PathBuf::from)
}

/// The auto kernel's modules the guests load (`qemu/setup.sh`): the
/// virtio console driver for the doorbell port, and `unix_diag`.
pub fn auto_kernel_modules() -> PathBuf {
    cache_dir().join("kernel/modules")
}

/// Where `qemu/setup.sh` puts another stock kernel (`kernel =
/// "auto-6.12"`): `kernel-6.12/` in the cache, with `vmlinuz`, `version`
/// (its release), `package` and `modules/`.
pub fn series_dir(k: KernelSeries) -> PathBuf {
    cache_dir().join(format!("kernel-{}", k.as_str()))
}

/// That kernel's image.
pub fn series_kernel(k: KernelSeries) -> PathBuf {
    series_dir(k).join("vmlinuz")
}

/// That kernel's modules for the guests (those it builds in are absent).
pub fn series_kernel_modules(k: KernelSeries) -> PathBuf {
    series_dir(k).join("modules")
}

/// The static guest-init: `$MKCTL_GUEST_INIT` or the cache's.
pub fn guest_init() -> PathBuf {
    std::env::var_os("MKCTL_GUEST_INIT")
        .map_or_else(|| cache_dir().join("guest-init"), PathBuf::from)
}
