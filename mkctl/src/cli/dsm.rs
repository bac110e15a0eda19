//! `mkctl dsm ls|show|rm`: the DSM regions as the daemon's kernels see
//! them (the daemon joins the registry with every kernel's counters).

use super::live::{connect, progress, refused};
use super::{DsmAction, Failure, Res, EXIT_OK};
use crate::daemon::control::{DsmRegion, Reply, Request};
use crate::units::ByteSize;

fn report(name: Option<String>) -> Result<Vec<DsmRegion>, Failure> {
    let reply = connect()?
        .call(&Request::DsmReport { name }, progress)
        .map_err(|e| Failure::Failed(crate::error_chain(&e)))?;
    match reply {
        Reply::Dsm { regions } => Ok(regions),
        other => Err(refused(other)),
    }
}

pub(super) fn run(action: DsmAction) -> Res {
    match action {
        DsmAction::Ls { json } => {
            let regions = report(None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&regions)?);
                return Ok(EXIT_OK);
            }
            if regions.is_empty() {
                println!("no DSM regions (programs create them with mkdsm_map())");
                return Ok(EXIT_OK);
            }
            println!("{:<20} {:>9}  {:<10} MAPPED ON", "REGION", "SIZE", "HOME");
            for r in &regions {
                let mapped: Vec<String> = r
                    .kernels
                    .iter()
                    .filter(|k| k.mappers > 0)
                    .map(|k| format!("{} ({})", k.kernel, k.mappers))
                    .collect();
                println!(
                    "{:<20} {:>9}  {:<10} {}",
                    r.name,
                    ByteSize(r.size).human(),
                    r.home,
                    if mapped.is_empty() {
                        "-".to_string()
                    } else {
                        mapped.join(", ")
                    }
                );
            }
            Ok(EXIT_OK)
        }
        DsmAction::Show { name, json } => {
            let regions = report(Some(name))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&regions)?);
                return Ok(EXIT_OK);
            }
            for r in &regions {
                println!(
                    "region {} (id {}): {} in {} pages, home {}",
                    r.name,
                    r.id,
                    ByteSize(r.size).human(),
                    r.size / 4096,
                    r.home
                );
                println!(
                    "{:<10} {:>4} {:>7} {:>7} {:>8} {:>8} {:>8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>6}",
                    "KERNEL",
                    "PROC",
                    "SHARED",
                    "EXCL",
                    "READ-F",
                    "WRITE-F",
                    "FETCHES",
                    "INVAL",
                    "IN",
                    "OUT",
                    "MEAN",
                    "P99",
                    "FAILED"
                );
                for k in &r.kernels {
                    println!(
                        "{:<10} {:>4} {:>7} {:>7} {:>8} {:>8} {:>8} {:>6} {:>9} {:>9} {:>7}µs {:>7}µs {:>6}",
                        k.kernel,
                        k.mappers,
                        k.shared_pages,
                        k.exclusive_pages,
                        k.read_faults,
                        k.write_faults,
                        k.fetches,
                        k.invalidations,
                        ByteSize(k.bytes_in).human(),
                        ByteSize(k.bytes_out).human(),
                        k.fault_mean_us,
                        k.fault_p99_us,
                        k.failed
                    );
                }
                for k in &r.kernels {
                    if let Some(e) = &k.error {
                        println!("  {}: {e}", k.kernel);
                    }
                    if k.lost_pages > 0 {
                        println!(
                            "  {}: {} page(s) lost with the kernel that held them",
                            k.kernel, k.lost_pages
                        );
                    }
                }
            }
            Ok(EXIT_OK)
        }
        DsmAction::Rm { name } => {
            let reply = connect()?
                .call(&Request::DsmRemove { name }, progress)
                .map_err(|e| Failure::Failed(crate::error_chain(&e)))?;
            match reply {
                Reply::Ok { message } => {
                    println!("{message}");
                    Ok(EXIT_OK)
                }
                other => Err(refused(other).into()),
            }
        }
    }
}
