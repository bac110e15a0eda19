//! What of the CPU a moved process may depend on: the instruction-set
//! extensions user code picks at start (glibc chooses its string functions
//! by them, compilers emit them) and the register state the kernel saves
//! (`NT_X86_XSTATE`, in the CPU's own XSAVE layout, which a restore writes
//! back whole). A destination that lacks an extension the origin has could
//! not run the process: the move is refused before the freeze, by name.
//! Register state goes between two layouts where the difference is only
//! where the parts lie or a part the destination has no use for
//! ([`convert`]): x87, SSE and AVX lie at the same offsets on every CPU;
//! the protection-key register (PKRU) is dropped on a CPU without
//! protection keys (no program picks code by them at start; a process
//! that set keys would find them all open); MPX's bound registers, which
//! some CPUs enable and no program can use since Linux dropped MPX, are
//! dropped. Other parts (AVX-512's, AMX's) move only between CPUs of one
//! layout.
//!
//! What a process depends on is the CPU it *started* on, not the one it
//! runs on: glibc reads CPUID once, at start, and every later choice
//! (lazily bound functions, `dlopen`ed libraries) uses that reading. So a
//! process restored here keeps the extensions of its image ([`remember`]),
//! and a later move asks the next destination for those ([`picked`]): a
//! program started in a TCG guest that moved to this host may go back to
//! a guest, though this host has extensions the guest lacks. Until it
//! calls `execve`, which picks anew.

use std::sync::Mutex;

use super::procfs::ProcDir;

/// Flags of `/proc/cpuinfo` that user code can depend on (not the
/// kernel's own: mitigations, virtualization, timers).
pub const USER_FLAGS: &[&str] = &[
    "mmx",
    "sse",
    "sse2",
    "pni",
    "ssse3",
    "sse4_1",
    "sse4_2",
    "sse4a",
    "popcnt",
    "abm",
    "lahf_lm",
    "cx8",
    "cx16",
    "cmov",
    "movbe",
    "pclmulqdq",
    "aes",
    "fma",
    "fma4",
    "xop",
    "tbm",
    "f16c",
    "avx",
    "avx2",
    "bmi1",
    "bmi2",
    "adx",
    "rdrand",
    "rdseed",
    "rdpid",
    "rdtscp",
    "erms",
    "fsrm",
    "rtm",
    "hle",
    "sha_ni",
    "gfni",
    "vaes",
    "vpclmulqdq",
    "clflushopt",
    "clwb",
    "xsave",
    "xsaveopt",
    "xsavec",
    "xgetbv1",
    "movdiri",
    "movdir64b",
    "serialize",
    "avx_vnni",
    "avx512f",
    "avx512dq",
    "avx512ifma",
    "avx512cd",
    "avx512bw",
    "avx512vl",
    "avx512vbmi",
    "avx512_vbmi2",
    "avx512_vnni",
    "avx512_bitalg",
    "avx512_vpopcntdq",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vp2intersect",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
];

/// This CPU's user-visible extensions (of the first CPU in
/// `/proc/cpuinfo`; a kernel shows the same set for all), sorted.
pub fn user_features() -> Vec<String> {
    // Read once: a move asks for them while its process is frozen.
    static FEATURES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    FEATURES
        .get_or_init(|| features_of(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default()))
        .clone()
}

/// The user-visible extensions a `/proc/cpuinfo` text names (its first
/// `flags` line), sorted.
pub fn features_of(cpuinfo: &str) -> Vec<String> {
    let flags = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "flags").then_some(v)
        })
        .unwrap_or("");
    let mut v: Vec<String> = flags
        .split_whitespace()
        .filter(|f| USER_FLAGS.contains(f))
        .map(str::to_string)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// One run of one program: a pid, when it started and its auxiliary
/// vector, which every `execve` renews (the stack's random address, the
/// entry point...) and a restore puts back as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    pid: i32,
    start: u64,
    auxv: Vec<(u64, u64)>,
}

impl Run {
    fn of(pid: i32) -> Option<Run> {
        let pd = ProcDir::new(std::path::Path::new("/proc"), pid);
        Some(Run {
            pid,
            start: pd.stat().ok()?.start_time,
            auxv: pd.auxv().ok()?,
        })
    }
}

/// The processes this one restored, each with the extensions its code
/// was picked for (those of the CPU its program started on).
static PICKED: Mutex<Vec<(Run, Vec<String>)>> = Mutex::new(Vec::new());

fn picked_table() -> std::sync::MutexGuard<'static, Vec<(Run, Vec<String>)>> {
    PICKED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records that process `pid`, just restored here, picked its code for
/// `cpu` (an image's list; empty: not known, and [`picked`] gives this
/// CPU's). Forgets processes that ended or ran another program since.
pub fn remember(pid: i32, cpu: &[String]) {
    let mut t = picked_table();
    t.retain(|(run, _)| Run::of(run.pid).as_ref() == Some(run));
    if let (Some(run), false) = (Run::of(pid), cpu.is_empty()) {
        t.push((run, cpu.to_vec()));
    }
}

/// The extensions process `pid` may have picked its code for: those its
/// image said when this process restored it and it runs the same program
/// since, otherwise this CPU's (a superset: every move checked that the
/// destination had them all).
pub fn picked(pid: i32) -> Vec<String> {
    let t = picked_table();
    if t.is_empty() {
        return user_features();
    }
    let run = Run::of(pid);
    t.iter()
        .find(|(r, _)| Some(r) == run.as_ref())
        .map_or_else(user_features, |(_, cpu)| cpu.clone())
}

/// While the guard lives, [`picked`] gives nothing for `pids`: a move the
/// user asked not to check (`--any-cpu`: they vouch the program uses none
/// of the extensions the destination lacks) asks the destination for none,
/// and its image names none, so the restore checks none and its copy then
/// counts as picked for the CPU it runs on.
pub fn unchecked(pids: &[i32]) -> Unchecked {
    let mut t = picked_table();
    let runs: Vec<Run> = pids.iter().filter_map(|&p| Run::of(p)).collect();
    for run in &runs {
        // First: found before what a restore remembered for it.
        t.insert(0, (run.clone(), Vec::new()));
    }
    Unchecked { runs }
}

/// See [`unchecked`]; dropped, the processes' extensions count again.
#[derive(Debug)]
pub struct Unchecked {
    runs: Vec<Run>,
}

impl Drop for Unchecked {
    fn drop(&mut self) {
        let mut t = picked_table();
        for run in &self.runs {
            if let Some(i) = t.iter().position(|(r, c)| r == run && c.is_empty()) {
                t.remove(i);
            }
        }
    }
}

/// The `GLIBC_TUNABLES` setting under which glibc picks none of its code
/// for `flags` (`/proc/cpuinfo` names; those glibc does not use, e.g.
/// SHA or GFNI, need nothing), e.g.
/// `GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX512F,-AVX512VL`; `None` where
/// glibc picks nothing by any of them.
pub fn glibc_tunables_without<S: AsRef<str>>(flags: &[S]) -> Option<String> {
    // glibc's names (sysdeps/x86/cpu-tunables.c) of what it picks by.
    const GLIBC: &[(&str, &str)] = &[
        ("avx", "AVX"),
        ("avx2", "AVX2"),
        ("avx512f", "AVX512F"),
        ("avx512vl", "AVX512VL"),
        ("avx512bw", "AVX512BW"),
        ("avx512dq", "AVX512DQ"),
        ("avx512cd", "AVX512CD"),
        ("bmi1", "BMI1"),
        ("bmi2", "BMI2"),
        ("erms", "ERMS"),
        ("fma", "FMA"),
        ("fma4", "FMA4"),
        ("abm", "LZCNT"),
        ("movbe", "MOVBE"),
        ("popcnt", "POPCNT"),
        ("rtm", "RTM"),
        ("sse4_1", "SSE4_1"),
        ("sse4_2", "SSE4_2"),
        ("ssse3", "SSSE3"),
        ("xsavec", "XSAVEC"),
    ];
    let off: Vec<String> = GLIBC
        .iter()
        .filter(|(f, _)| flags.iter().any(|x| x.as_ref() == *f))
        .map(|(_, g)| format!("-{g}"))
        .collect();
    (!off.is_empty()).then(|| format!("GLIBC_TUNABLES=glibc.cpu.hwcaps={}", off.join(",")))
}

/// Why a program whose code was picked for `lacks` (`, `-separated) cannot
/// run on this CPU; `more` goes inside the closing parenthesis.
pub fn lacking_text(lacks: &str, more: &str) -> String {
    format!("this CPU lacks {lacks}, which the program picked its code for when it started (that code would fault here{more})")
}

/// A thread's FP registers, from a CPU whose XSAVE components were
/// `origin`, laid out for this one ([`convert`]; FXSAVE ones as they are).
pub fn fp_here(st: &super::image::ThreadState, origin: u64) -> Result<Vec<u8>, XstateError> {
    if st.fp_kind != super::image::FpKind::Xstate {
        return Ok(st.fp.clone());
    }
    convert(&st.fp, origin, &Layout::here())
}

/// Which of `cpu` this CPU lacks.
pub fn lacking_here(cpu: &[String]) -> Vec<String> {
    let here = user_features();
    cpu.iter().filter(|f| !here.contains(f)).cloned().collect()
}

/// Bytes of the XSAVE area for the features this kernel enabled (CPUID
/// leaf 0xD, sub-leaf 0, EBX): the size of a thread's `NT_X86_XSTATE`,
/// which a restore must write back exactly.
pub fn fp_state_size() -> u32 {
    // CPUID is in every x86_64 CPU; leaf 0xD exists wherever XSAVE does
    // (the OSXSAVE bit says the kernel turned it on).
    let l1 = std::arch::x86_64::__cpuid(1);
    if l1.ecx & (1 << 27) == 0 {
        return 512;
    }
    std::arch::x86_64::__cpuid_count(0xd, 0).ebx
}

/// The state components this kernel enabled (XCR0, by `XGETBV`): x87 and
/// SSE alone without XSAVE.
pub fn xfeatures() -> u64 {
    let l1 = std::arch::x86_64::__cpuid(1);
    if l1.ecx & (1 << 27) == 0 {
        return 3;
    }
    super::sys::xgetbv0()
}

/// Where this CPU's XSAVE layout puts things.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Enabled components (XCR0).
    pub xfeatures: u64,
    /// Bytes of the whole area (what `NT_X86_XSTATE` is).
    pub size: u32,
}

impl Layout {
    /// This CPU's.
    pub fn here() -> Layout {
        Layout {
            xfeatures: xfeatures(),
            size: fp_state_size(),
        }
    }
}

/// x87 and SSE (the legacy area), AVX (at 576 everywhere): what moves
/// between layouts.
const PORTABLE: u64 = 0b111;
/// PKRU, the protection-key rights register: dropped where there is none.
const PKRU: u64 = 1 << 9;
/// MPX's bound registers: enabled by some CPUs (QEMU's TCG, whose threads
/// all have them marked in use), of use to no program since Linux dropped
/// MPX (5.6): dropped.
const MPX: u64 = 0b11 << 3;
/// Where the header's XSTATE_BV is (XCOMP_BV and the reserved bytes
/// follow, zero in the standard layout).
const XSTATE_BV: usize = 512;
const AVX: std::ops::Range<usize> = 576..832;

/// Why a thread's register state cannot be laid out for this CPU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XstateError {
    #[error("a register state of {0} bytes, too short for an XSAVE area")]
    Short(usize),
    #[error("its register state uses XSAVE components {0:#x}, which this CPU lays out otherwise or lacks")]
    Components(u64),
}

/// A thread's `NT_X86_XSTATE` from a CPU whose XSAVE components were
/// `origin` (0: not known), laid out for `here`: as it is in the same
/// layout; otherwise the legacy area, AVX and the header carried, PKRU
/// dropped if `here` has none, and an error naming what cannot be carried.
pub fn convert(fp: &[u8], origin: u64, here: &Layout) -> Result<Vec<u8>, XstateError> {
    if fp.len() == here.size as usize && (origin == here.xfeatures || origin == 0) {
        return Ok(fp.to_vec());
    }
    let Some(bv) = fp
        .get(XSTATE_BV..XSTATE_BV + 8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    else {
        return Err(XstateError::Short(fp.len()));
    };
    let mut keep = bv & PORTABLE;
    let mut lost = bv & !(PORTABLE | MPX | PKRU);
    // PKRU, 8 bytes: at the end of both areas when it is the last part of
    // both (parts lie in the order of their numbers); dropped where there
    // are no protection keys.
    let last = |x: u64| 63 - x.leading_zeros();
    let pkru_last = |x: u64| x & PKRU != 0 && last(x) == 9;
    if bv & PKRU != 0 && here.xfeatures & PKRU != 0 {
        if pkru_last(origin) && pkru_last(here.xfeatures) {
            keep |= PKRU;
        } else {
            lost |= PKRU;
        }
    }
    if bv & (1 << 2) != 0 && here.xfeatures & (1 << 2) == 0 {
        lost |= 1 << 2;
    }
    if lost != 0 {
        return Err(XstateError::Components(lost));
    }
    let mut out = vec![0u8; here.size as usize];
    let legacy = XSTATE_BV.min(out.len());
    out[..legacy].copy_from_slice(&fp[..legacy]);
    if keep & (1 << 2) != 0 && fp.len() >= AVX.end && out.len() >= AVX.end {
        out[AVX].copy_from_slice(&fp[AVX]);
    }
    if keep & PKRU != 0 && fp.len() >= AVX.end + 8 && out.len() >= AVX.end + 8 {
        let (from, to) = (fp.len() - 8, out.len() - 8);
        out[to..].copy_from_slice(&fp[from..]);
    }
    if out.len() >= XSTATE_BV + 64 {
        out[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&keep.to_le_bytes());
    }
    Ok(out)
}

/// What a process whose code was picked for the extensions `origin`
/// ([`picked`]), from a CPU whose register state is `origin_fp` bytes of
/// components `origin_x`, would miss here, in words (empty: nothing).
pub fn missing_here(origin: &[String], origin_fp: u32, origin_x: u64) -> Vec<String> {
    missing(
        origin,
        (origin_fp, origin_x),
        &user_features(),
        &Layout::here(),
    )
}

fn missing(
    origin: &[String],
    (origin_fp, origin_x): (u32, u64),
    here: &[String],
    layout: &Layout,
) -> Vec<String> {
    let mut out = Vec::new();
    let lacks: Vec<&str> = origin
        .iter()
        .filter(|f| !here.contains(f))
        .map(String::as_str)
        .collect();
    if !lacks.is_empty() {
        let glibc = match glibc_tunables_without(&lacks) {
            Some(t) => format!("a program started with {t} uses none of them through glibc, and "),
            None => String::new(),
        };
        out.push(lacking_text(
            &lacks.join(", "),
            &format!("; {glibc}--any-cpu moves one that uses none"),
        ));
    }
    // Another layout: only what `convert` carries. A program that picked
    // no AVX-512 or AMX code leaves their registers unused (the restore
    // checks each thread's state, after the freeze); one that did is
    // refused here, before it.
    let other = (origin_fp, origin_x) != (layout.size, layout.xfeatures);
    let beyond = origin_x & !(PORTABLE | PKRU | MPX);
    let wide = origin
        .iter()
        .any(|f| f.starts_with("avx512") || f.starts_with("amx"));
    if origin_fp != 0 && other && beyond != 0 && wide {
        out.push(format!(
            "this CPU's register state (XSAVE: {} bytes, components {:#x}) is laid out otherwise than the origin's ({origin_fp} bytes, {origin_x:#x}), whose components {beyond:#x} do not move between layouts",
            layout.size, layout.xfeatures
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Layouts like QEMU's TCG `-cpu max` (AVX, PKRU; MPX left out) and this
    /// machine's AMD CPU (AVX-512), as seen here.
    const TCG: Layout = Layout {
        xfeatures: 0x207,
        size: 2696,
    };
    const AMD: Layout = Layout {
        xfeatures: 0xe7,
        size: 2432,
    };

    #[test]
    fn only_user_extensions_are_taken() {
        let info = "processor\t: 0\nflags\t\t: fpu vme sse sse2 avx2 hypervisor constant_tsc avx512f pti\nbugs\t\t: spectre_v1\nprocessor\t: 1\nflags\t\t: sse\n";
        assert_eq!(features_of(info), ["avx2", "avx512f", "sse", "sse2"]);
        assert!(features_of("").is_empty());
    }

    #[test]
    fn what_is_missing_is_named() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let here = s(&["avx", "avx2", "sse2"]);
        let (tcg, amd) = (TCG, AMD);
        assert!(missing(&s(&["avx2", "sse2"]), (832, 0x7), &here, &amd).is_empty());
        // x87, SSE, AVX and PKRU move to any layout, and MPX's unused
        // registers (QEMU's TCG enables them).
        assert!(missing(&s(&["avx2"]), (2696, 0x21f), &here, &amd).is_empty());
        let m = missing(
            &s(&["avx2", "avx512f", "avx512bw"]),
            (2432, 0xe7),
            &here,
            &tcg,
        );
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m[0].contains("avx512f, avx512bw"), "{m:?}");
        assert!(
            m[0].contains("GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX512F,-AVX512BW uses none"),
            "{m:?}"
        );
        // What glibc picks nothing by: no setting to give.
        assert_eq!(glibc_tunables_without(&["sha_ni", "gfni"]), None);
        assert!(m[1].contains("components 0xe0 do not move"), "{m:?}");
        // A program whose code was picked without AVX-512 (it started on a
        // CPU without), from a CPU with: its AVX-512 registers are unused,
        // the layout is no reason to refuse (the restore checks each
        // thread's state).
        assert!(missing(&s(&["avx2"]), (2432, 0xe7), &here, &tcg).is_empty());
        // The same layout: anything.
        assert!(missing(&[], (2432, 0xe7), &here, &amd).is_empty());
        // An origin that did not say its size: not compared.
        assert!(missing(&[], (0, 0), &here, &tcg).is_empty());
    }

    /// An XSAVE area of `layout` with XSTATE_BV `bv`, bytes numbered.
    fn area(layout: &Layout, bv: u64) -> Vec<u8> {
        let mut a: Vec<u8> = (0..layout.size).map(|i| (i % 253) as u8 + 1).collect();
        a[XSTATE_BV..XSTATE_BV + 64].fill(0);
        a[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
        a
    }

    #[test]
    fn register_state_goes_to_another_layout_with_what_both_have() {
        let (tcg, amd) = (TCG, AMD);
        // Same layout: as it is.
        let a = area(&tcg, 0x207);
        assert_eq!(convert(&a, tcg.xfeatures, &tcg).unwrap(), a);
        // TCG (PKRU) to a CPU without protection keys: legacy area and AVX
        // kept, PKRU dropped, the rest zero, XSTATE_BV saying so.
        let b = convert(&a, tcg.xfeatures, &amd).unwrap();
        assert_eq!(b.len(), 2432);
        assert_eq!(b[..512], a[..512]);
        assert_eq!(b[576..832], a[576..832]);
        assert_eq!(u64::from_le_bytes(b[512..520].try_into().unwrap()), 0x7);
        assert!(b[520..576].iter().all(|&x| x == 0));
        assert!(b[832..].iter().all(|&x| x == 0));
        // AVX-512 in use does not move to another layout.
        let z = area(&amd, 0xe7);
        let e = convert(&z, amd.xfeatures, &tcg).unwrap_err();
        assert!(e.to_string().contains("0xe0"), "{e}");
        // To a CPU with protection keys of another layout: PKRU carried,
        // from the end of one area to the end of the other.
        let intel = Layout {
            xfeatures: 0x2e7,
            size: 2696 + 64,
        };
        let c = convert(&a, tcg.xfeatures, &intel).unwrap();
        assert_eq!(u64::from_le_bytes(c[512..520].try_into().unwrap()), 0x207);
        assert_eq!(c[c.len() - 8..], a[a.len() - 8..]);
        assert_eq!(c[576..832], a[576..832]);
        // MPX's registers (TCG marks them in use) are dropped too.
        let b = convert(&area(&tcg, 0x21f), 0x21f, &amd).unwrap();
        assert_eq!(u64::from_le_bytes(b[512..520].try_into().unwrap()), 0x7);
        // Nor AVX to a CPU without it.
        let e = convert(
            &area(&tcg, 0x7),
            tcg.xfeatures,
            &Layout {
                xfeatures: 3,
                size: 576,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("0x4"), "{e}");
        // Too short to be one: an error, not a panic.
        assert!(convert(&a[..100], tcg.xfeatures, &amd).is_err());
    }

    /// A restored process keeps the extensions of its image until it runs
    /// another program; any other process has this CPU's.
    #[test]
    fn a_restored_process_keeps_what_its_code_was_picked_for_until_it_execs() {
        use std::io::{BufRead, Write};
        use std::process::{Command, Stdio};
        let here = user_features();
        let mine = std::process::id() as i32;
        assert_eq!(picked(mine), here);
        // A shell that waits, then runs another program under its pid.
        let mut sh = Command::new("sh")
            .args(["-c", "echo up; read x; exec sh -c 'echo again; read y'"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = sh.id() as i32;
        let mut out = std::io::BufReader::new(sh.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let fewer = vec!["sse2".to_string()];
        remember(pid, &fewer);
        assert_eq!(picked(pid), fewer);
        assert_eq!(picked(mine), here);
        // Nothing known: this CPU's.
        remember(mine, &[]);
        assert_eq!(picked(mine), here);
        // A move the user vouches for: nothing, while it lasts.
        let g = unchecked(&[pid]);
        assert!(picked(pid).is_empty());
        drop(g);
        assert_eq!(picked(pid), fewer);
        // execve: it picks anew, on this CPU.
        let mut stdin = sh.stdin.take().unwrap();
        writeln!(stdin, "go").unwrap();
        line.clear();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "again");
        assert_eq!(picked(pid), here);
        writeln!(stdin, "end").unwrap();
        sh.wait().unwrap();
        assert!(lacking_here(&here).is_empty());
        assert_eq!(lacking_here(&["no_such_ext".into()]), ["no_such_ext"]);
    }

    #[test]
    fn this_machine_agrees_with_itself() {
        assert!(user_features().contains(&"sse2".to_string()));
        assert!(fp_state_size() >= 512);
        assert!(missing_here(&user_features(), fp_state_size(), xfeatures()).is_empty());
        assert!(xfeatures() & 3 == 3);
    }
}
