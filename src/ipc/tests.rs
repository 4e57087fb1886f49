//! Tests of the protocol, its transport and its checks.
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;

use nix::sys::socket::{AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair};

use super::error::*;
use super::frame::*;
use super::protocol::*;
use super::shm::*;
use super::socket::*;
use super::spawn::*;
use crate::backend::Origin;
use crate::error::GpuError;
use crate::op::Payload;
use crate::op::{ModuleHandle, ModuleSource, Op, Reply};
use proptest::prelude::*;

#[test]
fn a_worker_starts_with_sigint_and_sigterm_blocked() {
    let (ours, theirs) = Channel::pair().unwrap();
    let mut cmd = Command::new("grep");
    cmd.args(["^SigBlk", "/proc/self/status"])
        .stdout(std::process::Stdio::piped());
    let out = spawn_worker(cmd, theirs).unwrap().wait_with_output().unwrap();
    drop(ours);
    let text = String::from_utf8_lossy(&out.stdout);
    let mask = u64::from_str_radix(text.trim().trim_start_matches("SigBlk:").trim(), 16).unwrap();
    for (signal, name) in [(nix::libc::SIGINT, "SIGINT"), (nix::libc::SIGTERM, "SIGTERM")] {
        assert_ne!(mask & (1 << (signal - 1)), 0, "{name} blocked from the exec on: {text}");
    }
}

/// In a child process (this test binary re-executed): with descriptor 3 free, the worker
/// end of a new pair lands on 3, the number the worker must find it at, and
/// `spawn_worker`'s dup2 to the same number does nothing; close-on-exec must be cleared
/// explicitly or the worker starts without its socket.
#[test]
fn a_worker_socket_already_at_descriptor_3_survives_the_exec() {
    const CHILD: &str = "HV_IPC_FD3_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let _ = nix::unistd::close(3);
        let (worker_end, _host_end) = Channel::pair().unwrap();
        assert_eq!(worker_end.fd.as_raw_fd(), 3, "the lowest free descriptor");
        let mut cmd = Command::new("readlink");
        cmd.arg("/proc/self/fd/3").stdout(std::process::Stdio::piped());
        let out = spawn_worker(cmd, worker_end).unwrap().wait_with_output().unwrap();
        let link = String::from_utf8_lossy(&out.stdout);
        assert!(link.starts_with("socket:"), "the worker has its socket at 3: {link:?}");
        return;
    }
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "ipc::tests::a_worker_socket_already_at_descriptor_3_survives_the_exec",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .status()
        .unwrap();
    assert!(status.success(), "the child's check failed: {status}");
}

/// In a child process (this test binary re-executed with `HV_WORKER_FD=3`): a worker's
/// socket arrives without close-on-exec (so it survived the exec); once claimed, it has
/// it again, so nothing the worker starts inherits the host's connection.
#[test]
fn a_claimed_worker_socket_is_close_on_exec() {
    const CHILD: &str = "HV_IPC_CLAIM_CHILD";
    if std::env::var_os(CHILD).is_some() {
        use nix::fcntl::{FcntlArg, FdFlag, fcntl};
        let _ = nix::unistd::close(3);
        let (worker_end, _host_end) = Channel::pair().unwrap();
        let fd = worker_end.fd.as_raw_fd();
        assert_eq!(fd, 3, "the lowest free descriptor");
        fcntl(&worker_end.fd, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
        // The claim takes ownership of descriptor 3, as a worker's does.
        std::mem::forget(worker_end);
        let claimed = Channel::from_worker_env().expect("HV_WORKER_FD is set").unwrap();
        let flags = FdFlag::from_bits_truncate(fcntl(&claimed.fd, FcntlArg::F_GETFD).unwrap());
        assert!(flags.contains(FdFlag::FD_CLOEXEC), "{flags:?}");
        return;
    }
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "ipc::tests::a_claimed_worker_socket_is_close_on_exec",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .env(WORKER_ENV, "3")
        .status()
        .unwrap();
    assert!(status.success(), "the child's check failed: {status}");
}

#[test]
fn exit_statuses_are_described_and_only_sigabrt_is_an_abort() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;
    // Raw wait statuses: a signal number in the low bits (0x80: core dumped), an exit
    // code in the second byte.
    let abrt = ExitStatus::from_raw(6);
    assert_eq!(describe_exit(abrt), "worker killed by signal 6 (SIGABRT)");
    assert!(aborted(abrt));
    let dumped = ExitStatus::from_raw(6 | 0x80);
    assert_eq!(
        describe_exit(dumped),
        "worker killed by signal 6 (SIGABRT, core dumped)"
    );
    assert!(aborted(dumped));
    let kill = ExitStatus::from_raw(9);
    assert_eq!(describe_exit(kill), "worker killed by signal 9 (SIGKILL)");
    assert!(!aborted(kill));
    let exit3 = ExitStatus::from_raw(3 << 8);
    assert_eq!(describe_exit(exit3), "worker exited with status 3");
    assert!(!aborted(exit3));
    assert!(!aborted(ExitStatus::from_raw(0)));
}

#[test]
fn messages_round_trip() {
    let m = ToWorker::Request(Request {
        id: 9,
        op: Op::MemInfo,
        origin: Origin::Runtime,
        fault: Some(WireFault::Code(700)),
        task_faults: Vec::new(),
        input: None,
        output: Some(RegionRef {
            id: 3,
            len: 4096,
            cached: false,
        }),
        linger_us: 50,
    });
    assert_eq!(decode::<ToWorker>(&encode(&m).unwrap()).unwrap(), m);
}

#[test]
fn a_full_batch_fits_in_a_frame() {
    // The worst batch the host builds: MAX_BATCH launches with arguments, plus inline
    // payloads up to BATCH_INLINE_BYTES; and its answer with an error per op.
    let launch = |id| Request {
        id,
        op: Op::Launch {
            module: ModuleHandle { device: 0, id: 1 },
            function: "vector_add_f32".into(),
            grid: crate::op::Dim3::x(1024),
            block: crate::op::Dim3::x(256),
            shared_mem_bytes: 0,
            args: vec![crate::op::KernelArg::U64(u64::MAX); 8],
        },
        origin: Origin::Application,
        fault: Some(WireFault::Code(700)),
        task_faults: Vec::new(),
        input: None,
        output: None,
        linger_us: 0,
    };
    let mut batch: Vec<Request> = (0..MAX_BATCH as u64).map(launch).collect();
    batch[0].op = Op::CopyToDevice {
        dst: crate::op::BufferHandle {
            device: 0,
            epoch: 0,
            id: 1,
            len: 1 << 20,
        },
        offset: 0,
        data: vec![7u8; BATCH_INLINE_BYTES].into(),
    };
    let frame = encode(&ToWorker::Batch(batch)).expect("a full batch fits");
    assert!(frame.len() <= MAX_FRAME);
    let error = GpuError::api_with(
        crate::error::Api::Hip,
        700,
        crate::op::OpKind::Launch,
        0,
        "x".repeat(256),
    );
    let mut answers: Vec<_> = (0..MAX_BATCH as u64).map(|id| (id, Err(error.clone()))).collect();
    answers[0].1 = Ok(Reply::Data(vec![1u8; BATCH_INLINE_BYTES].into()));
    encode(&FromWorker::Batch {
        results: answers,
        done: true,
    })
    .expect("a full batch's answer fits");
}

#[test]
fn malformed_frames_are_typed_errors() {
    let good = encode(&ToWorker::Shutdown).unwrap();
    assert!(matches!(decode::<ToWorker>(b""), Err(IpcError::Malformed(_))));
    assert!(matches!(
        decode::<ToWorker>(b"XX\x01\x00\x03"),
        Err(IpcError::Malformed(_))
    ));
    let mut next = good.clone();
    next[2..4].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
    assert!(matches!(
        decode::<ToWorker>(&next),
        Err(IpcError::Version { got }) if got == PROTOCOL_VERSION + 1
    ));
    let mut trailing = good.clone();
    trailing.push(0);
    assert!(matches!(decode::<ToWorker>(&trailing), Err(IpcError::Malformed(_))));
    assert!(matches!(decode::<ToWorker>(&good[..4]), Err(IpcError::Malformed(_))));
}

#[test]
fn frames_and_descriptors_cross_a_socket_pair() {
    let (a, mut b) = Channel::pair().unwrap();
    let mut region = Region::new(10_000).unwrap();
    region.as_mut_slice()[9_999] = 42;
    a.send(&ToWorker::Shutdown, &[region.raw_fd()]).unwrap();
    let (msg, fds): (ToWorker, _) = b.recv().unwrap();
    assert_eq!(msg, ToWorker::Shutdown);
    let mapped = Region::map(fds.into_iter().next().unwrap(), 10_000).unwrap();
    assert_eq!(mapped.as_slice()[9_999], 42, "both processes' mappings share the bytes");
    a.send_frame(b"garbage", &[]).unwrap();
    assert!(matches!(b.recv::<ToWorker>(), Err(IpcError::Malformed(_))));
    drop(a);
    assert!(matches!(b.recv::<ToWorker>(), Err(IpcError::Closed)));
}

#[test]
fn the_control_page_is_shared() {
    let host = ControlPage::new().unwrap();
    let fd = nix::unistd::dup(host.region.fd.as_ref().unwrap()).unwrap();
    let worker = ControlPage::map(fd).unwrap();
    worker.set_started(17);
    assert_eq!(host.started(), 17);
}

#[test]
fn the_region_cache_evicts_the_least_recently_used() {
    let mut lru = RegionLru::default();
    for id in 1..=REGION_CACHE as u64 {
        assert_eq!(lru.touch(id), (false, None));
    }
    assert_eq!(lru.touch(1), (true, None));
    assert_eq!(lru.touch(100), (false, Some(2)), "2 is now the least recently used");
    assert_eq!(lru.touch(2), (false, Some(3)));
}

/// The descriptors of this process that are the memfd named `name`.
fn open_memfds_named(name: &str) -> usize {
    let target = format!("/memfd:{name} (deleted)");
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|link| link.to_str() == Some(target.as_str()))
        .count()
}

#[test]
fn descriptors_of_a_frame_with_truncated_control_data_are_closed() {
    // A peer that sends more descriptors than a frame may carry: the kernel installs
    // those that fit (MSG_CTRUNC); they must be closed and the frame refused.
    let name = format!("hipvisor-ctrunc-{}", std::process::id());
    let cname = std::ffi::CString::new(name.clone()).unwrap();
    let memfd = nix::sys::memfd::memfd_create(cname.as_c_str(), nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    assert_eq!(open_memfds_named(&name), 1);
    let (a, mut b) = Channel::pair().unwrap();
    let raw = [memfd.as_raw_fd(); MAX_FDS + 3];
    let frame = encode(&ToWorker::Shutdown).unwrap();
    let iov = [IoSlice::new(&frame)];
    sendmsg::<()>(
        a.fd.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    match b.recv::<ToWorker>() {
        Err(IpcError::Malformed(why)) => assert!(why.contains("descriptors"), "{why}"),
        other => panic!("a frame with truncated control data: {other:?}"),
    }
    assert_eq!(
        open_memfds_named(&name),
        1,
        "every descriptor that arrived with the refused frame is closed"
    );
    // The connection goes on.
    a.send(&ToWorker::Shutdown, &[]).unwrap();
    assert_eq!(b.recv::<ToWorker>().unwrap().0, ToWorker::Shutdown);
}

#[test]
fn a_transient_send_error_is_retried_not_taken_for_a_dead_peer() {
    let (a, mut b) = Channel::pair().unwrap();
    // Fill the peer's queue.
    let frame = encode(&ToWorker::Shutdown).unwrap();
    let mut queued = 0usize;
    loop {
        let iov = [IoSlice::new(&frame)];
        match sendmsg::<()>(a.fd.as_raw_fd(), &iov, &[], MsgFlags::MSG_DONTWAIT, None) {
            Ok(_) => queued += 1,
            Err(nix::errno::Errno::EAGAIN) => break,
            Err(e) => panic!("{e}"),
        }
    }
    // Each blocking send now gives up after 1 ms with EAGAIN, until the reader drains
    // the queue.
    let tv = nix::sys::time::TimeVal::from(libc_timeval(std::time::Duration::from_millis(1)));
    nix::sys::socket::setsockopt(&a.fd, nix::sys::socket::sockopt::SendTimeout, &tv).unwrap();
    let reader = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(30));
        for _ in 0..=queued {
            assert_eq!(b.recv::<ToWorker>().unwrap().0, ToWorker::Shutdown);
        }
    });
    a.send(&ToWorker::Shutdown, &[])
        .expect("EAGAIN is retried until the reader makes room");
    reader.join().unwrap();
}

#[test]
fn a_message_larger_than_a_frame_is_unsendable_and_nothing_is_sent() {
    let (a, mut b) = Channel::pair().unwrap();
    let huge = FromWorker::Malformed("x".repeat(MAX_FRAME));
    assert!(matches!(a.send(&huge, &[]), Err(IpcError::Unsendable(_))));
    assert!(matches!(
        a.send_frame(&[0; 8], &[0; MAX_FDS + 1]),
        Err(IpcError::Unsendable(_))
    ));
    a.send(&ToWorker::Shutdown, &[]).unwrap();
    assert_eq!(
        b.recv::<ToWorker>().unwrap().0,
        ToWorker::Shutdown,
        "the first frame the peer sees"
    );
}

#[test]
fn a_region_mapped_read_only_is_not_writable_here() {
    let mut r = Region::new(4096).unwrap();
    r.as_mut_slice().fill(3);
    let ro = Region::map_read_only(nix::unistd::dup(r.fd.as_ref().unwrap()).unwrap(), 4096).unwrap();
    assert!(ro.as_slice().iter().all(|b| *b == 3));
    assert!(!ro.has_descriptor());
    let addr = ro.as_slice().as_ptr() as usize;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let perms = maps
        .lines()
        .find_map(|line| {
            let mut it = line.split_whitespace();
            let (start, end) = it.next()?.split_once('-')?;
            let (start, end) = (
                usize::from_str_radix(start, 16).ok()?,
                usize::from_str_radix(end, 16).ok()?,
            );
            (start <= addr && addr < end).then(|| it.next().unwrap().to_string())
        })
        .expect("mapped");
    assert!(perms.starts_with("r-"), "{perms}");
}

#[test]
fn regions_are_sealed_against_shrinking_and_growing() {
    let region = Region::new(10_000).unwrap();
    let seals = nix::fcntl::fcntl(region.fd.as_ref().unwrap(), nix::fcntl::FcntlArg::F_GET_SEALS).unwrap();
    assert!(nix::fcntl::SealFlag::from_bits_truncate(seals).contains(size_seals()));
    assert_eq!(
        nix::unistd::ftruncate(region.fd.as_ref().unwrap(), 0),
        Err(nix::errno::Errno::EPERM),
        "a peer cannot truncate a region under our mapping"
    );
    let out = OutputRegion::new(10_000).unwrap();
    assert_eq!(nix::unistd::ftruncate(&out.fd, 1), Err(nix::errno::Errno::EPERM));
    let control = ControlPage::new().unwrap();
    assert_eq!(
        nix::unistd::ftruncate(control.region.fd.as_ref().unwrap(), 0),
        Err(nix::errno::Errno::EPERM)
    );
}

#[test]
fn host_copies_are_sealed_against_writes_in_place_or_copied_and_map_read_only() {
    let dup = |r: &Region| nix::unistd::dup(r.fd.as_ref().unwrap()).unwrap();
    // A writable region held once is sealed in place: the same memfd, no copy.
    let mut own = Region::new(10_000).unwrap();
    own.as_mut_slice()[..3].copy_from_slice(&[1, 2, 3]);
    let ino = |r: &Region| nix::sys::stat::fstat(r.fd.as_ref().unwrap()).unwrap().st_ino;
    let before = ino(&own);
    let sealed = own.into_sealed().unwrap();
    assert!(sealed.is_sealed() && !sealed.is_writable() && sealed.has_descriptor());
    assert_eq!(ino(&sealed), before, "sealed in place");
    assert_eq!(&sealed.as_slice()[..3], &[1, 2, 3]);
    // Nobody can write it any more: not through a new writable mapping, not through write(2).
    assert!(matches!(Region::map(dup(&sealed), 10_000), Err(IpcError::Os { .. })));
    assert!(nix::unistd::write(sealed.fd.as_ref().unwrap(), b"x").is_err());
    // A peer maps it read-only (privately: a shared mapping of a write-sealed memfd is
    // refused before Linux 6.7) and sees the bytes.
    let peer = Region::map_read_only(dup(&sealed), 10_000).unwrap();
    assert_eq!(&peer.as_slice()[..3], &[1, 2, 3]);
    // A copy of bytes that live elsewhere.
    let copy = Region::sealed_copy(&[7; 100]).unwrap();
    assert!(copy.is_sealed());
    assert_eq!(copy.as_slice(), &[7; 100]);
    // A payload held twice is copied, never sealed under its other holder.
    let mut shared = Region::new(64).unwrap();
    shared.as_mut_slice().fill(5);
    let p = crate::op::Payload::shared(std::sync::Arc::new(shared));
    let kept = p.clone();
    let sealed = p.into_sealed().unwrap();
    assert!(sealed.region().unwrap().is_sealed());
    assert!(
        kept.region().unwrap().is_writable(),
        "the other holder's region is untouched"
    );
    assert_eq!(sealed.as_bytes(), kept.as_bytes());
}

#[test]
fn a_received_descriptor_is_mapped_only_if_sealed_and_of_the_announced_size() {
    let plain = nix::sys::memfd::memfd_create(c"plain", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&plain, 4096).unwrap();
    assert!(
        matches!(Region::map(plain, 4096), Err(IpcError::Malformed(_))),
        "not sealed"
    );
    let sealed = Region::new(4096).unwrap();
    let dup = |r: &Region| nix::unistd::dup(r.fd.as_ref().unwrap()).unwrap();
    assert!(
        matches!(Region::map(dup(&sealed), 8192), Err(IpcError::Malformed(_))),
        "too small"
    );
    assert!(
        matches!(Region::map(dup(&sealed), 100), Err(IpcError::Malformed(_))),
        "not the size announced"
    );
    Region::map(dup(&sealed), 4096).expect("sealed, of the size announced");
    let (pipe, _w) = nix::unistd::pipe().unwrap();
    assert!(
        matches!(Region::map(pipe, 1), Err(IpcError::Malformed(_))),
        "not a memfd"
    );
}

#[test]
fn output_bytes_reach_the_application_sealed_or_copied() {
    // The worker's side: map, write, unmap; it keeps its descriptor.
    let out = OutputRegion::new(40_000).unwrap();
    let worker_fd = nix::unistd::dup(&out.fd).unwrap();
    {
        let fd = nix::unistd::dup(&out.fd).unwrap();
        let mut worker = Region::map(fd, 40_000).unwrap();
        worker.as_mut_slice().fill(9);
    }
    let payload = out.into_payload(40_000).unwrap();
    let region = payload.region().expect("no copy: the shared memory itself");
    assert!(!region.has_descriptor(), "no descriptor kept for it");
    assert!(payload.as_bytes().iter().all(|b| *b == 9));
    // What the worker can still do with its descriptor: nothing that changes the bytes.
    assert_eq!(
        nix::sys::uio::pwrite(&worker_fd, &[1], 0),
        Err(nix::errno::Errno::EPERM)
    );
    let writable = Region::map(nix::unistd::dup(&worker_fd).unwrap(), 40_000);
    assert!(
        matches!(writable, Err(IpcError::Os { call: "mmap", .. })),
        "{writable:?}"
    );
    assert_eq!(nix::unistd::ftruncate(&worker_fd, 0), Err(nix::errno::Errno::EPERM));
    let read_only = std::panic::catch_unwind(|| {
        let mut copy = Region::sealed(&worker_fd, 40_000).unwrap();
        copy.as_mut_slice()[0] = 1;
    });
    assert!(read_only.is_err(), "a sealed region is never handed out writable");

    // A worker that keeps a writable mapping: the seal is refused, the bytes are copied,
    // and what the worker writes afterwards does not reach the application.
    let out = OutputRegion::new(40_000).unwrap();
    let fd = nix::unistd::dup(out.fd.as_fd()).unwrap();
    let mut worker = Region::map(fd, 40_000).unwrap();
    worker.as_mut_slice().fill(3);
    let payload = out.into_payload(40_000).unwrap();
    assert!(payload.region().is_none(), "copied: {payload:?}");
    worker.as_mut_slice().fill(4);
    assert!(payload.as_bytes().iter().all(|b| *b == 3));

    let out = OutputRegion::new(40_000).unwrap();
    assert!(matches!(out.into_payload(40_001), Err(IpcError::Malformed(_))));
}

#[test]
fn the_region_cache_forgets_on_both_sides() {
    let mut lru = RegionLru::default();
    lru.touch(1);
    lru.touch(2);
    assert!(lru.forget(1));
    assert!(!lru.forget(1));
    assert_eq!(lru.touch(1), (false, None), "sent again");
    assert_eq!(lru.touch(2), (true, None));
}

#[test]
fn only_a_seqpacket_socket_becomes_a_channel() {
    let (s, _t) = socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC).unwrap();
    assert!(matches!(Channel::inherited(s), Err(IpcError::Malformed(_))));
    let (pipe, _w) = nix::unistd::pipe().unwrap();
    assert!(matches!(Channel::inherited(pipe), Err(IpcError::Os { .. })));
    let (_a, b) = Channel::pair().unwrap();
    Channel::inherited(b.fd).unwrap();
}

fn buffer(epoch: u64, len: u64) -> crate::op::BufferHandle {
    crate::op::BufferHandle {
        device: 1,
        epoch,
        id: 5,
        len,
    }
}

#[test]
fn answers_that_do_not_match_their_request_are_malformed() {
    let ok = |op: &Op, out: Option<usize>, r: Result<Reply, GpuError>, n: Option<u64>| {
        check_answer(op, 1, 2, out, &r, n).is_ok()
    };
    let read = Op::CopyFromDevice {
        src: buffer(2, 1 << 20),
        offset: 0,
        len: 100,
    };
    assert!(ok(&read, None, Ok(Reply::Data(vec![0; 100].into())), None));
    assert!(
        !ok(&read, None, Ok(Reply::Data(vec![0; 101].into())), None),
        "longer than asked"
    );
    assert!(!ok(&read, None, Ok(Reply::Data(vec![0; 99].into())), None), "shorter");
    assert!(!ok(&read, None, Ok(Reply::Done), None), "another kind");
    assert!(
        !ok(&read, None, Ok(Reply::Data(vec![0; 100].into())), Some(100)),
        "no output region"
    );
    let big = Op::CopyFromDevice {
        src: buffer(2, 1 << 20),
        offset: 0,
        len: 100_000,
    };
    assert!(ok(
        &big,
        Some(100_000),
        Ok(Reply::Data(Payload::default())),
        Some(100_000)
    ));
    assert!(!ok(
        &big,
        Some(100_000),
        Ok(Reply::Data(Payload::default())),
        Some(100_001)
    ));
    assert!(!ok(
        &big,
        Some(100_000),
        Ok(Reply::Data(Payload::default())),
        Some(u64::MAX)
    ));
    assert!(!ok(&big, Some(100_000), Ok(Reply::Data(Payload::default())), None));
    let alloc = Op::Alloc { bytes: 64 };
    assert!(ok(&alloc, None, Ok(Reply::Buffer(buffer(2, 64))), None));
    assert!(
        !ok(&alloc, None, Ok(Reply::Buffer(buffer(1, 64))), None),
        "an old epoch"
    );
    assert!(
        !ok(&alloc, None, Ok(Reply::Buffer(buffer(2, 65))), None),
        "another length"
    );
    let mem = Op::MemInfo;
    let info = |free, total| Ok(Reply::MemInfo(crate::op::MemInfo { free, total }));
    assert!(ok(&mem, None, info(1, 2), None));
    assert!(!ok(&mem, None, info(3, 2), None));
    let error = GpuError::api_with(crate::error::Api::Sim, 700, crate::op::OpKind::Synchronize, 1, "x");
    assert!(ok(&Op::Synchronize, None, Err(error.clone()), None));
    assert!(!ok(&Op::Synchronize, None, Err(error), Some(1)));
    assert!(!ok(
        &Op::LoadModule {
            source: ModuleSource::Builtin
        },
        None,
        Ok(Reply::Module(ModuleHandle { device: 0, id: 1 })),
        None
    ));
}

fn request(id: u64, op: Op) -> Request {
    Request {
        id,
        op,
        origin: Origin::Application,
        fault: None,
        task_faults: Vec::new(),
        input: None,
        output: None,
        linger_us: 0,
    }
}

#[test]
fn batch_answers_are_checked_for_count_order_and_what_follows_a_sticky_fault() {
    let reqs: Vec<Request> = (10..13).map(|id| request(id, Op::Synchronize)).collect();
    let done = |id| (id, Ok(Reply::Done));
    let sticky = |id| {
        let e = GpuError::api_with(crate::error::Api::Sim, 700, crate::op::OpKind::Synchronize, 1, "x");
        (id, Err(e))
    };
    let check = |answered, results: &[(u64, Result<Reply, GpuError>)], last| {
        check_batch_frame(&reqs, answered, results, last, 1, 2).is_ok()
    };
    assert!(check(0, &[done(10), done(11), done(12)], true));
    assert!(check(0, &[done(10)], false));
    assert!(check(1, &[done(11), done(12)], true));
    assert!(check(0, &[done(10), sticky(11)], true), "stopped at a sticky fault");
    assert!(
        !check(0, &[done(10), sticky(11)], false),
        "a sticky fault ends the batch"
    );
    assert!(
        !check(0, &[sticky(10), done(11)], true),
        "nothing runs after a sticky fault"
    );
    assert!(!check(0, &[done(10), done(11)], true), "stopped without a reason");
    assert!(!check(0, &[done(10), done(11), done(12), done(13)], true), "too many");
    assert!(!check(2, &[done(12), done(13)], true), "too many");
    assert!(!check(0, &[done(11)], false), "out of order");
    assert!(!check(0, &[], true), "nothing answered");
    assert!(!check(5, &[], true), "past the end");
}

/// Decodes `frame` as the host does and checks it against one request of every kind
/// (with and without an output region) and a batch of them.
fn check_any_response(frame: &[u8]) {
    let b = buffer(0, 1 << 20);
    let ops = [
        Op::Alloc { bytes: 64 },
        Op::Free { buffer: b },
        Op::CopyFromDevice {
            src: b,
            offset: 0,
            len: 64,
        },
        Op::CopyFromDevice {
            src: b,
            offset: 0,
            len: 65_536,
        },
        Op::Memset {
            buffer: b,
            offset: 0,
            len: 8,
            value: 1,
        },
        Op::LoadModule {
            source: ModuleSource::Builtin,
        },
        Op::Synchronize,
        Op::MemInfo,
        Op::DeviceInfo,
    ];
    let Ok(msg) = decode::<FromWorker>(frame) else { return };
    match msg {
        FromWorker::Response { result, output_len, .. } => {
            for op in &ops {
                for output in [None, Some(64), Some(65_536)] {
                    let _ = check_answer(op, 1, 0, output, &result, output_len);
                }
            }
        }
        FromWorker::Batch { results, done } => {
            let reqs: Vec<Request> = ops
                .iter()
                .cloned()
                .enumerate()
                .map(|(i, op)| request(i as u64, op))
                .collect();
            for answered in 0..=reqs.len() + 1 {
                let _ = check_batch_frame(&reqs, answered, &results, done, 1, 0);
            }
        }
        _ => {}
    }
}

proptest! {
    #[test]
    fn the_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<ToWorker>(&bytes);
        let _ = decode::<FromWorker>(&bytes);
    }

    #[test]
    fn valid_headers_with_random_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut frame = b"HV".to_vec();
        frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        frame.extend_from_slice(&body);
        let _ = decode::<ToWorker>(&frame);
        let _ = decode::<FromWorker>(&frame);
    }

    /// The host's whole response path on arbitrary bytes: decoded, then checked against
    /// every kind of request (and a batch of them); no panic, whatever the worker sends.
    #[test]
    fn the_host_checks_any_response_without_panicking(
        tag in 0u8..8,
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut frame = b"HV".to_vec();
        frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        frame.push(tag);
        frame.extend_from_slice(&body);
        check_any_response(&frame);
    }

    /// The same with responses built from arbitrary fields (valid frames whose numbers
    /// are anything).
    #[test]
    fn the_host_checks_responses_with_any_numbers(
        id in any::<u64>(),
        len in any::<u64>(),
        output_len in proptest::option::of(any::<u64>()),
        epoch in any::<u64>(),
        device in any::<u32>(),
        data in 0usize..70_000,
        done in any::<bool>(),
    ) {
        let handle = crate::op::BufferHandle { device, epoch, id, len };
        let replies = [
            Reply::Done,
            Reply::Buffer(handle),
            Reply::Data(vec![0; data].into()),
            Reply::Module(ModuleHandle { device, id }),
            Reply::MemInfo(crate::op::MemInfo { free: len, total: epoch }),
        ];
        for reply in replies {
            let response = FromWorker::Response { id, result: Ok(reply.clone()), output_len };
            check_any_response(&encode(&response).unwrap_or_default());
            let batch = FromWorker::Batch { results: vec![(id, Ok(reply)); (len % 70) as usize], done };
            check_any_response(&encode(&batch).unwrap_or_default());
        }
    }
}
