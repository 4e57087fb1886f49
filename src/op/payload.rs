//! Bulk host bytes ([`Payload`]): on the heap, or in a shared-memory region a worker process
//! maps directly.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::sync::Arc;

use crate::ipc::error::IpcError;
use crate::ipc::shm::{Output, OutputRegion, Region};

/// Bulk host bytes (copy data, module images).
///
/// Cheap to clone (shared), so an op can be resubmitted on retry without copying its data.
/// The representation is private: bytes on the heap, or a shared-memory region that a worker
/// process maps directly (see [`Region`]; a large copy back from a worker is a
/// region sealed against writes, mapped read-only), without changing the shape of [`Op`](super::Op).
/// On the wire (serde) it is a plain byte string.
#[derive(Clone)]
pub struct Payload {
    repr: Repr,
}

#[derive(Clone)]
enum Repr {
    Heap(Arc<[u8]>),
    Shared(Arc<Region>),
}

impl Default for Payload {
    fn default() -> Self {
        Payload::new(Vec::new())
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Payload {}

impl Payload {
    /// Wraps bytes.
    pub fn new(bytes: impl Into<Arc<[u8]>>) -> Payload {
        Payload {
            repr: Repr::Heap(bytes.into()),
        }
    }

    /// Wraps a shared-memory region (its whole length).
    pub fn shared(region: Arc<Region>) -> Payload {
        Payload {
            repr: Repr::Shared(region),
        }
    }

    /// The region behind the payload, if it lives in shared memory. (A sealed region from a
    /// worker has no descriptor to send: [`Region::has_descriptor`].)
    pub fn region(&self) -> Option<&Arc<Region>> {
        match &self.repr {
            Repr::Shared(r) => Some(r),
            Repr::Heap(_) => None,
        }
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.repr {
            Repr::Heap(b) => b,
            Repr::Shared(r) => r.as_slice(),
        }
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// `true` for an empty payload.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same bytes in a region sealed against writes, mapped read-only, with its
    /// descriptor ([`Region::into_sealed`]): the payload's own region when it is the only
    /// holder of a writable one (sealed in place, no copy), else one copy.
    ///
    /// # Errors
    /// [`IpcError::Os`] when the host has no shared memory for it.
    pub fn into_sealed(self) -> Result<Payload, IpcError> {
        let region = match self.repr {
            Repr::Shared(r) if r.is_sealed() => return Ok(Payload::shared(r)),
            Repr::Shared(r) => match Arc::try_unwrap(r) {
                Ok(own) => own.into_sealed()?,
                Err(shared) => Region::sealed_copy(shared.as_slice())?,
            },
            Repr::Heap(bytes) => Region::sealed_copy(&bytes)?,
        };
        Ok(Payload::shared(Arc::new(region)))
    }

    /// The bytes as a vector (copies).
    pub fn to_vec(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Payload {
        Payload::new(v)
    }
}

impl From<&[u8]> for Payload {
    fn from(v: &[u8]) -> Payload {
        Payload::new(v)
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let place = match &self.repr {
            Repr::Heap(_) => "heap",
            Repr::Shared(r) if r.has_descriptor() => "shared",
            Repr::Shared(_) => "shared, sealed",
        };
        write!(f, "Payload({} bytes, {place})", self.len())
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.as_bytes())
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Payload, D::Error> {
        let buf = serde_bytes::ByteBuf::deserialize(d)?;
        Ok(Payload::new(buf.into_vec()))
    }
}

impl OutputRegion {
    /// The bytes the worker wrote (`written`, which must be the region's whole length), as a
    /// payload the worker cannot change any more ([`OutputRegion::finish`]).
    ///
    /// # Errors
    /// As [`OutputRegion::finish`].
    pub fn into_payload(self, written: u64) -> Result<Payload, IpcError> {
        Ok(match self.finish(written)? {
            Output::Mapped(region) => Payload::shared(Arc::new(region)),
            Output::Copied(bytes) => Payload::new(bytes),
        })
    }
}
