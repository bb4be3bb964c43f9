//! `gup node seed`: its flags, and the summary it prints.
//!
//! Owns turning [`crate::node::seed`]'s report into lines on stdout and its errors into exit
//! codes (2: bad input, such as a missing source or a data dir that never synced; 1: the
//! store failed, or is in use by a running node, or some files could not be read). The work
//! itself is the node's.

use std::path::PathBuf;

use clap::Args;

use super::{config_failure, runtime, usage, Failure};
use crate::core::config::{self, LogFormat, NodeConfig};
use crate::node::seed::{SeedError, SeedOptions, Seeded};

#[derive(Args, Clone)]
pub(super) struct SeedArgs {
    /// The node's TOML config file (for node.data_dir, cache.retain_revisions and
    /// cache.min_free_bytes); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The stopped node's data directory [default: gup-data/node].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The directory to import from, read recursively.
    source: PathBuf,
}

pub(super) fn run(args: SeedArgs, log_format: LogFormat) -> Result<(), Failure> {
    let mut cfg: NodeConfig = match &args.config {
        Some(p) => config::load(p).map_err(config_failure)?,
        None => NodeConfig::default(),
    };
    if let Some(d) = args.data_dir {
        cfg.node.data_dir = d;
    }
    cfg.validate().map_err(config_failure)?;
    super::init_logging_with(log_format, "warn");
    let opts = SeedOptions {
        data_dir: cfg.node.data_dir.clone(),
        source: args.source,
        retain_revisions: cfg.cache.retain_revisions,
        min_free_bytes: cfg.cache.min_free_bytes,
    };
    let rt = super::runtime_env()?;
    let report = rt
        .block_on(crate::node::seed::seed(&opts))
        .map_err(|e| match e {
            SeedError::BadInput(m) => usage(m),
            e => runtime(e),
        })?;
    let item = |s: &Seeded| match &s.item {
        Some((name, version, size)) => format!(" ({name} {version}, {size} bytes)"),
        None => String::new(),
    };
    for s in &report.imported {
        outln!("imported: {}{}", s.path.display(), item(s));
    }
    for s in &report.already_stored {
        outln!("already stored: {}{}", s.path.display(), item(s));
    }
    for s in &report.not_in_catalog {
        outln!("skipped, not in the catalog: {}", s.path.display());
    }
    for (path, why) in &report.unreadable {
        outln!("not read: {}: {why}", path.display());
    }
    outln!(
        "imported {}, already stored {}, skipped {} not in the catalog{}",
        report.imported.len(),
        report.already_stored.len(),
        report.not_in_catalog.len(),
        match report.unreadable.len() {
            0 => String::new(),
            n => format!(", {n} not read"),
        }
    );
    if !report.unreadable.is_empty() {
        return Err(runtime(format!(
            "{} files could not be read (listed above)",
            report.unreadable.len()
        )));
    }
    Ok(())
}
