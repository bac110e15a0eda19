//! The QEMU command line of one instance.
//!
//! [`MachineSpec`] says what the instance is (kernel, initrd, command line,
//! vCPUs, RAM, guest NUMA nodes, shared window, console, QMP);
//! [`MachineSpec::argv`] checks it and returns the argv, program first. Every
//! choice of option is explained where it is emitted and in `qemu/README.md`.
//!
//! Memory is always a set of `memory-backend-*` objects, one per guest NUMA
//! node: files under [`MachineSpec::ram_dir`] (`share=on`, so the host can map
//! an instance's RAM as it would a multikernel instance's reserved region) or
//! anonymous RAM when no directory is given. Option values that hold paths are
//! escaped for QEMU's option parser (`,` becomes `,,`).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::topology::{Instance, Topology};
use crate::units::{ByteSize, CpuSet, MIB};

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// Software emulation with `-cpu max`: works everywhere, including under
    /// nested virtualisation where KVM hangs.
    #[default]
    Tcg,
    /// Hardware virtualisation with `-cpu host`.
    Kvm,
}

/// One guest NUMA node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaNode {
    /// The guest's vCPUs (0-based vCPU indices) on this node; may be empty
    /// for a memory-only node.
    pub cpus: CpuSet,
    /// Its memory.
    pub memory: ByteSize,
}

/// The shared window: a host file every instance gets as ivshmem BAR 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedWindow {
    /// The file (QEMU creates it when missing).
    pub path: PathBuf,
    /// Its size: a power of two (a PCI BAR), at least 4 KiB.
    pub size: ByteSize,
}

/// Where the first serial port (the kernel's `console=ttyS0`) goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Console {
    /// Everything the guest prints, from the start (truncated at each boot).
    pub log: PathBuf,
    /// A Unix socket to attach to (`mkctl console`), if any; QEMU listens on
    /// it without waiting for a client.
    pub socket: Option<PathBuf>,
}

/// The user-visible extensions (`/proc/cpuinfo` names) of
/// `mknode::migrate::cpu` missing from `host`, by the names QEMU's `-cpu`
/// knows them: what a guest's CPU should not have for its programs to be
/// able to move to this host (a move needs every extension the program
/// picked its code for).
pub fn flags_the_host_lacks(host: &[String]) -> Vec<String> {
    mknode::migrate::cpu::USER_FLAGS
        .iter()
        .filter(|f| !host.iter().any(|h| h == *f))
        .map(|f| qemu_flag(f))
        .collect()
}

/// QEMU's name of a `/proc/cpuinfo` flag.
fn qemu_flag(linux: &str) -> String {
    match linux {
        "sse4_1" => "sse4.1".into(),
        "sse4_2" => "sse4.2".into(),
        "avx512_vbmi2" => "avx512vbmi2".into(),
        "avx512_vnni" => "avx512vnni".into(),
        "avx512_bitalg" => "avx512bitalg".into(),
        other => other.replace('_', "-"),
    }
}

/// What one QEMU instance is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineSpec {
    /// Instance name (`-name`, thread names). `[A-Za-z0-9._-]`, 1 to 64 long.
    pub name: String,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// TCG or KVM.
    pub accel: Accel,
    /// CPUID flags (QEMU's names) switched off in TCG's `-cpu max`: those
    /// this host lacks ([`flags_the_host_lacks`]), so that what a program
    /// picks its code for in the guest, the host has too.
    pub cpu_off: Vec<String>,
    /// The kernel image (bzImage).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Total RAM: a whole number of MiB; with NUMA nodes, their sum.
    pub memory: ByteSize,
    /// Guest NUMA nodes, node id = index. Empty: one node, no NUMA topology.
    pub numa: Vec<NumaNode>,
    /// Directory for RAM backing files (`ram-node<N>`, or `ram` without NUMA
    /// nodes); `None` for anonymous RAM.
    pub ram_dir: Option<PathBuf>,
    /// The shared window, if any.
    pub window: Option<SharedWindow>,
    /// The serial console.
    pub console: Console,
    /// QMP socket, if any.
    pub qmp: Option<PathBuf>,
    /// The doorbell: a Unix socket QEMU listens on, wired to a
    /// virtio-serial port named [`DOORBELL_PORT`] in the guest, through
    /// which the daemon relays the rings of the window's links
    /// (`guest-init/src/doorbell.rs`); `None` for no such port.
    pub doorbell: Option<PathBuf>,
}

/// The name of the guest's doorbell port (`virtserialport,name=`); the
/// guest finds its port by it.
pub const DOORBELL_PORT: &str = "org.mkctl.doorbell";

/// A [`MachineSpec`] QEMU would refuse or that would not do what it says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MachineError {
    /// Name unusable for `-name` or as a hostname.
    #[error("instance name {0:?} must be 1 to 64 characters from [A-Za-z0-9._-]")]
    BadName(String),
    /// No vCPU.
    #[error("an instance needs at least one vCPU")]
    NoVcpus,
    /// RAM not a whole number of MiB (QEMU's `-m` unit) or zero.
    #[error("memory {0} is not a non-zero whole number of MiB")]
    BadMemory(ByteSize),
    /// NUMA node memory not a whole number of MiB or zero.
    #[error("NUMA node {node}: memory {memory} is not a non-zero whole number of MiB")]
    BadNodeMemory {
        /// Node id.
        node: usize,
        /// Its memory.
        memory: ByteSize,
    },
    /// Node memory does not add up to the total.
    #[error("NUMA nodes hold {nodes} of memory in all, but the instance has {total}")]
    NodeMemorySum {
        /// Sum over nodes.
        nodes: ByteSize,
        /// The instance's memory.
        total: ByteSize,
    },
    /// A vCPU on two nodes.
    #[error("vCPU(s) {cpus} are on NUMA nodes {a} and {b}")]
    NodeCpuOverlap {
        /// The vCPUs on both.
        cpus: CpuSet,
        /// First node.
        a: usize,
        /// Second node.
        b: usize,
    },
    /// A node names a vCPU that does not exist.
    #[error("NUMA node {node} names vCPU(s) {cpus}, but the instance has vCPUs 0-{last}")]
    NodeCpuRange {
        /// Node id.
        node: usize,
        /// The vCPUs past the end.
        cpus: CpuSet,
        /// Highest vCPU.
        last: u32,
    },
    /// A vCPU on no node.
    #[error("vCPU(s) {0} are on no NUMA node")]
    CpuWithoutNode(CpuSet),
    /// Window size that cannot be a PCI BAR.
    #[error("window size {0} must be a power of two of at least 4K (it is a PCI BAR)")]
    BadWindowSize(ByteSize),
    /// Unix socket path longer than `sun_path` allows.
    #[error("socket path {} is {len} bytes long; Unix sockets take at most 107", .path.display())]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
}

/// Longest Unix socket path (`sizeof(sun_path)` minus the NUL).
const MAX_SOCKET_PATH: usize = 107;

impl MachineSpec {
    /// A one-vCPU, 256 MiB TCG machine without window, NUMA or QMP; set the
    /// public fields for the rest.
    pub fn new(
        name: &str,
        kernel: &Path,
        initrd: &Path,
        cmdline: &str,
        console_log: &Path,
    ) -> Self {
        Self {
            name: name.to_string(),
            qemu: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Tcg,
            cpu_off: Vec::new(),
            kernel: kernel.to_path_buf(),
            initrd: initrd.to_path_buf(),
            cmdline: cmdline.to_string(),
            vcpus: 1,
            memory: ByteSize(256 * MIB),
            numa: Vec::new(),
            ram_dir: None,
            window: None,
            console: Console {
                log: console_log.to_path_buf(),
                socket: None,
            },
            qmp: None,
            doorbell: None,
        }
    }

    /// The RAM backing files QEMU will use, by node (empty without
    /// [`MachineSpec::ram_dir`]).
    pub fn ram_files(&self) -> Vec<PathBuf> {
        let Some(dir) = &self.ram_dir else {
            return Vec::new();
        };
        if self.numa.is_empty() {
            vec![dir.join("ram")]
        } else {
            (0..self.numa.len())
                .map(|n| dir.join(format!("ram-node{n}")))
                .collect()
        }
    }

    /// Checks the spec (see [`MachineError`]).
    pub fn validate(&self) -> Result<(), MachineError> {
        let n = &self.name;
        if n.is_empty()
            || n.len() > 64
            || !n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(MachineError::BadName(n.clone()));
        }
        if self.vcpus == 0 {
            return Err(MachineError::NoVcpus);
        }
        let whole_mib = |s: ByteSize| s.bytes() != 0 && s.bytes().is_multiple_of(MIB);
        if !whole_mib(self.memory) {
            return Err(MachineError::BadMemory(self.memory));
        }
        if !self.numa.is_empty() {
            let all = CpuSet::from_cpus(0..self.vcpus);
            let mut covered = CpuSet::new();
            let mut sum: u64 = 0;
            for (i, node) in self.numa.iter().enumerate() {
                if !whole_mib(node.memory) {
                    return Err(MachineError::BadNodeMemory {
                        node: i,
                        memory: node.memory,
                    });
                }
                // Each node is at most the u64 total checked below; a sum that
                // overflows cannot match it either.
                sum = sum.saturating_add(node.memory.bytes());
                let outside = node.cpus.difference(&all);
                if !outside.is_empty() {
                    return Err(MachineError::NodeCpuRange {
                        node: i,
                        cpus: outside,
                        last: self.vcpus - 1,
                    });
                }
                for (j, earlier) in self.numa[..i].iter().enumerate() {
                    let both = node.cpus.intersection(&earlier.cpus);
                    if !both.is_empty() {
                        return Err(MachineError::NodeCpuOverlap {
                            cpus: both,
                            a: j,
                            b: i,
                        });
                    }
                }
                covered = covered.union(&node.cpus);
            }
            let missing = all.difference(&covered);
            if !missing.is_empty() {
                return Err(MachineError::CpuWithoutNode(missing));
            }
            if sum != self.memory.bytes() {
                return Err(MachineError::NodeMemorySum {
                    nodes: ByteSize(sum),
                    total: self.memory,
                });
            }
        }
        if let Some(w) = &self.window {
            if !w.size.bytes().is_power_of_two() || w.size.bytes() < 4096 {
                return Err(MachineError::BadWindowSize(w.size));
            }
        }
        for sock in [
            self.console.socket.as_ref(),
            self.qmp.as_ref(),
            self.doorbell.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            let len = sock.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(MachineError::SocketPathTooLong {
                    path: sock.clone(),
                    len,
                });
            }
        }
        Ok(())
    }

    /// The full argv, `qemu` first.
    pub fn argv(&self) -> Result<Vec<OsString>, MachineError> {
        self.validate()?;
        let mut a = Argv::default();
        a.push(self.qemu.as_os_str());

        // Thread names ("CPU 0/TCG") let the daemon find and pin vCPU threads.
        a.opt(
            "-name",
            [escape(OsStr::new(&self.name)), "debug-threads=on".into()],
        );
        // q35: PCIe machine with ACPI, so the guest's power-off ends QEMU.
        a.opt("-machine", ["q35".into()]);
        match self.accel {
            // max: every feature TCG can emulate (the default qemu64 lacks
            // some that distribution kernels probe for), but those asked off.
            Accel::Tcg => {
                a.opt("-accel", ["tcg".into()]);
                let off: String = self.cpu_off.iter().map(|f| format!(",-{f}")).collect();
                a.opt("-cpu", [format!("max{off}").into()]);
            }
            Accel::Kvm => {
                a.opt("-accel", ["kvm".into()]);
                a.opt("-cpu", ["host".into()]);
            }
        }
        // One socket per vCPU: any split of vCPUs over NUMA nodes is then a
        // split of whole sockets, which QEMU and guests handle without
        // warnings about cores of one socket on different nodes.
        a.opt(
            "-smp",
            [
                self.vcpus.to_string().into(),
                format!("sockets={}", self.vcpus).into(),
                "cores=1".into(),
                "threads=1".into(),
            ],
        );
        a.push(OsStr::new("-m"));
        a.push(OsString::from(format!("{}M", self.memory.bytes() / MIB)));

        let ram_files = self.ram_files();
        let backend = |id: &str, size: ByteSize, file: Option<&PathBuf>| -> Vec<OsString> {
            match file {
                Some(f) => vec![
                    "memory-backend-file".into(),
                    format!("id={id}").into(),
                    format!("size={}", size.bytes()).into(),
                    kv("mem-path", f.as_os_str()),
                    // share=on: MAP_SHARED, so the file holds what the guest
                    // writes and the host can map it.
                    "share=on".into(),
                ],
                None => vec![
                    "memory-backend-ram".into(),
                    format!("id={id}").into(),
                    format!("size={}", size.bytes()).into(),
                ],
            }
        };
        if self.numa.is_empty() {
            a.opt("-object", backend("ram", self.memory, ram_files.first()));
            a.opt("-machine", ["memory-backend=ram".into()]);
        } else {
            for (i, node) in self.numa.iter().enumerate() {
                let id = format!("ram-node{i}");
                a.opt("-object", backend(&id, node.memory, ram_files.get(i)));
                let mut numa: Vec<OsString> = vec!["node".into(), format!("nodeid={i}").into()];
                // One cpus= per contiguous run: QEMU takes the option repeatedly.
                numa.extend(
                    cpu_ranges(&node.cpus)
                        .into_iter()
                        .map(|r| format!("cpus={r}").into()),
                );
                numa.push(format!("memdev={id}").into());
                a.opt("-numa", numa);
            }
        }

        if let Some(w) = &self.window {
            a.opt(
                "-object",
                [
                    "memory-backend-file".into(),
                    "id=mkwin".into(),
                    format!("size={}", w.size.bytes()).into(),
                    kv("mem-path", w.path.as_os_str()),
                    "share=on".into(),
                ],
            );
            // ivshmem-plain: BAR 2 is the file, no interrupts, no server.
            a.opt(
                "-device",
                [
                    "ivshmem-plain".into(),
                    "id=mkwin-dev".into(),
                    "memdev=mkwin".into(),
                ],
            );
        }

        if let Some(sock) = &self.doorbell {
            // The doorbell: a virtio-serial port whose host end is a socket
            // the daemon connects to. (ivshmem-doorbell's interrupts are
            // MSI-X only, which guest user space cannot wait on here:
            // qemu/README.md.)
            a.opt(
                "-chardev",
                [
                    "socket".into(),
                    "id=mkbell".into(),
                    kv("path", sock.as_os_str()),
                    "server=on".into(),
                    "wait=off".into(),
                ],
            );
            a.opt(
                "-device",
                ["virtio-serial-pci".into(), "id=mkbell-bus".into()],
            );
            a.opt(
                "-device",
                [
                    "virtserialport".into(),
                    "bus=mkbell-bus.0".into(),
                    "chardev=mkbell".into(),
                    format!("name={DOORBELL_PORT}").into(),
                ],
            );
        }

        a.push(OsStr::new("-kernel"));
        a.push(self.kernel.as_os_str());
        a.push(OsStr::new("-initrd"));
        a.push(self.initrd.as_os_str());
        a.push(OsStr::new("-append"));
        a.push(OsStr::new(&self.cmdline));

        let con = &self.console;
        match &con.socket {
            Some(sock) => a.opt(
                "-chardev",
                [
                    "socket".into(),
                    "id=con0".into(),
                    kv("path", sock.as_os_str()),
                    "server=on".into(),
                    "wait=off".into(),
                    kv("logfile", con.log.as_os_str()),
                    "logappend=off".into(),
                ],
            ),
            None => a.opt(
                "-chardev",
                [
                    "file".into(),
                    "id=con0".into(),
                    kv("path", con.log.as_os_str()),
                ],
            ),
        }
        a.opt("-serial", ["chardev:con0".into()]);

        if let Some(qmp) = &self.qmp {
            a.opt(
                "-chardev",
                [
                    "socket".into(),
                    "id=qmp0".into(),
                    kv("path", qmp.as_os_str()),
                    "server=on".into(),
                    "wait=off".into(),
                ],
            );
            a.opt("-mon", ["chardev=qmp0".into(), "mode=control".into()]);
        }

        // No default devices (VGA, NIC, floppy, CD, parallel, monitor), no
        // window, no config files from /etc: only what is listed here.
        a.push(OsStr::new("-nodefaults"));
        a.push(OsStr::new("-no-user-config"));
        a.opt("-display", ["none".into()]);
        // A guest reboot (including panic=-1 after a kernel panic) ends QEMU
        // instead of booting again.
        a.push(OsStr::new("-no-reboot"));
        Ok(a.0)
    }

    /// A [`Command`] for [`MachineSpec::argv`] (stdio left to the caller).
    pub fn command(&self) -> Result<Command, MachineError> {
        let argv = self.argv()?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        Ok(cmd)
    }
}

#[derive(Default)]
struct Argv(Vec<OsString>);

impl Argv {
    fn push(&mut self, s: impl Into<OsString>) {
        self.0.push(s.into());
    }

    /// `flag a,b,c`.
    fn opt(&mut self, flag: &str, parts: impl IntoIterator<Item = OsString>) {
        self.0.push(flag.into());
        let mut v = Vec::new();
        for (i, p) in parts.into_iter().enumerate() {
            if i > 0 {
                v.push(b',');
            }
            v.extend_from_slice(p.as_bytes());
        }
        self.0.push(OsString::from_vec(v));
    }
}

/// `key=value` with `value` escaped for QEMU's option parser.
fn kv(key: &str, value: &OsStr) -> OsString {
    let mut v = OsString::from(format!("{key}="));
    v.push(escape(value));
    v
}

/// Doubles every `,` so QEMU reads it as part of the value.
fn escape(value: &OsStr) -> OsString {
    let mut v = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        v.push(b);
        if b == b',' {
            v.push(b',');
        }
    }
    OsString::from_vec(v)
}

/// `0-1,4` → `["0-1", "4"]`.
fn cpu_ranges(cpus: &CpuSet) -> Vec<String> {
    let mut out = Vec::new();
    let mut run: Option<(u32, u32)> = None;
    for c in cpus.iter() {
        run = match run {
            Some((lo, hi)) if c == hi + 1 => Some((lo, c)),
            Some(r) => {
                out.push(range_text(r));
                Some((c, c))
            }
            None => Some((c, c)),
        };
    }
    if let Some(r) = run {
        out.push(range_text(r));
    }
    out
}

fn range_text((lo, hi): (u32, u32)) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    }
}

/// Guest NUMA nodes for an instance: one per machine node its CPUs sit
/// on, each with the vCPUs of those CPUs and a share of the memory in
/// proportion (whole MiB); none when all CPUs sit on one node.
pub fn guest_numa(t: &Topology, i: &Instance) -> Vec<NumaNode> {
    let nodes = t.machine.nodes_of_cpus(&i.cpus);
    if nodes.len() <= 1 {
        return Vec::new();
    }
    let cpus: Vec<u32> = i.cpus.iter().collect();
    let total_mib = i.memory.size() / MIB;
    let mut out = Vec::new();
    let mut given = 0u64;
    for (k, n) in nodes.iter().enumerate() {
        let vcpus: CpuSet = cpus
            .iter()
            .enumerate()
            .filter(|(_, c)| t.machine.node_of_cpu(**c) == Some(*n))
            .map(|(v, _)| u32::try_from(v).unwrap_or(0))
            .collect::<Vec<_>>()
            .into_iter()
            .fold(CpuSet::new(), |mut s, v| {
                s.insert(v);
                s
            });
        let mib = if k + 1 == nodes.len() {
            total_mib - given
        } else {
            total_mib * vcpus.len() as u64 / cpus.len() as u64
        };
        given += mib;
        out.push(NumaNode {
            cpus: vcpus,
            memory: ByteSize(mib * MIB),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_node() -> MachineSpec {
        let mut m = MachineSpec::new(
            "alpha",
            Path::new("/c/kernel/vmlinuz"),
            Path::new("/r/alpha/initrd.cpio"),
            "console=ttyS0 panic=-1 mk.name=alpha mk.id=1",
            Path::new("/r/alpha/console.log"),
        );
        m.vcpus = 2;
        m.memory = ByteSize(512 * MIB);
        m.numa = vec![
            NumaNode {
                cpus: CpuSet::parse("0").unwrap(),
                memory: ByteSize(256 * MIB),
            },
            NumaNode {
                cpus: CpuSet::parse("1").unwrap(),
                memory: ByteSize(256 * MIB),
            },
        ];
        m.ram_dir = Some(PathBuf::from("/r/alpha"));
        m.window = Some(SharedWindow {
            path: PathBuf::from("/r/window"),
            size: ByteSize(16 * MIB),
        });
        m.console.socket = Some(PathBuf::from("/r/alpha/console.sock"));
        m.qmp = Some(PathBuf::from("/r/alpha/qmp.sock"));
        m.doorbell = Some(PathBuf::from("/r/alpha/doorbell.sock"));
        m
    }

    fn strs(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn two_node_guest_argv() {
        let argv = strs(two_node().argv().unwrap());
        #[rustfmt::skip]
        let expected = [
            "qemu-system-x86_64",
            "-name", "alpha,debug-threads=on",
            "-machine", "q35",
            "-accel", "tcg",
            "-cpu", "max",
            "-smp", "2,sockets=2,cores=1,threads=1",
            "-m", "512M",
            "-object", "memory-backend-file,id=ram-node0,size=268435456,mem-path=/r/alpha/ram-node0,share=on",
            "-numa", "node,nodeid=0,cpus=0,memdev=ram-node0",
            "-object", "memory-backend-file,id=ram-node1,size=268435456,mem-path=/r/alpha/ram-node1,share=on",
            "-numa", "node,nodeid=1,cpus=1,memdev=ram-node1",
            "-object", "memory-backend-file,id=mkwin,size=16777216,mem-path=/r/window,share=on",
            "-device", "ivshmem-plain,id=mkwin-dev,memdev=mkwin",
            "-chardev", "socket,id=mkbell,path=/r/alpha/doorbell.sock,server=on,wait=off",
            "-device", "virtio-serial-pci,id=mkbell-bus",
            "-device", "virtserialport,bus=mkbell-bus.0,chardev=mkbell,name=org.mkctl.doorbell",
            "-kernel", "/c/kernel/vmlinuz",
            "-initrd", "/r/alpha/initrd.cpio",
            "-append", "console=ttyS0 panic=-1 mk.name=alpha mk.id=1",
            "-chardev", "socket,id=con0,path=/r/alpha/console.sock,server=on,wait=off,logfile=/r/alpha/console.log,logappend=off",
            "-serial", "chardev:con0",
            "-chardev", "socket,id=qmp0,path=/r/alpha/qmp.sock,server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
            "-no-reboot",
        ];
        assert_eq!(argv, expected);
        assert_eq!(
            two_node().ram_files(),
            [
                PathBuf::from("/r/alpha/ram-node0"),
                PathBuf::from("/r/alpha/ram-node1")
            ]
        );
    }

    #[test]
    fn minimal_guest_uses_machine_memory_backend() {
        let mut m = MachineSpec::new(
            "solo",
            Path::new("/k"),
            Path::new("/i"),
            "console=ttyS0",
            Path::new("/log"),
        );
        m.accel = Accel::Kvm;
        let argv = strs(m.argv().unwrap()).join(" ");
        assert!(argv.contains("-accel kvm -cpu host"), "{argv}");
        assert!(
            argv.contains(
                "-object memory-backend-ram,id=ram,size=268435456 -machine memory-backend=ram"
            ),
            "{argv}"
        );
        assert!(argv.contains("-chardev file,id=con0,path=/log"), "{argv}");
        assert!(!argv.contains("ivshmem"), "{argv}");
        assert!(!argv.contains("-mon"), "{argv}");
        assert!(!argv.contains("virtio-serial"), "{argv}");
        assert!(!argv.contains("-numa"), "{argv}");
    }

    /// A guest's CPU leaves out what the host lacks, by QEMU's names.
    #[test]
    fn a_guest_cpu_leaves_out_what_the_host_lacks() {
        let mut m = two_node();
        m.cpu_off = flags_the_host_lacks(
            &mknode::migrate::cpu::USER_FLAGS
                .iter()
                .filter(|f| !["sse4a", "sse4_1", "avx512_vnni"].contains(f))
                .map(|f| f.to_string())
                .collect::<Vec<_>>(),
        );
        let argv = strs(m.argv().unwrap()).join(" ");
        assert!(
            argv.contains("-cpu max,-sse4.1,-sse4a,-avx512vnni -smp"),
            "{argv}"
        );
        let all = flags_the_host_lacks(&[]);
        assert_eq!(all.len(), mknode::migrate::cpu::USER_FLAGS.len());
        assert!(all.contains(&"sha-ni".to_string()) && all.contains(&"lahf-lm".to_string()));
    }

    /// Every name we may switch off is one QEMU knows (an unknown one
    /// would stop it from starting).
    #[test]
    fn qemu_knows_every_flag_we_may_switch_off() {
        let qemu = std::env::var_os("MKCTL_QEMU").unwrap_or_else(|| "qemu-system-x86_64".into());
        let out = Command::new(&qemu)
            .args(["-cpu", "help"])
            .output()
            .unwrap_or_else(|e| {
                panic!("{qemu:?} -cpu help: {e} (./scripts/setup.sh installs QEMU)")
            });
        let text = String::from_utf8_lossy(&out.stdout);
        let known: Vec<&str> = text
            .split("Recognized CPUID flags:")
            .nth(1)
            .expect("QEMU lists its CPUID flags")
            .split_whitespace()
            .collect();
        for f in flags_the_host_lacks(&[]) {
            assert!(known.contains(&f.as_str()), "QEMU does not know {f}");
        }
    }

    #[test]
    fn escapes_commas_in_paths_and_splits_cpu_runs() {
        let mut m = two_node();
        m.vcpus = 5;
        m.numa[0].cpus = CpuSet::parse("0-1,4").unwrap();
        m.numa[1].cpus = CpuSet::parse("2-3").unwrap();
        m.window.as_mut().unwrap().path = PathBuf::from("/r/a,b/window");
        let argv = strs(m.argv().unwrap());
        assert!(argv.contains(&"node,nodeid=0,cpus=0-1,cpus=4,memdev=ram-node0".to_string()));
        assert!(argv.contains(
            &"memory-backend-file,id=mkwin,size=16777216,mem-path=/r/a,,b/window,share=on"
                .to_string()
        ));
    }

    #[test]
    fn refuses_inconsistent_specs() {
        let check = |f: &dyn Fn(&mut MachineSpec), want: &str| {
            let mut m = two_node();
            f(&mut m);
            let e = m.argv().unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        };
        check(&|m| m.name = "a b".into(), "instance name");
        check(&|m| m.vcpus = 0, "at least one vCPU");
        check(&|m| m.memory = ByteSize(MIB + 1), "whole number of MiB");
        check(
            &|m| m.numa[1].memory = ByteSize(128 * MIB),
            "NUMA nodes hold 384M",
        );
        check(
            &|m| m.numa[1].cpus = CpuSet::parse("0-1").unwrap(),
            "vCPU(s) 0 are on NUMA nodes 0 and 1",
        );
        check(
            &|m| m.numa[1].cpus = CpuSet::parse("1-2").unwrap(),
            "names vCPU(s) 2",
        );
        check(
            &|m| m.numa[1].cpus = CpuSet::new(),
            "vCPU(s) 1 are on no NUMA node",
        );
        check(
            &|m| m.window.as_mut().unwrap().size = ByteSize(12 * MIB),
            "power of two",
        );
        check(
            &|m| m.qmp = Some(PathBuf::from(format!("/{}", "x".repeat(120)))),
            "at most 107",
        );
        check(
            &|m| m.doorbell = Some(PathBuf::from(format!("/{}", "x".repeat(120)))),
            "at most 107",
        );
    }
}
