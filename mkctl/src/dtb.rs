//! Device trees for the Linux multikernel interface.
//!
//! A topology compiles to a small tree ([`DtNode`]) that is written either as
//! a flattened blob (via `vm-fdt`) for `/sys/fs/multikernel/device_tree`, or
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

use std::fmt::Write as _;

use crate::topology::{Instance, Topology};

/// The root `compatible` of the v1 interface.
pub const V1_COMPATIBLE: &str = "multikernel-v1";

/// A property value, as the kernel reads it (cells are big-endian in the blob).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DtValue {
    String(String),
    U32(Vec<u32>),
    U64(Vec<u64>),
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

    /// The flattened blob (FDT version 17).
    pub fn to_dtb(&self) -> Result<Vec<u8>, DtbError> {
        let mut w = vm_fdt::FdtWriter::new()?;
        self.write(&mut w)?;
        Ok(w.finish()?)
    }

    fn write(&self, w: &mut vm_fdt::FdtWriter) -> Result<(), DtbError> {
        let node = w.begin_node(&self.name)?;
        for (name, value) in &self.props {
            match value {
                DtValue::String(s) => w.property_string(name, s)?,
                DtValue::U32(v) => w.property_array_u32(name, v)?,
                DtValue::U64(v) => w.property_array_u64(name, v)?,
            }
        }
        for c in &self.children {
            c.write(w)?;
        }
        w.end_node(node)?;
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
            };
            let _ = writeln!(out, "{ind}\t{name} = {v};");
        }
        for c in &self.children {
            out.push('\n');
            c.write_dts(out, depth + 1);
        }
        let _ = writeln!(out, "{ind}}};");
    }
}

fn hex_cells<T: std::fmt::LowerHex>(v: &[T]) -> String {
    v.iter()
        .map(|x| format!("{x:#x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Building a blob failed (only on limits of the FDT format, e.g. a name
/// the writer refuses).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the device tree blob: {0}")]
pub struct DtbError(String);

impl From<vm_fdt::Error> for DtbError {
    fn from(e: vm_fdt::Error) -> Self {
        DtbError(e.to_string())
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
