//! libmk: what programs link to use mkctl's kernels — `mk.h` with
//! `libmk.a` / `libmk.so` for C, and the same calls in Rust.
//!
//! - [`mkdsm_map`] / [`mkdsm_unmap`] (and [`map`] / [`unmap`] in Rust):
//!   distributed shared memory regions, served by the agent of the kernel
//!   the process runs on (see `mk.h` for how it is found and every errno);
//! - [`mk_migrate`] / [`mk_kernel_id`] (and [`migrate`] / [`kernel_id`]):
//!   the calling thread moves to another kernel, its process stays one.
//!
//! The work is `mknode::dsm::client`'s and `mknode::thread`'s; this crate
//! is the C ABI around them:
//! no panic crosses it, every failure is a NULL or -1 with `errno`.

use std::ffi::{c_char, c_int, c_void, CStr};

pub use mknode::dsm::client::{map, unmap};
pub use mknode::dsm::DsmError;
pub use mknode::thread::{kernel_id, migrate};

fn set_errno(e: i32) {
    // SAFETY: __errno_location returns this thread's errno, valid for the
    // thread's lifetime.
    unsafe { *libc::__errno_location() = e };
}

/// Runs `f` for a C caller: its value, or `None` with `errno` set to the
/// error's (`EIO` for a panic, which must not cross the ABI).
fn c_call<T>(f: impl FnOnce() -> Result<T, DsmError> + std::panic::UnwindSafe) -> Option<T> {
    match std::panic::catch_unwind(f) {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            set_errno(e.errno());
            None
        }
        Err(_) => {
            set_errno(libc::EIO);
            None
        }
    }
}

/// `void *mkdsm_map(const char *name, size_t size)` (see `mk.h`).
///
/// # Safety
/// `name` must be a NUL-terminated string (or NULL, which fails with
/// `EINVAL`).
#[no_mangle]
pub unsafe extern "C" fn mkdsm_map(name: *const c_char, size: usize) -> *mut c_void {
    if name.is_null() {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    // SAFETY: the caller passes a NUL-terminated string, checked non-null.
    let name = unsafe { CStr::from_ptr(name) };
    let Ok(name) = name.to_str() else {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    };
    c_call(|| map(name, size)).map_or(std::ptr::null_mut(), |p| p.cast())
}

/// `int mkdsm_unmap(void *addr, size_t size)` (see `mk.h`).
///
/// # Safety
/// `addr` must not be used after a successful call.
#[no_mangle]
pub unsafe extern "C" fn mkdsm_unmap(addr: *mut c_void, size: usize) -> c_int {
    c_call(|| unmap(addr.cast(), size)).map_or(-1, |()| 0)
}

/// `int mk_migrate(int kernel)` (see `mk.h`).
#[no_mangle]
pub extern "C" fn mk_migrate(kernel: c_int) -> c_int {
    let Ok(to) = u16::try_from(kernel) else {
        set_errno(libc::EINVAL);
        return -1;
    };
    c_call(|| migrate(to)).map_or(-1, |()| 0)
}

/// `int mk_kernel_id(void)` (see `mk.h`).
#[no_mangle]
pub extern "C" fn mk_kernel_id() -> c_int {
    c_call(kernel_id).map_or(-1, c_int::from)
}
