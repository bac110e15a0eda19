//! The guest kernel command line mkctl passes: a base (console, panic
//! behaviour, the topology's own `cmdline`) plus the `mk.*` keys guest-init
//! reads, written by [`mknode::bootargs::BootArgs`] (the one type both
//! sides share; its module lists the keys).

use std::fmt;

use mknode::bootargs::{BootArgs, PhysWindow};

use crate::topology::Topology;
use crate::units::{ByteSize, InstanceId, PhysAddr};

/// What every guest gets unless the topology says otherwise: the console on
/// the first serial port (where QEMU's log and socket are), and a reboot
/// right after a panic, which `-no-reboot` turns into QEMU exiting, so a
/// broken guest never hangs; and no IO-APIC timer check, which a TCG guest
/// on a loaded host can fail ("IO-APIC + timer doesn't work!", a panic at
/// boot, seen once under load).
pub const DEFAULT_BASE: &str = "console=ttyS0 panic=-1 no_timer_check";

/// A kernel command line for one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCmdline {
    base: String,
    extra: Vec<String>,
    args: BootArgs,
}

impl GuestCmdline {
    /// [`DEFAULT_BASE`] plus `mk.name` and `mk.id`. `name` must already be a
    /// valid instance name (the topology validates it).
    pub fn new(name: &str, id: InstanceId) -> Self {
        Self {
            base: DEFAULT_BASE.to_string(),
            extra: Vec::new(),
            args: BootArgs {
                name: Some(name.to_string()),
                id: Some(id.0),
                ..BootArgs::default()
            },
        }
    }

    /// Names of the endpoints (valid instance names, or `host`).
    pub fn peers(mut self, names: impl IntoIterator<Item = (u16, String)>) -> Self {
        self.args.peers.extend(names);
        self
    }

    /// Replaces the base part (everything not `mk.*`).
    pub fn base(mut self, base: &str) -> Self {
        self.base = base.trim().to_string();
        self
    }

    /// Appends words to the base part (e.g. the topology's `cmdline`).
    pub fn extra(mut self, words: &str) -> Self {
        self.extra
            .extend(words.split_whitespace().map(str::to_string));
        self
    }

    /// The window is physical memory at `phys` (kexec backend).
    pub fn window(mut self, phys: PhysAddr, size: ByteSize) -> Self {
        self.args.window = Some(PhysWindow {
            phys: phys.get(),
            size: size.bytes(),
        });
        self
    }

    /// Run the selftest instead of the agent.
    pub fn selftest(mut self, on: bool) -> Self {
        self.args.selftest = on;
        self
    }
}

impl fmt::Display for GuestCmdline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let words: Vec<&str> = self
            .base
            .split_whitespace()
            .chain(self.extra.iter().map(String::as_str))
            .collect();
        write!(f, "{} {}", words.join(" "), self.args)
    }
}

impl GuestCmdline {
    /// The `mk.*` keys it carries.
    pub fn args(&self) -> &BootArgs {
        &self.args
    }
}

/// Endpoint ids and the names messages use for them (`mk.peers`): `host`
/// for 0, then the topology's instances.
pub fn endpoint_names(t: &Topology) -> Vec<(u16, String)> {
    std::iter::once((0, "host".to_string()))
        .chain(
            t.instances
                .iter()
                .filter_map(|i| Some((u16::try_from(i.id.0).ok()?, i.name.clone()))),
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What mkctl writes is what guest-init reads: the line, parsed with
    /// the guest's own parser, gives back the keys.
    #[test]
    fn guest_init_reads_back_what_mkctl_writes() {
        let c = GuestCmdline::new("beta", InstanceId(2))
            .extra("quiet mk_not=ours")
            .window(PhysAddr(0x3_ff00_0000), ByteSize(16 << 20))
            .peers([(0, "host".to_string()), (2, "beta".into())]);
        let read = BootArgs::parse(&c.to_string()).unwrap();
        assert_eq!(&read, c.args());
        assert_eq!(read.name.as_deref(), Some("beta"));
        assert_eq!(read.id, Some(2));
        assert_eq!(
            read.window,
            Some(PhysWindow {
                phys: 0x3_ff00_0000,
                size: 16 << 20
            })
        );
    }

    #[test]
    fn formats_mk_keys_after_the_base() {
        let c = GuestCmdline::new("alpha", InstanceId(1)).selftest(true);
        assert_eq!(
            c.to_string(),
            "console=ttyS0 panic=-1 no_timer_check mk.name=alpha mk.id=1 mk.selftest=1"
        );
        let c = GuestCmdline::new("beta", InstanceId(2))
            .base("console=ttyS0")
            .extra(" quiet  loglevel=3 ")
            .window(PhysAddr(0x1_0000_0000), ByteSize(16 << 20));
        assert_eq!(
            c.to_string(),
            "console=ttyS0 quiet loglevel=3 mk.name=beta mk.id=2 mk.window=0x100000000@0x1000000"
        );
        let c = GuestCmdline::new("alpha", InstanceId(1)).peers([
            (0, "host".to_string()),
            (1, "alpha".into()),
            (2, "beta".into()),
        ]);
        assert_eq!(
            c.to_string(),
            "console=ttyS0 panic=-1 no_timer_check mk.name=alpha mk.id=1 mk.peers=0:host,1:alpha,2:beta"
        );
    }
}
