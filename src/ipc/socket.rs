//! The connection: a Unix `SOCK_SEQPACKET` socket pair, one frame per datagram, descriptors
//! passed with `SCM_RIGHTS`.
#![allow(unsafe_code)]

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;

use nix::sys::socket::{AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair};
use serde::{Deserialize, Serialize};

use super::error::{IpcError, os};
use super::frame::*;
use super::protocol::{decode, encode};

/// The descriptor number of the worker's socket in the worker process.
pub const WORKER_FD: RawFd = 3;
/// The environment switch that makes a process a worker: the value is its socket's
/// descriptor number. (Not `HIPVISOR_*`: that prefix is configuration.)
pub const WORKER_ENV: &str = "HV_WORKER_FD";
/// How long a send keeps retrying transient errors (`EINTR`, `EAGAIN`, `ENOBUFS`) before it
/// gives up with [`IpcError::Os`].
pub const SEND_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// One end of a host ↔ worker connection.
#[derive(Debug)]
pub struct Channel {
    pub(super) fd: OwnedFd,
    buf: Vec<u8>,
}

/// Whether this process has claimed its worker socket ([`Channel::from_worker_env`]).
static WORKER_FD_CLAIMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Channel {
    /// A connected pair (host end, worker end), both close-on-exec.
    ///
    /// # Errors
    /// [`IpcError::Os`].
    pub fn pair() -> Result<(Channel, Channel), IpcError> {
        let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(os("socketpair"))?;
        Ok((Channel::from_fd(a), Channel::from_fd(b)))
    }

    /// Wraps a connected `SOCK_SEQPACKET` socket.
    pub fn from_fd(fd: OwnedFd) -> Channel {
        Channel {
            fd,
            buf: vec![0; MAX_FRAME + 1],
        }
    }

    /// Wraps the worker's end of the connection, after checking it is a `SOCK_SEQPACKET`
    /// socket.
    ///
    /// # Errors
    /// [`IpcError::Os`] if `fd` is not a socket; [`IpcError::Malformed`] if it is a socket of
    /// another type.
    pub fn inherited(fd: OwnedFd) -> Result<Channel, IpcError> {
        seqpacket(fd.as_fd())?;
        Ok(Channel::from_fd(fd))
    }

    /// The worker's end of the connection, inherited at the descriptor number named by
    /// [`WORKER_ENV`]: `None` if this process was not started as a worker (the variable is
    /// unset or not a descriptor number). Claimed at most once per process (a second call
    /// is an error).
    ///
    /// The descriptor is taken over only if it is open and a `SOCK_SEQPACKET` socket. The
    /// contract that makes this sound: the variable comes from whoever started the process
    /// ([`spawn_worker`](super::spawn::spawn_worker) puts the socket there), since changing a process's own environment
    /// needs `unsafe` (`std::env::set_var`); and it is read before anything else in the
    /// process could own that descriptor, which is why
    /// [`crate::worker::run_if_worker`] comes first in `main`.
    ///
    /// # Errors
    /// [`IpcError::Os`] / [`IpcError::Malformed`] if the descriptor is not a socket of the
    /// protocol's type; [`IpcError::Malformed`] on a second claim.
    pub fn from_worker_env() -> Option<Result<Channel, IpcError>> {
        let fd: RawFd = std::env::var(WORKER_ENV).ok()?.parse().ok()?;
        Some(Self::claim(fd))
    }

    fn claim(fd: RawFd) -> Result<Channel, IpcError> {
        if fd <= 2 {
            return Err(IpcError::Malformed(format!(
                "{WORKER_ENV}={fd} names a standard stream, not the worker's socket"
            )));
        }
        // Open at all? (`F_GETFD` reads the descriptor's flags and touches nothing.)
        // SAFETY: fcntl with F_GETFD only reads flags of a descriptor number; an unused number
        // is EBADF.
        if unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) } < 0 {
            return Err(IpcError::Os {
                call: "fcntl",
                errno: nix::errno::Errno::last(),
            });
        }
        // SAFETY: the descriptor is open (checked above); the borrow only reads its socket
        // type and ends before anything else happens to it.
        seqpacket(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })?;
        // Close-on-exec from now on (it was cleared so the socket survived the worker's own
        // exec): a helper the driver or toolchain starts must not inherit the host's
        // connection, or the host would see no end of file when the worker dies.
        // SAFETY: F_SETFD on a descriptor that is open (checked above) only sets its flag.
        if unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC) } < 0 {
            return Err(IpcError::Os {
                call: "fcntl(F_SETFD)",
                errno: nix::errno::Errno::last(),
            });
        }
        if WORKER_FD_CLAIMED.swap(true, Ordering::AcqRel) {
            return Err(IpcError::Malformed(format!(
                "the worker socket ({WORKER_ENV}={fd}) was claimed already"
            )));
        }
        // SAFETY: an open SOCK_SEQPACKET socket (checked above) which, by the contract of
        // `from_worker_env` (the environment names the socket the process's starter placed
        // there, read before anything else could own it), nothing else in the process owns;
        // claimed once per process (`WORKER_FD_CLAIMED`).
        Ok(Channel::from_fd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Sets how long [`Channel::recv`] waits (`None`: forever); a receive that times out is
    /// an [`IpcError::Os`] with `EAGAIN`.
    ///
    /// # Errors
    /// [`IpcError::Os`].
    pub fn set_timeout(&self, timeout: Option<std::time::Duration>) -> Result<(), IpcError> {
        let tv = nix::sys::time::TimeVal::from(libc_timeval(timeout.unwrap_or_default()));
        nix::sys::socket::setsockopt(&self.fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv).map_err(os("setsockopt"))
    }

    /// Sends a message with descriptors attached.
    ///
    /// # Errors
    /// [`IpcError::Unsendable`] if it cannot be encoded in a frame (nothing was sent);
    /// `Closed` if the peer is gone; `Os`.
    pub fn send<T: Serialize>(&self, msg: &T, fds: &[RawFd]) -> Result<(), IpcError> {
        let frame = encode(msg)?;
        self.send_frame(&frame, fds)
    }

    /// Sends raw bytes as one frame (tests send malformed frames with this). Transient
    /// errors (`EINTR`, `EAGAIN`, `ENOBUFS`: the peer's queue or the kernel's memory is
    /// short for a moment) are retried with a growing pause for up to [`SEND_RETRY_FOR`].
    ///
    /// # Errors
    /// [`IpcError::Unsendable`] for a frame above [`MAX_FRAME`] or more than [`MAX_FDS`]
    /// descriptors (nothing is sent); `Closed` if the peer is gone; [`IpcError::Os`].
    pub fn send_frame(&self, frame: &[u8], fds: &[RawFd]) -> Result<(), IpcError> {
        if frame.len() > MAX_FRAME {
            return Err(IpcError::Unsendable(format!(
                "a frame of {} bytes exceeds the protocol's {MAX_FRAME}",
                frame.len()
            )));
        }
        if fds.len() > MAX_FDS {
            return Err(IpcError::Unsendable(format!(
                "{} descriptors in one frame; at most {MAX_FDS}",
                fds.len()
            )));
        }
        let iov = [IoSlice::new(frame)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        retry_transient(|| sendmsg::<()>(self.fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None))
    }

    /// Receives one message and the descriptors sent with it (blocking).
    ///
    /// # Errors
    /// `Closed` at end of file; `Malformed` / `Version` for a bad frame; `Os`.
    pub fn recv<T: for<'de> Deserialize<'de>>(&mut self) -> Result<(T, Vec<OwnedFd>), IpcError> {
        let (len, fds) = self.recv_frame()?;
        Ok((decode(&self.buf[..len])?, fds))
    }

    /// Like [`Channel::recv`], but polls for up to `spin` (yielding the CPU between polls)
    /// before it blocks.
    ///
    /// # Errors
    /// As [`Channel::recv`].
    pub fn recv_spinning<T: for<'de> Deserialize<'de>>(
        &mut self,
        spin: std::time::Duration,
    ) -> Result<(T, Vec<OwnedFd>), IpcError> {
        if !spin.is_zero() {
            let until = std::time::Instant::now() + spin;
            loop {
                if let Some((len, fds)) = self.recv_frame_with(MsgFlags::MSG_DONTWAIT)? {
                    return Ok((decode(&self.buf[..len])?, fds));
                }
                if std::time::Instant::now() >= until {
                    break;
                }
                std::thread::yield_now();
            }
        }
        self.recv()
    }

    fn recv_frame(&mut self) -> Result<(usize, Vec<OwnedFd>), IpcError> {
        let frame = self.recv_frame_with(MsgFlags::empty())?;
        // A blocking receive gives a frame or an error (its timeout is an `EAGAIN` error).
        frame.ok_or(IpcError::Os {
            call: "recvmsg",
            errno: nix::errno::Errno::EAGAIN,
        })
    }

    /// One frame; `None` when `flags` has `MSG_DONTWAIT` and nothing is there. The
    /// descriptors that arrived are owned (and so closed) whatever the frame turns out to
    /// be: when the control data was truncated (`MSG_CTRUNC`: more descriptors than
    /// [`MAX_FDS`]), the kernel installed those that fit and they are closed here, and the
    /// frame is malformed.
    fn recv_frame_with(&mut self, flags: MsgFlags) -> Result<Option<(usize, Vec<OwnedFd>)>, IpcError> {
        use nix::libc;
        // Room for MAX_FDS descriptors, aligned for `cmsghdr`.
        let mut control = [0u64; 16];
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<libc::c_int>()) as u32) } as usize;
        // The kernel writes up to `space` bytes into `control`: checked in release builds too.
        assert!(
            space <= std::mem::size_of_val(&control),
            "MAX_FDS outgrew the control buffer"
        );
        let fd = self.fd.as_raw_fd();
        let nonblocking = flags.contains(MsgFlags::MSG_DONTWAIT);
        let mut iov = libc::iovec {
            iov_base: self.buf.as_mut_ptr().cast(),
            iov_len: self.buf.len(),
        };
        // SAFETY: an all-zero msghdr is a valid empty header; its pointers are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        let received = loop {
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            msg.msg_flags = 0;
            // SAFETY: `msg` points at `iov` (our receive buffer, `buf.len()` writable bytes)
            // and at `control` (`space` writable bytes, aligned for cmsghdr), all alive for
            // the call.
            let n = unsafe { libc::recvmsg(fd, &mut msg, (MsgFlags::MSG_CMSG_CLOEXEC | flags).bits()) };
            if n >= 0 {
                break n as usize;
            }
            match nix::errno::Errno::last() {
                nix::errno::Errno::EINTR => continue,
                nix::errno::Errno::EAGAIN if nonblocking => return Ok(None),
                nix::errno::Errno::ECONNRESET => return Err(IpcError::Closed),
                e => {
                    return Err(IpcError::Os {
                        call: "recvmsg",
                        errno: e,
                    });
                }
            }
        };
        let mut fds = Vec::new();
        let control_start = control.as_ptr() as usize;
        let control_end = control_start + (msg.msg_controllen as usize).min(space);
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR walk the control data the kernel wrote into
        // `control`, staying within `msg_controllen` (which the kernel set to what it wrote).
        let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !c.is_null() {
            // SAFETY: a non-null header from CMSG_FIRSTHDR/NXTHDR lies inside `control`.
            let (level, kind, len) = unsafe { ((*c).cmsg_level, (*c).cmsg_type, (*c).cmsg_len as usize) };
            if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
                // SAFETY: as above; CMSG_DATA and CMSG_LEN only compute addresses and sizes.
                let (data, header) = unsafe { (libc::CMSG_DATA(c), libc::CMSG_LEN(0) as usize) };
                let room = control_end.saturating_sub(data as usize) / std::mem::size_of::<libc::c_int>();
                let count = (len.saturating_sub(header) / std::mem::size_of::<libc::c_int>()).min(room);
                for i in 0..count {
                    // SAFETY: `count` descriptors lie between `data` and the end of the
                    // control data the kernel wrote (bounded by `room`); unaligned reads.
                    let raw = unsafe { data.cast::<libc::c_int>().add(i).read_unaligned() };
                    // SAFETY: the kernel just installed this descriptor in this process for
                    // this message; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
            // SAFETY: as for CMSG_FIRSTHDR.
            c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
        }
        let truncated = msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0;
        if received == 0 && fds.is_empty() && !truncated {
            return Err(IpcError::Closed);
        }
        if truncated {
            // `fds` is dropped here: every descriptor that arrived is closed.
            return Err(IpcError::Malformed(format!(
                "frame larger than {MAX_FRAME} bytes or with more than {MAX_FDS} descriptors ({} closed)",
                fds.len()
            )));
        }
        Ok(Some((received, fds)))
    }
}

/// Checks that `fd` is a `SOCK_SEQPACKET` socket.
fn seqpacket(fd: std::os::fd::BorrowedFd<'_>) -> Result<(), IpcError> {
    let kind = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SockType).map_err(os("getsockopt"))?;
    if kind != SockType::SeqPacket {
        return Err(IpcError::Malformed(format!(
            "the worker's descriptor is a {kind:?} socket, not SOCK_SEQPACKET"
        )));
    }
    Ok(())
}

/// Runs `send` until it succeeds, retrying the transient errors (`EINTR`, `EAGAIN`,
/// `ENOBUFS`) with a pause from 20 µs doubling to 5 ms, for up to [`SEND_RETRY_FOR`].
fn retry_transient(mut send: impl FnMut() -> nix::Result<usize>) -> Result<(), IpcError> {
    use nix::errno::Errno;
    let until = std::time::Instant::now() + SEND_RETRY_FOR;
    let mut pause = std::time::Duration::from_micros(20);
    loop {
        match send() {
            Ok(_) => return Ok(()),
            Err(Errno::EPIPE | Errno::ECONNRESET) => return Err(IpcError::Closed),
            Err(e @ (Errno::EINTR | Errno::EAGAIN | Errno::ENOBUFS)) => {
                if std::time::Instant::now() >= until {
                    return Err(IpcError::Os {
                        call: "sendmsg",
                        errno: e,
                    });
                }
                if e != Errno::EINTR {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_millis(5));
                }
            }
            Err(e) => {
                return Err(IpcError::Os {
                    call: "sendmsg",
                    errno: e,
                });
            }
        }
    }
}

pub(super) fn libc_timeval(d: std::time::Duration) -> nix::libc::timeval {
    nix::libc::timeval {
        tv_sec: d.as_secs() as nix::libc::time_t,
        tv_usec: d.subsec_micros() as nix::libc::suseconds_t,
    }
}
