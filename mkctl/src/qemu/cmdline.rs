//! The guest kernel command line mkctl passes: a base (console, panic
//! behaviour, the topology's own `cmdline`) plus the `mk.*` keys that
//! guest-init reads (`guest-init/src/cmdline.rs` is the other side):
//!
//! | key | meaning |
//! | --- | --- |
//! | `mk.name=<name>` | instance name; guest-init sets it as hostname |
//! | `mk.id=<n>` | the instance's endpoint id in the window |
//! | `mk.window=<phys>@<size>` | map the window from `/dev/mem` (kexec backend) instead of ivshmem |
//! | `mk.selftest=1` | write the selftest record into the window and power off |
//! | `mk.peers=<id>:<name>,...` | names of the endpoints, for the agent's messages (`0:host,1:alpha,2:beta`) |

use std::fmt;

use crate::topology::Topology;
use crate::units::{ByteSize, InstanceId, PhysAddr};

/// What every guest gets unless the topology says otherwise: the console on
/// the first serial port (where QEMU's log and socket are), and a reboot
/// right after a panic, which `-no-reboot` turns into QEMU exiting, so a
/// broken guest never hangs.
pub const DEFAULT_BASE: &str = "console=ttyS0 panic=-1";

/// A kernel command line for one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCmdline {
    base: String,
    name: String,
    id: InstanceId,
    window: Option<(PhysAddr, ByteSize)>,
    selftest: bool,
    extra: Vec<String>,
    peers: Vec<(u16, String)>,
}

impl GuestCmdline {
    /// [`DEFAULT_BASE`] plus `mk.name` and `mk.id`. `name` must already be a
    /// valid instance name (the topology validates it).
    pub fn new(name: &str, id: InstanceId) -> Self {
        Self {
            base: DEFAULT_BASE.to_string(),
            name: name.to_string(),
            id,
            window: None,
            selftest: false,
            extra: Vec::new(),
            peers: Vec::new(),
        }
    }

    /// Names of the endpoints (valid instance names, or `host`).
    pub fn peers(mut self, names: impl IntoIterator<Item = (u16, String)>) -> Self {
        self.peers.extend(names);
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
        self.window = Some((phys, size));
        self
    }

    /// Run the selftest instead of the agent.
    pub fn selftest(mut self, on: bool) -> Self {
        self.selftest = on;
        self
    }
}

impl fmt::Display for GuestCmdline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut words: Vec<String> = self.base.split_whitespace().map(str::to_string).collect();
        words.extend(self.extra.iter().cloned());
        words.push(format!("mk.name={}", self.name));
        words.push(format!("mk.id={}", self.id));
        if let Some((phys, size)) = self.window {
            words.push(format!("mk.window={:#x}@{:#x}", phys.get(), size.bytes()));
        }
        if self.selftest {
            words.push("mk.selftest=1".into());
        }
        if !self.peers.is_empty() {
            let list: Vec<String> = self
                .peers
                .iter()
                .map(|(id, name)| format!("{id}:{name}"))
                .collect();
            words.push(format!("mk.peers={}", list.join(",")));
        }
        f.write_str(&words.join(" "))
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

    #[test]
    fn formats_mk_keys_after_the_base() {
        let c = GuestCmdline::new("alpha", InstanceId(1)).selftest(true);
        assert_eq!(
            c.to_string(),
            "console=ttyS0 panic=-1 mk.name=alpha mk.id=1 mk.selftest=1"
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
            "console=ttyS0 panic=-1 mk.name=alpha mk.id=1 mk.peers=0:host,1:alpha,2:beta"
        );
    }
}
