//! The agent's own decoder of deltas: rebuilding a new version of an item from the version it
//! holds and the bytes a server sent.
//!
//! Owns [`apply`] and the bounds of a rebuild: a delta is one zstd frame that says its content
//! size and carries its checksum, compressed with the old version as zstd's reference prefix
//! (long-distance matching, a window of up to 2^[`WINDOW_LOG_MAX`] bytes). The output is
//! exactly the size the catalog gives for the new version: a frame that claims another size is
//! refused before anything is decoded, and one that would write more fails in zstd (the output
//! buffer has no room beyond it). Deltas are used only for items whose old and new versions
//! are each at most [`MAX_DELTA_ITEM`] bytes (both live in memory during a rebuild: no `mmap`
//! in the agent, which has no `unsafe`); larger items take the full blob. This is a separate
//! copy of the format the servers compute (`crate::core::delta`), like the rest of the
//! agent's wire: it must never import the servers' code. It must never trust what it rebuilt
//! either: the caller checks the output's SHA-256 against the catalog before installing it.
//! It is pure: no disk, no network.

use zstd::zstd_safe::{self, DCtx, DParameter};

/// The largest item (old or new version) an agent rebuilds from a delta: 1 GiB. A rebuild holds
/// the old version, the delta (at most half the new size) and the new version in memory, so
/// at most 2.5 GiB; together the versions stay inside zstd's widest window (2 GiB).
pub const MAX_DELTA_ITEM: u64 = 1 << 30;

/// The widest window the decoder accepts (2 GiB, zstd's limit on 64-bit machines): enough to
/// reach back from the end of a new version to the start of an old one when both are within
/// [`MAX_DELTA_ITEM`].
pub const WINDOW_LOG_MAX: u32 = 31;

/// Why a delta did not rebuild a version.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatchError {
    /// The versions are beyond what an agent rebuilds in memory.
    #[error("an item of {0} bytes is beyond the {MAX_DELTA_ITEM} bytes rebuilt from deltas")]
    TooLarge(u64),
    /// Not a zstd frame that says its content size.
    #[error("not a zstd frame that says its size")]
    NotAFrame,
    /// The frame says it holds another size than the new version's.
    #[error("the delta rebuilds {got} bytes, the new version has {want}")]
    WrongSize { got: u64, want: u64 },
    /// zstd refused the frame (corrupted, a failed checksum, a window too wide, ...).
    #[error("zstd: {0}")]
    Zstd(&'static str),
}

fn zstd_error(code: usize) -> PatchError {
    PatchError::Zstd(zstd_safe::get_error_name(code))
}

/// Rebuilds the new version of `size` bytes from `old` and `delta`. The result is exactly
/// `size` bytes or an error; its SHA-256 is still to be checked by the caller.
pub fn apply(old: &[u8], delta: &[u8], size: u64) -> Result<Vec<u8>, PatchError> {
    if size > MAX_DELTA_ITEM {
        return Err(PatchError::TooLarge(size));
    }
    if old.len() as u64 > MAX_DELTA_ITEM {
        return Err(PatchError::TooLarge(old.len() as u64));
    }
    match zstd_safe::get_frame_content_size(delta) {
        Ok(Some(n)) if n == size => {}
        Ok(Some(n)) => return Err(PatchError::WrongSize { got: n, want: size }),
        Ok(None) | Err(_) => return Err(PatchError::NotAFrame),
    }
    let mut dctx = DCtx::try_create().ok_or(PatchError::Zstd("out of memory"))?;
    dctx.set_parameter(DParameter::WindowLogMax(WINDOW_LOG_MAX))
        .map_err(zstd_error)?;
    dctx.ref_prefix(old).map_err(zstd_error)?;
    // Exactly the new version's room (bounded above): zstd writes into the spare capacity and
    // fails rather than grow it.
    let mut out: Vec<u8> = Vec::with_capacity(size as usize);
    let got = dctx.decompress(&mut out, delta).map_err(zstd_error)? as u64;
    if got != size || out.len() as u64 != size {
        return Err(PatchError::WrongSize { got, want: size });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use zstd::zstd_safe::{CCtx, CParameter};

    /// Deterministic bytes that do not compress (xorshift).
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A delta as the servers make one: `new` compressed against `old` as reference prefix,
    /// long-distance matching, content size and checksum in the frame.
    fn delta(old: &[u8], new: &[u8]) -> Vec<u8> {
        let mut cctx = CCtx::try_create().unwrap();
        for p in [
            CParameter::CompressionLevel(3),
            CParameter::WindowLog(24),
            CParameter::EnableLongDistanceMatching(true),
            CParameter::ContentSizeFlag(true),
            CParameter::ChecksumFlag(true),
        ] {
            cctx.set_parameter(p).unwrap();
        }
        cctx.ref_prefix(old).unwrap();
        let mut out = Vec::with_capacity(zstd_safe::compress_bound(new.len()));
        cctx.compress2(&mut out, new).unwrap();
        out
    }

    fn versions() -> (Vec<u8>, Vec<u8>) {
        let old = noise(1, 1 << 20);
        let mut new = old.clone();
        new[300_000..304_096].copy_from_slice(&noise(2, 4096));
        new.extend_from_slice(&noise(3, 10_000));
        (old, new)
    }

    #[test]
    fn a_delta_rebuilds_the_new_version_from_the_old_one() {
        let (old, new) = versions();
        let d = delta(&old, &new);
        assert!(
            d.len() < 30_000,
            "a small change makes a small delta: {}",
            d.len()
        );
        let out = apply(&old, &d, new.len() as u64).unwrap();
        assert!(out == new);
    }

    #[test]
    fn a_frame_of_another_size_is_refused_before_decoding() {
        let (old, new) = versions();
        let d = delta(&old, &new);
        for want in [new.len() as u64 - 1, new.len() as u64 + 1, 0] {
            assert_eq!(
                apply(&old, &d, want),
                Err(PatchError::WrongSize {
                    got: new.len() as u64,
                    want
                })
            );
        }
        assert_eq!(
            apply(&old, &d, MAX_DELTA_ITEM + 1),
            Err(PatchError::TooLarge(MAX_DELTA_ITEM + 1))
        );
    }

    #[test]
    fn a_corrupted_frame_or_one_that_is_no_frame_is_refused() {
        let (old, new) = versions();
        let d = delta(&old, &new);
        assert_eq!(
            apply(&old, b"not zstd at all", new.len() as u64),
            Err(PatchError::NotAFrame)
        );
        assert_eq!(
            apply(&old, &[], new.len() as u64),
            Err(PatchError::NotAFrame)
        );
        // Every flipped byte past the header fails in zstd (its checksum or its decoding) or
        // rebuilds other bytes, which the caller's SHA-256 check refuses: never the new version.
        for at in [d.len() / 3, d.len() / 2, d.len() - 1] {
            let mut bad = d.clone();
            bad[at] ^= 0x40;
            match apply(&old, &bad, new.len() as u64) {
                Ok(out) => assert!(out != new, "a flipped byte at {at} went unnoticed"),
                Err(e) => assert!(matches!(
                    e,
                    PatchError::Zstd(_) | PatchError::WrongSize { .. }
                )),
            }
        }
        // Cut short.
        assert!(apply(&old, &d[..d.len() / 2], new.len() as u64).is_err());
    }

    #[test]
    fn another_reference_never_rebuilds_the_new_version() {
        let (old, new) = versions();
        let d = delta(&old, &new);
        let other = noise(9, old.len());
        match apply(&other, &d, new.len() as u64) {
            Ok(out) => assert!(out != new),
            Err(e) => assert!(matches!(e, PatchError::Zstd(_))),
        }
    }
}
