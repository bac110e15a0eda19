//! A mapped window: creating, formatting, opening and validating it, and
//! attaching endpoints to it. It does not know what a frame is.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::doorbell::Bell;
use crate::layout::{self, Layout, LAYOUT_VERSION, MAGIC};
use crate::raw::Region;
use crate::Error;

/// A shared memory window holding the header, the endpoint directory and the
/// rings. Cheap to clone; every clone shares one mapping.
#[derive(Clone, Debug)]
pub struct Window {
    inner: Arc<WindowInner>,
}

#[derive(Debug)]
pub(crate) struct WindowInner {
    pub(crate) region: Arc<Region>,
    pub(crate) layout: Layout,
    pub(crate) name: PathBuf,
    /// Ring halves held in this process, by (ring data offset, is_sender): at
    /// most one sender and one receiver per ring per mapping, whatever the
    /// window's own claim words say (they may be scribbled on).
    pub(crate) held: Mutex<HashSet<(u64, bool)>>,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn map(file: &File, path: &Path, offset: u64, len: u64) -> Result<Region, Error> {
    let len_usize = usize::try_from(len).map_err(|_| Error::TooSmall {
        size: len,
        needed: len,
    })?;
    let map = memmap2::MmapOptions::new()
        .offset(offset)
        .len(len_usize)
        .map_raw(file)
        .map_err(io_err("map", path))?;
    Region::new(map).map_err(|addr| Error::Misaligned { addr })
}

fn format_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ u64::from(std::process::id()).rotate_left(40)) | 1
}

impl Window {
    /// Creates (or truncates) the file at `path`, sizes it for the largest
    /// ring capacity that fits in `size` bytes with `endpoints` endpoints, and
    /// formats it.
    pub fn create(path: impl AsRef<Path>, size: u64, endpoints: u16) -> Result<Window, Error> {
        Self::create_with(path, Layout::for_size(size, endpoints)?)
    }

    /// Creates (or truncates) the file at `path` with exactly `layout.size()`
    /// bytes and formats it.
    pub fn create_with(path: impl AsRef<Path>, layout: Layout) -> Result<Window, Error> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io_err("create", path))?;
        file.set_len(layout.size())
            .map_err(io_err("resize", path))?;
        let region = map(&file, path, 0, layout.size())?;
        Ok(Self::format(region, layout, path))
    }

    /// Formats `len` bytes at `offset` of an existing file or device (the
    /// ivshmem file that QEMU maps, a BAR, `/dev/mem`) without resizing it.
    /// `layout` must fit in `len`; [`Layout::for_size`]`(len, n)` uses it all.
    pub fn format_at(
        path: impl AsRef<Path>,
        offset: u64,
        len: u64,
        layout: Layout,
    ) -> Result<Window, Error> {
        if layout.size() > len {
            return Err(Error::TooSmall {
                size: len,
                needed: layout.size(),
            });
        }
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("open", path))?;
        let region = map(&file, path, offset, len)?;
        Ok(Self::format(region, layout, path))
    }

    /// A window in anonymous shared memory (a memfd): it survives `fork`, so
    /// parent and child share it; for tests, benchmarks and in-process use.
    pub fn anonymous(layout: Layout) -> Result<Window, Error> {
        let path = Path::new("memfd:shmem-ring");
        let fd =
            nix::sys::memfd::memfd_create(c"shmem-ring", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .map_err(|e| Error::Io {
                    op: "create",
                    path: path.to_path_buf(),
                    source: e.into(),
                })?;
        let file = File::from(fd);
        file.set_len(layout.size())
            .map_err(io_err("resize", path))?;
        let region = map(&file, path, 0, layout.size())?;
        Ok(Self::format(region, layout, path))
    }

    /// Opens a formatted window file, mapping all of it, and validates its
    /// header. Device files whose length reads as 0 need [`Window::open_at`].
    pub fn open(path: impl AsRef<Path>) -> Result<Window, Error> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("open", path))?;
        let len = file.metadata().map_err(io_err("stat", path))?.len();
        Self::attach_region(&file, path, 0, len)
    }

    /// Opens `len` bytes at `offset` of a file or device (`/dev/mem`, a PCI BAR
    /// `resource2` file) read-write, and validates the header found there.
    pub fn open_at(path: impl AsRef<Path>, offset: u64, len: u64) -> Result<Window, Error> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("open", path))?;
        Self::attach_region(&file, path, offset, len)
    }

    fn attach_region(file: &File, path: &Path, offset: u64, len: u64) -> Result<Window, Error> {
        if len < layout::HEADER_SIZE {
            return Err(Error::TooSmall {
                size: len,
                needed: layout::HEADER_SIZE,
            });
        }
        let region = map(file, path, offset, len)?;
        let layout = validate(&region)?;
        Ok(Self::wrap(region, layout, path))
    }

    fn wrap(region: Region, layout: Layout, path: &Path) -> Window {
        Window {
            inner: Arc::new(WindowInner {
                region: Arc::new(region),
                layout,
                name: path.to_path_buf(),
                held: Mutex::new(HashSet::new()),
            }),
        }
    }

    /// Writes the header, the directory and zeroed control blocks. The magic
    /// goes in last, so a concurrent `open` sees either no window or a whole one.
    fn format(region: Region, layout: Layout, path: &Path) -> Window {
        let w = |off: u64, v: u64| {
            if let Some(word) = usize::try_from(off).ok().and_then(|o| region.word(o)) {
                word.store(v, Ordering::Relaxed);
            }
        };
        w(layout::H_MAGIC, 0);
        // Header, directory and control blocks.
        let meta = usize::try_from(layout.data_offset()).unwrap_or(usize::MAX);
        let zeroed = region.zero(0, meta);
        debug_assert!(
            zeroed.is_some(),
            "the layout was checked against the mapping"
        );
        // Data areas need no zeroing except their first word: positions start
        // at 0, where the first frame's header goes, and the ring protocol
        // needs that word to read as "no frame yet" whatever an earlier format
        // left there; every later header position gets its marker from the
        // producer (`ring.rs`), and frame checks depend on the position.
        for from in 0..layout.endpoints() {
            for to in 0..layout.endpoints() {
                if let Some(ring) = layout.ring(from, to) {
                    w(ring.data, 0);
                }
            }
        }
        w(
            layout::H_VERSION,
            u64::from(LAYOUT_VERSION) | u64::from(layout.endpoints()) << 32,
        );
        w(layout::H_SIZE, layout.size());
        w(layout::H_CAPACITY, layout.ring_capacity());
        w(layout::H_DIRECTORY, layout.directory_offset());
        w(layout::H_CONTROL, layout.control_offset());
        w(layout::H_DATA, layout.data_offset());
        w(layout::H_FORMAT_ID, format_id());
        for id in 0..layout.endpoints() {
            if let Some(e) = layout.entry_offset(id) {
                w(e + layout::E_ID, u64::from(id));
            }
        }
        if let Some(magic) = region.word(layout::H_MAGIC as usize) {
            ////////////////
            // SYNC POINT: the layout is written (see `validate`)
            ////////////////
            magic.store(MAGIC, Ordering::Release);
        }
        Self::wrap(region, layout, path)
    }

    /// The window's layout (validated against the header).
    pub fn layout(&self) -> &Layout {
        &self.inner.layout
    }

    /// The path the window was opened or created from.
    pub fn path(&self) -> &Path {
        &self.inner.name
    }

    /// The id written by the last format; changes every time the window is
    /// formatted again.
    pub fn format_id(&self) -> u64 {
        self.read_word(layout::H_FORMAT_ID).unwrap_or(0)
    }

    pub(crate) fn inner(&self) -> &Arc<WindowInner> {
        &self.inner
    }

    pub(crate) fn read_word(&self, off: u64) -> Option<u64> {
        let w = self.inner.region.word(usize::try_from(off).ok()?)?;
        Some(w.load(Ordering::Acquire))
    }

    /// The doorbell word of ring `from -> to`: what a relay wakes when a
    /// ring for a receiver of this kernel comes from another kernel (see
    /// [`crate::doorbell`]).
    pub fn bell(&self, from: u16, to: u16) -> Result<Bell, Error> {
        let layout = self.layout();
        let ring = layout.ring(from, to).ok_or(Error::NoSuchEndpoint {
            id: from.max(to),
            endpoints: layout.endpoints(),
        })?;
        let off = ring.control + layout::C_BELL;
        usize::try_from(off)
            .ok()
            .and_then(|o| Bell::new(Arc::clone(&self.inner.region), o, from, to))
            .ok_or(Error::OutOfBounds {
                offset: off,
                len: 8,
                size: self.inner.region.len() as u64,
            })
    }

    /// Copies window bytes at `offset` into `buf` (for inspection tools).
    pub fn read_raw(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        usize::try_from(offset)
            .ok()
            .and_then(|o| self.inner.region.read_bytes(o, buf))
            .ok_or(Error::OutOfBounds {
                offset,
                len: buf.len() as u64,
                size: self.inner.region.len() as u64,
            })
    }

    /// Overwrites window bytes at `offset`, as a buggy or hostile peer could.
    /// For tests and fuzzing of the untrusted-peer rules; never needed to use
    /// a window.
    #[doc(hidden)]
    pub fn poke(&self, offset: u64, bytes: &[u8]) -> Result<(), Error> {
        usize::try_from(offset)
            .ok()
            .and_then(|o| self.inner.region.write_bytes(o, bytes))
            .ok_or(Error::OutOfBounds {
                offset,
                len: bytes.len() as u64,
                size: self.inner.region.len() as u64,
            })
    }
}

/// Checks the header of a mapped region and returns the layout it describes.
fn validate(region: &Region) -> Result<Layout, Error> {
    let r = |off: u64| {
        region
            .word(off as usize)
            .map_or(0, |w| w.load(Ordering::Relaxed))
    };
    let magic = region.word(layout::H_MAGIC as usize).map_or(0, |w| {
        ////////////////
        // SYNC POINT: the layout is written (see `format`)
        ////////////////
        w.load(Ordering::Acquire)
    });
    if magic != MAGIC {
        return Err(Error::BadMagic {
            found: magic,
            expected: MAGIC,
        });
    }
    let version_word = r(layout::H_VERSION);
    // Truncations pick the fields out of the word.
    #[allow(clippy::cast_possible_truncation)]
    let (version, endpoints) = (version_word as u32, (version_word >> 32) as u16);
    if version != LAYOUT_VERSION {
        return Err(Error::BadVersion {
            found: version,
            supported: LAYOUT_VERSION,
        });
    }
    let capacity = r(layout::H_CAPACITY);
    let layout = Layout::with_capacity(endpoints, capacity).map_err(|e| match e {
        Error::InvalidLayout { what, value, why } => Error::BadHeader {
            field: what,
            found: value,
            rule: why,
        },
        other => other,
    })?;
    let expect = [
        ("size", layout::H_SIZE, layout.size()),
        (
            "directory offset",
            layout::H_DIRECTORY,
            layout.directory_offset(),
        ),
        ("control offset", layout::H_CONTROL, layout.control_offset()),
        ("data offset", layout::H_DATA, layout.data_offset()),
    ];
    for (field, off, expected) in expect {
        let found = r(off);
        if found != expected {
            return Err(Error::HeaderMismatch {
                field,
                found,
                expected,
            });
        }
    }
    let mapped = region.len() as u64;
    if layout.size() > mapped {
        return Err(Error::SizeMismatch {
            header: layout.size(),
            mapped,
        });
    }
    Ok(layout)
}
