//! Shared memory: sealed memfd regions for bulk bytes, output regions a worker writes, and
//! the control page.
#![allow(unsafe_code)]

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use super::error::{IpcError, os};

/// A shared-memory region: a memfd mapped read-write into this process, sealed against
/// shrinking and growing (`F_SEAL_SHRINK | F_SEAL_GROW`), so no process holding its
/// descriptor can truncate it under a mapping (a later access would be SIGBUS).
///
/// Or, made by [`OutputRegion::into_payload`], bytes a worker wrote: sealed against writes
/// too, mapped read-only, and without a descriptor (the mapping keeps the memory; a held
/// payload costs a mapping, no descriptor).
#[derive(Debug)]
pub struct Region {
    id: u64,
    /// `None` for a sealed, read-only region from a worker (see above).
    pub(super) fd: Option<OwnedFd>,
    /// Mapped read-write (else read-only: sealed, or mapped so).
    writable: bool,
    ptr: NonNull<u8>,
    len: usize,
}

static NEXT_REGION: AtomicU64 = AtomicU64::new(1);

// SAFETY: the mapping is plain shared memory owned by this value; access goes through
// `&self`/`&mut self` like a `Vec<u8>`, so moving or sharing the handle across threads is as
// safe as for a byte buffer (concurrent writers in another process are the protocol's
// business: a region is written by one side, then handed over with a message).
unsafe impl Send for Region {}
// SAFETY: as above; `&Region` only gives read access.
unsafe impl Sync for Region {}

/// The seals every region carries from its creation: its size is fixed.
pub(super) fn size_seals() -> nix::fcntl::SealFlag {
    nix::fcntl::SealFlag::F_SEAL_SHRINK | nix::fcntl::SealFlag::F_SEAL_GROW
}

/// A new memfd of `len` bytes (at least one), sealed against shrinking and growing.
fn sealed_memfd(len: usize) -> Result<OwnedFd, IpcError> {
    use nix::sys::memfd::MFdFlags;
    let fd = nix::sys::memfd::memfd_create(c"hipvisor", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
        .map_err(os("memfd_create"))?;
    let size = i64::try_from(len.max(1)).map_err(|_| IpcError::Os {
        call: "ftruncate",
        errno: nix::errno::Errno::EFBIG,
    })?;
    nix::unistd::ftruncate(&fd, size).map_err(os("ftruncate"))?;
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_ADD_SEALS(size_seals())).map_err(os("fcntl(F_ADD_SEALS)"))?;
    Ok(fd)
}

/// Whether a memfd is sealed against writes.
fn write_sealed(fd: &OwnedFd) -> bool {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GET_SEALS)
        .is_ok_and(|s| nix::fcntl::SealFlag::from_bits_truncate(s).contains(nix::fcntl::SealFlag::F_SEAL_WRITE))
}

/// Checks a descriptor received from the peer before anything maps it: a memfd sealed
/// against shrinking and growing, of exactly `len` bytes (at least one).
fn check_received(fd: &OwnedFd, len: usize) -> Result<(), IpcError> {
    let seals = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GET_SEALS)
        .map_err(|e| IpcError::Malformed(format!("a received descriptor without seals (F_GET_SEALS: {e})")))?;
    let seals = nix::fcntl::SealFlag::from_bits_truncate(seals);
    if !seals.contains(size_seals()) {
        return Err(IpcError::Malformed(format!(
            "a received region is not sealed against shrinking and growing ({seals:?})"
        )));
    }
    let size = nix::sys::stat::fstat(fd).map_err(os("fstat"))?.st_size;
    if u64::try_from(size).ok() != Some(len.max(1) as u64) {
        return Err(IpcError::Malformed(format!(
            "a received region of {size} bytes, {len} announced"
        )));
    }
    Ok(())
}

impl Region {
    /// A new zero-filled region of `len` bytes (at least one page is mapped), sealed
    /// against shrinking and growing.
    ///
    /// # Errors
    /// [`IpcError::Os`].
    pub fn new(len: usize) -> Result<Region, IpcError> {
        Region::map(sealed_memfd(len)?, len)
    }

    /// Maps a region received from the peer, once the descriptor is checked: a memfd
    /// sealed against shrinking and growing (so the peer cannot truncate it under the
    /// mapping), of exactly `len` bytes.
    ///
    /// # Errors
    /// [`IpcError::Malformed`] if the descriptor is not such a memfd; [`IpcError::Os`].
    pub fn map(fd: OwnedFd, len: usize) -> Result<Region, IpcError> {
        check_received(&fd, len)?;
        let mut r = Region::mapped(
            &fd,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
        )?;
        r.fd = Some(fd);
        r.writable = true;
        Ok(r)
    }

    /// A region holding a copy of `bytes`, sealed against writes (`F_SEAL_WRITE`, with the
    /// size seals) and mapped read-only, keeping its descriptor: host memory nobody can
    /// change any more, which workers map read-only (a durable buffer's host copy). The
    /// bytes are written through the descriptor, so no writable mapping ever exists.
    ///
    /// # Errors
    /// [`IpcError::Os`].
    pub fn sealed_copy(bytes: &[u8]) -> Result<Region, IpcError> {
        let fd = sealed_memfd(bytes.len())?;
        let mut at = 0;
        while at < bytes.len() {
            match nix::sys::uio::pwrite(&fd, &bytes[at..], at as i64) {
                Ok(n) => at += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    return Err(IpcError::Os {
                        call: "pwrite",
                        errno: e,
                    });
                }
            }
        }
        Region::seal_fd(fd, bytes.len())
    }

    /// This region, sealed against writes and mapped read-only (see
    /// [`Region::sealed_copy`]): in place when it is this process's writable region and no
    /// one else maps it writable (its mapping here is replaced), else a sealed copy.
    ///
    /// # Errors
    /// [`IpcError::Os`].
    pub fn into_sealed(mut self) -> Result<Region, IpcError> {
        if !self.writable && self.fd.is_some() {
            return Ok(self);
        }
        let Some(fd) = self.fd.take().filter(|_| self.writable) else {
            return Region::sealed_copy(self.as_slice());
        };
        let len = self.len;
        let seal = nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_WRITE);
        // Our own writable mapping goes first: the kernel refuses the seal while one exists.
        drop(self);
        if nix::fcntl::fcntl(&fd, seal).is_ok() {
            let mut r = Region::sealed(&fd, len)?;
            r.fd = Some(fd);
            return Ok(r);
        }
        // Someone else maps it writable: copy what it holds now.
        let view = Region::mapped(&fd, len, ProtFlags::PROT_READ, MapFlags::MAP_SHARED)?;
        Region::sealed_copy(view.as_slice())
    }

    /// Seals a memfd of `len` bytes against writes and maps it read-only, keeping it.
    fn seal_fd(fd: OwnedFd, len: usize) -> Result<Region, IpcError> {
        let seal = nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_WRITE);
        nix::fcntl::fcntl(&fd, seal).map_err(os("fcntl(F_ADD_SEALS)"))?;
        let mut r = Region::sealed(&fd, len)?;
        r.fd = Some(fd);
        Ok(r)
    }

    /// Whether the region is sealed against writes (its bytes can no longer change).
    pub fn is_sealed(&self) -> bool {
        !self.writable && self.fd.as_ref().is_some_and(write_sealed)
    }

    /// Maps a region received from the peer as [`Region::map`] does, but read-only (and
    /// without its descriptor, closed once mapped): for what this side only reads (a
    /// worker's inputs, module images), so a bug here cannot write into the peer's memory.
    /// [`Region::as_mut_slice`] panics on it.
    ///
    /// # Errors
    /// As [`Region::map`].
    pub fn map_read_only(fd: OwnedFd, len: usize) -> Result<Region, IpcError> {
        check_received(&fd, len)?;
        // A write-sealed memfd (a durable buffer's host copy) is mapped privately: a shared
        // mapping of one, even read-only, is refused before Linux 6.7 (see `sealed`).
        let flags = if write_sealed(&fd) {
            MapFlags::MAP_PRIVATE
        } else {
            MapFlags::MAP_SHARED
        };
        Region::mapped(&fd, len, ProtFlags::PROT_READ, flags)
    }

    /// Maps `len` bytes of a memfd sealed against writes, shrinking and growing, read-only;
    /// the descriptor is closed (the mapping keeps the memory). Private: a shared mapping of
    /// a write-sealed memfd, even read-only, is refused before Linux 6.7; a private one
    /// shares the same page-cache pages (nothing writes them, so nothing is copied) on every
    /// kernel.
    pub(super) fn sealed(fd: &OwnedFd, len: usize) -> Result<Region, IpcError> {
        Region::mapped(fd, len, ProtFlags::PROT_READ, MapFlags::MAP_PRIVATE)
    }

    /// The one mapping of a region: `len` bytes (at least one) of `fd`, a memfd exactly that
    /// long (made here, or checked by [`check_received`]) and sealed against shrinking; no
    /// descriptor kept (the callers that send the region on keep theirs).
    fn mapped(fd: &OwnedFd, len: usize, prot: ProtFlags, flags: MapFlags) -> Result<Region, IpcError> {
        let length = NonZeroUsize::new(len.max(1)).expect("at least one byte");
        // SAFETY: maps `length` bytes of a memfd we hold; the file is exactly that long and
        // sealed against shrinking, so every mapped page stays backed (a mapping outlives its
        // descriptor); the mapping is unmapped once, in `drop`.
        let ptr = unsafe { mmap(None, length, prot, flags, fd.as_fd(), 0) }.map_err(os("mmap"))?;
        Ok(Region {
            id: NEXT_REGION.fetch_add(1, Ordering::Relaxed),
            fd: None,
            writable: false,
            ptr: ptr.cast(),
            len,
        })
    }

    /// The region's id, unique in this process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The region's length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` for an empty region.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the region has a descriptor (to send to a peer): every region but the
    /// sealed, read-only ones made by [`OutputRegion::into_payload`].
    pub fn has_descriptor(&self) -> bool {
        self.fd.is_some()
    }

    /// Whether the region is mapped writable here ([`Region::as_mut_slice`]).
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The descriptor, to send to the peer.
    ///
    /// # Panics
    /// For a sealed, read-only region, which has none ([`Region::has_descriptor`]).
    pub fn raw_fd(&self) -> RawFd {
        self.fd
            .as_ref()
            .expect("a sealed region received from a worker has no descriptor")
            .as_raw_fd()
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` maps at least `len` bytes for the life of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, writable.
    ///
    /// # Panics
    /// For a read-only region ([`Region::is_writable`] is `false`).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        assert!(self.writable, "a sealed or read-only region cannot be written");
        // SAFETY: as above; the mapping is writable (regions with a descriptor are mapped
        // read-write), and `&mut self` makes this the only reference in this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `map`, once; no slice outlives `self`.
        let _ = unsafe { munmap(self.ptr.cast(), self.len.max(1)) };
    }
}

/// The host's region for a large copy from the device: a memfd sealed against shrinking
/// and growing, which the host does not map while the worker writes it. The worker maps it,
/// writes, and unmaps it before it answers; then [`OutputRegion::into_payload`] seals it
/// against writes and maps it read-only, so the bytes the application gets can no longer be
/// changed by the worker (or by anyone).
#[derive(Debug)]
pub struct OutputRegion {
    id: u64,
    pub(super) fd: OwnedFd,
    len: usize,
}

impl OutputRegion {
    /// A new output region of `len` bytes.
    ///
    /// # Errors
    /// [`IpcError::Os`].
    pub fn new(len: usize) -> Result<OutputRegion, IpcError> {
        Ok(OutputRegion {
            id: NEXT_REGION.fetch_add(1, Ordering::Relaxed),
            fd: sealed_memfd(len)?,
            len,
        })
    }

    /// The region's id, unique in this process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The region's length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` for an empty region.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The descriptor, to send to the worker.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The bytes the worker wrote (`written`, which must be the region's whole length), as
    /// bytes the worker cannot change any more: the memfd is sealed against writes
    /// (`F_SEAL_WRITE`; the kernel refuses it while any process still has a writable shared
    /// mapping, which is why the worker unmaps first) and mapped read-only, and its
    /// descriptor is closed: a [`Region`] without one (a held payload costs a mapping, no
    /// descriptor). A region that cannot be sealed (a worker kept a mapping) or mapped (the
    /// process's mapping limit, `vm.max_map_count`) is copied once to the heap instead.
    ///
    /// # Errors
    /// [`IpcError::Malformed`] if `written` is not the region's length; [`IpcError::Os`] if
    /// the copy cannot be read.
    pub fn finish(self, written: u64) -> Result<Output, IpcError> {
        if written != self.len as u64 {
            return Err(IpcError::Malformed(format!(
                "{written} bytes written to an output region of {}",
                self.len
            )));
        }
        let sealed = nix::fcntl::fcntl(
            &self.fd,
            nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_WRITE),
        );
        if sealed.is_ok()
            && let Ok(mapping) = Region::sealed(&self.fd, self.len)
        {
            // `self.fd` is closed on return: the mapping keeps the memory.
            return Ok(Output::Mapped(mapping));
        }
        let mut copy = vec![0u8; self.len];
        let mut at = 0;
        while at < copy.len() {
            match nix::sys::uio::pread(&self.fd, &mut copy[at..], at as i64) {
                Ok(0) => return Err(IpcError::Malformed("an output region shorter than its seal".into())),
                Ok(n) => at += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    return Err(IpcError::Os {
                        call: "pread",
                        errno: e,
                    });
                }
            }
        }
        Ok(Output::Copied(copy))
    }
}

/// The bytes of a finished [`OutputRegion`]: mapped read-only, or copied to the heap.
#[derive(Debug)]
pub enum Output {
    /// Sealed against writes and mapped read-only.
    Mapped(Region),
    /// Copied once (the region could not be sealed or mapped).
    Copied(Vec<u8>),
}

/// The control page: the worker publishes the id of the request it has started, so after a
/// crash the host knows whether the op in flight may have executed.
#[derive(Debug)]
pub struct ControlPage {
    pub(super) region: Region,
}

impl ControlPage {
    /// A new page (host side).
    ///
    /// # Errors
    /// [`IpcError::Os`].
    pub fn new() -> Result<ControlPage, IpcError> {
        Ok(ControlPage {
            region: Region::new(64)?,
        })
    }

    /// The page received from the host (worker side).
    ///
    /// # Errors
    /// As [`Region::map`].
    pub fn map(fd: OwnedFd) -> Result<ControlPage, IpcError> {
        Ok(ControlPage {
            region: Region::map(fd, 64)?,
        })
    }

    fn started_cell(&self) -> &AtomicU64 {
        // SAFETY: the region is at least 64 bytes, page-aligned (so 8-byte aligned), lives as
        // long as `self`, and is only ever accessed through this atomic by both processes.
        unsafe { &*self.region.ptr.as_ptr().cast::<AtomicU64>() }
    }

    /// Records that request `id` has started.
    pub fn set_started(&self, id: u64) {
        self.started_cell().store(id, Ordering::Release);
    }

    /// The last request the worker started.
    pub fn started(&self) -> u64 {
        self.started_cell().load(Ordering::Acquire)
    }

    /// The descriptor, to send to the worker.
    pub fn raw_fd(&self) -> RawFd {
        self.region.raw_fd()
    }
}
