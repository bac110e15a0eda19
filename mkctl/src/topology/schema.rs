//! The written form of a topology: reads the TOML document (with spans) into
//! raw, unchecked structs, reporting every unknown key, wrong type and
//! unparsable value at once rather than stopping at the first.
//!
//! We walk the spanned TOML tree ourselves instead of deriving serde
//! `Deserialize` with `deny_unknown_fields`, because serde stops at the first
//! error and a topology author deserves the whole list in one run. Meaning
//! (overlaps, ownership, pool bounds) is checked later by `validate`.

use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::diag::{did_you_mean, Diagnostic};
use crate::units::{ByteSize, CpuSet, PhysAddr};

/// How an instance is booted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Each instance is a QEMU process running a real kernel (dev, CI).
    Qemu,
    /// The Linux multikernel interface: kexec into reserved CPUs and memory.
    Kexec,
}

impl Backend {
    pub const NAMES: [&'static str; 2] = ["qemu", "kexec"];

    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Qemu => "qemu",
            Backend::Kexec => "kexec",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the daemon does when an instance fails (`restart` in an
/// `[[instance]]`); the limit is `restart_limit`, combined with this into
/// [`super::model::Restart`] by `validate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Nothing: a failed instance stays failed until someone restarts it.
    No,
    /// The daemon restarts it, up to `restart_limit` times.
    OnFailure,
}

#[derive(Debug, Default)]
pub struct RawTopology {
    pub machine: Option<RawMachine>,
    pub host: RawHost,
    pub pool: Option<RawPool>,
    pub window: RawWindow,
    pub defaults: RawDefaults,
    pub instances: Vec<RawInstance>,
}

#[derive(Debug)]
pub struct RawMachine {
    pub span: Range<usize>,
    pub nodes: Vec<RawNode>,
}

#[derive(Debug)]
pub struct RawNode {
    pub span: Range<usize>,
    pub id: Option<Spanned<u32>>,
    pub cpus: Option<Spanned<CpuSet>>,
    pub memory: Option<Spanned<ByteSize>>,
    pub memory_base: Option<Spanned<PhysAddr>>,
}

#[derive(Debug, Default)]
pub struct RawHost {
    pub cpus: Option<Spanned<CpuSet>>,
    pub memory: Option<Spanned<ByteSize>>,
}

#[derive(Debug)]
pub struct RawPool {
    pub span: Range<usize>,
    pub base: Option<Spanned<PhysAddr>>,
    pub size: Option<Spanned<ByteSize>>,
    pub align: Option<Spanned<ByteSize>>,
}

#[derive(Debug, Default)]
pub struct RawWindow {
    pub size: Option<Spanned<ByteSize>>,
    pub base: Option<Spanned<PhysAddr>>,
}

#[derive(Debug, Default)]
pub struct RawDefaults {
    /// Extra files for the guests' initramfs: guest path -> host path.
    pub files: Vec<(Spanned<String>, Spanned<String>)>,
    pub backend: Option<Spanned<Backend>>,
    pub kernel: Option<Spanned<String>>,
    pub initrd: Option<Spanned<String>>,
    pub cmdline: Option<Spanned<String>>,
}

#[derive(Debug)]
pub struct RawInstance {
    pub span: Range<usize>,
    pub name: Option<Spanned<String>>,
    pub id: Option<Spanned<u32>>,
    pub cpus: Option<Spanned<CpuSet>>,
    pub memory: Option<Spanned<ByteSize>>,
    pub memory_base: Option<Spanned<PhysAddr>>,
    pub numa_node: Option<Spanned<u32>>,
    pub backend: Option<Spanned<Backend>>,
    pub kernel: Option<Spanned<String>>,
    pub initrd: Option<Spanned<String>>,
    pub cmdline: Option<Spanned<String>>,
    pub restart: Option<Spanned<RestartPolicy>>,
    /// `restart` is in the table (`restart` is `None` when it could not be
    /// read).
    pub restart_written: bool,
    pub restart_limit: Option<Spanned<u32>>,
}

/// Reads the document. Returns the raw topology (fields that could not be
/// read are `None`) and every problem found on the way.
pub fn read(text: &str) -> (RawTopology, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let (doc, errors) = DeTable::parse_recoverable(text);
    for e in errors {
        diags.push(
            Diagnostic::error("toml-syntax", e.message().trim().to_string())
                .at_opt(e.span())
                .help("fix the TOML syntax at this place"),
        );
    }
    if diags.iter().any(Diagnostic::is_error) {
        // A broken document gives misleading follow-up errors; stop here.
        return (RawTopology::default(), diags);
    }
    let span = doc.span();
    let mut top = Reader::new(doc.get_ref(), span, "the top level", &mut diags);
    let machine = top
        .table("machine")
        .map(|(t, s)| read_machine(t, s, top.diags));
    let host = top
        .table("host")
        .map(|(t, s)| read_host(t, s, top.diags))
        .unwrap_or_default();
    let pool = top.table("pool").map(|(t, s)| read_pool(t, s, top.diags));
    let window = top
        .table("window")
        .map(|(t, s)| read_window(t, s, top.diags))
        .unwrap_or_default();
    let defaults = top
        .table("defaults")
        .map(|(t, s)| read_defaults(t, s, top.diags))
        .unwrap_or_default();
    let instances = top
        .array_of_tables("instance")
        .into_iter()
        .map(|(t, s)| read_instance(t, s, top.diags))
        .collect();
    top.finish();
    (
        RawTopology {
            machine,
            host,
            pool,
            window,
            defaults,
            instances,
        },
        diags,
    )
}

fn read_machine(t: &DeTable<'_>, span: Range<usize>, diags: &mut Vec<Diagnostic>) -> RawMachine {
    let mut r = Reader::new(t, span.clone(), "[machine]", diags);
    let nodes = r
        .array_of_tables("node")
        .into_iter()
        .map(|(t, s)| {
            let mut n = Reader::new(t, s.clone(), "[[machine.node]]", r.diags);
            let node = RawNode {
                span: s.clone(),
                id: n.required(n_u32, "id", "a NUMA node number, e.g. id = 0"),
                cpus: n.required(n_cpus, "cpus", "the node's CPUs, e.g. cpus = \"0-3\""),
                memory: n.required(
                    n_size,
                    "memory",
                    "the node's memory size, e.g. memory = \"4G\"",
                ),
                memory_base: n.optional(n_addr, "memory_base"),
            };
            n.finish();
            node
        })
        .collect();
    r.finish();
    RawMachine { span, nodes }
}

fn read_host(t: &DeTable<'_>, span: Range<usize>, diags: &mut Vec<Diagnostic>) -> RawHost {
    let mut r = Reader::new(t, span, "[host]", diags);
    let host = RawHost {
        cpus: r.optional(n_cpus, "cpus"),
        memory: r.optional(n_size, "memory"),
    };
    r.finish();
    host
}

fn read_pool(t: &DeTable<'_>, span: Range<usize>, diags: &mut Vec<Diagnostic>) -> RawPool {
    let mut r = Reader::new(t, span.clone(), "[pool]", diags);
    let pool = RawPool {
        span,
        base: r.optional(n_addr, "base"),
        size: r.required(n_size, "size", "the pool's size, e.g. size = \"8G\""),
        align: r.optional(n_size, "align"),
    };
    r.finish();
    pool
}

fn read_window(t: &DeTable<'_>, span: Range<usize>, diags: &mut Vec<Diagnostic>) -> RawWindow {
    let mut r = Reader::new(t, span, "[window]", diags);
    let w = RawWindow {
        size: r.optional(n_size, "size"),
        base: r.optional(n_addr, "base"),
    };
    r.finish();
    w
}

fn read_defaults(t: &DeTable<'_>, span: Range<usize>, diags: &mut Vec<Diagnostic>) -> RawDefaults {
    let mut r = Reader::new(t, span, "[defaults]", diags);
    let files = r.string_table("files");
    let d = RawDefaults {
        files,
        backend: r.optional(n_backend, "backend"),
        kernel: r.optional(n_string, "kernel"),
        initrd: r.optional(n_string, "initrd"),
        cmdline: r.optional(n_string, "cmdline"),
    };
    r.finish();
    d
}

fn read_instance(t: &DeTable<'_>, span: Range<usize>, diags: &mut Vec<Diagnostic>) -> RawInstance {
    let mut r = Reader::new(t, span.clone(), "[[instance]]", diags);
    let i = RawInstance {
        span,
        name: r.required(n_string, "name", "a unique name, e.g. name = \"alpha\""),
        id: r.required(n_u32, "id", "a unique id from 1 to 511, e.g. id = 1"),
        cpus: r.required(n_cpus, "cpus", "the instance's CPUs, e.g. cpus = \"2-3\""),
        memory: r.required(
            n_size,
            "memory",
            "the instance's memory size, e.g. memory = \"512M\"",
        ),
        memory_base: r.optional(n_addr, "memory_base"),
        numa_node: r.optional(n_u32, "numa_node"),
        backend: r.optional(n_backend, "backend"),
        kernel: r.optional(n_string, "kernel"),
        initrd: r.optional(n_string, "initrd"),
        cmdline: r.optional(n_string, "cmdline"),
        restart: r.optional(n_restart, "restart"),
        restart_written: t.iter().any(|(k, _)| k.get_ref().as_ref() == "restart"),
        restart_limit: r.optional(n_u32, "restart_limit"),
    };
    r.finish();
    i
}

/// Converts one TOML value into a typed value, or says what was expected.
type Convert<T> = fn(&DeValue<'_>) -> Result<T, String>;

fn n_string(v: &DeValue<'_>) -> Result<String, String> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("expected a string, found {}", v.type_str()))
}

fn n_u32(v: &DeValue<'_>) -> Result<u32, String> {
    let i = int_value(v)?;
    u32::try_from(i).map_err(|_| format!("{i} is out of range (0 to {})", u32::MAX))
}

fn int_value(v: &DeValue<'_>) -> Result<u64, String> {
    match v {
        DeValue::Integer(i) => {
            let digits = i.as_str().replace('_', "");
            let digits = digits.trim_start_matches('+');
            u64::from_str_radix(digits, i.radix())
                .map_err(|_| format!("expected a non-negative integer, found {}", i.as_str()))
        }
        other => Err(format!("expected an integer, found {}", other.type_str())),
    }
}

fn n_cpus(v: &DeValue<'_>) -> Result<CpuSet, String> {
    match v {
        DeValue::String(s) => CpuSet::parse(s),
        DeValue::Integer(_) => Ok(CpuSet::from_cpus([n_u32(v)?])),
        other => Err(format!(
            "expected a CPU list string like \"2-3,6\", found {}",
            other.type_str()
        )),
    }
}

fn n_size(v: &DeValue<'_>) -> Result<ByteSize, String> {
    match v {
        DeValue::String(s) => ByteSize::parse(s),
        DeValue::Integer(_) => int_value(v).map(ByteSize),
        other => Err(format!(
            "expected a size like \"512M\", \"4G\" or \"0x20000000\", found {}",
            other.type_str()
        )),
    }
}

fn n_addr(v: &DeValue<'_>) -> Result<PhysAddr, String> {
    n_size(v).map(|s| PhysAddr(s.0))
}

fn n_backend(v: &DeValue<'_>) -> Result<Backend, String> {
    match v.as_str() {
        Some("qemu") => Ok(Backend::Qemu),
        Some("kexec") => Ok(Backend::Kexec),
        Some(other) => Err(format!(
            "unknown backend \"{other}\"; use \"qemu\" or \"kexec\""
        )),
        None => Err(format!(
            "expected \"qemu\" or \"kexec\", found {}",
            v.type_str()
        )),
    }
}

fn n_restart(v: &DeValue<'_>) -> Result<RestartPolicy, String> {
    match v.as_str() {
        Some("no") => Ok(RestartPolicy::No),
        Some("on-failure") => Ok(RestartPolicy::OnFailure),
        Some(other) => Err(format!(
            "unknown restart policy \"{other}\"; use \"no\" or \"on-failure\""
        )),
        None => Err(format!(
            "expected \"no\" or \"on-failure\", found {}",
            v.type_str()
        )),
    }
}

/// Reads keys out of one table and remembers which were asked for, so that
/// `finish` can report the rest as unknown.
struct Reader<'t, 'd, 'i> {
    table: &'t DeTable<'i>,
    span: Range<usize>,
    section: &'static str,
    known: Vec<&'static str>,
    diags: &'d mut Vec<Diagnostic>,
}

impl<'t, 'd, 'i> Reader<'t, 'd, 'i> {
    fn new(
        table: &'t DeTable<'i>,
        span: Range<usize>,
        section: &'static str,
        diags: &'d mut Vec<Diagnostic>,
    ) -> Self {
        Self {
            table,
            span,
            section,
            known: Vec::new(),
            diags,
        }
    }

    fn get(&mut self, key: &'static str) -> Option<&'t Spanned<DeValue<'i>>> {
        self.known.push(key);
        self.table
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == key)
            .map(|(_, v)| v)
    }

    fn optional<T>(&mut self, conv: Convert<T>, key: &'static str) -> Option<Spanned<T>> {
        let v = self.get(key)?;
        match conv(v.get_ref()) {
            Ok(x) => Some(Spanned::new(v.span(), x)),
            Err(msg) => {
                let d =
                    Diagnostic::error("bad-value", format!("`{key}` in {}: {msg}", self.section))
                        .at(v.span());
                self.diags.push(d);
                None
            }
        }
    }

    fn required<T>(
        &mut self,
        conv: Convert<T>,
        key: &'static str,
        example: &str,
    ) -> Option<Spanned<T>> {
        let present = self.get(key).is_some();
        self.known.pop();
        if !present {
            self.known.push(key);
            // A misspelling of it is reported once, as an unknown key that
            // suggests this one (see `finish`).
            let misspelt = self
                .table
                .iter()
                .any(|(k, _)| did_you_mean(k.get_ref().as_ref(), &[key]).is_some());
            if misspelt {
                return None;
            }
            let d = Diagnostic::error("missing-key", format!("{} has no `{key}`", self.section))
                .at(self.span.clone())
                .help(format!("add {example}"));
            self.diags.push(d);
            return None;
        }
        self.optional(conv, key)
    }

    /// A table of strings to strings (`files = { "/bin/x" = "x" }`).
    fn string_table(&mut self, key: &'static str) -> Vec<(Spanned<String>, Spanned<String>)> {
        let Some((t, _)) = self.table(key) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in t.iter() {
            match v.get_ref().as_str() {
                Some(val) => out.push((
                    Spanned::new(k.span(), k.get_ref().to_string()),
                    Spanned::new(v.span(), val.to_string()),
                )),
                None => self.diags.push(
                    Diagnostic::error(
                        "bad-value",
                        format!(
                            "`{key}.\"{}\"` must be a host path (a string), found {}",
                            k.get_ref(),
                            v.get_ref().type_str()
                        ),
                    )
                    .at(v.span()),
                ),
            }
        }
        out
    }

    fn table(&mut self, key: &'static str) -> Option<(&'t DeTable<'i>, Range<usize>)> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Table(t) => Some((t, v.span())),
            other => {
                let d = Diagnostic::error(
                    "bad-value",
                    format!(
                        "`{key}` must be a table ([{key}]), found {}",
                        other.type_str()
                    ),
                )
                .at(v.span());
                self.diags.push(d);
                None
            }
        }
    }

    fn array_of_tables(&mut self, key: &'static str) -> Vec<(&'t DeTable<'i>, Range<usize>)> {
        let Some(v) = self.get(key) else {
            return Vec::new();
        };
        let what = if self.section == "the top level" {
            format!("[[{key}]]")
        } else {
            format!("[[{}.{key}]]", self.section.trim_matches(['[', ']']))
        };
        match v.get_ref() {
            DeValue::Array(items) => {
                let mut out = Vec::new();
                for item in items.iter() {
                    match item.get_ref() {
                        DeValue::Table(t) => out.push((t, item.span())),
                        other => self.diags.push(
                            Diagnostic::error(
                                "bad-value",
                                format!("each `{key}` must be a table, found {}", other.type_str()),
                            )
                            .at(item.span())
                            .help(format!("write each one as a {what} table")),
                        ),
                    }
                }
                out
            }
            other => {
                let d = Diagnostic::error(
                    "bad-value",
                    format!(
                        "`{key}` must be an array of tables, found {}",
                        other.type_str()
                    ),
                )
                .at(v.span())
                .help(format!(
                    "write each one as a {what} table (double brackets)"
                ));
                self.diags.push(d);
                Vec::new()
            }
        }
    }

    /// Reports every key of the table that was never asked for.
    fn finish(self) {
        for (k, _) in self.table.iter() {
            let key: &str = k.get_ref().as_ref();
            if self.known.contains(&key) {
                continue;
            }
            let help = match did_you_mean(key, &self.known) {
                Some(s) => format!(
                    "did you mean `{s}`? (known keys: {})",
                    self.known.join(", ")
                ),
                None => format!("known keys in {}: {}", self.section, self.known.join(", ")),
            };
            self.diags.push(
                Diagnostic::error(
                    "unknown-key",
                    format!("unknown key `{key}` in {}", self.section),
                )
                .at(k.span())
                .help(help),
            );
        }
    }
}
