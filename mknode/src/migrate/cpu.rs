//! What of the CPU a moved process may depend on: the instruction-set
//! extensions user code picks at start (glibc chooses its string functions
//! by them, compilers emit them) and the size of the register state the
//! kernel saves (`NT_X86_XSTATE`, which a restore writes back whole). A
//! destination that lacks one the origin has could not run the process, or
//! not restore its registers: the move is refused before the freeze, by
//! name.

/// Flags of `/proc/cpuinfo` that user code can depend on (not the
/// kernel's own: mitigations, virtualization, timers).
const USER_FLAGS: &[&str] = &[
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
    "pku",
    "ospke",
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
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    features_of(&info)
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

/// What a process from a CPU with `origin` features and `origin_fp` bytes
/// of register state would miss here, in words (empty: nothing).
pub fn missing_here(origin: &[String], origin_fp: u32) -> Vec<String> {
    missing(origin, origin_fp, &user_features(), fp_state_size())
}

fn missing(origin: &[String], origin_fp: u32, here: &[String], here_fp: u32) -> Vec<String> {
    let mut out = Vec::new();
    let lacks: Vec<&str> = origin
        .iter()
        .filter(|f| !here.contains(f))
        .map(String::as_str)
        .collect();
    if !lacks.is_empty() {
        out.push(format!(
            "this CPU lacks {} of the origin's (code picked for them at the program's start would fault here)",
            lacks.join(", ")
        ));
    }
    if origin_fp != 0 && origin_fp != here_fp {
        out.push(format!(
            "this CPU's register state (XSAVE) is {here_fp} bytes, the origin's {origin_fp}: its registers cannot be written back here"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(missing(&s(&["avx2", "sse2"]), 832, &here, 832).is_empty());
        let m = missing(&s(&["avx2", "avx512f", "avx512bw"]), 2696, &here, 832);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m[0].contains("avx512f, avx512bw"), "{m:?}");
        assert!(m[1].contains("832 bytes, the origin's 2696"), "{m:?}");
        // An origin that did not say its size: not compared.
        assert!(missing(&[], 0, &here, 832).is_empty());
    }

    #[test]
    fn this_machine_agrees_with_itself() {
        assert!(user_features().contains(&"sse2".to_string()));
        assert!(fp_state_size() >= 512);
        assert!(missing_here(&user_features(), fp_state_size()).is_empty());
    }
}
