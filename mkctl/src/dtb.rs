//! Device trees for the Linux multikernel interface.
//!
//! A topology compiles to a small tree ([`DtNode`]) that is written either as
//! a flattened blob for `/sys/fs/multikernel/device_tree`, or
//! as DTS text for people and diffs. This module builds trees; it never
//! writes to the kernel.
//!
//! Generation `v1` (the LKML RFC v2 series, October 2025; see
//! `include/linux/multikernel.h` there: `MK_FDT_COMPATIBLE "multikernel-v1"`,
//! `MK_DT_RESOURCE_MEMORY "memory-bytes"`, `MK_DT_RESOURCE_CPUS "cpus"`):
//!
//! ```text
//! / { compatible = "multikernel-v1";
//!     instances { <name> { id = <N>;
//!         resources { cpus = <logical cpu ...>;        // u32 cells
//!                     memory-bytes = /bits/ 64 <size>;
//!                     memory-base = /bits/ 64 <base>; // only when the file gives it
//! }; }; }; };
//! ```
//!
//! Generation `current` (GitHub `multikernel/linux`, tag v7.0-mk2 and later,
//! spoken by kerf 0.4.0): the host gives resources to a pool once with a
//! *baseline* written to `device_tree`, and every later change is an
//! *overlay* written to `overlays/new` (see [`current_baseline`],
//! [`create_overlay`], [`remove_overlay`], [`pool_overlay`]). CPUs there are
//! physical ids (x86 APIC ids) in 64-bit cells; the kernel places memory
//! itself, so neither tree carries a base address.
//!
//! [`parse_dtb`] reads a blob back (the kernel's read-back of the pool, a
//! peer's output in tests) into the same [`DtNode`] form, with every value
//! as raw bytes ([`DtValue::Bytes`]); [`DtNode::canonical`] turns a built
//! tree into that form so two trees compare node by node.

use std::fmt::Write as _;

use crate::topology::{Instance, Topology};
use crate::units::InstanceId;

/// The root `compatible` of the v1 interface.
pub const V1_COMPATIBLE: &str = "multikernel-v1";

/// A property value, as the kernel reads it (cells are big-endian in the blob).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DtValue {
    String(String),
    U32(Vec<u32>),
    U64(Vec<u64>),
    /// Raw bytes: what [`parse_dtb`] yields, and empty (boolean) properties.
    Bytes(Vec<u8>),
}

impl DtValue {
    /// The bytes this value has in a blob.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            DtValue::String(s) => {
                let mut b = s.as_bytes().to_vec();
                b.push(0);
                b
            }
            DtValue::U32(v) => v.iter().flat_map(|x| x.to_be_bytes()).collect(),
            DtValue::U64(v) => v.iter().flat_map(|x| x.to_be_bytes()).collect(),
            DtValue::Bytes(b) => b.clone(),
        }
    }

    /// The value read as big-endian u32 cells, if its length allows.
    pub fn as_u32s(&self) -> Option<Vec<u32>> {
        let b = self.to_bytes();
        if !b.len().is_multiple_of(4) {
            return None;
        }
        Some(
            b.chunks_exact(4)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }

    /// The value read as big-endian u64 cells, if its length allows.
    pub fn as_u64s(&self) -> Option<Vec<u64>> {
        let b = self.to_bytes();
        if !b.len().is_multiple_of(8) {
            return None;
        }
        Some(
            b.chunks_exact(8)
                .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        )
    }

    /// The value read as one NUL-terminated string.
    pub fn as_str(&self) -> Option<String> {
        let b = self.to_bytes();
        let (last, body) = b.split_last()?;
        if *last != 0 || body.contains(&0) {
            return None;
        }
        String::from_utf8(body.to_vec()).ok()
    }
}

/// One node of a device tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DtNode {
    pub name: String,
    pub props: Vec<(String, DtValue)>,
    pub children: Vec<DtNode>,
}

impl DtNode {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            props: Vec::new(),
            children: Vec::new(),
        }
    }

    pub fn prop(mut self, name: &str, value: DtValue) -> Self {
        self.props.push((name.to_string(), value));
        self
    }

    pub fn child(mut self, node: DtNode) -> Self {
        self.children.push(node);
        self
    }

    /// The value of property `name` of this node.
    pub fn get(&self, name: &str) -> Option<&DtValue> {
        self.props.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The direct child called `name`.
    pub fn sub(&self, name: &str) -> Option<&DtNode> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The node at `path` below this one (`"resources/memory@0"`).
    pub fn at(&self, path: &str) -> Option<&DtNode> {
        path.split('/')
            .filter(|p| !p.is_empty())
            .try_fold(self, |n, p| n.sub(p))
    }

    /// The same tree with every value as raw bytes, the form [`parse_dtb`]
    /// yields: two trees are equal node by node when their canonical forms
    /// are equal.
    pub fn canonical(&self) -> DtNode {
        DtNode {
            name: self.name.clone(),
            props: self
                .props
                .iter()
                .map(|(n, v)| (n.clone(), DtValue::Bytes(v.to_bytes())))
                .collect(),
            children: self.children.iter().map(DtNode::canonical).collect(),
        }
    }

    /// Every difference between `self` and `other`, one line each, named by
    /// path (`/resources/memory@0: size: 0x.. != 0x..`). Props and children
    /// are compared by name, so order does not matter.
    pub fn diff(&self, other: &DtNode) -> Vec<String> {
        let mut out = Vec::new();
        diff_nodes(&self.canonical(), &other.canonical(), "", &mut out);
        out
    }

    /// The flattened blob (FDT version 17, empty memory reservation map,
    /// property names shared in the strings block).
    ///
    /// Written here rather than with vm-fdt: its writer refuses node names
    /// that do not start with a letter, and the overlay format's
    /// `__overlay__` node does not.
    pub fn to_dtb(&self) -> Result<Vec<u8>, DtbError> {
        let mut st = Vec::new();
        let mut strings = Vec::new();
        let mut offsets = std::collections::HashMap::new();
        self.write_struct(&mut st, &mut strings, &mut offsets, 0)?;
        st.extend_from_slice(&FDT_END.to_be_bytes());
        const HEADER: usize = 40;
        const RSVMAP: usize = 16; // one all-zero terminating entry
        let off_struct = HEADER + RSVMAP;
        let off_strings = off_struct + st.len();
        let total = off_strings + strings.len();
        let u = |v: usize| {
            u32::try_from(v).map_err(|_| DtbError(format!("blob of {v} bytes is past 4 GiB")))
        };
        let mut out = Vec::with_capacity(total);
        for v in [
            FDT_MAGIC,
            u(total)?,
            u(off_struct)?,
            u(off_strings)?,
            u(HEADER)?,
            17, // version
            16, // last_comp_version
            0,  // boot_cpuid_phys
            u(strings.len())?,
            u(st.len())?,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&[0u8; RSVMAP]);
        out.extend_from_slice(&st);
        out.extend_from_slice(&strings);
        Ok(out)
    }

    fn write_struct(
        &self,
        st: &mut Vec<u8>,
        strings: &mut Vec<u8>,
        offsets: &mut std::collections::HashMap<String, u32>,
        depth: usize,
    ) -> Result<(), DtbError> {
        if depth > MAX_DEPTH {
            return Err(DtbError("tree nested deeper than 64 levels".into()));
        }
        let bad_name = |n: &str| n.contains('/') || n.contains('\0') || n.len() > 255;
        if (depth > 0 && self.name.is_empty()) || bad_name(&self.name) {
            return Err(DtbError(format!("invalid node name {:?}", self.name)));
        }
        st.extend_from_slice(&FDT_BEGIN_NODE.to_be_bytes());
        st.extend_from_slice(self.name.as_bytes());
        st.push(0);
        pad4(st);
        for (name, value) in &self.props {
            if name.is_empty() || name.contains('\0') || name.len() > 255 {
                return Err(DtbError(format!("invalid property name {name:?}")));
            }
            let off = match offsets.get(name) {
                Some(o) => *o,
                None => {
                    let o = u32::try_from(strings.len())
                        .map_err(|_| DtbError("strings block past 4 GiB".into()))?;
                    strings.extend_from_slice(name.as_bytes());
                    strings.push(0);
                    offsets.insert(name.clone(), o);
                    o
                }
            };
            let data = value.to_bytes();
            let len = u32::try_from(data.len())
                .map_err(|_| DtbError(format!("property {name} is past 4 GiB")))?;
            st.extend_from_slice(&FDT_PROP.to_be_bytes());
            st.extend_from_slice(&len.to_be_bytes());
            st.extend_from_slice(&off.to_be_bytes());
            st.extend_from_slice(&data);
            pad4(st);
        }
        for c in &self.children {
            c.write_struct(st, strings, offsets, depth + 1)?;
        }
        st.extend_from_slice(&FDT_END_NODE.to_be_bytes());
        Ok(())
    }

    /// The DTS source form, as `dtc -I dtb -O dts` would print it (hex cells).
    pub fn to_dts(&self) -> String {
        let mut out = String::from("/dts-v1/;\n\n");
        self.write_dts(&mut out, 0);
        out
    }

    fn write_dts(&self, out: &mut String, depth: usize) {
        let ind = "\t".repeat(depth);
        let name = if self.name.is_empty() {
            "/"
        } else {
            &self.name
        };
        let _ = writeln!(out, "{ind}{name} {{");
        for (name, value) in &self.props {
            let v = match value {
                DtValue::String(s) => format!("\"{s}\""),
                DtValue::U32(v) => format!("<{}>", hex_cells(v)),
                DtValue::U64(v) => format!("/bits/ 64 <{}>", hex_cells(v)),
                DtValue::Bytes(b) => bytes_dts(b),
            };
            if v.is_empty() {
                let _ = writeln!(out, "{ind}\t{name};");
            } else {
                let _ = writeln!(out, "{ind}\t{name} = {v};");
            }
        }
        for c in &self.children {
            out.push('\n');
            c.write_dts(out, depth + 1);
        }
        let _ = writeln!(out, "{ind}}};");
    }
}

fn diff_nodes(a: &DtNode, b: &DtNode, path: &str, out: &mut Vec<String>) {
    let here = if a.name.is_empty() {
        "/".to_string()
    } else {
        format!("{path}/{}", a.name)
    };
    let child_path = if a.name.is_empty() { "" } else { &here };
    for (n, v) in &a.props {
        match b.get(n) {
            None => out.push(format!("{here}: property {n} only in the first tree")),
            Some(w) if w != v => out.push(format!(
                "{here}: {n}: [{}] != [{}]",
                hex_bytes(&v.to_bytes()),
                hex_bytes(&w.to_bytes())
            )),
            Some(_) => {}
        }
    }
    for (n, _) in &b.props {
        if a.get(n).is_none() {
            out.push(format!("{here}: property {n} only in the second tree"));
        }
    }
    for c in &a.children {
        match b.sub(&c.name) {
            None => out.push(format!(
                "{child_path}/{}: node only in the first tree",
                c.name
            )),
            Some(d) => diff_nodes(c, d, child_path, out),
        }
    }
    for d in &b.children {
        if a.sub(&d.name).is_none() {
            out.push(format!(
                "{child_path}/{}: node only in the second tree",
                d.name
            ));
        }
    }
}

/// Raw bytes shown as dtc would guess them: a string, u32 cells, or bytes.
fn bytes_dts(b: &[u8]) -> String {
    if b.is_empty() {
        return String::new();
    }
    if let Some((0, body)) = b.split_last() {
        if !body.is_empty() && body.iter().all(|c| c.is_ascii_graphic() || *c == b' ') {
            return format!("\"{}\"", String::from_utf8_lossy(body));
        }
    }
    if b.len().is_multiple_of(4) {
        let cells: Vec<u32> = b
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        return format!("<{}>", hex_cells(&cells));
    }
    format!("[{}]", hex_bytes(b))
}

fn hex_bytes(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn hex_cells<T: std::fmt::LowerHex>(v: &[T]) -> String {
    v.iter()
        .map(|x| format!("{x:#x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Building a blob failed (only on limits of the FDT format, e.g. a name
/// with a `/` in it).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the device tree blob: {0}")]
pub struct DtbError(String);

fn pad4(v: &mut Vec<u8>) {
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
}

/// The v1 tree for the whole topology, or for the named instances only.
pub fn v1_tree<'a>(t: &Topology, only: impl IntoIterator<Item = &'a Instance>) -> DtNode {
    let mut instances = DtNode::new("instances");
    for i in only {
        instances = instances.child(v1_instance(t, i));
    }
    DtNode::new("")
        .prop("compatible", DtValue::String(V1_COMPATIBLE.into()))
        .child(instances)
}

fn v1_instance(_t: &Topology, i: &Instance) -> DtNode {
    let mut res = DtNode::new("resources")
        .prop("cpus", DtValue::U32(i.cpus.iter().collect()))
        .prop("memory-bytes", DtValue::U64(vec![i.memory.size()]));
    if i.memory_base_given {
        res = res.prop("memory-base", DtValue::U64(vec![i.memory.start.0]));
    }
    DtNode::new(i.name.clone())
        .prop("id", DtValue::U32(vec![i.id.0]))
        .child(res)
}

// ---------------------------------------------------------------------------
// Reading blobs back
// ---------------------------------------------------------------------------

/// FDT structure-block tokens (Devicetree Specification v0.4, section 5.4.1;
/// `scripts/dtc/libfdt/fdt.h`).
const FDT_MAGIC: u32 = 0xd00d_feed;
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;
/// Deeper trees than this are refused: nothing mkctl reads nests past 8.
const MAX_DEPTH: usize = 64;

/// A blob could not be read back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DtbParseError {
    #[error("blob is {len} bytes, shorter than the 40-byte FDT header")]
    Short { len: usize },
    #[error("bad FDT magic 0x{0:08x} (expected 0xd00dfeed)")]
    Magic(u32),
    #[error("FDT header field {field} = 0x{value:x} points outside the {len}-byte blob")]
    Bounds {
        field: &'static str,
        value: u64,
        len: usize,
    },
    #[error("FDT structure block is malformed at offset 0x{offset:x}: {what}")]
    Structure { offset: usize, what: &'static str },
}

/// Reads a flattened device tree into a [`DtNode`] (every value as
/// [`DtValue::Bytes`]). Every offset and length is checked against the
/// blob; a malformed blob is an error, never a panic.
pub fn parse_dtb(blob: &[u8]) -> Result<DtNode, DtbParseError> {
    if blob.len() < 40 {
        return Err(DtbParseError::Short { len: blob.len() });
    }
    let hdr = |i: usize| be32(blob, i * 4).unwrap_or(0);
    if hdr(0) != FDT_MAGIC {
        return Err(DtbParseError::Magic(hdr(0)));
    }
    let len = blob.len();
    let total = hdr(1) as usize;
    let check = |field: &'static str, value: usize| {
        if value > len || value > total {
            Err(DtbParseError::Bounds {
                field,
                value: value as u64,
                len,
            })
        } else {
            Ok(value)
        }
    };
    check("totalsize", total)?;
    let off_struct = check("off_dt_struct", hdr(2) as usize)?;
    let off_strings = check("off_dt_strings", hdr(3) as usize)?;
    let size_strings = hdr(8) as usize;
    let size_struct = hdr(9) as usize;
    let end_strings = check("size_dt_strings", off_strings.saturating_add(size_strings))?;
    // Version 16 blobs have no size_dt_struct; read to the end then.
    let end_struct = if hdr(5) >= 17 {
        check("size_dt_struct", off_struct.saturating_add(size_struct))?
    } else {
        total
    };
    let structs = &blob[off_struct..end_struct];
    let strings = &blob[off_strings..end_strings];

    let mut pos = 0usize;
    let mut stack: Vec<DtNode> = Vec::new();
    let mut root: Option<DtNode> = None;
    let bad = |offset: usize, what: &'static str| DtbParseError::Structure {
        offset: off_struct + offset,
        what,
    };
    loop {
        let tok = be32(structs, pos).ok_or_else(|| bad(pos, "ends without FDT_END"))?;
        let at = pos;
        pos += 4;
        match tok {
            FDT_BEGIN_NODE => {
                let rest = structs.get(pos..).unwrap_or(&[]);
                let nul = rest
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or_else(|| bad(at, "node name not terminated"))?;
                let name = std::str::from_utf8(&rest[..nul])
                    .map_err(|_| bad(at, "node name is not UTF-8"))?;
                if root.is_some() {
                    return Err(bad(at, "a second root node"));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(bad(at, "nested deeper than 64 levels"));
                }
                stack.push(DtNode::new(name));
                pos = align4(pos + nul + 1).ok_or_else(|| bad(at, "offset overflow"))?;
            }
            FDT_END_NODE => {
                let node = stack
                    .pop()
                    .ok_or_else(|| bad(at, "END_NODE without BEGIN_NODE"))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => root = Some(node),
                }
            }
            FDT_PROP => {
                let plen =
                    be32(structs, pos).ok_or_else(|| bad(at, "truncated property"))? as usize;
                let nameoff =
                    be32(structs, pos + 4).ok_or_else(|| bad(at, "truncated property"))? as usize;
                let data_start = pos + 8;
                let data = data_start
                    .checked_add(plen)
                    .and_then(|end| structs.get(data_start..end))
                    .ok_or_else(|| bad(at, "property value runs past the structure block"))?;
                let name_bytes = strings
                    .get(nameoff..)
                    .ok_or_else(|| bad(at, "property name offset outside the strings block"))?;
                let nul = name_bytes
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or_else(|| bad(at, "property name not terminated"))?;
                let name = std::str::from_utf8(&name_bytes[..nul])
                    .map_err(|_| bad(at, "property name is not UTF-8"))?;
                let node = stack
                    .last_mut()
                    .ok_or_else(|| bad(at, "property outside any node"))?;
                node.props
                    .push((name.to_string(), DtValue::Bytes(data.to_vec())));
                pos = align4(data_start + plen).ok_or_else(|| bad(at, "offset overflow"))?;
            }
            FDT_NOP => {}
            FDT_END => {
                if !stack.is_empty() {
                    return Err(bad(at, "FDT_END inside an open node"));
                }
                return root.ok_or_else(|| bad(at, "no root node"));
            }
            _ => return Err(bad(at, "unknown token")),
        }
    }
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn align4(v: usize) -> Option<usize> {
    v.checked_add(3).map(|x| x & !3)
}

// ---------------------------------------------------------------------------
// Generation `current`: baseline and overlays
// ---------------------------------------------------------------------------

/// Root `compatible` of a baseline (kerf 0.4.0 `dtc/extractor.py`
/// `generate_global_dtb`; the kernel's `kernel/multikernel/baseline.c` reads
/// only `/resources`).
pub const HOST_COMPATIBLE: &str = "linux,multikernel-host";
/// Root `compatible` of an overlay (kerf 0.4.0 `dtc/overlay.py`).
pub const OVERLAY_COMPATIBLE: &str = "linux,multikernel-overlay";
/// `device_tree` takes the whole baseline in one write of at most 1 MiB
/// (`kernel/multikernel/kernfs.c`: `.atomic_write_len = SZ_1M`; a blob whose
/// header size differs from the write is refused with EINVAL).
pub const MAX_BASELINE_BYTES: usize = 1 << 20;
/// `overlays/new` has no `atomic_write_len` (`kernel/multikernel/overlay.c`),
/// so kernfs hands a write over in page-sized pieces and any piece at a
/// non-zero offset is refused with EINVAL: an overlay must fit in one 4 KiB
/// page.
pub const MAX_OVERLAY_BYTES: usize = 4096;

/// Memory the host gives to the pool: a size, on a NUMA node or anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolMemory {
    pub size: u64,
    pub numa_node: Option<u32>,
}

/// What a baseline hands to the pool. CPUs are physical ids (APIC ids on
/// x86), never logical CPU numbers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolRequest {
    pub cpus: Vec<u64>,
    pub memory: Vec<PoolMemory>,
}

/// The baseline for the pool (written once to `device_tree`):
///
/// ```text
/// / { compatible = "linux,multikernel-host";
///     resources { cpus = /bits/ 64 <apic ...>;
///                 memory@0 { size = /bits/ 64 <bytes>; numa-node-id = <N>; }; }; };
/// ```
///
/// No instances: the kernel refuses a baseline that has any
/// (`kernel/multikernel/kernfs.c` `root_device_tree_write`).
pub fn current_baseline(req: &PoolRequest) -> DtNode {
    let mut res = DtNode::new("resources").prop("cpus", DtValue::U64(req.cpus.clone()));
    for (i, m) in req.memory.iter().enumerate() {
        res = res.child(memory_size_node(i, m));
    }
    DtNode::new("")
        .prop("compatible", DtValue::String(HOST_COMPATIBLE.into()))
        .child(res)
}

fn memory_size_node(i: usize, m: &PoolMemory) -> DtNode {
    let mut n = DtNode::new(format!("memory@{i}")).prop("size", DtValue::U64(vec![m.size]));
    if let Some(node) = m.numa_node {
        n = n.prop("numa-node-id", DtValue::U32(vec![node]));
    }
    n
}

/// One instance as the current interface creates it. The kernel picks where
/// its memory goes inside the pool (no `memory-base` exists in this
/// generation: `kernel/multikernel/dts.c` reads `cpus`, `memory-bytes`,
/// `numa-nodes`, `devices`, `virtio` only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRequest {
    pub name: String,
    pub id: InstanceId,
    /// Physical CPU ids (APIC ids on x86).
    pub cpus: Vec<u64>,
    pub memory_bytes: u64,
    /// The node whose pool memory the instance takes (the kernel uses the
    /// first entry of `numa-nodes` only).
    pub numa_node: Option<u32>,
}

/// The overlay that creates one instance (written to `overlays/new`):
///
/// ```text
/// / { compatible = "linux,multikernel-overlay";
///     fragment@0 { target-path = "/instances";
///         __overlay__ { instance-create { instance-name = "NAME"; id = <N>;
///             resources { cpus = /bits/ 64 <apic ...>; memory-bytes = /bits/ 64 <bytes>;
///                         numa-nodes = <N>; }; }; }; }; };
/// ```
pub fn create_overlay(req: &InstanceRequest) -> DtNode {
    let mut res = DtNode::new("resources")
        .prop("cpus", DtValue::U64(req.cpus.clone()))
        .prop("memory-bytes", DtValue::U64(vec![req.memory_bytes]));
    if let Some(n) = req.numa_node {
        res = res.prop("numa-nodes", DtValue::U32(vec![n]));
    }
    let op = DtNode::new("instance-create")
        .prop("instance-name", DtValue::String(req.name.clone()))
        .prop("id", DtValue::U32(vec![req.id.0]))
        .child(res);
    overlay("/instances", op)
}

/// The overlay that destroys an instance (EBUSY while it is loaded or
/// active: `kernel/multikernel/kernfs.c` `mk_instance_destroy`).
pub fn remove_overlay(name: &str) -> DtNode {
    let op = DtNode::new("instance-remove").prop("instance-name", DtValue::String(name.into()));
    overlay("/instances", op)
}

/// A pool chunk the kernel reports (`memory@N { reg = <base size>; }` in
/// the read-back of `device_tree`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolChunk {
    pub base: u64,
    pub size: u64,
    pub numa_node: Option<u32>,
}

/// A change to a live pool, from the pool's point of view
/// (`kernel/multikernel/overlay.c`: under `/resources`, `cpu-add` hands a
/// host CPU to the pool, `cpu-remove` gives a free pool CPU back,
/// `memory-add` grows the pool by a size, `memory-remove` returns a whole
/// chunk named by `reg`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolChange {
    pub cpu_add: Vec<u64>,
    pub cpu_remove: Vec<u64>,
    pub memory_add: Vec<PoolMemory>,
    pub memory_remove: Vec<PoolChunk>,
}

impl PoolChange {
    /// True when the change moves nothing.
    pub fn is_empty(&self) -> bool {
        self.cpu_add.is_empty()
            && self.cpu_remove.is_empty()
            && self.memory_add.is_empty()
            && self.memory_remove.is_empty()
    }
}

/// The overlay that moves resources between the host and the pool; with
/// every pool CPU and chunk in `cpu_remove`/`memory_remove` it empties the
/// pool (the kernel orders CPU before memory itself).
pub fn pool_overlay(change: &PoolChange) -> DtNode {
    let mut ov = DtNode::new("__overlay__");
    if !change.memory_remove.is_empty() {
        let mut op = DtNode::new("memory-remove");
        for (i, c) in change.memory_remove.iter().enumerate() {
            op = op.child(
                DtNode::new(format!("memory@{i}")).prop("reg", DtValue::U64(vec![c.base, c.size])),
            );
        }
        ov = ov.child(op);
    }
    if !change.memory_add.is_empty() {
        let mut op = DtNode::new("memory-add");
        for (i, m) in change.memory_add.iter().enumerate() {
            op = op.child(memory_size_node(i, m));
        }
        ov = ov.child(op);
    }
    for (name, cpus) in [
        ("cpu-remove", &change.cpu_remove),
        ("cpu-add", &change.cpu_add),
    ] {
        if !cpus.is_empty() {
            let mut op = DtNode::new(name);
            for c in cpus {
                op = op.child(DtNode::new(format!("cpu@{c}")).prop("reg", DtValue::U64(vec![*c])));
            }
            ov = ov.child(op);
        }
    }
    DtNode::new("")
        .prop("compatible", DtValue::String(OVERLAY_COMPATIBLE.into()))
        .child(
            DtNode::new("fragment@0")
                .prop("target-path", DtValue::String("/resources".into()))
                .child(ov),
        )
}

fn overlay(target: &str, op: DtNode) -> DtNode {
    DtNode::new("")
        .prop("compatible", DtValue::String(OVERLAY_COMPATIBLE.into()))
        .child(
            DtNode::new("fragment@0")
                .prop("target-path", DtValue::String(target.into()))
                .child(DtNode::new("__overlay__").child(op)),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dts_text_shape() {
        let t = DtNode::new("")
            .prop("compatible", DtValue::String("x".into()))
            .child(DtNode::new("a").prop("n", DtValue::U64(vec![16])));
        let dts = t.to_dts();
        assert!(dts.starts_with("/dts-v1/;"));
        assert!(dts.contains("\tcompatible = \"x\";"));
        assert!(
            dts.contains("\ta {\n\t\tn = /bits/ 64 <0x10>;\n\t};"),
            "{dts}"
        );
        // The blob starts with the FDT magic.
        assert_eq!(&t.to_dtb().unwrap()[..4], &[0xd0, 0x0d, 0xfe, 0xed]);
    }
}
