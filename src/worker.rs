//! The device worker (process isolation): a process that owns exactly one device and serves
//! ops for it over the [`crate::ipc`] protocol. No tokio, no actors: one blocking loop.
//!
//! A process becomes a worker when its environment has [`ipc::WORKER_ENV`] (set by the
//! host when it spawns one). Two ways to provide the worker program:
//! - the `hipvisor-worker` binary of this crate;
//! - any binary whose `main` starts with [`run_if_worker`] (the `hipvisor` command line
//!   does this, so it is its own worker): `if let Some(code) = hipvisor_core::worker::run_if_worker() { return code; }`.
//!
//! The worker dies with its host: the host sets `PR_SET_PDEATHSIG` when it spawns it, and
//! the worker exits when its socket reaches end of file — also when the host died before the
//! worker started: the host's end of the socket closed with it. The worker never guesses from
//! process ids: as a container's entrypoint without an init, the host is PID 1 and "my
//! parent is PID 1" is the normal case, not a dead host.
//!
//! A worker blocks SIGINT and SIGTERM: a terminal's Ctrl-C goes to the whole foreground
//! process group, workers included, and so does `kill -TERM -<pgid>` or systemd's stop with
//! its default `KillMode=control-group`; the host decides what they mean (the `hipvisor`
//! command line stops gracefully and then stops its workers; a host that dies takes its
//! workers with it: end of file on the socket, or the parent-death SIGKILL). SIGKILL still
//! ends a worker at once.

pub mod client;

use std::os::fd::OwnedFd;
use std::process::ExitCode;
use std::sync::Arc;

use crate::backend::factory::{self, Built, Faults, SimParts};
use crate::backend::{BackendKind, DeviceContext};
use crate::config::SimConfig;
use crate::error::{GpuError, InvalidReason};
use crate::ipc::{self, Channel, ControlPage, FromWorker, IpcError, Region, Request, ToWorker};
use crate::op::{ModuleSource, Op, OpKind, Payload, Reply};

/// Runs the worker loop if this process was started as a worker (blocking SIGINT and
/// SIGTERM first, see the module docs); returns its exit code. Returns `None` in any other
/// process.
///
/// Call it first in `main`, before anything opens a descriptor: the worker's socket is the
/// descriptor its environment names ([`Channel::from_worker_env`]).
pub fn run_if_worker() -> Option<ExitCode> {
    let channel = Channel::from_worker_env()?;
    block_interrupts();
    Some(match channel.and_then(serve) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hipvisor worker: {e}");
            ExitCode::FAILURE
        }
    })
}

/// Blocks SIGINT and SIGTERM in this thread and every thread it starts from now on (so
/// [`run_if_worker`] comes first in `main`): see the module docs. (A worker spawned by
/// [`ipc::spawn_worker`] has them blocked from its exec on already; this covers any other
/// way of starting one.)
fn block_interrupts() {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGINT);
    set.add(nix::sys::signal::Signal::SIGTERM);
    if let Err(e) = set.thread_block() {
        eprintln!("hipvisor worker: cannot block SIGINT and SIGTERM: {e}");
    }
}

/// The backend `hello` asks for, from the one backend factory: for the simulator, a fresh
/// simulated host (this process's GPU runtime), whose faults the host decides and sends with
/// each request.
fn backend_for(hello: &ipc::Hello) -> Result<Built, GpuError> {
    let sim = hello.sim.unwrap_or(ipc::SimHello {
        devices: hello.device + 1,
        memory_bytes: 16 << 30,
        flavour: Default::default(),
    });
    let sim = SimConfig {
        devices: sim.devices,
        memory_bytes: sim.memory_bytes,
        flavour: sim.flavour,
        ..SimConfig::default()
    };
    factory::build(hello.backend, &sim, Faults::FromHost, true).map_err(|e| cannot_open(hello.device, &e))
}

/// A backend the worker cannot make: a worker program built without the backend's feature
/// (or a bad `[sim]`), which no retry mends — an invalid request, so the device is failed
/// rather than probed for ever as a lost one.
fn cannot_open(device: u32, e: &factory::BuildError) -> GpuError {
    let reason = InvalidReason::WorkerBackend {
        reason: format!("{e} (in this worker program)"),
    };
    GpuError::invalid(OpKind::DeviceInfo, device, reason)
}

/// Serves one device until the host says `Shutdown` or goes away.
///
/// # Errors
/// An [`IpcError`] that ends the connection.
pub fn serve(mut channel: Channel) -> Result<(), IpcError> {
    // The host logs the codes of the errors this worker sends it, once per run: a worker
    // that logged its own would log an unknown code again after every restart.
    crate::error::quiet_api_codes();
    let (hello, fds) = match channel.recv::<ToWorker>() {
        Ok((ToWorker::Hello(h), fds)) => (h, fds),
        Ok((other, _)) => {
            let msg = format!("expected Hello, got {other:?}");
            channel.send(&FromWorker::Malformed(msg.clone()), &[])?;
            return Err(IpcError::Malformed(msg));
        }
        Err(e @ (IpcError::Malformed(_) | IpcError::Version { .. })) => {
            channel.send(&FromWorker::Malformed(e.to_string()), &[])?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    if hello.version != ipc::PROTOCOL_VERSION {
        let msg = format!(
            "protocol version {}, this worker speaks {}",
            hello.version,
            ipc::PROTOCOL_VERSION
        );
        channel.send(&FromWorker::Malformed(msg.clone()), &[])?;
        return Err(IpcError::Malformed(msg));
    }
    let control = match fds.into_iter().next() {
        Some(fd) => ControlPage::map(fd)?,
        None => return Err(IpcError::Malformed("Hello came without the control page".into())),
    };
    if hello.backend == BackendKind::Hip {
        no_core_dumps();
    }
    let opened = backend_for(&hello).and_then(|b| Ok((b.backend.open(hello.device, hello.epoch)?, b.sim)));
    let (mut ctx, sim) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            channel.send(&FromWorker::Failed(e), &[])?;
            return Ok(());
        }
    };
    let info = match ctx.execute(&Op::DeviceInfo, crate::backend::Origin::Runtime) {
        Ok(Reply::DeviceInfo(i)) => i,
        Ok(other) => unreachable!("device info answered {other:?}"),
        Err(e) => {
            channel.send(&FromWorker::Failed(e), &[])?;
            return Ok(());
        }
    };
    channel.send(
        &FromWorker::Ready {
            version: ipc::PROTOCOL_VERSION,
            info,
        },
        &[],
    )?;
    serve_context(channel, &mut *ctx, sim.as_ref(), &control)
}

/// Serves requests on an open context until the host says `Shutdown` or goes away. On the
/// way out, every cached host region is unregistered from the context while it is still
/// mapped, then unmapped (the context itself is dropped by the caller, after).
fn serve_context(
    mut channel: Channel,
    ctx: &mut dyn DeviceContext,
    sim: Option<&SimParts>,
    control: &ControlPage,
) -> Result<(), IpcError> {
    let mut cache = RegionCache::default();
    let served = serve_requests(&mut channel, ctx, sim, control, &mut cache);
    cache.release(ctx);
    served
}

fn serve_requests(
    channel: &mut Channel,
    ctx: &mut dyn DeviceContext,
    sim: Option<&SimParts>,
    control: &ControlPage,
    cache: &mut RegionCache,
) -> Result<(), IpcError> {
    // How long to poll for the next request before blocking (see `Request::linger_us`).
    let mut linger_us = 0;
    loop {
        let spin = std::time::Duration::from_micros(std::mem::take(&mut linger_us).into());
        let (msg, fds) = match channel.recv_spinning::<ToWorker>(spin) {
            Ok(m) => m,
            Err(IpcError::Closed) => return Ok(()),
            Err(e @ (IpcError::Malformed(_) | IpcError::Version { .. })) => {
                channel.send(&FromWorker::Malformed(e.to_string()), &[])?;
                continue;
            }
            Err(e) => return Err(e),
        };
        match msg {
            ToWorker::Shutdown => return Ok(()),
            ToWorker::Hello(_) => channel.send(&FromWorker::Malformed("a second Hello".into()), &[])?,
            ToWorker::Restore { module, source, input } => {
                let source = match with_region(source, input, fds) {
                    Ok(s) => s,
                    Err(e) => {
                        channel.send(&FromWorker::Malformed(e.to_string()), &[])?;
                        continue;
                    }
                };
                let reply = match ctx.restore_module(module, &source) {
                    Ok(()) => FromWorker::Restored,
                    Err(e) => FromWorker::Failed(e),
                };
                channel.send(&reply, &[])?;
            }
            ToWorker::Request(req) => {
                linger_us = req.linger_us.min(crate::config::MAX_SPIN_US as u32);
                let started = Started { control, sim };
                let (id, kind) = (req.id, req.op.kind());
                let cached = req.input.filter(|r| r.cached).map(|r| r.id);
                let reply = match execute(ctx, started, cache, req, fds) {
                    Ok(r) => r,
                    Err(e) => {
                        // The host forgets the region of a request answered `Malformed` too,
                        // so both caches stay in step (see `RegionCache::region`).
                        if let Some(id) = cached {
                            cache.forget(ctx, id);
                        }
                        FromWorker::Malformed(e.to_string())
                    }
                };
                send_fitting(channel, reply, |why| oversized(kind, ctx.device(), id, why))?;
            }
            ToWorker::Batch(reqs) => {
                let started = Started { control, sim };
                execute_batch(ctx, started, channel, reqs, fds)?
            }
        }
    }
}

/// Sets this process's core-dump limit to 0. ROCm aborts a process whose kernel made a GPU
/// memory access fault (and ROCm 5.2's hiprtc one that compiles for a target it does not
/// know); the core of a process holding a GPU context can take gigabytes and a long time to
/// write, and the supervisor can restart the device only once the worker is gone. The
/// simulator's `hip` flavour does the same before its simulated abort. Before the backend is
/// opened, since opening may already abort.
fn no_core_dumps() {
    if let Err(e) = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0) {
        eprintln!("hipvisor worker: cannot turn core dumps off: {e}");
    }
}

/// Where the worker publishes the request it starts.
#[derive(Clone, Copy)]
struct Started<'a> {
    control: &'a ControlPage,
    /// The simulator's parts: its host, whose pending abort ends the process before a
    /// request starts, and its injector, which takes the fault the host decided.
    sim: Option<&'a SimParts>,
}

impl Started<'_> {
    /// Marks request `id` started on the control page. First, in a simulated `hip`-flavour
    /// process whose kernel made a memory access fault, the process aborts, as ROCm's would
    /// have by now ([`SimHost::abort_if_pending`]): the request did not start.
    fn start(self, id: u64) {
        if let Some(sim) = self.sim {
            sim.host.abort_if_pending();
        }
        self.control.set_started(id);
    }

    /// Starts request `id` ([`Started::start`]) and executes its op with the fault the host
    /// decided for it — for a task, each of its ops with the fault decided for it.
    fn execute(self, ctx: &mut dyn DeviceContext, req: &RequestFaults, op: &Op) -> Result<Reply, GpuError> {
        self.start(req.id);
        let device = ctx.device();
        let sim = self.sim;
        let mut plan = |i: usize| {
            if let Some(sim) = sim {
                let fault = match op {
                    Op::Task(_) => req
                        .task_faults
                        .iter()
                        .find(|(at, _)| *at as usize == i)
                        .map(|(_, f)| *f),
                    _ => req.fault,
                };
                sim.faults.plan(device, fault.map(Into::into));
            }
        };
        crate::backend::task::execute(ctx, op, req.origin, &mut plan)
    }
}

/// What [`Started::execute`] needs of a request besides its op.
struct RequestFaults {
    id: u64,
    origin: crate::op::Origin,
    fault: Option<ipc::WireFault>,
    task_faults: Vec<(u32, ipc::WireFault)>,
}

impl RequestFaults {
    fn of(req: &Request) -> RequestFaults {
        RequestFaults {
            id: req.id,
            origin: req.origin,
            fault: req.fault,
            task_faults: req.task_faults.clone(),
        }
    }
}

/// A module source whose image travelled in a region: the image, mapped.
fn with_region(
    source: ModuleSource,
    input: Option<ipc::RegionRef>,
    fds: Vec<OwnedFd>,
) -> Result<ModuleSource, IpcError> {
    match (input, fds.into_iter().next()) {
        (None, _) => Ok(source),
        // Read only: the worker has no business writing the application's image.
        (Some(r), Some(fd)) => Ok(ModuleSource::Image(Payload::shared(Arc::new(Region::map_read_only(
            fd,
            r.len as usize,
        )?)))),
        (Some(_), None) => Err(IpcError::Malformed(
            "a region was announced but no descriptor came".into(),
        )),
    }
}

/// Host buffers this worker keeps mapped, and registered as pinned memory, between
/// requests (see [`ipc::REGION_CACHE`]).
#[derive(Default)]
struct RegionCache {
    lru: ipc::RegionLru,
    regions: std::collections::HashMap<u64, Arc<Region>>,
}

impl RegionCache {
    /// The region a request names: mapped from the descriptor that came with it (and, when
    /// `cached`, kept and registered, replacing what the cache had under its id), else from
    /// the cache. Host and worker touch the same ids in the same order; when a request is
    /// answered `Malformed` (its region could not be mapped, or was not in the cache) both
    /// forget the id, so the host sends the descriptor again with its next use and the
    /// caches never fall out of step.
    fn region(
        &mut self,
        ctx: &mut dyn DeviceContext,
        r: ipc::RegionRef,
        fds: &mut impl Iterator<Item = OwnedFd>,
    ) -> Result<Arc<Region>, IpcError> {
        if !r.cached {
            let fd = fds
                .next()
                .ok_or_else(|| IpcError::Malformed(format!("region {} announced, no descriptor", r.id)))?;
            // A one-shot input, only read: mapped read-only. (Cached host buffers stay
            // writable: they are registered as pinned memory, which GPU runtimes refuse for
            // read-only pages unless asked with a read-only flag.)
            return Ok(Arc::new(Region::map_read_only(fd, r.len as usize)?));
        }
        let (_, evicted) = self.lru.touch(r.id);
        if let Some(old) = evicted.and_then(|id| self.regions.remove(&id)) {
            ctx.unregister_host_memory(old.as_slice());
        }
        match fds.next() {
            Some(fd) => {
                // Unregistered while still mapped, then replaced.
                if let Some(old) = self.regions.remove(&r.id) {
                    ctx.unregister_host_memory(old.as_slice());
                }
                let region = Arc::new(Region::map(fd, r.len as usize)?);
                ctx.register_host_memory(region.as_slice());
                self.regions.insert(r.id, region.clone());
                Ok(region)
            }
            None => self
                .regions
                .get(&r.id)
                .filter(|region| region.len() as u64 == r.len)
                .cloned()
                .ok_or_else(|| IpcError::Malformed(format!("region {} is not in this worker's cache", r.id))),
        }
    }

    /// Forgets `id`: unregistered, then unmapped (when no request holds it any more).
    fn forget(&mut self, ctx: &mut dyn DeviceContext, id: u64) {
        self.lru.forget(id);
        if let Some(old) = self.regions.remove(&id) {
            ctx.unregister_host_memory(old.as_slice());
        }
    }

    /// Unregisters every cached region from `ctx` while it is still mapped, then unmaps them
    /// (a worker that ends: the context must not keep registered memory that is gone).
    fn release(&mut self, ctx: &mut dyn DeviceContext) {
        for (_, region) in self.regions.drain() {
            ctx.unregister_host_memory(region.as_slice());
        }
        self.lru = ipc::RegionLru::default();
    }
}

/// Sends `reply`; an answer too large for a frame is replaced by what `oversized` makes of
/// the reason (a batch's answers are split over several frames first), so a worker never
/// dies of an answer it cannot send.
fn send_fitting(
    channel: &Channel,
    reply: FromWorker,
    oversized: impl FnOnce(String) -> FromWorker,
) -> Result<(), IpcError> {
    match channel.send(&reply, &[]) {
        Err(IpcError::Unsendable(why)) => channel.send(&oversized(why), &[]),
        other => other,
    }
}

/// The answer that replaces one too large for a frame: an invalid request (the op's answer
/// cannot be carried back; running it again would not help).
fn oversized(kind: OpKind, device: u32, id: u64, why: String) -> FromWorker {
    FromWorker::Response {
        id,
        result: Err(oversized_error(kind, device, why)),
        output_len: None,
    }
}

fn oversized_error(kind: OpKind, device: u32, why: String) -> GpuError {
    GpuError::invalid(
        kind,
        device,
        InvalidReason::BadArguments {
            kernel: String::new(),
            reason: format!("the worker's answer cannot be sent back: {why}"),
        },
    )
}

/// Sends a batch's answers: in one frame if they fit, else split in halves (every frame but
/// the last says `done: false`); a single answer that does not fit is replaced by an
/// invalid-request error.
fn send_batch(
    channel: &Channel,
    results: Vec<(u64, Result<Reply, GpuError>)>,
    done: bool,
    kinds: &std::collections::HashMap<u64, OpKind>,
    device: u32,
) -> Result<(), IpcError> {
    let frame = FromWorker::Batch { results, done };
    match ipc::encode(&frame) {
        Ok(bytes) => channel.send_frame(&bytes, &[]),
        Err(IpcError::Unsendable(why)) => {
            let FromWorker::Batch { mut results, done } = frame else {
                unreachable!("the batch frame")
            };
            if results.len() > 1 {
                let second = results.split_off(results.len() / 2);
                send_batch(channel, results, false, kinds, device)?;
                return send_batch(channel, second, done, kinds, device);
            }
            let results = results
                .into_iter()
                .map(|(id, r)| {
                    let kind = kinds.get(&id).copied().unwrap_or(OpKind::DeviceInfo);
                    // A sticky fault stays one (the batch stopped at it).
                    match r {
                        Err(e) if e.class() == crate::error::ErrorClass::Sticky => (id, Err(e)),
                        _ => (id, Err(oversized_error(kind, device, why.clone()))),
                    }
                })
                .collect();
            channel.send(&FromWorker::Batch { results, done }, &[])
        }
        Err(e) => Err(e),
    }
}

/// Whether `op` may wait for earlier GPU work (or take long by itself): copies, memsets,
/// allocations, frees, synchronizations, launches. Only queries answer at once.
fn may_wait(op: &Op) -> bool {
    !matches!(op, Op::MemInfo | Op::DeviceInfo)
}

/// Runs a batch in order, stopping after a result that poisons the context (the ops after
/// it do not start). The answers gathered so far go out before any op that may wait, so
/// no answer is held behind a long op; the last frame says `done`. A batch that breaks the
/// rules (regions, too many ops) runs not at all.
fn execute_batch(
    ctx: &mut dyn DeviceContext,
    started: Started<'_>,
    channel: &Channel,
    reqs: Vec<Request>,
    fds: Vec<OwnedFd>,
) -> Result<(), IpcError> {
    if reqs.len() > ipc::MAX_BATCH {
        let why = format!("a batch of {} ops; at most {}", reqs.len(), ipc::MAX_BATCH);
        return channel.send(&FromWorker::Malformed(why), &[]);
    }
    if !fds.is_empty() || reqs.iter().any(|r| r.input.is_some() || r.output.is_some()) {
        let why = "a batched request carries a region".to_string();
        return channel.send(&FromWorker::Malformed(why), &[]);
    }
    let kinds: std::collections::HashMap<u64, OpKind> = reqs.iter().map(|r| (r.id, r.op.kind())).collect();
    let device = ctx.device();
    let mut results = Vec::with_capacity(reqs.len());
    for req in reqs {
        if !results.is_empty() && may_wait(&req.op) {
            let results = std::mem::take(&mut results);
            send_batch(channel, results, false, &kinds, device)?;
        }
        let result = started.execute(ctx, &RequestFaults::of(&req), &req.op);
        let poisoned = matches!(&result, Err(e) if e.class() == crate::error::ErrorClass::Sticky);
        results.push((req.id, result));
        if poisoned {
            break;
        }
    }
    send_batch(channel, results, true, &kinds, device)
}

fn execute(
    ctx: &mut dyn DeviceContext,
    started: Started<'_>,
    cache: &mut RegionCache,
    req: Request,
    fds: Vec<OwnedFd>,
) -> Result<FromWorker, IpcError> {
    let mut fds = fds.into_iter();
    let faults = RequestFaults::of(&req);
    let mut op = req.op;
    if let Some(r) = req.input {
        let payload = Payload::shared(cache.region(ctx, r, &mut fds)?);
        match &mut op {
            Op::CopyToDevice { data, .. } | Op::Durable { data, .. } => *data = payload,
            Op::LoadModule { source } => *source = ModuleSource::Image(payload),
            _ => {
                return Err(IpcError::Malformed(
                    "an input region for an op without a payload".into(),
                ));
            }
        }
    }
    let mut output = match req.output {
        Some(r) => {
            let fd = fds
                .next()
                .ok_or_else(|| IpcError::Malformed("output region announced, no descriptor".into()))?;
            Some(Region::map(fd, r.len as usize)?)
        }
        None => None,
    };
    let result = started.execute(ctx, &faults, &op);
    let (result, output_len) = match (result, output.as_mut()) {
        (Ok(Reply::Data(d)), Some(out)) if d.len() == out.len() => {
            out.as_mut_slice().copy_from_slice(d.as_bytes());
            (Ok(Reply::Data(Payload::default())), Some(d.len() as u64))
        }
        (Ok(Reply::Data(d)), Some(out)) => {
            // The op has run: an answer to it (an invalid request), not `Malformed`, which
            // says that nothing ran.
            let reason = InvalidReason::BadArguments {
                kernel: String::new(),
                reason: format!("{} bytes for an output region of {}", d.len(), out.len()),
            };
            (Err(GpuError::invalid(op.kind(), ctx.device(), reason)), None)
        }
        (r, _) => (r, None),
    };
    // Unmapped (and its descriptor closed) before the answer goes: the host seals the
    // region against writes, which the kernel refuses while a writable mapping exists.
    drop(output);
    Ok(FromWorker::Response {
        id: req.id,
        result,
        output_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Origin;
    use crate::ipc::RegionRef;
    use crate::op::BufferHandle;
    use std::os::fd::AsRawFd;
    use std::sync::Mutex;

    /// Whether `[addr, addr + len)` is mapped in this process (from `/proc/self/maps`).
    fn mapped(addr: usize, len: usize) -> bool {
        std::fs::read_to_string("/proc/self/maps").unwrap().lines().any(|line| {
            let range = line.split_whitespace().next().unwrap();
            let (start, end) = range.split_once('-').unwrap();
            let (start, end) = (
                usize::from_str_radix(start, 16).unwrap(),
                usize::from_str_radix(end, 16).unwrap(),
            );
            start <= addr && addr + len <= end
        })
    }

    /// Whether the page at `addr` is mapped writable in this process.
    fn writable(addr: usize) -> bool {
        std::fs::read_to_string("/proc/self/maps").unwrap().lines().any(|line| {
            let mut it = line.split_whitespace();
            let (start, end) = it.next().unwrap().split_once('-').unwrap();
            let (start, end) = (
                usize::from_str_radix(start, 16).unwrap(),
                usize::from_str_radix(end, 16).unwrap(),
            );
            start <= addr && addr < end && it.next().unwrap().contains('w')
        })
    }

    /// A worker built without the backend the host asks for fails the device (an invalid
    /// request), rather than reading as a lost device the supervisor probes for ever.
    #[test]
    fn a_backend_missing_from_the_worker_build_is_permanent() {
        for kind in [BackendKind::Hip, BackendKind::Cuda] {
            let e = cannot_open(3, &factory::BuildError::NotBuilt(kind));
            assert_eq!(e.class(), crate::error::ErrorClass::InvalidRequest, "{e}");
            assert_eq!((e.op(), e.device()), (OpKind::DeviceInfo, 3));
            assert!(e.to_string().contains("not part of this build"), "{e}");
            assert_eq!(
                crate::supervision::decide_open_failure(e.class(), crate::config::Isolation::Process),
                crate::supervision::OpenFailureAction::FailDevice,
            );
        }
    }

    #[test]
    fn a_one_shot_input_region_is_mapped_read_only_in_the_worker() {
        let (mut host, log, thread) = recorded_worker();
        let mut region = Region::new(64 << 10).unwrap();
        region.as_mut_slice().fill(1);
        let r = RegionRef {
            id: region.id(),
            len: region.len() as u64,
            cached: false,
        };
        host.send(&upload(1, &r), &[region.raw_fd()]).unwrap();
        assert!(matches!(
            host.recv::<FromWorker>().unwrap().0,
            FromWorker::Response { result: Ok(_), .. }
        ));
        drop(host);
        thread.join().unwrap();
        assert_eq!(*log.lock().unwrap(), ["input read-only"]);
    }

    /// A context that records what happens to the host memory registered with it, as a GPU
    /// backend would see it: memory must stay mapped until it is unregistered.
    struct Recorder {
        registered: Vec<(usize, usize)>,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Recorder {
        fn note(&self, what: String) {
            self.log.lock().unwrap().push(what);
        }
    }

    impl DeviceContext for Recorder {
        fn device(&self) -> u32 {
            0
        }

        fn epoch(&self) -> u64 {
            0
        }

        fn execute(&mut self, op: &Op, _origin: Origin) -> Result<Reply, GpuError> {
            match op {
                Op::CopyToDevice { data, .. } if !data.is_empty() => {
                    let ptr = data.as_bytes().as_ptr() as usize;
                    if !writable(ptr) {
                        self.note("input read-only".into());
                    }
                    Ok(Reply::Done)
                }
                // A broken backend: fewer bytes than asked.
                Op::CopyFromDevice { len, .. } => Ok(Reply::Data(vec![0; *len as usize / 2].into())),
                _ => Ok(Reply::Done),
            }
        }

        fn restore_module(&mut self, _: crate::op::ModuleHandle, _: &ModuleSource) -> Result<(), GpuError> {
            Ok(())
        }

        fn register_host_memory(&mut self, bytes: &[u8]) -> bool {
            self.registered.push((bytes.as_ptr() as usize, bytes.len()));
            self.note("registered".into());
            true
        }

        fn unregister_host_memory(&mut self, bytes: &[u8]) {
            let start = bytes.as_ptr() as usize;
            if let Some(i) = self.registered.iter().position(|(s, _)| *s == start) {
                let (s, l) = self.registered.swap_remove(i);
                let state = if mapped(s, l) { "mapped" } else { "UNMAPPED" };
                self.note(format!("unregistered while {state}"));
            }
        }
    }

    impl Drop for Recorder {
        /// What a GPU context does with memory still registered when it is destroyed.
        fn drop(&mut self) {
            for (s, l) in std::mem::take(&mut self.registered) {
                let state = if mapped(s, l) { "mapped" } else { "UNMAPPED" };
                self.note(format!("still registered at the context's end, {state}"));
            }
        }
    }

    /// A worker serving a [`Recorder`] on a thread: the host's end, the log, the thread.
    fn recorded_worker() -> (Channel, Arc<Mutex<Vec<String>>>, std::thread::JoinHandle<()>) {
        let (host, worker) = Channel::pair().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let control = ControlPage::new().unwrap();
        let thread = std::thread::spawn({
            let log = log.clone();
            move || {
                let mut ctx = Recorder {
                    registered: Vec::new(),
                    log,
                };
                serve_context(worker, &mut ctx, None, &control).unwrap();
            }
        });
        (host, log, thread)
    }

    fn upload(id: u64, region: &RegionRef) -> ToWorker {
        ToWorker::Request(Request {
            id,
            op: Op::CopyToDevice {
                dst: BufferHandle {
                    device: 0,
                    epoch: 0,
                    id: 1,
                    len: 1 << 20,
                },
                offset: 0,
                data: Payload::default(),
            },
            origin: Origin::Application,
            fault: None,
            task_faults: Vec::new(),
            input: Some(*region),
            output: None,
            linger_us: 0,
        })
    }

    fn cached(r: &Region) -> RegionRef {
        RegionRef {
            id: r.id(),
            len: r.len() as u64,
            cached: true,
        }
    }

    #[test]
    fn a_worker_that_ends_unregisters_its_cached_host_memory_before_unmapping_it() {
        let (mut host, log, thread) = recorded_worker();
        let region = Region::new(64 << 10).unwrap();
        host.send(&upload(1, &cached(&region)), &[region.raw_fd()]).unwrap();
        assert!(matches!(
            host.recv::<FromWorker>().unwrap().0,
            FromWorker::Response {
                id: 1,
                result: Ok(_),
                ..
            }
        ));
        drop(host); // the host goes away: the worker ends
        thread.join().unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            ["registered", "unregistered while mapped"],
            "unregistered, then unmapped"
        );
    }

    #[test]
    fn a_cached_region_that_cannot_be_mapped_is_sent_again_and_the_caches_stay_in_step() {
        let (mut host, log, thread) = recorded_worker();
        let region = Region::new(64 << 10).unwrap();
        let r = cached(&region);
        // What the host does: its cache forgets a region whose request was answered
        // Malformed, so the next use sends the descriptor again.
        let mut lru = ipc::RegionLru::default();
        let mut ask = |host: &mut Channel, id: u64, fd: Option<std::os::fd::RawFd>| {
            let (known, _) = lru.touch(r.id);
            let fds: Vec<_> = if known { Vec::new() } else { fd.into_iter().collect() };
            host.send(&upload(id, &r), &fds).unwrap();
            match host.recv::<FromWorker>().unwrap().0 {
                FromWorker::Response { result: Ok(_), .. } => true,
                FromWorker::Malformed(_) => {
                    lru.forget(r.id);
                    false
                }
                other => panic!("{other:?}"),
            }
        };
        // A descriptor the worker cannot map (not sealed: refused before mmap).
        let bad = nix::sys::memfd::memfd_create(c"bad", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&bad, 64 << 10).unwrap();
        assert!(!ask(&mut host, 1, Some(bad.as_raw_fd())), "the mapping fails");
        assert!(ask(&mut host, 2, Some(region.raw_fd())), "sent again, mapped");
        assert!(ask(&mut host, 3, Some(region.raw_fd())), "cached now: no descriptor");
        // A host that believes the worker has a region it has not: answered Malformed, and
        // the descriptor comes with the next use.
        let other = Region::new(64 << 10).unwrap();
        let o = cached(&other);
        host.send(&upload(4, &o), &[]).unwrap();
        assert!(matches!(host.recv::<FromWorker>().unwrap().0, FromWorker::Malformed(_)));
        host.send(&upload(5, &o), &[other.raw_fd()]).unwrap();
        assert!(matches!(
            host.recv::<FromWorker>().unwrap().0,
            FromWorker::Response {
                id: 5,
                result: Ok(_),
                ..
            }
        ));
        drop(host);
        thread.join().unwrap();
        let log = log.lock().unwrap();
        assert!(log.iter().all(|l| !l.contains("UNMAPPED")), "{log:?}");
    }
    #[test]
    fn an_op_that_ran_is_answered_not_malformed_when_its_output_does_not_fit() {
        let (mut host, _log, thread) = recorded_worker();
        let out = ipc::OutputRegion::new(64 << 10).unwrap();
        let request = Request {
            id: 1,
            op: Op::CopyFromDevice {
                src: BufferHandle {
                    device: 0,
                    epoch: 0,
                    id: 1,
                    len: 64 << 10,
                },
                offset: 0,
                len: 64 << 10,
            },
            origin: Origin::Application,
            fault: None,
            task_faults: Vec::new(),
            input: None,
            output: Some(RegionRef {
                id: out.id(),
                len: out.len() as u64,
                cached: false,
            }),
            linger_us: 0,
        };
        host.send(&ToWorker::Request(request), &[out.raw_fd()]).unwrap();
        // `Malformed` says nothing ran; this op ran, so it is answered (an invalid request).
        match host.recv::<FromWorker>().unwrap().0 {
            FromWorker::Response {
                id: 1,
                result: Err(e),
                output_len: None,
            } => assert_eq!(e.class(), crate::error::ErrorClass::InvalidRequest, "{e}"),
            other => panic!("{other:?}"),
        }
        drop(host);
        thread.join().unwrap();
    }
}
