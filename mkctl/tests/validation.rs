//! Every validation rule, each with a config that breaks it: the rule's
//! code, the line it points at, the message and the suggested fix.

use mkctl::topology::{self, Diagnostic, LoadError, Severity, Source, Topology};

/// A two-node machine (CPUs 0-3 and 4-7, 4G each), the host keeping CPU 0,
/// and a 4G pool at 2G: node 0's top half and node 1's bottom half.
const BASE: &str = r#"
[[machine.node]]
id = 0
cpus = "0-3"
memory = "4G"

[[machine.node]]
id = 1
cpus = "4-7"
memory = "4G"

[host]
cpus = "0"

[pool]
base = "0x80000000"
size = "4G"
"#;

fn parse_at(path: &str, text: &str) -> Result<Topology, (Source, Vec<Diagnostic>)> {
    match topology::parse(Source::new(path, text), || None) {
        Ok(t) => Ok(t),
        Err(LoadError::Invalid { file, diagnostics }) => Err((*file, diagnostics)),
        Err(e) => panic!("unexpected {e}"),
    }
}

fn diags(text: &str) -> (Source, Vec<Diagnostic>) {
    match parse_at("t.toml", text) {
        Ok(t) => (t.source.clone(), t.warnings.clone()),
        Err(x) => x,
    }
}

/// The 1-based line of the first occurrence of `marker` (the nth when
/// `nth` > 0).
fn line_of(text: &str, marker: &str, nth: usize) -> usize {
    let at = text
        .match_indices(marker)
        .nth(nth)
        .unwrap_or_else(|| panic!("marker {marker:?} not in text"))
        .0;
    text[..at].matches('\n').count() + 1
}

/// Asserts a finding with `code` at the line of `marker`, whose message and
/// help contain the given parts; returns it.
#[track_caller]
fn expect(
    text: &str,
    code: &str,
    marker: (&str, usize),
    message: &[&str],
    help: &[&str],
) -> Diagnostic {
    let (src, ds) = diags(text);
    let want_line = line_of(text, marker.0, marker.1);
    let found = ds.iter().find(|d| {
        d.code == code
            && d.span
                .as_ref()
                .is_some_and(|s| src.line_col(s.start).0 == want_line)
            && message.iter().all(|m| d.message.contains(m))
    });
    let Some(d) = found else {
        let all: Vec<String> = ds.iter().map(|d| src.render(d)).collect();
        panic!(
            "no `{code}` at line {want_line} saying {message:?}; got:\n{}",
            all.join("\n")
        );
    };
    let h = d.help.clone().unwrap_or_default();
    for m in help {
        assert!(h.contains(m), "help {h:?} lacks {m:?}");
    }
    let rendered = src.render(d);
    assert!(
        rendered.contains(&format!("t.toml:{want_line}:")),
        "rendering lacks file:line: {rendered}"
    );
    d.clone()
}

fn with(extra: &str) -> String {
    format!("{BASE}{extra}")
}

#[test]
fn base_is_valid() {
    let t = parse_at(
        "t.toml",
        &with("[[instance]]\nname = \"a\"\nid = 1\ncpus = \"1-2\"\nmemory = \"1G\"\n"),
    )
    .unwrap_or_else(|(s, d)| panic!("{}", topology::render_all(&s, &d)));
    let a = t.instance("a").unwrap();
    // Placed on node 0's part of the pool, aligned.
    assert_eq!(a.memory.start.0, 0x8000_0000);
    assert_eq!(a.memory.size(), 1 << 30);
    assert_eq!(a.numa_node, Some(0));
}

#[test]
fn toml_syntax_error_points_at_the_place() {
    let text = with("[[instance]]\nname = \"a\nid = 1\n");
    let (src, ds) = diags(&text);
    assert_eq!(ds[0].code, "toml-syntax");
    let line = src.line_col(ds[0].span.clone().unwrap().start).0;
    assert_eq!(line, line_of(&text, "name = \"a", 0));
}

/// A required key spelt wrong is one finding (the unknown key, with the
/// guess), not also "has no `memory`".
#[test]
fn a_misspelt_required_key_is_reported_once() {
    let text = with("[[instance]]\nname = \"a\"\nid = 1\ncpus = \"1\"\nmemroy = \"1G\"\n");
    let (_, ds) = diags(&text);
    let codes: Vec<&str> = ds.iter().map(|d| d.code).collect();
    assert_eq!(codes, ["unknown-key"], "{ds:?}");
    assert!(ds[0]
        .help
        .as_deref()
        .unwrap_or("")
        .contains("did you mean `memory`"));
    // Without a near miss, the missing key is still reported.
    let text = with("[[instance]]\nname = \"a\"\nid = 1\ncpus = \"1\"\n");
    let (_, ds) = diags(&text);
    assert!(
        ds.iter()
            .any(|d| d.code == "missing-key" && d.message.contains("`memory`")),
        "{ds:?}"
    );
}

#[test]
fn unknown_keys_are_all_reported_with_a_guess() {
    let text = with(
        "[[instance]]\nname = \"a\"\nid = 1\ncpu = \"1\"\ncpus = \"1\"\nmemroy = \"1G\"\nmemory = \"1G\"\n[extra]\n",
    );
    expect(
        &text,
        "unknown-key",
        ("cpu = ", 0),
        &["`cpu`", "[[instance]]"],
        &["did you mean `cpus`"],
    );
    expect(
        &text,
        "unknown-key",
        ("memroy", 0),
        &["`memroy`"],
        &["did you mean `memory`"],
    );
    expect(
        &text,
        "unknown-key",
        ("[extra]", 0),
        &["`extra`", "top level"],
        &["known keys"],
    );
}

#[test]
fn wrong_types_and_bad_values() {
    let text = with(
        "[[instance]]\nname = 7\nid = \"one\"\ncpus = \"3-1\"\nmemory = \"12Q\"\nbackend = \"xen\"\n",
    );
    expect(
        &text,
        "bad-value",
        ("name = 7", 0),
        &["expected a string, found integer"],
        &[],
    );
    expect(
        &text,
        "bad-value",
        ("id = \"one\"", 0),
        &["expected an integer"],
        &[],
    );
    expect(
        &text,
        "bad-value",
        ("cpus = \"3-1\"", 0),
        &["backwards", "\"1-3\""],
        &[],
    );
    expect(
        &text,
        "bad-value",
        ("memory = \"12Q\"", 0),
        &["unknown unit \"Q\""],
        &[],
    );
    expect(
        &text,
        "bad-value",
        ("backend = \"xen\"", 0),
        &["unknown backend \"xen\"", "\"qemu\" or \"kexec\""],
        &[],
    );
}

#[test]
fn restart_policy_and_limit() {
    use mkctl::topology::Restart;
    let inst = |name: &str, id: u32, cpu: u32, extra: &str| {
        format!("[[instance]]\nname = \"{name}\"\nid = {id}\ncpus = \"{cpu}\"\nmemory = \"256M\"\n{extra}")
    };
    // Valid: no policy (the default), on-failure with the default limit of
    // 3, and with a limit of its own.
    let text = with(&format!(
        "{}{}{}",
        inst("a", 1, 1, ""),
        inst("b", 2, 2, "restart = \"on-failure\"\n"),
        inst("c", 3, 3, "restart = \"on-failure\"\nrestart_limit = 1\n"),
    ));
    let t = parse_at("t.toml", &text)
        .unwrap_or_else(|(s, d)| panic!("{}", topology::render_all(&s, &d)));
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    let policy = |n: &str| t.instance(n).unwrap().restart;
    assert_eq!(policy("a"), Restart::No);
    assert_eq!(policy("b"), Restart::OnFailure { limit: 3 });
    assert_eq!(policy("c"), Restart::OnFailure { limit: 1 });
    assert_eq!(policy("c").limit(), Some(1));
    assert_eq!(policy("a").limit(), None);

    // Wrong values: an unknown policy, a wrong type, a zero or negative
    // limit; each at its line, saying what to write instead.
    let text = with(&format!(
        "{}{}{}{}",
        inst("a", 1, 1, "restart = \"always\"\n"),
        inst("b", 2, 2, "restart = true\n"),
        inst("c", 3, 3, "restart = \"on-failure\"\nrestart_limit = 0\n"),
        inst("d", 4, 4, "restart = \"on-failure\"\nrestart_limit = -2\n"),
    ));
    expect(
        &text,
        "bad-value",
        ("restart = \"always\"", 0),
        &[
            "`restart` in [[instance]]",
            "unknown restart policy \"always\"",
            "use \"no\" or \"on-failure\"",
        ],
        &[],
    );
    expect(
        &text,
        "bad-value",
        ("restart = true", 0),
        &["expected \"no\" or \"on-failure\", found boolean"],
        &[],
    );
    let d = expect(
        &text,
        "bad-restart-limit",
        ("restart_limit = 0", 0),
        &["instance \"c\" has restart_limit = 0"],
        &["use 1 or more", "restart_limit = 3"],
    );
    assert_eq!(d.instances, vec!["c"]);
    expect(
        &text,
        "bad-value",
        ("restart_limit = -2", 0),
        &[
            "`restart_limit`",
            "expected a non-negative integer, found -2",
        ],
        &[],
    );
    let (_, ds) = diags(&text);
    assert_eq!(ds.len(), 4, "one finding per mistake: {ds:?}");
    // A limit beside a policy that could not be read is not also "unused".
    let text = with(&inst(
        "a",
        1,
        1,
        "restart = \"always\"\nrestart_limit = 2\n",
    ));
    let (_, ds) = diags(&text);
    let codes: Vec<&str> = ds.iter().map(|d| d.code).collect();
    assert_eq!(codes, ["bad-value"], "{ds:?}");

    // A limit without the policy, or a policy the daemon cannot carry out
    // (kexec instances are not its own): warnings, the file stays valid.
    let text = with(&format!(
        "{}{}",
        inst("a", 1, 1, "restart_limit = 5\n"),
        inst("b", 2, 2, "backend = \"kexec\"\nrestart = \"on-failure\"\n"),
    ));
    let t = parse_at("t.toml", &text)
        .unwrap_or_else(|(s, d)| panic!("{}", topology::render_all(&s, &d)));
    assert_eq!(t.instance("a").unwrap().restart, Restart::No);
    let d = expect(
        &text,
        "restart-limit-unused",
        ("restart_limit = 5", 0),
        &["restart_limit of \"a\" does nothing"],
        &["add restart = \"on-failure\""],
    );
    assert_eq!(d.severity, Severity::Warning);
    let d = expect(
        &text,
        "restart-kexec",
        ("restart = \"on-failure\"", 0),
        &["\"b\" uses the kexec backend"],
        &["backend = \"qemu\""],
    );
    assert_eq!(d.severity, Severity::Warning);
    // A misspelt key gets the usual guess.
    let text = with(&inst("a", 1, 1, "restart_limt = 2\n"));
    expect(
        &text,
        "unknown-key",
        ("restart_limt", 0),
        &["`restart_limt`"],
        &["did you mean `restart_limit`"],
    );
}

#[test]
fn missing_required_keys() {
    let text = with("[[instance]]\nname = \"a\"\n");
    let (_, ds) = diags(&text);
    let missing: Vec<&str> = ds
        .iter()
        .filter(|d| d.code == "missing-key")
        .map(|d| d.message.as_str())
        .collect();
    assert_eq!(missing.len(), 3, "{missing:?}");
    expect(
        &text,
        "missing-key",
        ("[[instance]]", 0),
        &["has no `id`"],
        &["id = 1"],
    );
    expect(
        &text,
        "missing-key",
        ("[[instance]]", 0),
        &["has no `cpus`"],
        &["cpus = \"2-3\""],
    );
}

#[test]
fn cpu_that_does_not_exist() {
    let text = with("[[instance]]\nname = \"a\"\nid = 1\ncpus = \"6-9\"\nmemory = \"1G\"\n");
    let d = expect(
        &text,
        "no-such-cpu",
        ("cpus = \"6-9\"", 0),
        &["CPUs 8-9", "does not have (it has 0-7)"],
        &["cpus = \"4-7\""],
    );
    assert_eq!(d.instances, vec!["a"]);
}

#[test]
fn cpu_of_the_host() {
    let text = with("[[instance]]\nname = \"a\"\nid = 1\ncpus = \"0-1\"\nmemory = \"1G\"\n");
    expect(
        &text,
        "host-cpu",
        ("cpus = \"0-1\"", 0),
        &["CPU 0", "host kernel keeps"],
        &["use free CPUs instead: cpus = \"1-2\""],
    );
}

#[test]
fn cpu_given_to_two_instances() {
    let text = with(
        "[[instance]]\nname = \"a\"\nid = 1\ncpus = \"1-2\"\nmemory = \"1G\"\n\
         [[instance]]\nname = \"b\"\nid = 2\ncpus = \"2-3\"\nmemory = \"1G\"\n",
    );
    let d = expect(
        &text,
        "cpu-conflict",
        ("cpus = \"2-3\"", 0),
        &["CPU 2 is given to both \"a\" and \"b\""],
        // b keeps 3 and needs one more: the first free CPU of node 0 is gone,
        // so the suggestion uses node 1's.
        &["cpus = \"3-4\""],
    );
    assert_eq!(d.instances, vec!["a", "b"]);
    assert!(d.related[0].1.contains("\"a\" takes them here"));
}

#[test]
fn memory_outside_the_pool() {
    let text = with("[[instance]]\nname = \"a\"\nid = 1\ncpus = \"1\"\nmemory = \"1G\"\nmemory_base = \"0x40000000\"\n");
    expect(
        &text,
        "memory-outside-pool",
        ("memory_base", 0),
        &[
            "[0x40000000-0x80000000)",
            "outside the pool [0x80000000-0x180000000)",
        ],
        &["memory_base = \"0x80000000\""],
    );
}

#[test]
fn memory_overlapping_another_instance() {
    let text = with(
        "[[instance]]\nname = \"a\"\nid = 1\ncpus = \"1\"\nmemory = \"1G\"\nmemory_base = \"0x80000000\"\n\
         [[instance]]\nname = \"b\"\nid = 2\ncpus = \"2\"\nmemory = \"1G\"\nmemory_base = \"0xa0000000\"\n",
    );
    let d = expect(
        &text,
        "memory-overlap",
        ("memory_base = \"0xa0000000\"", 0),
        &["\"b\"", "overlaps \"a\""],
        &["memory_base = \"0xc0000000\""],
    );
    assert_eq!(d.instances, vec!["a", "b"]);
}

#[test]
fn memory_misaligned_base_and_size() {
    let text = with("[[instance]]\nname = \"a\"\nid = 1\ncpus = \"1\"\nmemory = \"1025M\"\nmemory_base = \"0x80100000\"\n");
    expect(
        &text,
        "misaligned",
        ("memory = \"1025M\"", 0),
        &["1025M", "alignment 2M"],
        &["memory = \"1G\" or \"1026M\""],
    );
    expect(
        &text,
        "misaligned",
        ("memory_base", 0),
        &["0x80100000", "alignment 2M"],
        &["memory_base = \"0x80000000\" or \"0x80200000\""],
    );
}

#[test]
fn memory_summing_past_the_pool() {
    let text = with(
        "[[instance]]\nname = \"a\"\nid = 1\ncpus = \"1\"\nmemory = \"3G\"\n\
         [[instance]]\nname = \"b\"\nid = 2\ncpus = \"2\"\nmemory = \"2G\"\n",
    );
    let d = expect(
        &text,
        "pool-overcommit",
        ("size = \"4G\"", 0),
        &["need 5G", "holds 4G"],
        &["size = \"5G\"", "by 1G"],
    );
    assert_eq!(d.instances, vec!["a", "b"]);
}

#[test]
fn pool_fragmented_by_explicit_bases() {
    // 1G pinned in the middle of the 4G pool leaves two 1.5G holes: a 2G
    // instance fits the total but not any hole.
    let text = with(
        "[[instance]]\nname = \"a\"\nid = 1\ncpus = \"1\"\nmemory = \"1G\"\nmemory_base = \"0xe0000000\"\n\
         [[instance]]\nname = \"b\"\nid = 2\ncpus = \"2\"\nmemory = \"2G\"\n",
    );
    expect(
        &text,
        "pool-fragmented",
        ("memory = \"2G\"", 0),
        &["no free aligned range of 2G", "\"b\""],
        &["largest free range is 1536M"],
    );
}

#[test]
fn duplicate_names_and_ids() {
    let text = with(
        "[[instance]]\nname = \"a\"\nid = 1\ncpus = \"1\"\nmemory = \"1G\"\n\
         [[instance]]\nname = \"a\"\nid = 1\ncpus = \"2\"\nmemory = \"1G\"\n",
    );
    expect(
        &text,
        "duplicate-name",
        ("name = \"a\"", 1),
        &["two instances are named \"a\""],
        &["name = \"a-2\""],
    );
    // BASE's node 1 holds the first "id = 1".
    let d = expect(
        &text,
        "duplicate-id",
        ("id = 1", 2),
        &["\"a\" and \"a (2nd)\" both have id 1"],
        &["id = 2"],
    );
    assert_eq!(d.instances, vec!["a", "a (2nd)"]);
}

#[test]
fn ids_and_names_out_of_range() {
    let text = with(
        "[[instance]]\nname = \"9lives\"\nid = 0\ncpus = \"1\"\nmemory = \"1G\"\n\
         [[instance]]\nname = \"host\"\nid = 600\ncpus = \"2\"\nmemory = \"1G\"\n",
    );
    expect(
        &text,
        "bad-name",
        ("name = \"9lives\"", 0),
        &["not usable as a hostname"],
        &["name = \"k9lives\""],
    );
    expect(
        &text,
        "bad-id",
        ("id = 0", 1),
        &["id 0 is out of range"],
        &["from 1 to 511"],
    );
    expect(
        &text,
        "bad-name",
        ("name = \"host\"", 0),
        &["means the host kernel"],
        &[],
    );
    expect(&text, "bad-id", ("id = 600", 0), &["id 600"], &[]);
}

#[test]
fn numa_mismatch_is_a_warning_not_an_error() {
    // CPUs on node 0 with memory pinned to node 1; CPUs across nodes; CPUs
    // not on the node asked for.
    let text = with(
        "[[instance]]\nname = \"a\"\nid = 1\ncpus = \"1\"\nmemory = \"1G\"\nmemory_base = \"0x100000000\"\n\
         [[instance]]\nname = \"b\"\nid = 2\ncpus = \"3-4\"\nmemory = \"1G\"\n\
         [[instance]]\nname = \"c\"\nid = 3\ncpus = \"2\"\nmemory = \"512M\"\nnuma_node = 1\n",
    );
    let t = parse_at("t.toml", &text)
        .unwrap_or_else(|(s, d)| panic!("{}", topology::render_all(&s, &d)));
    assert!(t.warnings.iter().all(|w| w.severity == Severity::Warning));
    let d = expect(
        &text,
        "numa-split",
        ("memory_base = \"0x100000000\"", 0),
        &["CPUs of \"a\" are on node(s) 0", "on node(s) 1"],
        &["move memory_base"],
    );
    assert_eq!(d.severity, Severity::Warning);
    expect(
        &text,
        "numa-split",
        ("cpus = \"3-4\"", 0),
        &["span NUMA nodes 0, 1"],
        &[],
    );
    expect(
        &text,
        "numa-split",
        ("cpus = \"2\"", 0),
        &["meant for node 1", "CPU"],
        &["use CPUs of node 1 (4-7)"],
    );
}

#[test]
fn numa_node_that_does_not_exist() {
    let text =
        with("[[instance]]\nname = \"a\"\nid = 1\ncpus = \"1\"\nmemory = \"1G\"\nnuma_node = 5\n");
    expect(
        &text,
        "no-such-node",
        ("[[instance]]", 0),
        &["NUMA node 5"],
        &["nodes 0, 1"],
    );
}

#[test]
fn kernel_and_initrd_files_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vmlinuz"), b"x").unwrap();
    let text = with(
        "[defaults]\nkernel = \"vmlinuz\"\n\
         [[instance]]\nname = \"a\"\nid = 1\ncpus = \"1\"\nmemory = \"1G\"\ninitrd = \"missing.cpio\"\n\
         [[instance]]\nname = \"b\"\nid = 2\ncpus = \"2\"\nmemory = \"1G\"\nkernel = \"nope/bzImage\"\n",
    );
    let path = dir.path().join("t.toml");
    let (src, ds) = parse_at(path.to_str().unwrap(), &text).expect_err("invalid");
    let files: Vec<&Diagnostic> = ds.iter().filter(|d| d.code == "missing-file").collect();
    // The default kernel exists (relative to the file's directory); the two
    // overrides do not.
    assert_eq!(files.len(), 2, "{}", topology::render_all(&src, &ds));
    assert!(files[0].message.contains("initrd file") && files[0].message.contains("missing.cpio"));
    assert!(files[1].message.contains("kernel file") && files[1].message.contains("nope/bzImage"));
    assert!(files[1]
        .help
        .as_ref()
        .unwrap()
        .contains("kernel = \"auto\""));
}

#[test]
fn stock_kernel_series() {
    let inst = |name: &str, id: u32, extra: &str| {
        format!(
            "[[instance]]\nname = \"{name}\"\nid = {id}\ncpus = \"{id}\"\nmemory = \"1G\"\n{extra}"
        )
    };
    let ok = with(&format!(
        "{}{}",
        inst("old", 1, ""),
        inst("new", 2, "kernel = \"auto-6.12\"\n")
    ));
    let t = parse_at("t.toml", &ok).expect("auto-6.12 is a kernel");
    assert_eq!(t.instances[0].kernel, topology::ImageSpec::Auto);
    assert_eq!(
        t.instances[1].kernel,
        topology::ImageSpec::AutoSeries(topology::KernelSeries::V6_12)
    );
    assert_eq!(t.instances[1].initrd, topology::ImageSpec::Auto);
    // Serialized as the topology spells it.
    let json = serde_json::to_value(&t.instances[1]).unwrap();
    assert_eq!(json["kernel"], "auto-6.12");
    assert_eq!(json["initrd"], "auto");

    let bad = with(&inst("a", 1, "kernel = \"auto-6.13\"\n"));
    expect(
        &bad,
        "bad-value",
        ("auto-6.13", 0),
        &["no stock kernel \"auto-6.13\""],
        &["\"auto-6.12\"", "qemu/setup.sh"],
    );
    let initrd = with(&inst("a", 1, "initrd = \"auto-6.12\"\n"));
    expect(
        &initrd,
        "bad-value",
        ("initrd = ", 0),
        &["names a stock kernel, not an initrd"],
        &["initrd = \"auto\""],
    );
}

#[test]
fn pool_rules() {
    let no_pool = "[[machine.node]]\nid = 0\ncpus = \"0-3\"\nmemory = \"8G\"\n\
                   [[instance]]\nname = \"a\"\nid = 1\ncpus = \"1\"\nmemory = \"1G\"\n";
    let (_, ds) = diags(no_pool);
    let d = ds.iter().find(|d| d.code == "no-pool").expect("no-pool");
    assert!(d.help.as_ref().unwrap().contains("size = \"4G\""), "{d:?}");

    let outside = "[[machine.node]]\nid = 0\ncpus = \"0-3\"\nmemory = \"8G\"\n\
                   [pool]\nbase = \"0x180000000\"\nsize = \"4G\"\n";
    expect(
        outside,
        "pool-outside",
        ("base = ", 0),
        &["[0x180000000-0x280000000)", "not inside"],
        &["node 0 [0x0-0x200000000)"],
    );

    let host_mem = "[[machine.node]]\nid = 0\ncpus = \"0-3\"\nmemory = \"8G\"\n\
                    [host]\nmemory = \"6G\"\n[pool]\nsize = \"4G\"\n";
    expect(
        host_mem,
        "host-memory",
        ("size = \"4G\"", 0),
        &["leaves the host 4G", "asks for 6G"],
        &["at most 2G"],
    );

    let align = "[[machine.node]]\nid = 0\ncpus = \"0-3\"\nmemory = \"8G\"\n\
                 [pool]\nsize = \"4G\"\nalign = \"3M\"\n";
    expect(
        align,
        "bad-align",
        ("align", 0),
        &["3M is not a power of two"],
        &["align = \"2M\""],
    );
}

#[test]
fn host_must_keep_cpu0_and_exist() {
    let text = BASE.replace("[host]\ncpus = \"0\"", "[host]\ncpus = \"1,9\"");
    expect(
        &text,
        "host-cpu0",
        ("cpus = \"1,9\"", 0),
        &["must keep CPU 0"],
        &["cpus = \"0-1,9\""],
    );
    expect(
        &text,
        "no-such-cpu",
        ("cpus = \"1,9\"", 0),
        &["host CPUs 9"],
        &["0-7"],
    );
}

#[test]
fn window_rules() {
    let text = with("[window]\nsize = \"3M\"\n");
    expect(
        &text,
        "bad-window",
        ("size = \"3M\"", 0),
        &["not a power of two"],
        &["size = \"4M\""],
    );
    let text = with("[window]\nsize = \"16M\"\nbase = \"0x10000000\"\n");
    expect(
        &text,
        "window-outside",
        ("base = \"0x10000000\"", 0),
        &["not inside the pool"],
        &["base = \"0x17f000000\""],
    );
}

#[test]
fn machine_nodes_must_not_overlap() {
    let text = "[[machine.node]]\nid = 0\ncpus = \"0-3\"\nmemory = \"4G\"\n\
                [[machine.node]]\nid = 0\ncpus = \"3-4\"\nmemory = \"4G\"\nmemory_base = \"0x80000000\"\n";
    expect(
        text,
        "duplicate-node",
        ("id = 0", 1),
        &["node 0 is described twice"],
        &["id = 1"],
    );
    expect(
        text,
        "node-overlap",
        ("cpus = \"3-4\"", 0),
        &["CPU", "3"],
        &[],
    );
    expect(
        text,
        "node-overlap",
        ("memory_base", 0),
        &["overlaps node 0"],
        &["memory_base = \"0x100000000\""],
    );
}

#[test]
fn invalid_example_reports_everything_in_one_run() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/invalid.toml");
    let err = topology::load(std::path::Path::new(path), || None).unwrap_err();
    let LoadError::Invalid { diagnostics, file } = &err else {
        panic!("{err}")
    };
    let codes: Vec<(&str, usize)> = diagnostics
        .iter()
        .map(|d| (d.code, file.line_col(d.span.clone().unwrap().start).0))
        .collect();
    assert_eq!(
        codes,
        vec![
            ("unknown-key", 11),
            ("pool-overcommit", 15),
            ("duplicate-name", 24),
            ("duplicate-id", 25),
            ("no-such-cpu", 26),
            ("cpu-conflict", 26),
            ("missing-file", 28),
        ]
    );
}

#[test]
fn shipped_examples_are_valid() {
    for name in ["demo", "large", "kexec"] {
        let path = format!("{}/../configs/{name}.toml", env!("CARGO_MANIFEST_DIR"));
        let t = topology::load(std::path::Path::new(&path), || None)
            .unwrap_or_else(|e| panic!("{name}: {}", e.render()));
        assert!(t.warnings.is_empty(), "{name}: {:?}", t.warnings);
    }
}

#[test]
fn extra_guest_files_must_exist_and_be_absolute() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("prog"), b"x").unwrap();
    let text = with(
        "[defaults]\nfiles = { \"/bin/prog\" = \"prog\", \"/bin/gone\" = \"nope\", \"rel\" = \"prog\", \"/init\" = \"prog\" }\n",
    );
    let path = dir.path().join("t.toml");
    let (src, ds) = parse_at(path.to_str().unwrap(), &text).expect_err("invalid");
    let msgs: Vec<&str> = ds.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(ds.len(), 3, "{}", topology::render_all(&src, &ds));
    assert!(
        msgs.iter()
            .any(|m| m.contains("nope") && m.contains("/bin/gone")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter().any(|m| m.contains("\"rel\" must be absolute")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("\"/init\" must be absolute and not /init")),
        "{msgs:?}"
    );
    // The valid entry alone is accepted, resolved against the file's directory.
    let ok = with("[defaults]\nfiles = { \"/bin/prog\" = \"prog\" }\n");
    let t = parse_at(path.to_str().unwrap(), &ok)
        .unwrap_or_else(|(s, d)| panic!("{}", topology::render_all(&s, &d)));
    assert_eq!(
        t.files,
        vec![("/bin/prog".to_string(), dir.path().join("prog"))]
    );
}
