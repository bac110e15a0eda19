//! The `mk.*` keys mkctl puts on a spawned kernel's command line and
//! guest-init reads back: one type, [`BootArgs`], for both sides — its
//! `Display` writes them (mkctl's QEMU and kexec backends), its
//! [`BootArgs::parse`] reads them from `/proc/cmdline` (guest-init).
//!
//! | key | meaning |
//! | --- | --- |
//! | `mk.name=<name>` | instance name; guest-init sets it as hostname |
//! | `mk.id=<n>` | the instance's endpoint id in the window |
//! | `mk.window=<phys>@<size>` | map the window from `/dev/mem` (kexec backend) instead of ivshmem |
//! | `mk.selftest=1` | write the selftest record into the window and power off |
//! | `mk.peers=<id>:<name>,...` | names of the endpoints, for the agent's messages (`0:host,1:alpha,2:beta`) |
//!
//! Splitting follows the kernel's own `next_arg()` (kernel/params.c): words are
//! separated by whitespace outside double quotes, a quoted value loses its
//! quotes, a word without `=` is a flag. When a key repeats, the last one wins,
//! as for most kernel parameters. This module never touches the system.

use std::fmt;

/// One word of the command line: `key` or `key=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// Text before the first `=` (the whole word for a flag).
    pub key: String,
    /// Text after the first `=`, without surrounding quotes; `None` for a flag.
    pub value: Option<String>,
}

/// Splits a command line into words the way the kernel does.
pub fn split(text: &str) -> Vec<Param> {
    let mut out = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let (quoted, body) = match rest.strip_prefix('"') {
            Some(b) => (true, b),
            None => (false, rest),
        };
        let mut in_quote = quoted;
        let mut end = body.len();
        for (i, c) in body.char_indices() {
            if c.is_whitespace() && !in_quote {
                end = i;
                break;
            }
            if c == '"' {
                in_quote = !in_quote;
            }
        }
        let word = &body[..end];
        rest = body[end..].trim_start();

        let (key, value) = match word.split_once('=') {
            Some((k, v)) => {
                let v = match v.strip_prefix('"') {
                    Some(inner) => inner.strip_suffix('"').unwrap_or(inner),
                    None if quoted => v.strip_suffix('"').unwrap_or(v),
                    None => v,
                };
                (k.to_string(), Some(v.to_string()))
            }
            None => {
                let k = if quoted {
                    word.strip_suffix('"').unwrap_or(word)
                } else {
                    word
                };
                (k.to_string(), None)
            }
        };
        out.push(Param { key, value });
    }
    out
}

/// A physical memory range given with `mk.window=<phys>@<size>` (the kexec
/// backend's window: guest-init maps it through `/dev/mem`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhysWindow {
    /// Physical address of the first byte (page aligned).
    pub phys: u64,
    /// Length in bytes (page aligned, not zero).
    pub size: u64,
}

impl fmt::Display for PhysWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:x}@0x{:x}", self.phys, self.size)
    }
}

/// What mkctl told this guest through the `mk.*` keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootArgs {
    /// `mk.name=`: the instance name, used as the hostname.
    pub name: Option<String>,
    /// `mk.id=`: this kernel's endpoint id in the window.
    pub id: Option<u32>,
    /// `mk.window=<phys>@<size>`: map the window from `/dev/mem` instead of
    /// looking for an ivshmem device.
    pub window: Option<PhysWindow>,
    /// `mk.selftest=1`: write the selftest record into the window and power off.
    pub selftest: bool,
    /// `mk.peers=<id>:<name>,...`: endpoint names, for the agent's messages.
    pub peers: Vec<(u16, String)>,
}

/// A `mk.*` key whose value guest-init cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad {key}={value:?} on the kernel command line: {reason}")]
pub struct CmdlineError {
    /// The key, e.g. `mk.id`.
    pub key: &'static str,
    /// The value as written.
    pub value: String,
    /// What was expected instead.
    pub reason: String,
}

/// Longest hostname Linux accepts (`__NEW_UTS_LEN`).
pub const MAX_NAME_LEN: usize = 64;

/// Page size the window must be aligned to.
const PAGE: u64 = 4096;

impl BootArgs {
    /// Reads the `mk.*` keys of a command line; other keys are ignored.
    pub fn parse(cmdline: &str) -> Result<Self, CmdlineError> {
        let mut args = BootArgs::default();
        for p in split(cmdline) {
            let value = p.value.clone().unwrap_or_default();
            let err = |key: &'static str, reason: &str| CmdlineError {
                key,
                value: value.clone(),
                reason: reason.to_string(),
            };
            match p.key.as_str() {
                "mk.name" => {
                    if !valid_name(&value) {
                        return Err(err(
                            "mk.name",
                            "expected 1 to 64 characters from [A-Za-z0-9._-]",
                        ));
                    }
                    args.name = Some(value);
                }
                "mk.id" => {
                    let id = value
                        .parse::<u32>()
                        .map_err(|_| err("mk.id", "expected a decimal number below 2^32"))?;
                    args.id = Some(id);
                }
                "mk.selftest" => {
                    args.selftest = match p.value.as_deref() {
                        None | Some("1") | Some("y") | Some("yes") | Some("on") => true,
                        Some("0") | Some("n") | Some("no") | Some("off") => false,
                        Some(_) => return Err(err("mk.selftest", "expected 1 or 0")),
                    };
                }
                "mk.window" => {
                    args.window = Some(parse_window(&value).map_err(|r| err("mk.window", r))?);
                }
                "mk.peers" => {
                    args.peers = parse_peers(&value).ok_or_else(|| {
                        err(
                            "mk.peers",
                            "expected <id>:<name> pairs separated by commas, e.g. 0:host,1:alpha",
                        )
                    })?;
                }
                _ => {}
            }
        }
        Ok(args)
    }
}

/// The `mk.*` words, in the order mkctl writes them (name, id, window,
/// selftest, peers), separated by spaces; what is unset is left out.
impl fmt::Display for BootArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut words: Vec<String> = Vec::new();
        if let Some(n) = &self.name {
            words.push(format!("mk.name={n}"));
        }
        if let Some(id) = self.id {
            words.push(format!("mk.id={id}"));
        }
        if let Some(w) = self.window {
            words.push(format!("mk.window={w}"));
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

/// True for a name `mk.name` and `mk.peers` accept: 1 to 64 characters
/// from `[A-Za-z0-9._-]` (a hostname; the topology checks the same).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parses `0:host,1:alpha`; `None` if any pair is not `<u16>:<valid name>`.
fn parse_peers(text: &str) -> Option<Vec<(u16, String)>> {
    text.split(',')
        .map(|pair| {
            let (id, name) = pair.split_once(':')?;
            let id = id.parse::<u16>().ok()?;
            valid_name(name).then(|| (id, name.to_string()))
        })
        .collect()
}

/// Parses `<phys>@<size>`; both sides take `0x` hex or decimal, the size also
/// a `K`, `M` or `G` suffix (powers of 1024).
fn parse_window(text: &str) -> Result<PhysWindow, &'static str> {
    let (phys, size) = text
        .split_once('@')
        .ok_or("expected <phys>@<size>, e.g. 0x100000000@16M")?;
    let phys = parse_number(phys).ok_or("physical address is not a number")?;
    let size = parse_size(size).ok_or("size is not a number with an optional K/M/G suffix")?;
    if size == 0 {
        return Err("size is zero");
    }
    if phys % PAGE != 0 || size % PAGE != 0 {
        return Err("address and size must be multiples of 4 KiB");
    }
    if phys.checked_add(size).is_none() {
        return Err("range runs past the end of the address space");
    }
    Ok(PhysWindow { phys, size })
}

fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn parse_size(text: &str) -> Option<u64> {
    let (num, shift) = match text.as_bytes().last()? {
        b'K' | b'k' => (&text[..text.len() - 1], 10),
        b'M' | b'm' => (&text[..text.len() - 1], 20),
        b'G' | b'g' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    parse_number(num)?.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: Option<&str>) -> Param {
        Param {
            key: k.into(),
            value: v.map(Into::into),
        }
    }

    #[test]
    fn splits_like_the_kernel() {
        let p = split("  console=ttyS0 quiet  foo=\"a b\" \"bar=c d\" mk.id=1\n");
        assert_eq!(
            p,
            vec![
                kv("console", Some("ttyS0")),
                kv("quiet", None),
                kv("foo", Some("a b")),
                kv("bar", Some("c d")),
                kv("mk.id", Some("1")),
            ]
        );
        assert_eq!(split(""), vec![]);
        assert_eq!(split("a= b"), vec![kv("a", Some("")), kv("b", None)]);
        // An unterminated quote runs to the end, as in the kernel.
        assert_eq!(split("x=\"a b"), vec![kv("x", Some("a b"))]);
    }

    #[test]
    fn reads_mk_keys() {
        let a = BootArgs::parse(
            "BOOT_IMAGE=/vmlinuz console=ttyS0 mk.name=alpha mk.id=7 mk.selftest=1 panic=-1\n",
        )
        .unwrap();
        assert_eq!(a.name.as_deref(), Some("alpha"));
        assert_eq!(a.id, Some(7));
        assert!(a.selftest);
        assert_eq!(a.window, None);

        let a = BootArgs::parse("mk.selftest mk.id=1 mk.id=2").unwrap();
        assert!(a.selftest);
        assert_eq!(a.id, Some(2), "last one wins");

        let a = BootArgs::parse("console=ttyS0").unwrap();
        assert_eq!(a, BootArgs::default());

        let a = BootArgs::parse("mk.peers=0:host,1:alpha,2:beta").unwrap();
        assert_eq!(
            a.peers,
            vec![(0, "host".into()), (1, "alpha".into()), (2, "beta".into())]
        );
    }

    #[test]
    fn reads_window() {
        let a = BootArgs::parse("mk.window=0x100000000@16M").unwrap();
        assert_eq!(
            a.window,
            Some(PhysWindow {
                phys: 0x1_0000_0000,
                size: 16 << 20
            })
        );
        let a = BootArgs::parse("mk.window=4096@0x2000").unwrap();
        assert_eq!(
            a.window,
            Some(PhysWindow {
                phys: 4096,
                size: 0x2000
            })
        );
    }

    #[test]
    fn rejects_bad_values_with_reason() {
        for bad in [
            "mk.id=x",
            "mk.id=-1",
            "mk.id=4294967296",
            "mk.name=",
            "mk.name=a/b",
            "mk.selftest=maybe",
            "mk.window=16M",
            "mk.window=0x1000@0",
            "mk.window=0x1001@4K",
            "mk.window=0xfffffffffffff000@8K",
            "mk.window=0x1000@99999999999999999999G",
            "mk.peers=",
            "mk.peers=1",
            "mk.peers=x:alpha",
            "mk.peers=70000:alpha",
            "mk.peers=1:alpha,2:a/b",
        ] {
            let e = BootArgs::parse(bad).unwrap_err();
            assert!(bad.starts_with(e.key), "{bad}: {e}");
            assert!(e.to_string().contains("kernel command line"), "{e}");
        }
        let long = format!("mk.name={}", "a".repeat(65));
        assert!(BootArgs::parse(&long).is_err());
    }

    fn arb_name() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::string::string_regex("[A-Za-z0-9._-]{1,64}").unwrap()
    }

    fn arb_args() -> impl proptest::strategy::Strategy<Value = BootArgs> {
        use proptest::prelude::*;
        (
            proptest::option::of(arb_name()),
            proptest::option::of(any::<u32>()),
            proptest::option::of((0u64..1 << 40, 1u64..1 << 20)),
            any::<bool>(),
            proptest::collection::vec((any::<u16>(), arb_name()), 0..5),
        )
            .prop_map(|(name, id, window, selftest, peers)| BootArgs {
                name,
                id,
                window: window.map(|(p, s)| PhysWindow {
                    phys: p * PAGE,
                    size: s * PAGE,
                }),
                selftest,
                peers,
            })
    }

    proptest::proptest! {
        /// What mkctl writes, guest-init reads back unchanged, whatever the
        /// words around it.
        #[test]
        fn written_args_read_back(args in arb_args(), base in "[a-z=0-9 ]{0,40}") {
            let line = format!("{base} {args} panic=-1\n");
            // The base may itself hold words that look like ours only if
            // they start with mk.; this alphabet cannot.
            proptest::prop_assert_eq!(BootArgs::parse(&line).unwrap(), args);
        }
    }
}
