//! initramfs images built by mkctl itself (cpio `newc`), holding a static
//! `guest-init` as `/init` plus files a topology lists. Not yet implemented.
