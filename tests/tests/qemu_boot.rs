//! Boots Debian's cloud kernel under TCG with mkctl's initramfs (guest-init as
//! `/init`) and checks what the guest wrote into the shared window.
//!
//! Needs `qemu/setup.sh` to have run (kernel + static guest-init in the cache);
//! without it every test here fails with "run qemu/setup.sh first".
//! Boot times are printed: `cargo test -p mkctl-e2e -- --nocapture`.

use std::fs;
use std::path::Path;

use guest_init::selftest::{check_fill_and_tail, Record};
use mkctl::qemu::{GuestCmdline, MachineSpec, NumaNode, SharedWindow};
use mkctl::units::{ByteSize, CpuSet, InstanceId, PhysAddr, MIB};
use mkctl_e2e::{boot_timeout, make_window_file, run_qemu, Artifacts, RunOutcome, Scratch};

const WINDOW: u64 = 16 * MIB;
const RAM: u64 = 512 * MIB;

/// A 2-vCPU guest with 2 NUMA nodes (one vCPU and half the RAM each, RAM in
/// files under the scratch dir) and, if `window` is given, the window file.
fn two_node_guest(
    a: &Artifacts,
    s: &Scratch,
    name: &str,
    cmdline: &GuestCmdline,
    window: Option<&Path>,
) -> MachineSpec {
    let initrd = s.join(&format!("{name}.initrd"));
    a.initramfs().write_file(&initrd).expect("write initramfs");
    let mut m = MachineSpec::new(
        name,
        &a.kernel,
        &initrd,
        &cmdline.to_string(),
        &s.join(&format!("{name}.console.log")),
    );
    m.qemu = a.qemu.clone();
    m.vcpus = 2;
    m.memory = ByteSize(RAM);
    m.numa = (0..2)
        .map(|n| NumaNode {
            cpus: CpuSet::from_cpus([n]),
            memory: ByteSize(RAM / 2),
        })
        .collect();
    m.ram_dir = Some(s.path().to_path_buf());
    m.console.socket = Some(s.join(&format!("{name}.console.sock")));
    m.qmp = Some(s.join(&format!("{name}.qmp.sock")));
    m.window = window.map(|p| SharedWindow {
        path: p.to_path_buf(),
        size: ByteSize(WINDOW),
    });
    m
}

/// Boots, requires a clean power-off, and decodes the record in the window.
fn boot_selftest(spec: &MachineSpec, window: &Path, id: u32) -> (Record, RunOutcome) {
    let run = run_qemu(spec, boot_timeout());
    run.assert_powered_off();
    let img = fs::read(window).expect("read window file");
    assert_eq!(img.len() as u64, WINDOW, "window file size");
    let rec = Record::decode(&img)
        .unwrap_or_else(|e| panic!("no selftest record in the window: {e}\n{}", run.report()));
    check_fill_and_tail(&img, id).unwrap_or_else(|e| panic!("{e}\n{}", run.report()));
    assert!(
        run.console.contains("selftest: record written"),
        "{}",
        run.report()
    );
    eprintln!(
        "{}: boot to power-off {:.2} s (guest uptime at selftest {} s), window {}",
        spec.name,
        run.elapsed.as_secs_f64(),
        rec.text.get("uptime").map_or("?", String::as_str),
        rec.text.get("window").map_or("?", String::as_str),
    );
    (rec, run)
}

#[test]
fn selftest_guest_reports_kernel_cpus_numa_and_memory() {
    let a = Artifacts::require();
    let s = Scratch::new("selftest");
    let window = s.join("window");
    make_window_file(&window, WINDOW);
    let cmdline = GuestCmdline::new("alpha", InstanceId(1)).selftest(true);
    let spec = two_node_guest(&a, &s, "alpha", &cmdline, Some(&window));
    let (rec, run) = boot_selftest(&spec, &window, 1);
    let ctx = run.report();

    assert_eq!(rec.id, 1, "{rec:?}");
    assert_eq!(rec.text["name"], "alpha");
    assert_eq!(
        rec.text["release"], a.kernel_release,
        "uname -r in the guest"
    );
    assert_eq!(rec.cpus, 2, "CPUs online: {rec:?}");
    assert_eq!(rec.text["cpus"], "0-1");
    assert_eq!(rec.nodes, 2, "NUMA nodes: {rec:?}");
    assert_eq!(rec.text["nodes"], "0,1");
    assert_eq!(rec.text["node0.cpus"], "0");
    assert_eq!(rec.text["node1.cpus"], "1");
    // MemTotal is RAM minus what the kernel keeps for itself (its image,
    // page tables, reserved firmware ranges): somewhere in 60-100 % of it.
    assert!(
        rec.mem_total > RAM * 6 / 10 && rec.mem_total <= RAM,
        "MemTotal {} for {RAM} bytes of RAM\n{ctx}",
        rec.mem_total
    );
    for n in 0..2 {
        let kb: u64 = rec.text[&format!("node{n}.mem_kb")].parse().unwrap();
        assert!(
            kb * 1024 > RAM / 2 * 5 / 10 && kb * 1024 <= RAM / 2,
            "node {n} MemTotal {kb} kB for {} bytes\n{ctx}",
            RAM / 2
        );
    }
    assert_eq!(rec.text["window.kind"], "ivshmem");
    assert_eq!(rec.text["window.size"], WINDOW.to_string());
    assert!(run.console.contains("MiB"), "{ctx}");
    assert!(
        run.console.contains("guest-init: ") && run.console.contains("instance alpha, id 1"),
        "{ctx}"
    );
    // The RAM files are the guest's memory, as the host sees it.
    for f in spec.ram_files() {
        let len = fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
        assert_eq!(len, RAM / 2, "{}", f.display());
    }
}

#[test]
fn guest_without_window_says_so_and_powers_off() {
    let a = Artifacts::require();
    let s = Scratch::new("nowindow");
    let cmdline = GuestCmdline::new("lonely", InstanceId(3)).selftest(true);
    let spec = two_node_guest(&a, &s, "lonely", &cmdline, None);
    let run = run_qemu(&spec, boot_timeout());
    run.assert_powered_off();
    assert!(
        run.console
            .contains("no window: no ivshmem device (1af4:1110)"),
        "{}",
        run.report()
    );
    eprintln!(
        "lonely: boot to power-off without a window {:.2} s",
        run.elapsed.as_secs_f64()
    );
}

/// The kexec backend's path: the window given as `mk.window=<phys>@<size>`
/// and mapped through `/dev/mem`. The ivshmem BAR stands in for the reserved
/// region: a first boot learns its physical address, a second one maps it by
/// address only, and the host sees the record in the file behind it.
#[test]
fn window_by_physical_address_through_dev_mem() {
    let a = Artifacts::require();
    let s = Scratch::new("devmem");
    let first = s.join("window-1");
    make_window_file(&first, WINDOW);
    let probe = GuestCmdline::new("probe", InstanceId(4)).selftest(true);
    let spec = two_node_guest(&a, &s, "probe", &probe, Some(&first));
    let (rec, _) = boot_selftest(&spec, &first, 4);
    let phys_text = &rec.text["window.phys"];
    let phys = u64::from_str_radix(phys_text.trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| panic!("window.phys {phys_text:?} is not hex"));

    let second = s.join("window-2");
    make_window_file(&second, WINDOW);
    let by_addr = GuestCmdline::new("byaddr", InstanceId(5))
        .selftest(true)
        .window(PhysAddr(phys), ByteSize(WINDOW));
    let spec = two_node_guest(&a, &s, "byaddr", &by_addr, Some(&second));
    let (rec, run) = boot_selftest(&spec, &second, 5);
    assert_eq!(rec.id, 5);
    assert_eq!(rec.text["window.kind"], "devmem", "{}", run.report());
    assert_eq!(rec.text["window.phys"], *phys_text);
    assert!(run.console.contains("/dev/mem at 0x"), "{}", run.report());
}

/// A `mk.*` value guest-init cannot use is fatal: it says which and why on the
/// console and powers off (no hang, no kernel panic).
#[test]
fn bad_mk_value_is_reported_and_powers_off() {
    let a = Artifacts::require();
    let s = Scratch::new("badarg");
    let window = s.join("window");
    make_window_file(&window, WINDOW);
    let cmdline = GuestCmdline::new("badarg", InstanceId(6)).extra("mk.selftest=maybe");
    let spec = two_node_guest(&a, &s, "badarg", &cmdline, Some(&window));
    let run = run_qemu(&spec, boot_timeout());
    run.assert_powered_off();
    assert!(
        run.console
            .contains("fatal: bad mk.selftest=\"maybe\" on the kernel command line"),
        "{}",
        run.report()
    );
    assert!(!run.console.contains("Kernel panic"), "{}", run.report());
}
