//! A scripted multikernel kernel for tests and dry runs: an in-memory model
//! of `/sys/fs/multikernel` (baseline, overlay transactions, instances and
//! their status, the pool, `/proc/iomem`) that answers every
//! [`KernelIface`] call the way the kernel read for this backend does
//! (`kernel/multikernel/{kernfs,overlay,baseline}.c` of multikernel/linux;
//! the RFC v2 series for v1), records each call, and fails on cue: an
//! errno from any call, an overlay whose transaction reads `failed`, an
//! instance that never becomes `active`, a halt nobody answers.
//!
//! It parses what it is given with [`crate::dtb::parse_dtb`], so a test
//! that passes here has also checked the blobs' layout.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::dtb::{self, DtNode, DtValue, PoolChunk};
use crate::units::InstanceId;

use super::iface::{Call, Errno, KernelIface, KexecLoad, RebootCmd, KEXEC_FILE_UNLOAD};
use super::probe::FsState;
use super::Generation;

/// Where the model places the pool's first chunk, and the chunk alignment.
const POOL_BASE: u64 = 0x1_0000_0000;
const CHUNK_ALIGN: u64 = 128 << 20;

/// Which call a scripted fault hits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultAt {
    Mount,
    /// The write of the baseline (or the v1 tree) to `device_tree`.
    DeviceTree,
    /// The write of an overlay whose first operation is this node name
    /// (`instance-create`, `instance-remove`, `cpu-add`, `memory-add`,
    /// `cpu-remove`, `memory-remove`).
    OverlayWrite(&'static str),
    Load,
    Unload,
    Start,
    Halt,
    HaltForce,
    Rmdir,
    Umount,
}

#[derive(Debug, Clone)]
struct Fault {
    at: FaultAt,
    errno: Errno,
    /// Instance name the fault is limited to, if any.
    only: Option<String>,
}

/// One instance in the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeInstance {
    pub id: u32,
    pub status: String,
    pub cpus: Vec<u64>,
    pub memory: u64,
    pub region: Option<PoolChunk>,
}

/// The pool in the model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakePool {
    pub cpus: BTreeSet<u64>,
    pub free: BTreeSet<u64>,
    pub chunks: Vec<PoolChunk>,
}

/// The scripted kernel.
#[derive(Debug, Clone)]
pub struct ScriptedKernel {
    pub sysroot: PathBuf,
    pub generation: Generation,
    pub mounted: bool,
    /// The host's online CPUs (APIC ids), listed in the read-back before a
    /// baseline exists.
    pub host_cpus: Vec<u64>,
    pub pool: Option<FakePool>,
    pub instances: BTreeMap<String, FakeInstance>,
    /// Overlay transactions: id → (status, blob).
    pub txs: BTreeMap<u64, (String, Vec<u8>)>,
    next_tx: u64,
    /// Logical CPUs offlined through sysfs (v1).
    pub offline: BTreeSet<u32>,
    pub calls: Vec<Call>,
    pub dmesg: Vec<String>,
    faults: Vec<Fault>,
    /// Overlay operation kinds whose transaction reads `failed`.
    failing_overlays: Vec<&'static str>,
    /// Started instances stay `loaded` instead of becoming `active`.
    pub never_active: bool,
    /// `LINUX_REBOOT_CMD_MULTIKERNEL_HALT` returns ETIMEDOUT.
    pub halt_unanswered: bool,
    /// A v1 kernel with the forced halt (ours, `qemu/multikernel`): it
    /// takes an active instance back to `ready`. Without it a v1 kernel
    /// answers both halts EINVAL, as the RFC v2 series does.
    pub v1_forced_halt: bool,
}

impl ScriptedKernel {
    /// A kernel of `generation` with the filesystem not mounted and no
    /// pool; `host_cpus` are the APIC ids of its online CPUs.
    pub fn new(sysroot: &Path, generation: Generation, host_cpus: Vec<u64>) -> Self {
        Self {
            sysroot: sysroot.to_path_buf(),
            generation,
            mounted: false,
            host_cpus,
            pool: None,
            instances: BTreeMap::new(),
            txs: BTreeMap::new(),
            // overlay.c: ATOMIC_INIT(1) then atomic_inc_return: tx_2 first.
            next_tx: 2,
            offline: BTreeSet::new(),
            calls: Vec::new(),
            dmesg: Vec::new(),
            faults: Vec::new(),
            failing_overlays: Vec::new(),
            never_active: false,
            halt_unanswered: false,
            v1_forced_halt: false,
        }
    }

    /// A model of what `fs` (read from a real sysroot) shows: mounted or
    /// not, the generation, the instances; for the dry run.
    pub fn from_probe(sysroot: &Path, fs: &FsState, host_cpus: Vec<u64>) -> Self {
        let mut k = Self::new(
            sysroot,
            fs.generation.unwrap_or(Generation::Current),
            host_cpus,
        );
        k.mounted = fs.mounted;
        for i in &fs.instances {
            k.instances.insert(
                i.name.clone(),
                FakeInstance {
                    id: i.id.unwrap_or(0),
                    status: i.status.clone().unwrap_or_default(),
                    cpus: Vec::new(),
                    memory: 0,
                    region: None,
                },
            );
        }
        if fs.mounted && fs.generation == Some(Generation::Current) {
            if let Ok(blob) =
                std::fs::read(sysroot.join(super::probe::MK_MOUNT).join("device_tree"))
            {
                if let Ok(p) = super::PoolState::from_dtb(&blob) {
                    if p.live {
                        k.pool = Some(FakePool {
                            cpus: p.cpus.iter().copied().collect(),
                            free: p.free_cpus.unwrap_or(p.cpus).into_iter().collect(),
                            chunks: p.chunks,
                        });
                    }
                }
            }
        }
        k
    }

    /// Makes the next call at `at` fail with `errno`.
    pub fn fail(&mut self, at: FaultAt, errno: Errno) -> &mut Self {
        self.faults.push(Fault {
            at,
            errno,
            only: None,
        });
        self
    }

    /// Makes the next call at `at` for instance `name` fail with `errno`.
    pub fn fail_for(&mut self, at: FaultAt, name: &str, errno: Errno) -> &mut Self {
        self.faults.push(Fault {
            at,
            errno,
            only: Some(name.into()),
        });
        self
    }

    /// Makes the next overlay whose first operation is `kind` read status
    /// `failed` (its write still succeeds, as in the kernel).
    pub fn fail_overlay(&mut self, kind: &'static str) -> &mut Self {
        self.failing_overlays.push(kind);
        self
    }

    /// The recorded calls, one line each.
    pub fn call_lines(&self) -> Vec<String> {
        self.calls.iter().map(ToString::to_string).collect()
    }

    fn take_fault(&mut self, at: &FaultAt, name: Option<&str>) -> Option<Errno> {
        let i = self
            .faults
            .iter()
            .position(|f| &f.at == at && (f.only.is_none() || f.only.as_deref() == name))?;
        Some(self.faults.remove(i).errno)
    }

    fn rel(&self, p: &Path) -> String {
        p.strip_prefix(&self.sysroot)
            .unwrap_or(p)
            .to_string_lossy()
            .trim_start_matches('/')
            .to_string()
    }

    fn mk_rel<'p>(&self, rel: &'p str) -> Option<&'p str> {
        if !self.mounted {
            return None;
        }
        rel.strip_prefix("sys/fs/multikernel")
            .map(|r| r.trim_start_matches('/'))
    }

    fn by_id(&self, id: u32) -> Option<String> {
        self.instances
            .iter()
            .find(|(_, i)| i.id == id)
            .map(|(n, _)| n.clone())
    }

    fn err(&mut self, msg: String, e: Errno) -> Errno {
        self.dmesg.push(msg);
        e
    }

    // ---- the kernel's side of device_tree ------------------------------------

    fn readback(&self) -> DtNode {
        let mut res = DtNode::new("resources");
        match &self.pool {
            None => {
                res = res.prop("cpus", DtValue::U64(self.host_cpus.clone()));
            }
            Some(p) => {
                res = res
                    .prop("cpus", DtValue::U64(p.cpus.iter().copied().collect()))
                    .prop(
                        "cpus-available",
                        DtValue::U64(p.free.iter().copied().collect()),
                    );
                for c in &p.chunks {
                    let mut n = DtNode::new(format!("memory@{:x}", c.base))
                        .prop("device_type", DtValue::String("memory".into()))
                        .prop("reg", DtValue::U64(vec![c.base, c.size]));
                    if let Some(node) = c.numa_node {
                        n = n.prop("numa-node-id", DtValue::U32(vec![node]));
                    }
                    res = res.child(n);
                }
            }
        }
        DtNode::new("")
            .prop("compatible", DtValue::String(dtb::HOST_COMPATIBLE.into()))
            .child(res)
    }

    fn iomem(&self) -> String {
        let mut s = String::from("00000000-00000fff : Reserved\n");
        if let Some(p) = &self.pool {
            for c in &p.chunks {
                s.push_str(&format!(
                    "{:08x}-{:08x} : Multikernel Memory Pool\n",
                    c.base,
                    c.base + c.size - 1
                ));
                for (name, i) in &self.instances {
                    if let Some(r) = i
                        .region
                        .filter(|r| r.base >= c.base && r.base < c.base + c.size)
                    {
                        s.push_str(&format!(
                            "  {:08x}-{:08x} : mk-instance-{}-{name}-region-0\n",
                            r.base,
                            r.base + r.size - 1,
                            i.id
                        ));
                    }
                }
            }
        }
        s
    }

    fn grow_pool(&mut self, size: u64, node: Option<u32>) {
        let pool = self.pool.get_or_insert_with(FakePool::default);
        let base = pool
            .chunks
            .iter()
            .map(|c| (c.base + c.size).div_ceil(CHUNK_ALIGN) * CHUNK_ALIGN)
            .max()
            .unwrap_or(POOL_BASE);
        pool.chunks.push(PoolChunk {
            base,
            size,
            numa_node: node,
        });
    }

    fn write_baseline(&mut self, blob: &[u8]) -> Result<(), Errno> {
        let t = dtb::parse_dtb(blob).map_err(|_| Errno::EINVAL)?;
        if t.at("instances").is_some_and(|n| !n.children.is_empty()) {
            return Err(self.err(
                "Device tree contains kernel instances. Host kernel configuration must not contain instances.".into(),
                Errno::EINVAL,
            ));
        }
        if self.pool.is_some() {
            return Err(self.err(
                "Baseline already applied; change the pool with an overlay targeting /resources"
                    .into(),
                Errno::EBUSY,
            ));
        }
        let res = t.sub("resources").ok_or(Errno::EINVAL)?;
        let cpus = res
            .get("cpus")
            .and_then(DtValue::as_u64s)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                self.err(
                    "No 'cpus' property in baseline /resources node".into(),
                    Errno::EINVAL,
                )
            })?;
        let mut mem = Vec::new();
        for m in res
            .children
            .iter()
            .filter(|c| c.name.starts_with("memory@"))
        {
            let size = m
                .get("size")
                .and_then(DtValue::as_u64s)
                .and_then(|v| v.first().copied())
                .filter(|s| *s > 0 && s % 4096 == 0)
                .ok_or(Errno::EINVAL)?;
            let node = m
                .get("numa-node-id")
                .and_then(DtValue::as_u32s)
                .and_then(|v| v.first().copied());
            mem.push((size, node));
        }
        if mem.is_empty() {
            return Err(self.err(
                "Baseline has no memory@N node; the pool needs memory".into(),
                Errno::EINVAL,
            ));
        }
        for c in &cpus {
            if !self.host_cpus.contains(c) {
                return Err(self.err(
                    format!("Baseline CPU {c} not found in system (not present)"),
                    Errno::ENODEV,
                ));
            }
        }
        for (size, node) in mem {
            self.grow_pool(size, node);
        }
        let pool = self.pool.as_mut().expect("grown above");
        pool.cpus.extend(cpus.iter().copied());
        pool.free.extend(cpus.iter().copied());
        self.host_cpus.retain(|c| !cpus.contains(c));
        Ok(())
    }

    fn write_v1(&mut self, blob: &[u8]) -> Result<(), Errno> {
        let t = dtb::parse_dtb(blob).map_err(|_| Errno::EINVAL)?;
        let inst = t.sub("instances").ok_or(Errno::EINVAL)?;
        for n in &inst.children {
            let Some(id) = n
                .get("id")
                .and_then(DtValue::as_u32s)
                .and_then(|v| v.first().copied())
            else {
                continue;
            };
            if self.instances.contains_key(&n.name) || self.by_id(id).is_some() {
                self.dmesg
                    .push(format!("Failed to create instance '{}': -17", n.name));
                continue; // the RFC logs and goes on
            }
            let res = n.sub("resources");
            self.instances.insert(
                n.name.clone(),
                FakeInstance {
                    id,
                    status: "ready".into(),
                    cpus: res
                        .and_then(|r| r.get("cpus"))
                        .and_then(DtValue::as_u32s)
                        .unwrap_or_default()
                        .into_iter()
                        .map(u64::from)
                        .collect(),
                    memory: res
                        .and_then(|r| r.get("memory-bytes"))
                        .and_then(DtValue::as_u64s)
                        .and_then(|v| v.first().copied())
                        .unwrap_or(0),
                    region: None,
                },
            );
        }
        Ok(())
    }

    fn write_overlay(&mut self, blob: &[u8]) -> Result<(), Errno> {
        if blob.len() > dtb::MAX_OVERLAY_BYTES {
            // kernfs hands the rest over at a non-zero offset.
            return Err(Errno::EINVAL);
        }
        let t = dtb::parse_dtb(blob).map_err(|_| Errno::EINVAL)?;
        let frag = t.sub("fragment@0").ok_or(Errno::EINVAL)?;
        let ov = frag.sub("__overlay__").ok_or(Errno::EINVAL)?;
        let first = ov
            .children
            .first()
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let name = ov
            .children
            .first()
            .and_then(|c| c.get("instance-name"))
            .and_then(DtValue::as_str);
        if let Some(e) = self.faults.iter().position(|f| {
            matches!(&f.at, FaultAt::OverlayWrite(k) if *k == first)
                && (f.only.is_none() || f.only == name)
        }) {
            return Err(self.faults.remove(e).errno);
        }
        let id = self.next_tx;
        self.next_tx += 1;
        let forced = self.failing_overlays.iter().position(|k| *k == first);
        let status = if let Some(i) = forced {
            self.failing_overlays.remove(i);
            self.dmesg
                .push(format!("Failed to apply overlay transaction {id}: -22"));
            "failed"
        } else {
            let target = frag
                .get("target-path")
                .and_then(DtValue::as_str)
                .unwrap_or_default();
            match self.apply(&target, ov) {
                Ok(()) => "applied",
                Err(e) => {
                    self.dmesg.push(format!(
                        "Failed to apply overlay transaction {id}: -{}",
                        e as i32
                    ));
                    "failed"
                }
            }
        };
        self.txs.insert(id, (status.into(), blob.to_vec()));
        Ok(())
    }

    fn apply(&mut self, target: &str, ov: &DtNode) -> Result<(), Errno> {
        match target {
            "/instances" => {
                for op in &ov.children {
                    let name = op
                        .get("instance-name")
                        .and_then(DtValue::as_str)
                        .ok_or(Errno::EINVAL)?;
                    match op.name.as_str() {
                        "instance-create" => self.create(&name, op)?,
                        "instance-remove" => {
                            let st = self
                                .instances
                                .get(&name)
                                .map(|i| i.status.clone())
                                .ok_or_else(|| {
                                    self.err(
                                        format!("Overlay: instance '{name}' not found"),
                                        Errno::ENOENT,
                                    )
                                })?;
                            if st == "loaded" || st == "active" {
                                return Err(self.err(
                                    format!("Cannot remove instance '{name}' with loaded kernel. Unload it first."),
                                    Errno::EBUSY,
                                ));
                            }
                            self.destroy(&name);
                        }
                        _ => return Err(Errno::EINVAL),
                    }
                }
                Ok(())
            }
            "/resources" => {
                if self.pool.is_none() {
                    return Err(self.err(
                        "this kernel manages no pool, /resources is not a valid target".into(),
                        Errno::EPERM,
                    ));
                }
                // Pool order: cpu-remove, memory-remove, memory-add, cpu-add.
                for kind in ["cpu-remove", "memory-remove", "memory-add", "cpu-add"] {
                    let Some(op) = ov.sub(kind) else { continue };
                    for item in &op.children {
                        self.pool_op(kind, item)?;
                    }
                }
                Ok(())
            }
            _ => Err(Errno::EINVAL),
        }
    }

    fn pool_op(&mut self, kind: &str, item: &DtNode) -> Result<(), Errno> {
        let reg = item
            .get("reg")
            .and_then(DtValue::as_u64s)
            .unwrap_or_default();
        match kind {
            "cpu-add" => {
                let c = *reg.first().ok_or(Errno::EINVAL)?;
                if !self.host_cpus.contains(&c) {
                    return Err(self.err(format!("Failed to move CPU {c}: -16"), Errno::EBUSY));
                }
                self.host_cpus.retain(|x| *x != c);
                let p = self.pool.as_mut().ok_or(Errno::EPERM)?;
                p.cpus.insert(c);
                p.free.insert(c);
            }
            "cpu-remove" => {
                let c = *reg.first().ok_or(Errno::EINVAL)?;
                let p = self.pool.as_mut().ok_or(Errno::EPERM)?;
                if !p.free.remove(&c) {
                    return Err(self.err(format!("Failed to move CPU {c}: -16"), Errno::EBUSY));
                }
                p.cpus.remove(&c);
                self.host_cpus.push(c);
                self.host_cpus.sort_unstable();
            }
            "memory-add" => {
                let size = item
                    .get("size")
                    .and_then(DtValue::as_u64s)
                    .and_then(|v| v.first().copied())
                    .ok_or(Errno::EINVAL)?;
                let node = item
                    .get("numa-node-id")
                    .and_then(DtValue::as_u32s)
                    .and_then(|v| v.first().copied());
                self.grow_pool(size, node);
            }
            "memory-remove" => {
                let [base, size] = reg[..] else {
                    return Err(Errno::EINVAL);
                };
                let busy = self.instances.values().any(|i| {
                    i.region
                        .is_some_and(|r| r.base >= base && r.base < base + size)
                });
                if busy {
                    return Err(self.err("Failed to resize the pool: -16".into(), Errno::EBUSY));
                }
                let p = self.pool.as_mut().ok_or(Errno::EPERM)?;
                let i = p
                    .chunks
                    .iter()
                    .position(|c| c.base == base && c.size == size)
                    .ok_or(Errno::EINVAL)?;
                p.chunks.remove(i);
                if p.chunks.is_empty() && p.cpus.is_empty() {
                    self.pool = None;
                }
            }
            _ => return Err(Errno::EINVAL),
        }
        Ok(())
    }

    fn create(&mut self, name: &str, op: &DtNode) -> Result<(), Errno> {
        if self.instances.contains_key(name) {
            return Err(self.err(
                format!("Overlay: instance '{name}' already exists"),
                Errno::EEXIST,
            ));
        }
        let id = op
            .get("id")
            .and_then(DtValue::as_u32s)
            .and_then(|v| v.first().copied())
            .ok_or(Errno::EINVAL)?;
        if id == 0 {
            return Err(self.err(
                "Instance ID 0 is reserved for the host kernel".into(),
                Errno::ENOMEM,
            ));
        }
        if self.by_id(id).is_some() {
            return Err(self.err(
                format!("Overlay: instance ID {id} is already in use"),
                Errno::EEXIST,
            ));
        }
        let res = op.sub("resources").ok_or(Errno::EINVAL)?;
        let cpus = res
            .get("cpus")
            .and_then(DtValue::as_u64s)
            .ok_or(Errno::EINVAL)?;
        let memory = res
            .get("memory-bytes")
            .and_then(DtValue::as_u64s)
            .and_then(|v| v.first().copied())
            .filter(|m| *m > 0 && m % 4096 == 0)
            .ok_or(Errno::EINVAL)?;
        let pool = self.pool.as_ref().ok_or(Errno::ENOSPC)?;
        if let Some(c) = cpus.iter().find(|c| !pool.free.contains(c)) {
            return Err(self.err(format!("CPU {c} not available in the pool"), Errno::EBUSY));
        }
        // First fit above the regions already given out.
        let used: Vec<PoolChunk> = self.instances.values().filter_map(|i| i.region).collect();
        let mut region = None;
        for c in &pool.chunks {
            let start = used
                .iter()
                .filter(|r| r.base >= c.base && r.base < c.base + c.size)
                .map(|r| r.base + r.size)
                .max()
                .unwrap_or(c.base);
            if start + memory <= c.base + c.size {
                region = Some(PoolChunk {
                    base: start,
                    size: memory,
                    numa_node: c.numa_node,
                });
                break;
            }
        }
        let region = region.ok_or_else(|| {
            self.err(
                format!("Failed to reserve resources for instance '{name}': -12"),
                Errno::ENOMEM,
            )
        })?;
        let pool = self.pool.as_mut().expect("checked above");
        for c in &cpus {
            pool.free.remove(c);
        }
        self.instances.insert(
            name.into(),
            FakeInstance {
                id,
                status: "ready".into(),
                cpus,
                memory,
                region: Some(region),
            },
        );
        Ok(())
    }

    fn destroy(&mut self, name: &str) {
        if let Some(i) = self.instances.remove(name) {
            if let Some(p) = self.pool.as_mut() {
                p.free
                    .extend(i.cpus.iter().copied().filter(|c| p.cpus.contains(c)));
            }
        }
    }

    fn rollback_tx(&mut self, id: u64) -> Result<(), Errno> {
        let (_, blob) = self.txs.get(&id).cloned().ok_or(Errno::ENOENT)?;
        let t = dtb::parse_dtb(&blob).map_err(|_| Errno::EINVAL)?;
        let ov = t.at("fragment@0/__overlay__").ok_or(Errno::EINVAL)?;
        if let Some(op) = ov.sub("instance-create") {
            let name = op
                .get("instance-name")
                .and_then(DtValue::as_str)
                .unwrap_or_default();
            if let Some(i) = self.instances.get(&name) {
                if i.status == "loaded" || i.status == "active" {
                    if let Some(tx) = self.txs.get_mut(&id) {
                        tx.0 = "failed".into();
                    }
                    return Err(self.err(
                        format!("Rollback tx{id}: Failed to destroy instance '{name}': -16"),
                        Errno::EBUSY,
                    ));
                }
                self.destroy(&name);
            }
        }
        self.txs.remove(&id);
        Ok(())
    }
}

impl KernelIface for ScriptedKernel {
    fn mount_multikernel(&mut self, target: &Path) -> Result<(), Errno> {
        self.calls.push(Call::Mount(target.to_path_buf()));
        if let Some(e) = self.take_fault(&FaultAt::Mount, None) {
            return Err(e);
        }
        if self.mounted {
            return Err(Errno::EBUSY);
        }
        self.mounted = true;
        Ok(())
    }

    fn umount(&mut self, target: &Path) -> Result<(), Errno> {
        self.calls.push(Call::Umount(target.to_path_buf()));
        if let Some(e) = self.take_fault(&FaultAt::Umount, None) {
            return Err(e);
        }
        if !self.mounted {
            return Err(Errno::EINVAL);
        }
        self.mounted = false;
        Ok(())
    }

    fn write_file(&mut self, path: &Path, data: &[u8]) -> Result<(), Errno> {
        self.calls
            .push(Call::Write(path.to_path_buf(), data.to_vec()));
        let rel = self.rel(path);
        if let Some(cpu) = rel
            .strip_prefix("sys/devices/system/cpu/cpu")
            .and_then(|r| r.strip_suffix("/online"))
            .and_then(|n| n.parse::<u32>().ok())
        {
            match data {
                b"0" => self.offline.insert(cpu),
                b"1" => self.offline.remove(&cpu),
                _ => return Err(Errno::EINVAL),
            };
            return Ok(());
        }
        let Some(mk) = self.mk_rel(&rel).map(str::to_string) else {
            return Err(Errno::ENOENT);
        };
        match (mk.as_str(), self.generation) {
            ("device_tree", g) => {
                if let Some(e) = self.take_fault(&FaultAt::DeviceTree, None) {
                    return Err(e);
                }
                match g {
                    Generation::Current => self.write_baseline(data),
                    Generation::V1 => self.write_v1(data),
                }
            }
            ("overlays/new", Generation::Current) => self.write_overlay(data),
            _ => Err(Errno::EACCES),
        }
    }

    fn read_file(&mut self, path: &Path) -> Result<Vec<u8>, Errno> {
        self.calls.push(Call::Read(path.to_path_buf()));
        let rel = self.rel(path);
        if rel == "proc/iomem" {
            return Ok(self.iomem().into_bytes());
        }
        if rel == "sys/devices/system/cpu/offline" {
            let set = crate::units::CpuSet::from_cpus(self.offline.iter().copied());
            return Ok(format!("{set}\n").into_bytes());
        }
        let mk = self.mk_rel(&rel).ok_or(Errno::ENOENT)?.to_string();
        if mk == "device_tree" {
            return match self.generation {
                Generation::Current => self.readback().to_dtb().map_err(|_| Errno::EIO),
                Generation::V1 => {
                    Ok(b"Write multikernel device tree here to propagate to instances\n".to_vec())
                }
            };
        }
        if let Some(rest) = mk.strip_prefix("instances/") {
            let (name, file) = rest.split_once('/').ok_or(Errno::EISDIR)?;
            let i = self.instances.get(name).ok_or(Errno::ENOENT)?;
            return match file {
                "id" => Ok(format!("{}\n", i.id).into_bytes()),
                "status" => Ok(format!("{}\n", i.status).into_bytes()),
                _ => Err(Errno::ENOENT),
            };
        }
        if let Some(rest) = mk.strip_prefix("overlays/tx_") {
            let (id, file) = rest.split_once('/').ok_or(Errno::EISDIR)?;
            let id: u64 = id.parse().map_err(|_| Errno::ENOENT)?;
            let (status, blob) = self.txs.get(&id).ok_or(Errno::ENOENT)?;
            return match file {
                "status" => Ok(format!("{status}\n").into_bytes()),
                "dtbo" => Ok(blob.clone()),
                _ => Err(Errno::ENOENT),
            };
        }
        Err(Errno::ENOENT)
    }

    fn read_dir(&mut self, path: &Path) -> Result<Vec<String>, Errno> {
        self.calls.push(Call::ReadDir(path.to_path_buf()));
        let rel = self.rel(path);
        if rel == "sys/fs/multikernel" && !self.mounted {
            return Ok(Vec::new()); // the empty mount point
        }
        let mk = self.mk_rel(&rel).ok_or(Errno::ENOENT)?;
        match mk {
            "" => {
                let mut v = vec!["device_tree".to_string(), "instances".to_string()];
                if self.generation == Generation::Current {
                    v.push("overlays".into());
                }
                v.sort();
                Ok(v)
            }
            "instances" => Ok(self.instances.keys().cloned().collect()),
            "overlays" if self.generation == Generation::Current => {
                let mut v: Vec<String> = self.txs.keys().map(|id| format!("tx_{id}")).collect();
                v.push("new".into());
                v.sort();
                Ok(v)
            }
            _ => Err(Errno::ENOENT),
        }
    }

    fn rmdir(&mut self, path: &Path) -> Result<(), Errno> {
        self.calls.push(Call::Rmdir(path.to_path_buf()));
        if let Some(e) = self.take_fault(&FaultAt::Rmdir, None) {
            return Err(e);
        }
        let rel = self.rel(path);
        let mk = self.mk_rel(&rel).ok_or(Errno::ENOENT)?.to_string();
        if let Some(id) = mk.strip_prefix("overlays/tx_") {
            let id: u64 = id.parse().map_err(|_| Errno::ENOENT)?;
            return self.rollback_tx(id);
        }
        if let Some(name) = mk.strip_prefix("instances/") {
            if self.generation == Generation::Current {
                return Err(Errno::EPERM);
            }
            let st = self
                .instances
                .get(name)
                .map(|i| i.status.clone())
                .ok_or(Errno::ENOENT)?;
            if st == "active" || st == "loading" {
                return Err(self.err(
                    format!("Cannot remove active instance '{name}'"),
                    Errno::EBUSY,
                ));
            }
            self.instances.remove(name);
            return Ok(());
        }
        Err(Errno::EPERM)
    }

    fn kexec_file_load(&mut self, load: &KexecLoad) -> Result<(), Errno> {
        self.calls.push(Call::KexecFileLoad(load.to_string()));
        let id = load.mk_id().0;
        let name = self.by_id(id);
        let unload = load.flags & KEXEC_FILE_UNLOAD != 0;
        let at = if unload {
            FaultAt::Unload
        } else {
            FaultAt::Load
        };
        if let Some(e) = self.take_fault(&at, name.as_deref()) {
            return Err(self.err(format!("kexec_file_load: injected failure for id {id}"), e));
        }
        if id == 0 {
            return Err(self.err(
                format!("Invalid multikernel ID {id} in flags"),
                Errno::EINVAL,
            ));
        }
        let Some(name) = name else {
            return Err(self.err(
                format!("No multikernel instance found with ID {id}"),
                Errno::ENOENT,
            ));
        };
        let loaded = match self.generation {
            Generation::Current => "loaded",
            Generation::V1 => "loading",
        };
        let i = self.instances.get_mut(&name).expect("found by id");
        if unload {
            if i.status == "active" {
                return Err(Errno::EBUSY);
            }
            i.status = "ready".into();
            return Ok(());
        }
        if i.status != "ready" {
            let s = i.status.clone();
            return Err(self.err(
                format!("Multikernel instance {id} already has an associated kimage ({s})"),
                Errno::EBUSY,
            ));
        }
        i.status = loaded.into();
        Ok(())
    }

    fn reboot(&mut self, cmd: RebootCmd, id: InstanceId) -> Result<(), Errno> {
        self.calls.push(Call::Reboot(cmd, id));
        let name = self.by_id(id.0);
        let at = match cmd {
            RebootCmd::Start => FaultAt::Start,
            RebootCmd::Halt => FaultAt::Halt,
            RebootCmd::HaltForce => FaultAt::HaltForce,
        };
        if let Some(e) = self.take_fault(&at, name.as_deref()) {
            return Err(self.err(format!("reboot: injected failure for id {id}"), e));
        }
        let name = name.ok_or(Errno::ESRCH)?;
        let gen = self.generation;
        let offline_ok = {
            let i = &self.instances[&name];
            gen == Generation::Current
                || i.cpus
                    .first()
                    .is_none_or(|c| self.offline.contains(&(*c as u32)))
        };
        let never_active = self.never_active;
        let unanswered = self.halt_unanswered;
        let v1_force = self.v1_forced_halt;
        let i = self.instances.get_mut(&name).expect("found by id");
        match cmd {
            RebootCmd::Start => {
                if i.status != "loaded" && i.status != "loading" {
                    return Err(Errno::EINVAL);
                }
                if !offline_ok {
                    return Err(self.err(format!("CPU is currently online and cannot be used for multikernel instance {id}"), Errno::EBUSY));
                }
                if !never_active {
                    i.status = "active".into();
                }
                Ok(())
            }
            RebootCmd::Halt | RebootCmd::HaltForce if gen == Generation::V1 => {
                if cmd == RebootCmd::Halt || !v1_force {
                    return Err(Errno::EINVAL);
                }
                if i.status != "active" {
                    return Err(Errno::ESRCH);
                }
                i.status = "ready".into();
                Ok(())
            }
            RebootCmd::Halt => {
                if i.status != "active" {
                    return Err(Errno::ESRCH);
                }
                if unanswered {
                    return Err(Errno::ETIMEDOUT);
                }
                i.status = "loaded".into();
                Ok(())
            }
            RebootCmd::HaltForce => {
                if i.status != "active" && i.status != "loaded" {
                    return Err(Errno::ESRCH);
                }
                i.status = "loaded".into();
                Ok(())
            }
        }
    }

    fn sleep(&mut self, d: Duration) {
        self.calls.push(Call::Sleep(d));
    }

    fn kernel_log_tail(&mut self, lines: usize) -> Vec<String> {
        let n = self.dmesg.len().saturating_sub(lines);
        self.dmesg[n..].to_vec()
    }
}
