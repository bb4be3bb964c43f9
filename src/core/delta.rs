//! Deltas: the bytes that turn one version of a package into the next.
//!
//! Owns the one delta format of the product (a zstd frame compressed with the old version as
//! its reference prefix, long-distance matching on, the window wide enough to reach back over
//! the whole reference) and the two pure operations on it: [`compute`] (bounded by the
//! largest delta worth having, so a useless one costs no memory) and [`apply`] (into an output
//! of exactly the new version's size, so a hostile delta can neither grow nor shrink it). It
//! must never trust a delta: the caller checks the rebuilt bytes' SHA-256 before using them,
//! and it never touches the disk or the network (callers map the files and pass slices).

use zstd::zstd_safe::{self, CCtx, CParameter, DCtx, DParameter};

/// The zstd level deltas are computed at: with long-distance matching, level 3 already finds
/// the reference's unchanged runs; higher levels buy a few percent for several times the time.
pub const LEVEL: i32 = 3;

/// The widest window zstd decodes on 64-bit machines (2 GiB): deltas between versions larger
/// than this together are not computed.
pub const MAX_WINDOW_LOG: u32 = 31;

/// Why a delta was not computed or not applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeltaError {
    #[error("versions of {0} bytes together are beyond the widest zstd window (2 GiB)")]
    TooLarge(u64),
    #[error("zstd: {0}")]
    Zstd(&'static str),
    #[error("the delta rebuilds {got} bytes, the new version has {want}")]
    WrongSize { got: u64, want: u64 },
}

/// The window log a delta from `old_len` to `new_len` bytes needs: the decoder must reach
/// back from the end of the new version to the start of the reference.
pub fn window_log(old_len: usize, new_len: usize) -> Result<u32, DeltaError> {
    let span = (old_len as u64).saturating_add(new_len as u64).max(1 << 10);
    let log = 64 - (span - 1).leading_zeros();
    if log > MAX_WINDOW_LOG {
        return Err(DeltaError::TooLarge(span));
    }
    Ok(log.max(10))
}

fn zstd_error(code: usize) -> DeltaError {
    DeltaError::Zstd(zstd_safe::get_error_name(code))
}

/// The delta from `old` to `new`, or None when it would be larger than `max_len` bytes (not
/// worth listing: the caller passes half the new version's size).
pub fn compute(old: &[u8], new: &[u8], max_len: usize) -> Result<Option<Vec<u8>>, DeltaError> {
    let window = window_log(old.len(), new.len())?;
    let mut cctx = CCtx::try_create().ok_or(DeltaError::Zstd("out of memory"))?;
    for p in [
        CParameter::CompressionLevel(LEVEL),
        CParameter::WindowLog(window),
        CParameter::EnableLongDistanceMatching(true),
        CParameter::ContentSizeFlag(true),
        CParameter::ChecksumFlag(true),
    ] {
        cctx.set_parameter(p).map_err(zstd_error)?;
    }
    cctx.ref_prefix(old).map_err(zstd_error)?;
    let mut out = Vec::with_capacity(max_len.min(zstd_safe::compress_bound(new.len())));
    match cctx.compress2(&mut out, new) {
        Ok(_) => Ok((out.len() <= max_len).then_some(out)),
        // The output did not fit in `max_len`: no delta worth having.
        Err(code) if zstd_safe::get_error_name(code) == DST_TOO_SMALL => Ok(None),
        Err(code) => Err(zstd_error(code)),
    }
}

/// zstd's name of the error for an output buffer that is too small.
const DST_TOO_SMALL: &str = "Destination buffer is too small";

/// Rebuilds the new version from `old` and `delta` into `out`, which must be exactly the new
/// version's size: a delta that writes more or fewer bytes is refused. The caller checks the
/// SHA-256 of `out` before trusting it.
pub fn apply(old: &[u8], delta: &[u8], out: &mut [u8]) -> Result<(), DeltaError> {
    let want = out.len() as u64;
    // The frame says how long its content is: refuse a mismatch before decoding anything.
    match zstd_safe::get_frame_content_size(delta) {
        Ok(Some(n)) if n == want => {}
        Ok(Some(n)) => return Err(DeltaError::WrongSize { got: n, want }),
        Ok(None) | Err(_) => return Err(DeltaError::Zstd("not a zstd frame with its size")),
    }
    let mut dctx = DCtx::try_create().ok_or(DeltaError::Zstd("out of memory"))?;
    dctx.set_parameter(DParameter::WindowLogMax(MAX_WINDOW_LOG))
        .map_err(zstd_error)?;
    dctx.ref_prefix(old).map_err(zstd_error)?;
    let got = dctx.decompress(out, delta).map_err(zstd_error)? as u64;
    if got != want {
        return Err(DeltaError::WrongSize { got, want });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bytes that do not compress (xorshift).
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_small_change_makes_a_small_delta_that_rebuilds_the_new_version() {
        let old = noise(1, 4 << 20);
        let mut new = old.clone();
        for at in [10_000usize, 1 << 20, 3 << 20] {
            new[at..at + 4096].copy_from_slice(&noise(at as u64, 4096));
        }
        new.extend_from_slice(&noise(9, 64 << 10));
        let changed = 3 * 4096 + (64 << 10);
        let delta = compute(&old, &new, new.len() / 2).unwrap().unwrap();
        assert!(
            delta.len() < changed * 12 / 10,
            "delta {} for {changed} changed bytes",
            delta.len()
        );
        let mut out = vec![0u8; new.len()];
        apply(&old, &delta, &mut out).unwrap();
        assert!(out == new);
    }

    #[test]
    fn unrelated_versions_make_no_delta() {
        let (old, new) = (noise(1, 1 << 20), noise(2, 1 << 20));
        assert_eq!(compute(&old, &new, new.len() / 2).unwrap(), None);
    }

    #[test]
    fn a_wrong_reference_size_or_frame_is_refused() {
        let old = noise(1, 256 << 10);
        let mut new = old.clone();
        new[5] ^= 1;
        let delta = compute(&old, &new, new.len() / 2).unwrap().unwrap();
        // Too short or too long an output: refused before decoding.
        let mut short = vec![0u8; new.len() - 1];
        assert!(matches!(
            apply(&old, &delta, &mut short),
            Err(DeltaError::WrongSize { .. })
        ));
        // Not a frame at all.
        let mut out = vec![0u8; new.len()];
        assert!(apply(&old, b"not zstd", &mut out).is_err());
        // A flipped byte in the frame fails its checksum or its decoding, never silently.
        let mut bad = delta.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        let r = apply(&old, &bad, &mut out);
        assert!(r.is_err() || out != new, "a corrupted delta went unnoticed");
        // Another reference: the output is wrong or refused; the caller's SHA-256 check
        // catches the first.
        let other = noise(3, old.len());
        let r = apply(&other, &delta, &mut out);
        assert!(r.is_err() || out != new);
    }

    #[test]
    fn window_covers_both_versions() {
        assert_eq!(window_log(0, 0).unwrap(), 10);
        assert_eq!(window_log(100 << 20, 101 << 20).unwrap(), 28);
        assert!(window_log(1 << 30, 1 << 30).is_ok());
        assert!(window_log(1 << 31, 1 << 30).is_err());
    }
}
