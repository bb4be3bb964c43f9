//! The `gup` binary: the allocator, then `gup::cli`, which parses the command line and runs a
//! role.
#![deny(unsafe_code)]

use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: a node with thousands of idle push streams allocates
/// small, long-lived state between the transient buffers of other requests, and glibc's arenas
/// keep the freed holes resident (about 4.6 KiB per stream at 10,000 streams, measured with
/// `malloc_trim`); mimalloc returns freed pages to the system by itself. Built with `no_thp`:
/// where transparent huge pages are `always`, mimalloc's eagerly committed arenas would
/// otherwise make an idle node 48 MiB resident instead of 3 MiB. `benches/push.sh` measured
/// 10,000 idle streams at 12.2-12.9 KiB each with glibc, 5.7-5.8 KiB with this (an A/B of the
/// allocator alone, before serving threads handed connections over).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    gup::cli::main()
}
