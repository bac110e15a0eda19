//! The console of a spawned kernel booted with `console=mktty0`: the host
//! opens `/dev/mktty` and writes the instance id and a newline to choose
//! whose console the descriptor carries (kerf 0.4.0 `console/main.py`;
//! `drivers/tty/mktty.c` of multikernel/linux). The caller then copies
//! bytes both ways. This is the one device the backend keeps open, so it
//! sits outside [`super::KernelIface`]'s one-shot calls.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::units::InstanceId;

/// The console device, relative to the sysroot.
pub const MKTTY: &str = "dev/mktty";

/// Opens the console of instance `id`.
pub fn open(sysroot: &Path, id: InstanceId) -> std::io::Result<File> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(sysroot.join(MKTTY))?;
    f.write_all(format!("{id}\n").as_bytes())?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_id_then_hands_the_descriptor_over() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("dev")).unwrap();
        std::fs::write(d.path().join(MKTTY), b"").unwrap();
        drop(open(d.path(), InstanceId(7)).unwrap());
        assert_eq!(std::fs::read(d.path().join(MKTTY)).unwrap(), b"7\n");
        let e = open(&d.path().join("nope"), InstanceId(1)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
