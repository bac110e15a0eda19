//! The DSM facet: carries the coherence protocol's messages between this
//! kernel's DSM engine ([`crate::dsm::Engine`], started on first use) and
//! the others', keeps the region registry when this is endpoint 0, and
//! serves local processes on a Unix socket ([`Dsm::serve_local`]).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Threads;
use super::{lock, Agent, AgentError, AgentRef, Facet};
use crate::dsm::engine::{Command, Event, Outlet};
use crate::dsm::local::{self, LocalServer, Opener};
use crate::dsm::stats::Stats;
use crate::dsm::{check_name, check_size, DsmConfig, DsmError, Engine, RegionInfo};
use crate::migrate::split::{SelfMove, Share};
use crate::wire::{Kind, Msg};

/// The endpoint that keeps the registry of region names.
pub const REGISTRY: u16 = 0;

/// How long an open waits for the registry.
const REGISTRY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Registry {
    by_name: HashMap<String, RegionInfo>,
    next: u32,
    /// Regions whose home was lost: still listed (with why their faults
    /// fail), and made anew by the next map of their name.
    lost: std::collections::HashSet<u32>,
}

/// The engine's way out: this agent's links.
struct AgentOutlet(AgentRef);

impl AgentOutlet {
    fn sent(&self, r: Result<bool, AgentError>) -> bool {
        r.unwrap_or_else(|e| {
            log::warn!("dsm: {}", crate::error_text(&e));
            true
        })
    }
}

impl Outlet for AgentOutlet {
    fn try_send(&self, to: u16, m: &Msg) -> bool {
        match self.0.get() {
            Ok(a) => self.sent(a.try_send(to, m)),
            Err(_) => true,
        }
    }

    fn send(&self, to: u16, m: &Msg) {
        if let Ok(a) = self.0.get() {
            self.sent(a.send(to, m).map(|()| true));
        }
    }
}

/// See the module doc.
#[derive(Debug)]
pub struct Dsm {
    agent: AgentRef,
    config: Mutex<DsmConfig>,
    engine: Mutex<Option<Arc<Engine>>>,
    registry: Mutex<Registry>,
    server: Mutex<Option<LocalServer>>,
    /// Split processes (and shadows) whose memory this agent attached:
    /// pid → the engine's connection id for their mappings.
    split: Mutex<HashMap<i32, u64>>,
}

impl Facet for Dsm {
    fn kinds(&self) -> &'static [Kind] {
        &[
            Kind::DsmRequest,
            Kind::DsmGrant,
            Kind::DsmInvalidate,
            Kind::DsmAck,
            Kind::DsmFail,
            Kind::DsmOpen,
            Kind::DsmStat,
            Kind::DsmDrop,
            Kind::DsmForgetProcess,
        ]
    }

    fn handle(self: Arc<Self>, agent: &Arc<Agent>, peer: u16, msg: Msg) -> Option<Msg> {
        match msg {
            Msg::DsmOpen { req, name, size } => {
                let answer = if agent.id() == REGISTRY {
                    match self.register(&name, size, peer) {
                        Ok(i) => Msg::DsmOpened {
                            req,
                            region: i.id,
                            size: i.size,
                            home: i.home,
                        },
                        Err(e) => Msg::Failed {
                            req,
                            message: crate::error_text(&e),
                        },
                    }
                } else {
                    Msg::Failed {
                        req,
                        message: format!("the DSM registry is endpoint {REGISTRY}"),
                    }
                };
                let _ = agent.post(peer, &answer);
            }
            Msg::DsmForgetProcess { pid } if agent.id() == REGISTRY => {
                self.forget_process(peer, pid);
            }
            Msg::DsmForgetProcess { .. } => {}
            Msg::DsmStat { req } => agent.answer_later(peer, req, move |_| {
                let st = self.stats()?;
                Ok::<_, DsmError>(Msg::DsmStats {
                    req,
                    regions: st.regions.iter().map(|r| r.to_wire()).collect(),
                })
            }),
            msg => match self.engine() {
                Ok(e) => e.deliver(peer, msg),
                Err(e) => log::warn!("dsm: {}", crate::error_text(&e)),
            },
        }
        None
    }

    fn peer_lost(&self, peer: u16, why: &str) {
        // The regions homed there are lost with their pages: the next map
        // of such a name creates it anew (it would find a home that never
        // answers); until then they stay listed.
        {
            let mut r = lock(&self.registry);
            let Registry { by_name, lost, .. } = &mut *r;
            for i in by_name.values().filter(|i| i.home == peer) {
                if lost.insert(i.id) {
                    log::warn!(
                        "dsm: region {} is lost with its home ({why}); a new map creates it anew",
                        i.name
                    );
                }
            }
        }
        if let Some(e) = lock(&self.engine).as_ref() {
            e.post(Event::PeerLost {
                node: peer,
                why: why.to_string(),
            });
        }
    }
}

impl Dsm {
    pub fn new(agent: AgentRef) -> Self {
        Dsm {
            agent,
            config: Mutex::new(DsmConfig::default()),
            engine: Mutex::new(None),
            registry: Mutex::new(Registry::default()),
            server: Mutex::new(None),
            split: Mutex::new(HashMap::new()),
        }
    }

    /// Sets the engine's knobs; only before its first use.
    pub fn configure(&self, config: DsmConfig) {
        *lock(&self.config) = config;
    }

    /// The engine, started on first use.
    pub fn engine(&self) -> Result<Arc<Engine>, DsmError> {
        let mut e = lock(&self.engine);
        if let Some(e) = e.as_ref() {
            return Ok(Arc::clone(e));
        }
        let agent = self.agent.get().map_err(DsmError::Registry)?;
        let out = self.agent.clone();
        let engine = Arc::new(Engine::start(
            agent.id(),
            *lock(&self.config),
            Box::new(AgentOutlet(out)),
        )?);
        *e = Some(Arc::clone(&engine));
        Ok(engine)
    }

    /// Serves this kernel's processes on a Unix socket at `path` (see
    /// [`crate::dsm::local`]); replaces an earlier one.
    pub fn serve_local(self: &Arc<Self>, path: &Path) -> Result<(), DsmError> {
        let server = local::serve(path, self.engine()?, Arc::new(Resolver(Arc::clone(self))))?;
        *lock(&self.server) = Some(server);
        Ok(())
    }

    /// Stops serving local processes.
    pub fn stop_local(&self) {
        lock(&self.server).take();
    }

    /// What this kernel's DSM holds and counted.
    pub fn stats(&self) -> Result<Stats, DsmError> {
        self.engine()?.ask(|reply| Command::Stats { reply })
    }

    /// Every region the registry knows (endpoint 0 only: elsewhere none).
    pub fn regions(&self) -> Vec<RegionInfo> {
        let mut v: Vec<RegionInfo> = lock(&self.registry).by_name.values().cloned().collect();
        v.sort_by_key(|r| r.id);
        v
    }

    /// Removes region `name` from the registry (endpoint 0) and tells every
    /// kernel linked to this one, and this one, to forget it. The caller
    /// checks first that nothing maps it.
    pub fn remove(&self, name: &str) -> Result<RegionInfo, DsmError> {
        let info = lock(&self.registry)
            .by_name
            .remove(name)
            .ok_or_else(|| DsmError::Refused {
                errno: libc::ENOENT,
                message: format!("no region {name}"),
            })?;
        let agent = self.agent.get().map_err(DsmError::Registry)?;
        let drop = Msg::DsmDrop { region: info.id };
        for peer in agent.peers() {
            let _ = agent.send(peer, &drop);
        }
        self.engine()?.deliver(agent.id(), drop);
        Ok(info)
    }

    /// The registry (at endpoint 0): kernel `home`'s split process `pid`
    /// ended, so the regions its memory became go (only those: named after
    /// it and homed there, whoever asks).
    pub fn forget_process(&self, home: u16, pid: u32) {
        let Ok(pid) = i32::try_from(pid) else { return };
        let prefix = crate::migrate::split::region_prefix(home, pid);
        let names: Vec<String> = lock(&self.registry)
            .by_name
            .values()
            .filter(|i| i.home == home && i.name.starts_with(&prefix))
            .map(|i| i.name.clone())
            .collect();
        for name in names {
            if let Err(e) = self.remove(&name) {
                log::warn!("dsm: {}", crate::error_text(&e));
            }
        }
    }

    /// The split process `pid` of this kernel ended: the regions its
    /// memory became are forgotten, here and everywhere (see
    /// [`Dsm::forget_process`]).
    pub fn process_gone(&self, pid: i32) {
        self.release(pid);
        let Ok(agent) = self.agent.get() else { return };
        let Ok(pid) = u32::try_from(pid) else { return };
        if agent.id() == REGISTRY {
            self.forget_process(REGISTRY, pid);
        } else {
            let _ = agent.send(REGISTRY, &Msg::DsmForgetProcess { pid });
        }
    }

    /// The registry (at endpoint 0): region `name`, created homed at
    /// `asker` if new.
    fn register(&self, name: &str, size: u64, asker: u16) -> Result<RegionInfo, DsmError> {
        check_name(name)?;
        check_size(size)?;
        let mut r = lock(&self.registry);
        let lost = r
            .by_name
            .get(name)
            .map(|i| i.id)
            .filter(|id| r.lost.contains(id));
        if let Some(id) = lost {
            r.lost.remove(&id);
            r.by_name.remove(name);
        }
        if let Some(i) = r.by_name.get(name) {
            if i.size != size {
                return Err(DsmError::SizeMismatch {
                    name: name.to_string(),
                    size,
                    existing: i.size,
                });
            }
            return Ok(i.clone());
        }
        r.next += 1;
        let info = RegionInfo {
            id: r.next,
            name: name.to_string(),
            size,
            home: asker,
        };
        r.by_name.insert(name.to_string(), info.clone());
        log::info!("dsm: region {name} ({size} bytes) created, home {asker}");
        Ok(info)
    }

    /// Asks the registry for region `name`.
    fn resolve(&self, name: &str, size: u64) -> Result<RegionInfo, DsmError> {
        let agent = self.agent.get().map_err(DsmError::Registry)?;
        if agent.id() == REGISTRY {
            return self.register(name, size, REGISTRY);
        }
        let (id, size, home) = agent
            .call_for(
                REGISTRY,
                REGISTRY_TIMEOUT,
                |req| Msg::DsmOpen {
                    req,
                    name: name.to_string(),
                    size,
                },
                |m| match m {
                    Msg::DsmOpened {
                        region, size, home, ..
                    } => Some((region, size, home)),
                    _ => None,
                },
            )
            .map_err(|e| match e {
                // The registry's own refusal says what is wrong.
                AgentError::Failed { message, .. } => DsmError::Refused {
                    errno: if message.contains("exists with") {
                        libc::EINVAL
                    } else {
                        libc::EIO
                    },
                    message,
                },
                e => DsmError::Registry(e),
            })?;
        Ok(RegionInfo {
            id,
            name: name.to_string(),
            size,
            home,
        })
    }
}

impl Dsm {
    /// Where this kernel's processes reach its agent, when it serves them.
    pub fn local_path(&self) -> Option<std::path::PathBuf> {
        lock(&self.server).as_ref().map(|s| s.path().to_path_buf())
    }

    /// Forgets what process `pid` (a split process or a shadow, now gone)
    /// had attached.
    pub fn release(&self, pid: i32) {
        if let Some(conn) = lock(&self.split).remove(&pid) {
            if let Ok(e) = self.engine() {
                e.post(Event::Command(Command::Closed { conn }));
            }
        }
    }
}

/// The DSM as a split process sees it.
impl Share for Dsm {
    fn adopt(&self, name: &str, size: u64, copy: File, memory: File) -> Result<u32, DsmError> {
        let me = self.agent.get().map_err(DsmError::Registry)?.id();
        let info = self.resolve(name, size)?;
        if info.home != me {
            return Err(DsmError::Refused {
                errno: libc::EEXIST,
                message: format!(
                    "region {name} exists already, homed at kernel {}",
                    info.home
                ),
            });
        }
        let id = info.id;
        self.engine()?.ask(|reply| Command::Adopt {
            info,
            copy,
            memory,
            reply,
        })??;
        Ok(id)
    }

    fn open(&self, name: &str, size: u64) -> Result<(u32, OwnedFd), DsmError> {
        let info = self.resolve(name, size)?;
        let id = info.id;
        let fd = self
            .engine()?
            .ask(|reply| Command::Open { info, reply })??;
        Ok((id, fd))
    }

    fn attach(
        &self,
        region: u32,
        addr: u64,
        len: u64,
        uffd: OwnedFd,
        pid: i32,
    ) -> Result<(), DsmError> {
        let conn = *lock(&self.split).entry(pid).or_insert_with(local::new_conn);
        self.engine()?.ask(|reply| Command::Attach {
            region,
            addr,
            len,
            uffd,
            pid,
            conn,
            reply,
        })?
    }
}

/// The registry as the local socket sees it.
struct Resolver(Arc<Dsm>);

impl Opener for Resolver {
    fn open(&self, name: &str, size: u64) -> Result<RegionInfo, DsmError> {
        self.0.resolve(name, size)
    }

    fn kernel(&self) -> u16 {
        self.0.agent.get().map(|a| a.id()).unwrap_or(u16::MAX)
    }

    fn migrate(&self, pid: i32, tid: i32, to: u16, m: SelfMove) -> Result<(), DsmError> {
        let agent = self.0.agent.get().map_err(DsmError::Registry)?;
        let threads = agent.facet::<Threads>();
        let refused = |errno, message| DsmError::Refused { errno, message };
        let (Ok(pid), Ok(tid)) = (u32::try_from(pid), u32::try_from(tid)) else {
            return Err(refused(libc::EINVAL, "no such thread".into()));
        };
        if let Some((origin, opid, otid)) = threads.shadow_of(pid) {
            if to == agent.id() {
                return Err(refused(
                    libc::EALREADY,
                    format!("thread {otid} of process {opid} runs here already"),
                ));
            }
            // A shadow's thread: its process's kernel moves it.
            return agent
                .call(origin, Duration::from_secs(120), |req| Msg::ThreadMove {
                    req,
                    pid: opid,
                    tid: otid,
                    to,
                    reply_fd: m.fd,
                    reply_buf: m.buf,
                })
                .map(drop)
                .map_err(|e| match e {
                    AgentError::NoAnswer { .. } => refused(libc::ETIMEDOUT, crate::error_text(&e)),
                    e => refused(
                        if e.to_string().contains("no link") {
                            libc::ENOENT
                        } else {
                            libc::EIO
                        },
                        crate::error_text(&e),
                    ),
                });
        }
        threads
            .move_thread(pid, tid, to, Some(m))
            .map(drop)
            .map_err(|e| refused(e.errno(), crate::error_text(&e)))
    }
}
