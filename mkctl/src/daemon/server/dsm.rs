//! The DSM across the daemon's kernels: the registry (kept by the host's
//! agent, endpoint 0) joined with what each ready kernel holds and counted
//! of each region, for `mkctl dsm ls|show|rm`.

use std::time::Duration;

use mknode::agent::Dsm;
use mknode::wire::{DsmRegionStat, Msg};

use super::Daemon;
use crate::daemon::control::{DsmKernel, DsmRegion, Reply};
use crate::daemon::error::RequestError;

/// How long a kernel may take to report its DSM.
const STAT_TIMEOUT: Duration = Duration::from_secs(5);

impl Daemon {
    /// Every region (or only `name`), with each kernel's view.
    /// The instances whose agents answer now: (name, id).
    pub(super) fn serving(&self) -> Vec<(String, u16)> {
        self.registry()
            .instances
            .values()
            .filter(|i| i.state.serves())
            .map(|i| (i.name.clone(), i.id))
            .collect()
    }

    pub(super) fn dsm_report(&self, name: Option<&str>) -> Result<Vec<DsmRegion>, RequestError> {
        let agent = self.agent()?;
        let dsm = agent.facet::<Dsm>();
        // (kernel name, its stats)
        let mut views: Vec<(String, Vec<DsmRegionStat>)> = vec![(
            "host".into(),
            dsm.stats()?.regions.iter().map(|r| r.to_wire()).collect(),
        )];
        let ready = self.serving();
        for (kernel, id) in ready {
            let got = agent.call_for(
                id,
                STAT_TIMEOUT,
                |req| Msg::DsmStat { req },
                |m| match m {
                    Msg::DsmStats { regions, .. } => Some(regions),
                    _ => None,
                },
            );
            match got {
                Ok(r) => views.push((kernel, r)),
                Err(e) => log::warn!("dsm report: {}", crate::error_chain(&e)),
            }
        }
        let kernel_name = |id: u16| peer_name(&agent, id);
        let mut out = Vec::new();
        for info in dsm.regions() {
            if name.is_some_and(|n| n != info.name) {
                continue;
            }
            let kernels = views
                .iter()
                .filter_map(|(k, stats)| {
                    let s = stats.iter().find(|s| s.region == info.id)?;
                    Some(DsmKernel {
                        kernel: k.clone(),
                        mappers: s.mappers,
                        shared_pages: s.shared,
                        exclusive_pages: s.exclusive,
                        read_faults: s.read_faults,
                        write_faults: s.write_faults,
                        fetches: s.requests,
                        invalidations: s.invalidations,
                        bytes_in: s.bytes_in,
                        bytes_out: s.bytes_out,
                        failed: s.failed,
                        lost_pages: s.lost_pages,
                        fault_mean_us: s.mean_us,
                        fault_p99_us: s.p99_us,
                        error: (!s.error.is_empty()).then(|| s.error.clone()),
                    })
                })
                .collect();
            out.push(DsmRegion {
                name: info.name.clone(),
                id: info.id,
                size: info.size,
                home: kernel_name(info.home),
                kernels,
            });
        }
        if let Some(n) = name {
            if out.is_empty() {
                return Err(RequestError::NoRegion(n.to_string()));
            }
        }
        Ok(out)
    }

    /// Removes region `name`, unless a process maps it somewhere.
    pub(super) fn dsm_remove(&self, name: &str) -> Result<Reply, RequestError> {
        let report = self.dsm_report(Some(name))?;
        let places: Vec<String> = report
            .iter()
            .flat_map(|r| r.kernels.iter())
            .filter(|k| k.mappers > 0)
            .map(|k| format!("{} ({} process(es))", k.kernel, k.mappers))
            .collect();
        if !places.is_empty() {
            return Err(RequestError::RegionMapped {
                name: name.to_string(),
                places: places.join(", "),
            });
        }
        self.agent()?.facet::<Dsm>().remove(name)?;
        Ok(Reply::Ok {
            message: format!("removed region {name}"),
        })
    }
}

/// How the daemon's agent names kernel `id` to users: `host`, or the peer's
/// name.
pub(super) fn peer_name(agent: &mknode::agent::Agent, id: u16) -> String {
    if id == 0 {
        "host".to_string()
    } else {
        agent.peer(id).to_string()
    }
}
