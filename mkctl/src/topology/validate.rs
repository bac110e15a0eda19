//! The rules a topology must obey, checked all together, and the placement
//! of instance memory that has no explicit base (which ranges are free is
//! [`super::place`]'s arithmetic; what to place and what is wrong is here).
//!
//! Every rule reports with the span of the value at fault, the instances
//! involved and a concrete fix (free CPUs to use, the next free aligned base,
//! by how much to shrink). Nothing here touches the machine: the machine
//! description comes in as data (from the file, or discovered by the caller).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::diag::{Diagnostic, Source};
use super::model::{
    HostShare, ImageSpec, Instance, KernelSeries, Machine, Node, Pool, Restart, Topology,
    WindowSpec,
};
use super::place::{largest_gap, next_free, Taken};
use super::schema::{Backend, RawInstance, RawTopology, RestartPolicy};
use crate::units::{align_up, ByteSize, CpuSet, InstanceId, MemRange, PhysAddr, GIB, KIB, MIB};

/// The default alignment of instance memory: 2 MiB, one huge page, so a
/// spawned kernel's memory can be mapped with large pages and handed over
/// in whole pageblocks.
pub const DEFAULT_ALIGN: u64 = 2 * MIB;
/// Default size of the shared window (a power of two, as ivshmem requires).
pub const DEFAULT_WINDOW: u64 = 16 * MIB;
/// How many times the daemon restarts an instance with
/// `restart = "on-failure"` and no `restart_limit`.
pub const DEFAULT_RESTART_LIMIT: u32 = 3;
/// Instance names become hostnames and device tree node names.
const NAME_MAX: usize = 63;

/// Checks the raw topology and builds the model, or returns every error.
/// `machine` is used when the file has no `[machine]` table.
pub fn validate(
    source: &Source,
    raw: RawTopology,
    discovered: Option<Machine>,
    mut diags: Vec<Diagnostic>,
) -> Result<Topology, Vec<Diagnostic>> {
    let mut v = Validator {
        diags: &mut diags,
        base_dir: source
            .path()
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    let machine = v.machine(&raw, discovered);
    let host = v.host(&raw, machine.as_ref());
    let pool = v.pool(&raw, machine.as_ref(), &host);
    let instances = v.instances(&raw, machine.as_ref(), &host);
    let window = v.window(&raw, pool.as_ref(), &instances);
    let files = v.files(&raw);
    let placed = match (&machine, &pool) {
        (Some(m), Some(p)) => v.place_memory(&raw, m, p, &instances, &window),
        _ => None,
    };
    if let (Some(m), Some(placed)) = (&machine, &placed) {
        v.numa_warnings(m, &instances, placed);
    }

    diags.sort_by_key(|d| (d.severity, d.span.as_ref().map_or(0, |s| s.start)));
    if diags.iter().any(Diagnostic::is_error) {
        return Err(diags);
    }
    // No errors: every piece below is present.
    let (Some(machine), Some(pool), Some(placed)) = (machine, pool, placed) else {
        return Err(diags);
    };
    let mut built = Vec::with_capacity(instances.len());
    for (c, memory) in instances.into_iter().zip(placed) {
        // Every `None` below was reported as an error above; stay defensive.
        let (Some(name), Some(id), Some(cpus)) = (c.name, c.id, c.cpus) else {
            return Err(diags);
        };
        let numa_node = c.numa_node.or_else(|| {
            let nodes = machine.nodes_of_cpus(&cpus);
            (nodes.len() == 1).then(|| nodes[0])
        });
        built.push(Instance {
            name,
            id: InstanceId(id),
            backend: c.backend,
            cpus,
            memory,
            memory_base_given: c.memory_base.is_some(),
            numa_node,
            kernel: c.kernel,
            initrd: c.initrd,
            cmdline: c.cmdline,
            restart: c.restart,
        });
    }
    let instances = built;
    Ok(Topology {
        source: source.clone(),
        machine,
        host,
        pool,
        window: window.spec,
        instances,
        files,
        warnings: diags,
    })
}

/// One instance as far as it could be checked; `None` fields failed.
struct Checked {
    span: Range<usize>,
    name: Option<String>,
    label: String,
    id: Option<u32>,
    cpus: Option<CpuSet>,
    cpus_span: Option<Range<usize>>,
    size: Option<u64>,
    size_span: Option<Range<usize>>,
    memory_base: Option<Spanned<PhysAddr>>,
    numa_node: Option<u32>,
    backend: Backend,
    kernel: ImageSpec,
    initrd: ImageSpec,
    cmdline: String,
    restart: Restart,
}

struct WindowPlan {
    spec: WindowSpec,
    span: Option<Range<usize>>,
}

struct Validator<'d> {
    diags: &'d mut Vec<Diagnostic>,
    base_dir: PathBuf,
}

impl Validator<'_> {
    fn push(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn machine(&mut self, raw: &RawTopology, discovered: Option<Machine>) -> Option<Machine> {
        let Some(rm) = &raw.machine else {
            if discovered.is_none() {
                self.push(
                    Diagnostic::error(
                        "no-machine",
                        "the file has no [machine] and the host could not be read",
                    )
                    .help("describe the machine with [[machine.node]] tables, or run on the host itself"),
                );
            }
            return discovered;
        };
        if rm.nodes.is_empty() {
            self.push(
                Diagnostic::error("no-machine", "[machine] has no [[machine.node]] tables")
                    .at(rm.span.clone())
                    .help("add one table per NUMA node: [[machine.node]] id = 0, cpus = \"0-3\", memory = \"4G\""),
            );
            return None;
        }
        let mut nodes: Vec<Node> = Vec::new();
        let mut spans: Vec<Range<usize>> = Vec::new();
        let mut next_base = 0u64;
        let mut ok = true;
        for rn in &rm.nodes {
            let (Some(id), Some(cpus), Some(mem)) = (&rn.id, &rn.cpus, &rn.memory) else {
                ok = false;
                continue;
            };
            let base = rn.memory_base.as_ref().map_or(next_base, |b| b.get_ref().0);
            let Some(range) = MemRange::new(base, mem.get_ref().0) else {
                self.push(
                    Diagnostic::error(
                        "bad-value",
                        "node memory runs past the end of the address space",
                    )
                    .at(mem.span()),
                );
                ok = false;
                continue;
            };
            next_base = range.end.0;
            if let Some((i, _)) = nodes
                .iter()
                .enumerate()
                .find(|(_, n)| n.id == *id.get_ref())
            {
                self.push(
                    Diagnostic::error(
                        "duplicate-node",
                        format!("NUMA node {} is described twice", id.get_ref()),
                    )
                    .at(id.span())
                    .related(spans[i].clone(), "first described here")
                    .help(format!(
                        "give this node another id, e.g. id = {}",
                        nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1
                    )),
                );
                ok = false;
            }
            for n in &nodes {
                let both = n.cpus.intersection(cpus.get_ref());
                if !both.is_empty() {
                    self.push(
                        Diagnostic::error(
                            "node-overlap",
                            format!("CPUs {both} are in node {} and node {}", n.id, id.get_ref()),
                        )
                        .at(cpus.span())
                        .help("each CPU belongs to exactly one NUMA node"),
                    );
                    ok = false;
                }
                if n.memory.iter().any(|m| m.overlaps(&range)) {
                    self.push(
                        Diagnostic::error(
                            "node-overlap",
                            format!(
                                "memory {range} of node {} overlaps node {}",
                                id.get_ref(),
                                n.id
                            ),
                        )
                        .at(rn.memory_base.as_ref().map_or(mem.span(), Spanned::span))
                        .help(format!(
                            "start it after node {}: memory_base = \"{:#x}\"",
                            n.id,
                            n.memory.iter().map(|m| m.end.0).max().unwrap_or(0)
                        )),
                    );
                    ok = false;
                }
            }
            nodes.push(Node {
                id: *id.get_ref(),
                cpus: cpus.get_ref().clone(),
                memory: vec![range],
            });
            spans.push(rn.span.clone());
        }
        ok.then_some(Machine {
            discovered: false,
            nodes,
        })
    }

    fn host(&mut self, raw: &RawTopology, machine: Option<&Machine>) -> HostShare {
        let cpus = raw
            .host
            .cpus
            .as_ref()
            .map_or_else(|| CpuSet::from_cpus([0]), |c| c.get_ref().clone());
        if let (Some(m), Some(c)) = (machine, &raw.host.cpus) {
            let missing = c.get_ref().difference(&m.cpus());
            if !missing.is_empty() {
                self.push(
                    Diagnostic::error(
                        "no-such-cpu",
                        format!("host CPUs {missing} do not exist on this machine"),
                    )
                    .at(c.span())
                    .help(format!("the machine has CPUs {}", m.cpus())),
                );
            }
            if !c.get_ref().contains(0) {
                self.push(
                    Diagnostic::error("host-cpu0", "the host kernel must keep CPU 0")
                        .at(c.span())
                        .help(format!(
                            "write cpus = \"{}\"",
                            c.get_ref().union(&CpuSet::from_cpus([0]))
                        )),
                );
            }
        }
        HostShare {
            cpus,
            memory: raw.host.memory.as_ref().map(|m| *m.get_ref()),
        }
    }

    fn pool(
        &mut self,
        raw: &RawTopology,
        machine: Option<&Machine>,
        host: &HostShare,
    ) -> Option<Pool> {
        let Some(rp) = &raw.pool else {
            if !raw.instances.is_empty() {
                let hint = machine.map_or_else(String::new, |m| {
                    let total = m.memory_total();
                    format!(
                        ": e.g. [pool] size = \"{}\" (half of the machine's {})",
                        ByteSize(total / 2 / GIB * GIB),
                        ByteSize(total)
                    )
                });
                self.push(
                    Diagnostic::error(
                        "no-pool",
                        "the topology has instances but no [pool] of memory to give them",
                    )
                    .help(format!("add a [pool] table{hint}")),
                );
            }
            return None;
        };
        let size = rp.size.as_ref()?;
        let align = match &rp.align {
            Some(a) => {
                let a = a.get_ref().0;
                if !a.is_power_of_two() || a < 4 * KIB {
                    self.push(
                        Diagnostic::error(
                            "bad-align",
                            format!(
                                "pool alignment {} is not a power of two of at least 4K",
                                ByteSize(a)
                            ),
                        )
                        .at(rp.align.as_ref().map(Spanned::span).unwrap_or_default())
                        .help("use align = \"2M\" (the default) or another power of two"),
                    );
                    return None;
                }
                a
            }
            None => DEFAULT_ALIGN,
        };
        let m = machine?;
        let size_b = size.get_ref().0;
        if size_b == 0 {
            self.push(
                Diagnostic::error("bad-value", "the pool is empty")
                    .at(size.span())
                    .help("give it a size, e.g. size = \"4G\""),
            );
            return None;
        }
        if size_b % align != 0 {
            self.push(misaligned("pool size", size_b, align, size.span(), "size"));
        }
        let base = match &rp.base {
            Some(b) => {
                if b.get_ref().0 % align != 0 {
                    self.push(misaligned(
                        "pool base",
                        b.get_ref().0,
                        align,
                        b.span(),
                        "base",
                    ));
                }
                b.get_ref().0
            }
            None => {
                // Default: the top of the machine's highest memory range.
                let top = m
                    .nodes
                    .iter()
                    .flat_map(|n| &n.memory)
                    .map(|r| r.end.0)
                    .max()
                    .unwrap_or(0);
                top.saturating_sub(size_b) & !(align - 1)
            }
        };
        let Some(range) = MemRange::new(base, size_b) else {
            self.push(
                Diagnostic::error(
                    "pool-outside",
                    "the pool runs past the end of the address space",
                )
                .at(rp.span.clone()),
            );
            return None;
        };
        if !covered(
            &m.nodes
                .iter()
                .flat_map(|n| n.memory.clone())
                .collect::<Vec<_>>(),
            &range,
        ) {
            let ranges: Vec<String> = m
                .nodes
                .iter()
                .flat_map(|n| n.memory.iter().map(|r| format!("node {} {r}", n.id)))
                .collect();
            self.push(
                Diagnostic::error(
                    "pool-outside",
                    format!("the pool {range} is not inside the machine's memory"),
                )
                .at(rp.base.as_ref().map_or(size.span(), Spanned::span))
                .help(format!("place it inside: {}", ranges.join(", "))),
            );
        }
        if let Some(hm) = host.memory {
            let left = m.memory_total().saturating_sub(size_b);
            if left < hm.0 {
                self.push(
                    Diagnostic::error(
                        "host-memory",
                        format!(
                            "the pool leaves the host {} but [host] memory asks for {hm}",
                            ByteSize(left)
                        ),
                    )
                    .at(size.span())
                    .help(format!(
                        "shrink the pool to at most {}",
                        ByteSize((m.memory_total().saturating_sub(hm.0)) & !(align - 1))
                    )),
                );
            }
        }
        Some(Pool {
            range,
            align: ByteSize(align),
        })
    }

    fn instances(
        &mut self,
        raw: &RawTopology,
        machine: Option<&Machine>,
        host: &HostShare,
    ) -> Vec<Checked> {
        let mut out: Vec<Checked> = Vec::new();
        let default_backend = raw
            .defaults
            .backend
            .as_ref()
            .map_or(Backend::Qemu, |b| *b.get_ref());
        for ri in &raw.instances {
            let c = self.instance(raw, ri, default_backend, &out);
            out.push(c);
        }
        if let Some(m) = machine {
            self.cpu_ownership(&out, m, host);
        }
        out
    }

    fn instance(
        &mut self,
        raw: &RawTopology,
        ri: &RawInstance,
        default_backend: Backend,
        before: &[Checked],
    ) -> Checked {
        let name = ri.name.as_ref().and_then(|n| {
            let s = n.get_ref();
            let valid = !s.is_empty()
                && s.len() <= NAME_MAX
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
            if !valid {
                self.push(
                    Diagnostic::error("bad-name", format!("instance name \"{s}\" is not usable as a hostname and device tree node"))
                        .at(n.span())
                        .instance(s.clone())
                        .help(format!("start with a letter and use only letters, digits, '-' and '_' (at most {NAME_MAX}): e.g. name = \"{}\"", sanitize(s))),
                );
                return None;
            }
            if s == "host" {
                self.push(
                    Diagnostic::error("bad-name", "the name \"host\" means the host kernel")
                        .at(n.span())
                        .help("pick another name, e.g. name = \"host1\""),
                );
                return None;
            }
            if let Some(first) = before.iter().find(|c| c.name.as_deref() == Some(s)) {
                self.push(
                    Diagnostic::error("duplicate-name", format!("two instances are named \"{s}\""))
                        .at(n.span())
                        .related(first.span.clone(), "the first one is here")
                        .instance(s.clone())
                        .help(format!("rename this one, e.g. name = \"{}\"", unique_name(s, before))),
                );
            }
            Some(s.clone())
        });
        // How messages name this instance; a second "alpha" is "alpha (2nd)".
        let label = match &name {
            Some(n) => {
                let same = before
                    .iter()
                    .filter(|c| c.name.as_deref() == Some(n))
                    .count();
                if same == 0 {
                    n.clone()
                } else {
                    format!("{n} ({})", ordinal(same + 1))
                }
            }
            None => format!("instance #{}", before.len() + 1),
        };

        let id = ri.id.as_ref().and_then(|i| {
            let n = *i.get_ref();
            if n == 0 || n > InstanceId::MAX {
                self.push(
                    Diagnostic::error("bad-id", format!("instance id {n} is out of range"))
                        .at(i.span())
                        .instance(label.clone())
                        .help(format!(
                            "ids run from 1 to {} (0 is the host); the lowest free one is {}",
                            InstanceId::MAX,
                            free_id(before)
                        )),
                );
                return None;
            }
            if let Some(first) = before.iter().find(|c| c.id == Some(n)) {
                self.push(
                    Diagnostic::error(
                        "duplicate-id",
                        format!(
                            "instances \"{}\" and \"{label}\" both have id {n}",
                            first.label
                        ),
                    )
                    .at(i.span())
                    .related(first.span.clone(), format!("\"{}\" is here", first.label))
                    .instance(first.label.clone())
                    .instance(label.clone())
                    .help(format!(
                        "give \"{label}\" a free id, e.g. id = {}",
                        free_id(before)
                    )),
                );
            }
            Some(n)
        });

        let size = ri.memory.as_ref().and_then(|m| {
            let b = m.get_ref().0;
            if b == 0 {
                self.push(
                    Diagnostic::error("bad-value", format!("instance \"{label}\" has no memory"))
                        .at(m.span())
                        .instance(label.clone())
                        .help("give it at least 64M, e.g. memory = \"512M\""),
                );
                return None;
            }
            Some(b)
        });
        if let Some(c) = &ri.cpus {
            if c.get_ref().is_empty() {
                self.push(
                    Diagnostic::error("bad-value", format!("instance \"{label}\" has no CPUs"))
                        .at(c.span())
                        .instance(label.clone())
                        .help("give it at least one CPU, e.g. cpus = \"1\""),
                );
            }
        }

        let backend = ri
            .backend
            .as_ref()
            .map_or(default_backend, |b| *b.get_ref());
        let kernel = self.image(
            ri.kernel.as_ref().or(raw.defaults.kernel.as_ref()),
            "kernel",
            &label,
        );
        let initrd = self.image(
            ri.initrd.as_ref().or(raw.defaults.initrd.as_ref()),
            "initrd",
            &label,
        );
        let cmdline = ri
            .cmdline
            .as_ref()
            .or(raw.defaults.cmdline.as_ref())
            .map_or_else(String::new, |c| c.get_ref().clone());
        let restart = self.restart(ri, backend, &label);

        Checked {
            span: ri.span.clone(),
            name,
            label,
            id,
            cpus: ri
                .cpus
                .as_ref()
                .map(|c| c.get_ref().clone())
                .filter(|c| !c.is_empty()),
            cpus_span: ri.cpus.as_ref().map(Spanned::span),
            size,
            size_span: ri.memory.as_ref().map(Spanned::span),
            memory_base: ri.memory_base.clone(),
            numa_node: ri.numa_node.as_ref().map(|n| *n.get_ref()),
            backend,
            kernel,
            initrd,
            cmdline,
            restart,
        }
    }

    /// `restart` and `restart_limit`: a limit of at least 1; a limit
    /// without `restart = "on-failure"`, or a policy on an instance the
    /// daemon does not run (kexec), is a warning.
    fn restart(&mut self, ri: &RawInstance, backend: Backend, label: &str) -> Restart {
        let policy = ri
            .restart
            .as_ref()
            .map_or(RestartPolicy::No, |p| *p.get_ref());
        let limit = match &ri.restart_limit {
            Some(l) if *l.get_ref() == 0 => {
                self.push(
                    Diagnostic::error(
                        "bad-restart-limit",
                        format!("instance \"{label}\" has restart_limit = 0"),
                    )
                    .at(l.span())
                    .instance(label)
                    .help(format!(
                        "it is how many times the daemon restarts the instance: use 1 or more, \
                         e.g. restart_limit = {DEFAULT_RESTART_LIMIT}"
                    )),
                );
                DEFAULT_RESTART_LIMIT
            }
            Some(l) => *l.get_ref(),
            None => DEFAULT_RESTART_LIMIT,
        };
        // A `restart` that could not be read was reported already; the
        // limit beside it is not "unused" then.
        let unreadable_policy = ri.restart.is_none() && ri.restart_written;
        match policy {
            RestartPolicy::No => {
                if let (Some(l), false) = (&ri.restart_limit, unreadable_policy) {
                    self.push(
                        Diagnostic::warning(
                            "restart-limit-unused",
                            format!(
                                "restart_limit of \"{label}\" does nothing without \
                                 restart = \"on-failure\""
                            ),
                        )
                        .at(l.span())
                        .instance(label)
                        .help(
                            "add restart = \"on-failure\" to the instance, or remove restart_limit",
                        ),
                    );
                }
                Restart::No
            }
            RestartPolicy::OnFailure => {
                if backend == Backend::Kexec {
                    self.push(
                        Diagnostic::warning(
                            "restart-kexec",
                            format!(
                                "\"{label}\" uses the kexec backend, which the daemon does \
                                 not restart"
                            ),
                        )
                        .at_opt(ri.restart.as_ref().map(Spanned::span))
                        .instance(label)
                        .help("restart policies apply to backend = \"qemu\" instances; remove restart"),
                    );
                }
                Restart::OnFailure { limit }
            }
        }
    }

    /// `[defaults] files`: absolute guest paths, host files that exist.
    fn files(&mut self, raw: &RawTopology) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        for (guest, host) in &raw.defaults.files {
            if !guest.get_ref().starts_with('/') || guest.get_ref() == "/init" {
                self.push(
                    Diagnostic::error(
                        "bad-value",
                        format!(
                            "guest path \"{}\" must be absolute and not /init",
                            guest.get_ref()
                        ),
                    )
                    .at(guest.span())
                    .help(format!(
                        "write it as \"/bin/{}\"",
                        guest.get_ref().trim_start_matches('/')
                    )),
                );
                continue;
            }
            let path = self.base_dir.join(host.get_ref());
            if !path.is_file() {
                self.push(
                    Diagnostic::error("missing-file", format!("the file {} for the guests' {} does not exist", path.display(), guest.get_ref()))
                        .at(host.span())
                        .help("fix the path (relative paths start at the topology file's directory); test programs are built by scripts/setup.sh into .cache/"),
                );
                continue;
            }
            out.push((guest.get_ref().clone(), path));
        }
        out
    }

    /// A kernel or initrd: `"auto"`, for a kernel `"auto-<series>"` (a
    /// [`KernelSeries`]), or a file that must exist.
    fn image(&mut self, value: Option<&Spanned<String>>, what: &str, label: &str) -> ImageSpec {
        let Some(v) = value else {
            return ImageSpec::Auto;
        };
        if v.get_ref() == "auto" {
            return ImageSpec::Auto;
        }
        if let Some(series) = v.get_ref().strip_prefix("auto-") {
            let stock = || {
                KernelSeries::ALL
                    .iter()
                    .map(|k| format!("\"{}\"", k.spelling()))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            match KernelSeries::from_spelling(v.get_ref()) {
                Some(k) if what == "kernel" => return ImageSpec::AutoSeries(k),
                Some(_) => {
                    self.push(
                        Diagnostic::error(
                            "bad-value",
                            format!("{what} = \"{}\" names a stock kernel, not an initrd", v.get_ref()),
                        )
                        .at(v.span())
                        .instance(label.to_string())
                        .help(format!(
                            "write {what} = \"auto\" (mkctl builds the initramfs, with the modules of the instance's kernel) or a path"
                        )),
                    );
                }
                None => {
                    self.push(
                        Diagnostic::error(
                            "bad-value",
                            format!("there is no stock kernel \"{}\" (series {series})", v.get_ref()),
                        )
                        .at(v.span())
                        .instance(label.to_string())
                        .help(format!(
                            "write {what} = \"auto\" (the default stock kernel) or one of {} (qemu/setup.sh fetches them), or a path to a kernel image",
                            stock()
                        )),
                    );
                }
            }
            return ImageSpec::Auto;
        }
        let path = self.base_dir.join(v.get_ref());
        if !path.is_file() {
            let why = if path.exists() {
                "is not a regular file"
            } else {
                "does not exist"
            };
            self.push(
                Diagnostic::error("missing-file", format!("the {what} file {} {why}", path.display()))
                    .at(v.span())
                    .instance(label.to_string())
                    .help(format!(
                        "fix the path (relative paths start at the topology file's directory), or write {what} = \"auto\" for the one qemu/setup.sh prepares"
                    )),
            );
        }
        ImageSpec::Path(path)
    }

    /// CPUs: exist, are not the host's, are not given twice.
    fn cpu_ownership(&mut self, inst: &[Checked], m: &Machine, host: &HostShare) {
        let all = m.cpus();
        let mut owner: BTreeMap<u32, usize> = BTreeMap::new();
        for (i, c) in inst.iter().enumerate() {
            let (Some(cpus), Some(span)) = (&c.cpus, &c.cpus_span) else {
                continue;
            };
            // What this instance could use instead: nobody else's CPUs.
            let others = inst
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .filter_map(|(_, o)| o.cpus.as_ref())
                .fold(host.cpus.clone(), |acc, o| acc.union(o));
            let free = all.difference(&others);
            let want = cpus.len();
            let node = c
                .numa_node
                .or_else(|| m.nodes_of_cpus(cpus).first().copied());
            let suggestion = suggest_cpus(m, &free, want, node);
            let missing = cpus.difference(&all);
            if !missing.is_empty() {
                self.push(
                    Diagnostic::error(
                        "no-such-cpu",
                        format!("instance \"{}\" names {}, which this machine does not have (it has {all})", c.label, cpus_phrase(&missing)),
                    )
                    .at(span.clone())
                    .instance(c.label.clone())
                    .help(suggestion.clone()),
                );
            }
            let hosts = cpus.intersection(&host.cpus);
            if !hosts.is_empty() {
                self.push(
                    Diagnostic::error(
                        "host-cpu",
                        format!(
                            "instance \"{}\" takes {}, which the host kernel keeps",
                            c.label,
                            cpus_phrase(&hosts)
                        ),
                    )
                    .at(span.clone())
                    .instance(c.label.clone())
                    .help(suggestion.clone()),
                );
            }
            let mut clash: BTreeMap<usize, CpuSet> = BTreeMap::new();
            for cpu in cpus.intersection(&all).difference(&host.cpus).iter() {
                match owner.get(&cpu) {
                    Some(&j) => clash.entry(j).or_default().insert(cpu),
                    None => {
                        owner.insert(cpu, i);
                    }
                }
            }
            for (j, both) in clash {
                let first = &inst[j];
                self.push(
                    Diagnostic::error(
                        "cpu-conflict",
                        format!(
                            "{} given to both \"{}\" and \"{}\"",
                            cpus_phrase_verb(&both),
                            first.label,
                            c.label
                        ),
                    )
                    .at(span.clone())
                    .related(
                        first.cpus_span.clone().unwrap_or_default(),
                        format!("\"{}\" takes them here", first.label),
                    )
                    .instance(first.label.clone())
                    .instance(c.label.clone())
                    .help(suggestion.clone()),
                );
            }
        }
    }

    fn window(&mut self, raw: &RawTopology, pool: Option<&Pool>, _inst: &[Checked]) -> WindowPlan {
        let size = raw
            .window
            .size
            .as_ref()
            .map_or(DEFAULT_WINDOW, |s| s.get_ref().0);
        let span = raw.window.size.as_ref().map(Spanned::span);
        if !size.is_power_of_two() || size < 64 * KIB {
            self.push(
                Diagnostic::error(
                    "bad-window",
                    format!(
                        "window size {} is not a power of two of at least 64K",
                        ByteSize(size)
                    ),
                )
                .at_opt(span.clone())
                .help(format!(
                    "ivshmem needs a power of two: use size = \"{}\"",
                    ByteSize(size.max(64 * KIB).next_power_of_two())
                )),
            );
        }
        let range = raw.window.base.as_ref().and_then(|b| {
            let r = MemRange::new(b.get_ref().0, size)?;
            if let Some(p) = pool {
                if b.get_ref().0 % p.align.0 != 0 {
                    self.push(misaligned(
                        "window base",
                        b.get_ref().0,
                        p.align.0,
                        b.span(),
                        "base",
                    ));
                }
                if !p.range.contains(&r) {
                    self.push(
                        Diagnostic::error(
                            "window-outside",
                            format!("the window {r} is not inside the pool {}", p.range),
                        )
                        .at(b.span())
                        .help(format!(
                            "place it in the pool, e.g. base = \"{:#x}\"",
                            p.range.end.0.saturating_sub(size)
                        )),
                    );
                }
            }
            Some(r)
        });
        WindowPlan {
            spec: WindowSpec {
                size: ByteSize(size),
                range,
            },
            span: raw.window.base.as_ref().map(Spanned::span),
        }
    }

    /// Checks explicit memory ranges and places the rest, first fit in the
    /// pool, on the instance's NUMA node when that part of the pool has room.
    fn place_memory(
        &mut self,
        raw: &RawTopology,
        m: &Machine,
        pool: &Pool,
        inst: &[Checked],
        window: &WindowPlan,
    ) -> Option<Vec<MemRange>> {
        let align = pool.align.0;
        let mut ok = true;
        // Sizes must be aligned, and must fit in total.
        for c in inst {
            if let (Some(sz), Some(span)) = (c.size, &c.size_span) {
                if sz % align != 0 {
                    self.push(
                        misaligned(
                            &format!("memory size of \"{}\"", c.label),
                            sz,
                            align,
                            span.clone(),
                            "memory",
                        )
                        .instance(c.label.clone()),
                    );
                    ok = false;
                }
            }
        }
        let window_take = window.spec.range.map_or(0, |r| r.size());
        let total: u64 = inst.iter().filter_map(|c| c.size).sum::<u64>() + window_take;
        if total > pool.range.size() {
            let over = total - pool.range.size();
            let mut d = Diagnostic::error(
                "pool-overcommit",
                format!(
                    "instances need {} in total{} but the pool holds {}",
                    ByteSize(total),
                    if window_take > 0 {
                        " (with the window)"
                    } else {
                        ""
                    },
                    ByteSize(pool.range.size())
                ),
            )
            .at_opt(
                raw.pool
                    .as_ref()
                    .and_then(|p| p.size.as_ref())
                    .map(Spanned::span),
            )
            .help(format!(
                "enlarge the pool to size = \"{}\", or shrink the instances by {} in total",
                ByteSize(align_up(total, align).unwrap_or(total)),
                ByteSize(over)
            ));
            for c in inst {
                d = d.instance(c.label.clone());
            }
            self.push(d);
            return None;
        }

        // Explicit ranges: aligned, inside the pool, not overlapping.
        let mut taken: Vec<Taken> = Vec::new();
        if let Some(r) = window.spec.range {
            taken.push((
                r,
                "the window".into(),
                window.span.clone().unwrap_or_default(),
            ));
        }
        let mut placed: Vec<Option<MemRange>> = vec![None; inst.len()];
        for (i, c) in inst.iter().enumerate() {
            let (Some(b), Some(sz)) = (&c.memory_base, c.size) else {
                continue;
            };
            let base = b.get_ref().0;
            let Some(r) = MemRange::new(base, sz) else {
                ok = false;
                continue;
            };
            let mut bad = false;
            if base % align != 0 {
                self.push(
                    misaligned(
                        &format!("memory base of \"{}\"", c.label),
                        base,
                        align,
                        b.span(),
                        "memory_base",
                    )
                    .instance(c.label.clone()),
                );
                bad = true;
            }
            if !pool.range.contains(&r) {
                let hint = free_base_hint(pool, &taken, sz, align, m);
                self.push(
                    Diagnostic::error(
                        "memory-outside-pool",
                        format!(
                            "memory {r} of \"{}\" is outside the pool {}",
                            c.label, pool.range
                        ),
                    )
                    .at(b.span())
                    .instance(c.label.clone())
                    .help(hint),
                );
                bad = true;
            }
            for (t, who, tspan) in &taken {
                if t.overlaps(&r) {
                    let hint = free_base_hint(pool, &taken, sz, align, m);
                    self.push(
                        Diagnostic::error(
                            "memory-overlap",
                            format!("memory {r} of \"{}\" overlaps {who} {t}", c.label),
                        )
                        .at(b.span())
                        .related(tspan.clone(), format!("{who} is here"))
                        .instance(who.trim_matches('"').to_string())
                        .instance(c.label.clone())
                        .help(hint),
                    );
                    bad = true;
                }
            }
            if bad {
                ok = false;
            } else {
                taken.push((r, format!("\"{}\"", c.label), b.span()));
                placed[i] = Some(r);
            }
        }
        // A kexec window without a base takes the top of the pool.
        if window.spec.range.is_none() && inst.iter().any(|c| c.backend == Backend::Kexec) {
            let size = window.spec.size.0;
            let top = MemRange::new(pool.range.end.0.saturating_sub(size) & !(align - 1), size)?;
            if taken.iter().all(|(t, _, _)| !t.overlaps(&top)) {
                taken.push((top, "the window".into(), 0..0));
            }
        }
        if !ok {
            return None;
        }
        // Place the others, largest first for less fragmentation.
        let mut order: Vec<usize> = (0..inst.len()).filter(|&i| placed[i].is_none()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(inst[i].size.unwrap_or(0)));
        for i in order {
            let c = &inst[i];
            let Some(sz) = c.size else {
                ok = false;
                continue;
            };
            let node = c.numa_node.or_else(|| {
                c.cpus
                    .as_ref()
                    .and_then(|cp| m.nodes_of_cpus(cp).first().copied())
            });
            match next_free(pool, &taken, sz, align, node, m)
                .or_else(|| next_free(pool, &taken, sz, align, None, m))
            {
                Some(r) => {
                    taken.push((r, format!("\"{}\"", c.label), c.span.clone()));
                    placed[i] = Some(r);
                }
                None => {
                    let largest = largest_gap(pool, &taken, align);
                    self.push(
                        Diagnostic::error("pool-fragmented", format!("no free aligned range of {} is left in the pool for \"{}\"", ByteSize(sz), c.label))
                            .at_opt(c.size_span.clone())
                            .instance(c.label.clone())
                            .help(format!("the largest free range is {} at {:#x}; shrink the instance or move the explicit memory_base values together", ByteSize(largest.size()), largest.start.0)),
                    );
                    ok = false;
                }
            }
        }
        if !ok {
            return None;
        }
        Some(placed.into_iter().map(|p| p.expect("placed")).collect())
    }

    fn numa_warnings(&mut self, m: &Machine, inst: &[Checked], placed: &[MemRange]) {
        for (c, mem) in inst.iter().zip(placed) {
            let Some(cpus) = &c.cpus else { continue };
            let cpu_nodes = m.nodes_of_cpus(cpus);
            let mem_nodes = m.nodes_of_range(mem);
            let span = c.cpus_span.clone();
            if let Some(n) = c.numa_node {
                if m.node(n).is_none() {
                    self.push(
                        Diagnostic::error(
                            "no-such-node",
                            format!(
                                "instance \"{}\" asks for NUMA node {n}, which does not exist",
                                c.label
                            ),
                        )
                        .at(c.span.clone())
                        .instance(c.label.clone())
                        .help(format!(
                            "the machine has nodes {}",
                            m.nodes
                                .iter()
                                .map(|n| n.id.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )),
                    );
                    continue;
                }
                if cpu_nodes.iter().any(|&x| x != n) {
                    let on_node = &m.node(n).expect("checked").cpus;
                    self.push(
                        Diagnostic::warning("numa-split", format!("instance \"{}\" is meant for node {n} but CPUs {} are on node(s) {}", c.label, cpus.difference(on_node), join(&cpu_nodes)))
                            .at_opt(span.clone())
                            .instance(c.label.clone())
                            .help(format!("use CPUs of node {n} ({on_node})")),
                    );
                }
            } else if cpu_nodes.len() > 1 {
                self.push(
                    Diagnostic::warning("numa-split", format!("the CPUs of \"{}\" span NUMA nodes {}", c.label, join(&cpu_nodes)))
                        .at_opt(span.clone())
                        .instance(c.label.clone())
                        .help("keep an instance's CPUs on one node, or set numa_node to say which one its memory should come from"),
                );
            }
            if !cpu_nodes.is_empty() && mem_nodes.iter().any(|x| !cpu_nodes.contains(x)) {
                self.push(
                    Diagnostic::warning(
                        "numa-split",
                        format!("the CPUs of \"{}\" are on node(s) {} but its memory {mem} is on node(s) {}", c.label, join(&cpu_nodes), join(&mem_nodes)),
                    )
                    .at_opt(c.memory_base.as_ref().map(Spanned::span).or(span))
                    .instance(c.label.clone())
                    .help("every access would cross the interconnect: move memory_base into the CPUs' node, or enlarge the pool's part on that node"),
                );
            }
        }
    }
}

fn misaligned(what: &str, value: u64, align: u64, span: Range<usize>, key: &str) -> Diagnostic {
    let up = align_up(value, align).unwrap_or(value);
    let down = value & !(align - 1);
    let fmt = |v: u64| {
        if key.contains("base") {
            format!("{v:#x}")
        } else {
            ByteSize(v).to_string()
        }
    };
    let choice = if down != 0 && down != up {
        format!("{key} = \"{}\" or \"{}\"", fmt(down), fmt(up))
    } else {
        format!("{key} = \"{}\"", fmt(up))
    };
    Diagnostic::error(
        "misaligned",
        format!(
            "{what} {} is not a multiple of the pool alignment {}",
            fmt(value),
            ByteSize(align)
        ),
    )
    .at(span)
    .help(format!("round it: {choice}"))
}

/// True when `r` is covered by the union of `ranges`.
fn covered(ranges: &[MemRange], r: &MemRange) -> bool {
    let mut sorted = ranges.to_vec();
    sorted.sort();
    let mut at = r.start.0;
    for s in sorted {
        if s.start.0 <= at && s.end.0 > at {
            at = s.end.0;
        }
        if at >= r.end.0 {
            return true;
        }
    }
    at >= r.end.0
}

/// "use memory_base = ..." with the next free aligned base for `size` bytes.
fn free_base_hint(pool: &Pool, taken: &[Taken], size: u64, align: u64, m: &Machine) -> String {
    next_free(pool, taken, size, align, None, m).map_or_else(
        || "no free range of that size is left in the pool".to_string(),
        |f| {
            format!(
                "use memory_base = \"{:#x}\" (the next free aligned base)",
                f.start.0
            )
        },
    )
}

/// A concrete CPU suggestion: `want` free CPUs, from `node` first.
fn suggest_cpus(m: &Machine, free: &CpuSet, want: usize, node: Option<u32>) -> String {
    let on_node = node
        .and_then(|n| m.node(n))
        .map(|n| free.intersection(&n.cpus))
        .unwrap_or_default();
    let pick = if on_node.len() >= want {
        on_node.take(want)
    } else {
        free.take(want)
    };
    if pick.len() == want && want > 0 {
        format!("use free CPUs instead: cpus = \"{pick}\"")
    } else if free.is_empty() {
        "no CPU is free: take CPUs from another instance, or give the host fewer".into()
    } else {
        format!(
            "only {} free: use cpus = \"{free}\" or fewer",
            cpus_phrase_verb(free)
        )
    }
}

fn free_id(before: &[Checked]) -> u32 {
    let used: Vec<u32> = before.iter().filter_map(|c| c.id).collect();
    (1..=InstanceId::MAX)
        .find(|i| !used.contains(i))
        .unwrap_or(1)
}

fn unique_name(s: &str, before: &[Checked]) -> String {
    let names: HashMap<&str, ()> = before
        .iter()
        .filter_map(|c| c.name.as_deref())
        .map(|n| (n, ()))
        .collect();
    (2..)
        .map(|i| format!("{s}-{i}"))
        .find(|n| !names.contains_key(n.as_str()))
        .expect("unbounded")
}

fn sanitize(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(NAME_MAX)
        .collect();
    if !out.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) {
        out.insert(0, 'k');
        out.truncate(NAME_MAX);
    }
    out
}

fn join(v: &[u32]) -> String {
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}

/// "CPU 3" or "CPUs 3-4".
fn cpus_phrase(c: &CpuSet) -> String {
    if c.len() == 1 {
        format!("CPU {c}")
    } else {
        format!("CPUs {c}")
    }
}

/// "CPU 3 is" or "CPUs 3-4 are".
fn cpus_phrase_verb(c: &CpuSet) -> String {
    if c.len() == 1 {
        format!("CPU {c} is")
    } else {
        format!("CPUs {c} are")
    }
}

fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (1, x) if x != 11 => "st",
        (2, x) if x != 12 => "nd",
        (3, x) if x != 13 => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}
