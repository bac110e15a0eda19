//! Finding and mapping the shared window.
//!
//! Under the qemu backend the window is BAR 2 of an `ivshmem-plain` PCI device
//! (1af4:1110): enable the device through sysfs, then map
//! `/sys/bus/pci/devices/<addr>/resource2`. Under the kexec backend the kernel
//! command line says where it is (`mk.window=<phys>@<size>`) and it is mapped
//! from `/dev/mem`. Either way the result is a [`Window`]: the mapping plus
//! where it came from.
//!
//! The bytes are shared with other kernels and may change at any moment, so
//! this module never hands out a reference into them: [`Window::read_at`] and
//! [`Window::write_at`] copy with volatile accesses, and the ring transport
//! will take the raw base pointer ([`Window::as_ptr`]). This module does not
//! interpret the contents.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use memmap2::{MmapMut, MmapOptions};

use mknode::bootargs::{BootArgs, PhysWindow};

/// PCI vendor id of ivshmem (Red Hat, Inc.).
pub const IVSHMEM_VENDOR: u16 = 0x1af4;
/// PCI device id of ivshmem.
pub const IVSHMEM_DEVICE: u16 = 0x1110;
/// The BAR that holds the shared memory.
pub const IVSHMEM_SHMEM_BAR: usize = 2;

/// An ivshmem device found under `/sys/bus/pci/devices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IvshmemDevice {
    /// PCI address, e.g. `0000:00:04.0`.
    pub address: String,
    /// Its sysfs directory.
    pub dir: PathBuf,
}

/// Where a [`Window`] came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowSource {
    /// BAR 2 of an ivshmem device, mapped through its `resource2` file.
    Ivshmem {
        /// PCI address of the device.
        address: String,
        /// Physical address of the BAR as the guest sees it.
        phys: u64,
    },
    /// Physical memory named by `mk.window=`, mapped through `/dev/mem`.
    DevMem {
        /// Physical address of the window.
        phys: u64,
    },
}

impl fmt::Display for WindowSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WindowSource::Ivshmem { address, phys } => {
                write!(
                    f,
                    "ivshmem {address} resource{IVSHMEM_SHMEM_BAR} (phys 0x{phys:x})"
                )
            }
            WindowSource::DevMem { phys } => write!(f, "/dev/mem at 0x{phys:x}"),
        }
    }
}

/// Why no window could be mapped.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    /// No ivshmem device and no `mk.window=`.
    #[error(
        "no window: no ivshmem device ({IVSHMEM_VENDOR:04x}:{IVSHMEM_DEVICE:04x}) under {} \
         and no mk.window= on the kernel command line",
        .0.display()
    )]
    NotFound(PathBuf),
    /// Listing PCI devices failed.
    #[error("cannot list PCI devices in {}", .0.display())]
    Scan(PathBuf, #[source] io::Error),
    /// Writing `1` to the device's `enable` failed.
    #[error("cannot enable PCI device through {}", .0.display())]
    Enable(PathBuf, #[source] io::Error),
    /// The BAR has no address (firmware did not assign one).
    #[error("BAR {IVSHMEM_SHMEM_BAR} of PCI device {0} has no address assigned")]
    BarUnassigned(String),
    /// A sysfs `resource` file could not be read or parsed.
    #[error("cannot read BAR {IVSHMEM_SHMEM_BAR} from {}: {}", .0.display(), .1)]
    Resource(PathBuf, String),
    /// The file to map could not be opened.
    #[error("cannot open {}", .0.display())]
    Open(PathBuf, #[source] io::Error),
    /// The file is shorter than the window it should hold.
    #[error("{} holds {len} bytes, less than the window's {size}", .path.display())]
    Short {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The window size.
        size: u64,
    },
    /// The window does not fit this process's address space.
    #[error("window of 0x{0:x} bytes does not fit the address space")]
    TooLarge(u64),
    /// `mmap` failed.
    #[error("cannot map {} (offset 0x{offset:x}, 0x{size:x} bytes)", .path.display())]
    Map {
        /// The file.
        path: PathBuf,
        /// Offset in the file.
        offset: u64,
        /// Length.
        size: u64,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

/// An access past the end of the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("access of {len} bytes at offset 0x{offset:x} is outside the window of 0x{window:x} bytes")]
pub struct OutOfBounds {
    /// Offset asked for.
    pub offset: usize,
    /// Length asked for.
    pub len: usize,
    /// Window size.
    pub window: usize,
}

/// Lists ivshmem devices under `<sys>/bus/pci/devices`, by PCI address.
pub fn find_ivshmem(sys: &Path) -> Result<Vec<IvshmemDevice>, WindowError> {
    let dir = sys.join("bus/pci/devices");
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(WindowError::Scan(dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| WindowError::Scan(dir.clone(), e))?;
        let dev = entry.path();
        let id = |name: &str| read_hex_id(&dev.join(name));
        if id("vendor") == Some(IVSHMEM_VENDOR) && id("device") == Some(IVSHMEM_DEVICE) {
            found.push(IvshmemDevice {
                address: entry.file_name().to_string_lossy().into_owned(),
                dir: dev,
            });
        }
    }
    found.sort_by(|a, b| a.address.cmp(&b.address));
    Ok(found)
}

fn read_hex_id(path: &Path) -> Option<u16> {
    let text = fs::read_to_string(path).ok()?;
    let t = text.trim();
    u16::from_str_radix(t.strip_prefix("0x").unwrap_or(t), 16).ok()
}

/// Start and size of BAR `index` from a device's `resource` file (one line
/// per resource: `start end flags`, in hex). `None` when unassigned.
fn read_bar(dev_dir: &Path, index: usize) -> Result<Option<(u64, u64)>, WindowError> {
    let path = dev_dir.join("resource");
    let text = fs::read_to_string(&path)
        .map_err(|e| WindowError::Resource(path.clone(), e.to_string()))?;
    let bad = |why: &str| WindowError::Resource(path.clone(), why.to_string());
    let line = text
        .lines()
        .nth(index)
        .ok_or_else(|| bad("too few lines"))?;
    let mut f = line.split_whitespace().map(|w| {
        u64::from_str_radix(w.trim_start_matches("0x"), 16).map_err(|_| bad("not hex numbers"))
    });
    let (start, end) = match (f.next(), f.next()) {
        (Some(s), Some(e)) => (s?, e?),
        _ => return Err(bad("expected `start end flags`")),
    };
    if start == 0 && end == 0 {
        return Ok(None);
    }
    let size = end
        .checked_sub(start)
        .and_then(|d| d.checked_add(1))
        .ok_or_else(|| bad("end before start"))?;
    Ok(Some((start, size)))
}

/// The mapped window.
#[derive(Debug)]
pub struct Window {
    /// Keeps the mapping alive; never dereferenced (see the module doc).
    map: MmapMut,
    /// `map.as_mut_ptr()`, taken once so that writes through it do not derive
    /// from a shared borrow of `map`.
    base: NonNull<u8>,
    source: WindowSource,
}

impl Window {
    /// Finds and maps the window: `mk.window=` if given, else the first
    /// ivshmem device under `<root>/sys` (devices sorted by PCI address).
    pub fn discover(args: &BootArgs, root: &Path) -> Result<Window, WindowError> {
        if let Some(w) = args.window {
            return Window::open_phys(&root.join("dev/mem"), w);
        }
        let sys = root.join("sys");
        match find_ivshmem(&sys)?.first() {
            Some(dev) => Window::open_ivshmem(dev),
            None => Err(WindowError::NotFound(sys.join("bus/pci/devices"))),
        }
    }

    /// Enables an ivshmem device and maps its BAR 2 read-write.
    pub fn open_ivshmem(dev: &IvshmemDevice) -> Result<Window, WindowError> {
        let enable = dev.dir.join("enable");
        fs::write(&enable, "1").map_err(|e| WindowError::Enable(enable, e))?;
        let (phys, size) = read_bar(&dev.dir, IVSHMEM_SHMEM_BAR)?
            .ok_or_else(|| WindowError::BarUnassigned(dev.address.clone()))?;
        let path = dev.dir.join(format!("resource{IVSHMEM_SHMEM_BAR}"));
        let map = map_file(&path, 0, size)?;
        Ok(Window::new(
            map,
            WindowSource::Ivshmem {
                address: dev.address.clone(),
                phys,
            },
        ))
    }

    /// Maps physical memory through `dev_mem` (normally `/dev/mem`).
    pub fn open_phys(dev_mem: &Path, w: PhysWindow) -> Result<Window, WindowError> {
        let map = map_file(dev_mem, w.phys, w.size)?;
        Ok(Window::new(map, WindowSource::DevMem { phys: w.phys }))
    }

    fn new(mut map: MmapMut, source: WindowSource) -> Window {
        let base = NonNull::new(map.as_mut_ptr()).expect("mmap never returns null");
        Window { map, base, source }
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True for a zero-sized window (never produced by the constructors).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Where the window came from.
    pub fn source(&self) -> &WindowSource {
        &self.source
    }

    /// Base address of the mapping, for the ring transport's unsafe core. Valid
    /// for [`Window::len`] bytes while `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), OutOfBounds> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(OutOfBounds {
                offset,
                len,
                window: self.len(),
            }),
        }
    }

    /// Copies `data` into the window at `offset` with volatile writes.
    pub fn write_at(&mut self, offset: usize, data: &[u8]) -> Result<(), OutOfBounds> {
        self.check(offset, data.len())?;
        let base = self.base.as_ptr();
        for (i, b) in data.iter().enumerate() {
            debug_assert!(offset + i < self.map.len());
            // SAFETY: `check` proved offset + data.len() <= len, so every
            // `offset + i` is inside the mapping, which lives as long as
            // `self`; a volatile byte store is valid on shared memory that
            // other kernels may touch concurrently (no reference is formed).
            unsafe { base.add(offset + i).write_volatile(*b) };
        }
        Ok(())
    }

    /// Copies bytes out of the window at `offset` with volatile reads.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        self.check(offset, buf.len())?;
        let base = self.base.as_ptr().cast_const();
        for (i, b) in buf.iter_mut().enumerate() {
            debug_assert!(offset + i < self.map.len());
            // SAFETY: as in `write_at`: in bounds by `check`, mapping alive
            // for `self`, volatile read of shared memory without a reference.
            *b = unsafe { base.add(offset + i).read_volatile() };
        }
        Ok(())
    }

    /// Asks the kernel to write back the mapping (a no-op for device memory,
    /// useful when the window is a plain file in tests).
    pub fn flush(&self) -> io::Result<()> {
        self.map.flush()
    }
}

fn map_file(path: &Path, offset: u64, size: u64) -> Result<MmapMut, WindowError> {
    let len = usize::try_from(size).map_err(|_| WindowError::TooLarge(size))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| WindowError::Open(path.to_path_buf(), e))?;
    // sysfs gives resource files the BAR's size; /dev/mem reports 0. A regular
    // file shorter than the window would SIGBUS on access: refuse it here.
    let file_len = file
        .metadata()
        .map_err(|e| WindowError::Open(path.to_path_buf(), e))?
        .len();
    let need = offset
        .checked_add(size)
        .ok_or(WindowError::TooLarge(size))?;
    if file_len != 0 && file_len < need {
        return Err(WindowError::Short {
            path: path.to_path_buf(),
            len: file_len,
            size: need,
        });
    }
    // SAFETY: memmap2's contract is that the file is not truncated or changed
    // behind the mapping in a way that breaks references into it. Here the
    // file is a device BAR or physical memory (never truncated; a short plain
    // file is refused above), and the bytes *are* changed by other kernels, so
    // `Window` never creates a reference into the mapping: every access is a
    // volatile copy or goes through the raw pointer of `as_ptr`.
    unsafe { MmapOptions::new().offset(offset).len(len).map_mut(&file) }.map_err(|source| {
        WindowError::Map {
            path: path.to_path_buf(),
            offset,
            size,
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A fake `/sys/bus/pci/devices/<addr>` with a plain file as resource2.
    fn fake_dev(sys: &Path, addr: &str, vendor: &str, device: &str, bar2: Option<u64>) {
        let d = sys.join("bus/pci/devices").join(addr);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("vendor"), format!("{vendor}\n")).unwrap();
        fs::write(d.join("device"), format!("{device}\n")).unwrap();
        fs::write(d.join("enable"), "0\n").unwrap();
        let zero = "0x0000000000000000 0x0000000000000000 0x0000000000000000\n";
        let mut res = String::new();
        res.push_str("0x00000000febf1000 0x00000000febf10ff 0x0000000000040200\n");
        res.push_str(zero);
        match bar2 {
            Some(size) => {
                let start = 0xfe00_0000u64;
                res.push_str(&format!(
                    "0x{start:016x} 0x{:016x} 0x000000000014220c\n",
                    start + size - 1
                ));
                let f = fs::File::create(d.join("resource2")).unwrap();
                f.set_len(size).unwrap();
            }
            None => res.push_str(zero),
        }
        fs::write(d.join("resource"), res).unwrap();
    }

    #[test]
    fn finds_only_ivshmem_sorted() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path().join("sys");
        fake_dev(&sys, "0000:00:05.0", "0x1af4", "0x1110", Some(MIB));
        fake_dev(&sys, "0000:00:01.0", "0x8086", "0x1237", None);
        fake_dev(&sys, "0000:00:04.0", "0x1af4", "0x1110", Some(MIB));
        fake_dev(&sys, "0000:00:03.0", "0x1af4", "0x1000", None);
        let found = find_ivshmem(&sys).unwrap();
        let addrs: Vec<_> = found.iter().map(|d| d.address.as_str()).collect();
        assert_eq!(addrs, ["0000:00:04.0", "0000:00:05.0"]);
    }

    #[test]
    fn maps_bar2_and_enables_device() {
        let t = tempfile::tempdir().unwrap();
        fake_dev(
            &t.path().join("sys"),
            "0000:00:04.0",
            "0x1af4",
            "0x1110",
            Some(MIB),
        );
        let mut w = Window::discover(&BootArgs::default(), t.path()).unwrap();
        assert_eq!(w.len(), MIB as usize);
        assert_eq!(
            w.source(),
            &WindowSource::Ivshmem {
                address: "0000:00:04.0".into(),
                phys: 0xfe00_0000
            }
        );
        let dev = t.path().join("sys/bus/pci/devices/0000:00:04.0");
        assert_eq!(fs::read_to_string(dev.join("enable")).unwrap(), "1");

        w.write_at(100, b"hello").unwrap();
        let end = w.len() - 3;
        w.write_at(end, b"end").unwrap();
        assert!(w.write_at(end, b"four").is_err());
        assert!(w.write_at(usize::MAX, b"x").is_err());
        let mut buf = [0u8; 5];
        w.read_at(100, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        w.flush().unwrap();
        let bytes = fs::read(dev.join("resource2")).unwrap();
        assert_eq!(&bytes[100..105], b"hello");
        assert_eq!(&bytes[bytes.len() - 3..], b"end");
    }

    #[test]
    fn missing_device_says_where_it_looked() {
        let t = tempfile::tempdir().unwrap();
        fake_dev(
            &t.path().join("sys"),
            "0000:00:01.0",
            "0x8086",
            "0x1237",
            None,
        );
        let e = Window::discover(&BootArgs::default(), t.path()).unwrap_err();
        assert!(matches!(e, WindowError::NotFound(_)), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("no window: no ivshmem device (1af4:1110)"),
            "{e}"
        );
    }

    #[test]
    fn unassigned_bar_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        fake_dev(
            &t.path().join("sys"),
            "0000:00:04.0",
            "0x1af4",
            "0x1110",
            None,
        );
        let e = Window::discover(&BootArgs::default(), t.path()).unwrap_err();
        assert!(matches!(e, WindowError::BarUnassigned(_)), "{e:?}");
    }

    #[test]
    fn phys_window_maps_at_offset_and_refuses_short_files() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("dev")).unwrap();
        let mem = t.path().join("dev/mem");
        let mut content = vec![0u8; 3 * 4096];
        content[8192..8197].copy_from_slice(b"magic");
        fs::write(&mem, &content).unwrap();
        let args = BootArgs {
            window: Some(PhysWindow {
                phys: 8192,
                size: 4096,
            }),
            ..BootArgs::default()
        };
        let w = Window::discover(&args, t.path()).unwrap();
        assert_eq!(w.source(), &WindowSource::DevMem { phys: 8192 });
        let mut buf = [0u8; 5];
        w.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"magic");

        let too_far = PhysWindow {
            phys: 8192,
            size: 8192,
        };
        let e = Window::open_phys(&mem, too_far).unwrap_err();
        assert!(matches!(e, WindowError::Short { .. }), "{e:?}");
    }
}
