//! Module images are checked before a driver reads them.
//!
//! `cuModuleLoadData` and `hipModuleLoadData` take a bare pointer: the driver learns an
//! image's length from the image itself (an ELF's section table, a fatbin's header, a PTX
//! string's NUL), so a truncated or forged image makes it read past the bytes the application
//! sent. Every image is therefore checked here first, in safe code, and one that does not hold
//! together is a typed invalid request naming what is wrong:
//!
//! | format | recognised by | checked |
//! | --- | --- | --- |
//! | ELF (cubin, HIP code object) | `\x7fELF` | 64-bit little-endian header; program and section header tables, and every section with contents, inside the image |
//! | CUDA fatbin | `0xBA55ED50` (little-endian) | header inside the image; header size + payload size ≤ image |
//! | clang offload bundle (HIP) | `__CLANG_OFFLOAD_BUNDLE__` | entry table and every entry's code inside the image |
//! | PTX (CUDA only) | text with `.version` or `.target` | valid UTF-8 up to the first NUL; a NUL is appended when missing, so the driver's string read ends inside the copy |
//!
//! Anything else is rejected as an unknown format.

/// What an image was recognised as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// An ELF object: a CUDA cubin or a HIP/ROCm code object.
    Elf,
    /// A CUDA fat binary.
    Fatbin,
    /// A clang offload bundle (HIP code objects for several architectures).
    OffloadBundle,
    /// PTX text, NUL-terminated by [`checked`].
    Ptx,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const FATBIN_MAGIC: u32 = 0xBA55_ED50;
const BUNDLE_MAGIC: &[u8; 24] = b"__CLANG_OFFLOAD_BUNDLE__";

/// Checks `image` and returns its kind and the bytes to hand the driver (PTX gets a NUL
/// appended when it has none; other formats are returned as they are). `allow_ptx`: whether
/// PTX is a format of this backend (CUDA) or an unknown one (HIP).
pub fn checked(image: &[u8], allow_ptx: bool) -> Result<(ImageKind, std::borrow::Cow<'_, [u8]>), String> {
    use std::borrow::Cow;
    if image.is_empty() {
        return Err("empty image".into());
    }
    if image.starts_with(ELF_MAGIC) {
        check_elf(image)?;
        return Ok((ImageKind::Elf, Cow::Borrowed(image)));
    }
    if image.len() >= 4 && u32::from_le_bytes(image[..4].try_into().expect("4 bytes")) == FATBIN_MAGIC {
        check_fatbin(image)?;
        return Ok((ImageKind::Fatbin, Cow::Borrowed(image)));
    }
    if image.starts_with(BUNDLE_MAGIC) {
        check_bundle(image)?;
        return Ok((ImageKind::OffloadBundle, Cow::Borrowed(image)));
    }
    if allow_ptx && looks_like_ptx(image) {
        let text_len = image.iter().position(|b| *b == 0).unwrap_or(image.len());
        if std::str::from_utf8(&image[..text_len]).is_err() {
            return Err("PTX is not valid UTF-8 text".into());
        }
        if text_len < image.len() {
            return Ok((ImageKind::Ptx, Cow::Borrowed(&image[..=text_len])));
        }
        let mut v = image.to_vec();
        v.push(0);
        return Ok((ImageKind::Ptx, Cow::Owned(v)));
    }
    let head: Vec<String> = image.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Err(format!(
        "unknown format (first bytes {}): expected {}",
        head.join(" "),
        if allow_ptx {
            "PTX text, a cubin (ELF) or a fatbin"
        } else {
            "a code object (ELF) or a clang offload bundle"
        }
    ))
}

fn looks_like_ptx(bytes: &[u8]) -> bool {
    let head = &bytes[..bytes.len().min(4096)];
    let text = match std::str::from_utf8(head) {
        Ok(s) => s,
        // Text up to the first byte that is not (a NUL is valid UTF-8, so this is binary
        // data or a multi-byte character cut at 4096 bytes).
        Err(e) => std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or(""),
    };
    text.contains(".version") || text.contains(".target")
}

fn u16_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?) as u64)
}
fn u32_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as u64)
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// `offset + count * size ≤ len`, without overflow.
fn fits(offset: u64, count: u64, size: u64, len: usize) -> bool {
    count
        .checked_mul(size)
        .and_then(|n| n.checked_add(offset))
        .is_some_and(|end| end <= len as u64)
}

fn check_elf(b: &[u8]) -> Result<(), String> {
    const HEADER: usize = 64;
    let truncated = |what: &str| format!("truncated ELF image ({} bytes): {what} lies past its end", b.len());
    if b.len() < HEADER {
        return Err(truncated("the 64-byte header"));
    }
    if b[4] != 2 || b[5] != 1 {
        return Err("ELF image is not 64-bit little-endian".into());
    }
    let field = |at, f: fn(&[u8], usize) -> Option<u64>| f(b, at).ok_or_else(|| truncated("the header"));
    let (phoff, phentsize, phnum) = (field(32, u64_at)?, field(54, u16_at)?, field(56, u16_at)?);
    let (shoff, shentsize, shnum) = (field(40, u64_at)?, field(58, u16_at)?, field(60, u16_at)?);
    // Extended numbering keeps the real counts in section 0: driver images never need it,
    // and a check of the header's counts would not cover what the driver reads.
    if (shnum == 0 && shoff != 0) || phnum == 0xffff {
        return Err("ELF image uses extended section or segment numbering, which module images never need".into());
    }
    if phnum > 0 && !fits(phoff, phnum, phentsize, b.len()) {
        return Err(truncated("the program header table"));
    }
    if shnum > 0 {
        if shentsize < 64 || !fits(shoff, shnum, shentsize, b.len()) {
            return Err(truncated("the section header table"));
        }
        for i in 0..shnum {
            let at = (shoff + i * shentsize) as usize;
            let kind = u32_at(b, at + 4).ok_or_else(|| truncated("a section header"))?;
            const SHT_NOBITS: u64 = 8;
            if kind == SHT_NOBITS {
                continue;
            }
            let off = u64_at(b, at + 24).ok_or_else(|| truncated("a section header"))?;
            let size = u64_at(b, at + 32).ok_or_else(|| truncated("a section header"))?;
            if size > 0 && !fits(off, 1, size, b.len()) {
                return Err(truncated(&format!("section {i} ({size} bytes at {off})")));
            }
        }
    }
    for i in 0..phnum {
        let at = (phoff + i * phentsize) as usize;
        let off = u64_at(b, at + 8).ok_or_else(|| truncated("a program header"))?;
        let size = u64_at(b, at + 32).ok_or_else(|| truncated("a program header"))?;
        if size > 0 && !fits(off, 1, size, b.len()) {
            return Err(truncated(&format!("segment {i} ({size} bytes at {off})")));
        }
    }
    Ok(())
}

fn check_fatbin(b: &[u8]) -> Result<(), String> {
    // struct { u32 magic; u16 version; u16 header_size; u64 fat_size; }
    let header = u16_at(b, 6).zip(u64_at(b, 8));
    let Some((header_size, fat_size)) = header else {
        return Err(format!(
            "truncated fatbin ({} bytes): its 16-byte header is incomplete",
            b.len()
        ));
    };
    if header_size < 16 || !fits(header_size, 1, fat_size, b.len()) {
        return Err(format!(
            "truncated fatbin: header ({header_size} bytes) and payload ({fat_size} bytes) exceed the image's {} bytes",
            b.len()
        ));
    }
    Ok(())
}

fn check_bundle(b: &[u8]) -> Result<(), String> {
    let truncated = |what: String| format!("truncated offload bundle ({} bytes): {what}", b.len());
    let n = u64_at(b, 24).ok_or_else(|| truncated("no entry count".into()))?;
    let mut at = 32usize;
    for i in 0..n {
        let off = u64_at(b, at).ok_or_else(|| truncated(format!("entry {i}'s header lies past its end")))?;
        let size = u64_at(b, at + 8).ok_or_else(|| truncated(format!("entry {i}'s header lies past its end")))?;
        let triple = u64_at(b, at + 16).ok_or_else(|| truncated(format!("entry {i}'s header lies past its end")))?;
        if !fits(at as u64 + 24, 1, triple, b.len()) {
            return Err(truncated(format!("entry {i}'s target name lies past its end")));
        }
        if size > 0 && !fits(off, 1, size, b.len()) {
            return Err(truncated(format!(
                "entry {i} ({size} bytes at {off}) lies past its end"
            )));
        }
        at += 24 + triple as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal valid 64-bit ELF: header, one section header table of 2 entries (null +
    /// one PROGBITS section of 16 bytes).
    fn elf() -> Vec<u8> {
        let mut b = vec![0u8; 64 + 16 + 2 * 64];
        b[..4].copy_from_slice(ELF_MAGIC);
        b[4] = 2;
        b[5] = 1;
        let shoff = 64 + 16u64;
        b[40..48].copy_from_slice(&shoff.to_le_bytes());
        b[58..60].copy_from_slice(&64u16.to_le_bytes());
        b[60..62].copy_from_slice(&2u16.to_le_bytes());
        let s1 = (shoff + 64) as usize;
        b[s1 + 4..s1 + 8].copy_from_slice(&1u32.to_le_bytes());
        b[s1 + 24..s1 + 32].copy_from_slice(&64u64.to_le_bytes());
        b[s1 + 32..s1 + 40].copy_from_slice(&16u64.to_le_bytes());
        b
    }

    #[test]
    fn a_whole_elf_passes_and_every_truncation_is_named() {
        let e = elf();
        assert_eq!(checked(&e, true).unwrap().0, ImageKind::Elf);
        for cut in 1..e.len() {
            let err = checked(&e[..cut], true).unwrap_err();
            assert!(
                err.contains("truncated ELF") || err.contains("unknown format"),
                "cut {cut}: {err}"
            );
        }
        let mut extended = e.clone();
        extended[60..62].copy_from_slice(&0u16.to_le_bytes());
        assert!(checked(&extended, true).unwrap_err().contains("extended"));
        let mut big = e.clone();
        let s1 = 64 + 16 + 64;
        big[s1 + 32..s1 + 40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(checked(&big, true).unwrap_err().contains("section 1"));
    }

    #[test]
    fn fatbin_and_bundle_sizes_are_checked() {
        let mut f = Vec::new();
        f.extend_from_slice(&FATBIN_MAGIC.to_le_bytes());
        f.extend_from_slice(&1u16.to_le_bytes());
        f.extend_from_slice(&16u16.to_le_bytes());
        f.extend_from_slice(&8u64.to_le_bytes());
        f.extend_from_slice(&[0; 8]);
        assert_eq!(checked(&f, true).unwrap().0, ImageKind::Fatbin);
        assert!(checked(&f[..20], true).unwrap_err().contains("truncated fatbin"));
        assert!(checked(&f[..10], true).unwrap_err().contains("truncated fatbin"));

        let mut b = BUNDLE_MAGIC.to_vec();
        b.extend_from_slice(&1u64.to_le_bytes());
        let code_at = 32 + 24 + 6;
        b.extend_from_slice(&(code_at as u64).to_le_bytes());
        b.extend_from_slice(&4u64.to_le_bytes());
        b.extend_from_slice(&6u64.to_le_bytes());
        b.extend_from_slice(b"hip-am");
        b.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(checked(&b, false).unwrap().0, ImageKind::OffloadBundle);
        for cut in 24..b.len() {
            assert!(
                checked(&b[..cut], false)
                    .unwrap_err()
                    .contains("truncated offload bundle")
            );
        }
    }

    #[test]
    fn ptx_gets_a_nul_and_other_text_is_an_unknown_format() {
        let (k, bytes) = checked(b".version 8.0\n.target sm_90\n", true).unwrap();
        assert_eq!(k, ImageKind::Ptx);
        assert_eq!(bytes.last(), Some(&0));
        let (_, bytes) = checked(b".version 8.0\0trailing", true).unwrap();
        assert_eq!(&*bytes, b".version 8.0\0");
        assert!(
            checked(b".version 8.0\n", false)
                .unwrap_err()
                .contains("unknown format")
        );
        assert!(checked(b"hello", true).unwrap_err().contains("unknown format"));
        assert!(checked(b"", true).unwrap_err().contains("empty"));
        assert!(checked(b".version \xff\xfe", true).unwrap_err().contains("UTF-8"));
    }

    proptest! {
        /// Whatever the bytes, the check answers without panicking, and an image it accepts
        /// (other than PTX, which is copied) is the input itself.
        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..512), kind in 0u8..4) {
            match kind {
                0 => bytes.splice(0..0, ELF_MAGIC.iter().copied().chain([2, 1])).for_each(drop),
                1 => bytes.splice(0..0, FATBIN_MAGIC.to_le_bytes()).for_each(drop),
                2 => bytes.splice(0..0, BUNDLE_MAGIC.iter().copied()).for_each(drop),
                _ => {}
            }
            if let Ok((k, out)) = checked(&bytes, true)
                && k != ImageKind::Ptx
            {
                prop_assert_eq!(&*out, &bytes[..]);
            }
        }
    }
}
