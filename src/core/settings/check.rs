//! Checking a directory that came from elsewhere (a mirror, a file) before it is used.
//!
//! Owns [`Directory::check`]: `default` is the root, every other group has an existing parent,
//! there are no cycles, the tree is at most `MAX_GROUP_DEPTH` deep, names are valid, every
//! stored key is known, valid and allowed where it is, and no policy is over
//! `MAX_POLICY_BYTES`. The walk is linear in the size of the tree, so a hostile upstream's
//! long chain cannot keep a node from becoming ready. It must never change the directory.

use std::collections::{BTreeSet, HashMap};

use super::directory::{
    validate_name, Directory, DEFAULT_GROUP, MAX_GROUP_DEPTH, MAX_POLICY_BYTES,
};
use super::keys::{key_spec, Overrides, Scope};
use super::SettingsError;

impl Directory {
    /// Checks a directory received from elsewhere (a mirror, a file): `default` exists with no
    /// parent, every other group has an existing parent, there are no cycles, names are valid,
    /// and every stored key is known, valid and allowed where it is.
    pub fn check(&self) -> Result<(), SettingsError> {
        match self.groups.get(DEFAULT_GROUP) {
            Some(g) if g.parent.is_none() => {}
            Some(_) => {
                return Err(SettingsError::Conflict(
                    "group default must not have a parent".into(),
                ))
            }
            None => return Err(SettingsError::NotFound("group default is missing".into())),
        }
        // Depth of each group below `default`, found in one walk per group that stops at the
        // first group whose depth is known: linear in the size of the tree.
        let mut depth: HashMap<&str, usize> = HashMap::new();
        depth.insert(DEFAULT_GROUP, 0);
        for (name, g) in &self.groups {
            validate_name("group", name)?;
            if name != DEFAULT_GROUP {
                match g.parent.as_deref() {
                    Some(p) if self.groups.contains_key(p) => {}
                    Some(p) => {
                        return Err(SettingsError::NotFound(format!(
                            "group {name} has unknown parent {p}"
                        )))
                    }
                    None => {
                        return Err(SettingsError::Conflict(format!(
                            "group {name} has no parent"
                        )))
                    }
                }
                let mut path: Vec<&str> = Vec::new();
                let mut on_path = BTreeSet::new();
                let mut cur = name.as_str();
                let base = loop {
                    if let Some(d) = depth.get(cur) {
                        break *d;
                    }
                    if !on_path.insert(cur) {
                        return Err(SettingsError::Conflict(format!(
                            "group {name} is part of a parent cycle"
                        )));
                    }
                    path.push(cur);
                    match self.groups.get(cur).and_then(|g| g.parent.as_deref()) {
                        Some(p) => cur = p,
                        None => break 0,
                    }
                };
                for (i, n) in path.iter().rev().enumerate() {
                    let d = base + i + 1;
                    if d > MAX_GROUP_DEPTH {
                        return Err(SettingsError::Conflict(format!(
                            "group {n} is {d} levels below default; at most {MAX_GROUP_DEPTH}"
                        )));
                    }
                    depth.insert(n, d);
                }
            }
            if let Some(p) = &g.policy {
                if p.document.get().len() > MAX_POLICY_BYTES {
                    return Err(SettingsError::TooLarge(format!(
                        "the policy of group {name} is {} bytes; at most {MAX_POLICY_BYTES}",
                        p.document.get().len()
                    )));
                }
            }
            check_overrides(&g.own, None)?;
            for (l, o) in &g.locations {
                validate_name("location", l)?;
                check_overrides(o, Some(l))?;
            }
        }
        Ok(())
    }
}

fn check_overrides(o: &Overrides, location: Option<&str>) -> Result<(), SettingsError> {
    for (k, v) in o.iter() {
        let spec = key_spec(k)
            .ok_or_else(|| SettingsError::bad(k, format!("unknown settings key {k}")))?;
        if location.is_some() && spec.scope == Scope::GroupOnly {
            return Err(SettingsError::bad(
                k,
                format!("{k} is group-only and cannot be set on a location"),
            ));
        }
        spec.validate(v)?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "check_tests.rs"]
mod tests;
