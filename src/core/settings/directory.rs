//! The group tree and everything stored on it: [`Directory`] (groups, their own keys and
//! location overrides, policies, site settings and the one serial counter), the changes
//! admins make to it (groups, settings, policies, site settings), and reading it back:
//! effective settings by the resolution order, serials and ETags, policies, the listing, and
//! checking a directory received from elsewhere.
//!
//! Pure data and functions: this file must never do I/O, read the clock, speak HTTP or touch
//! storage; callers persist a `Directory` by serializing it with serde.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::keys::{is_key_prefix, key_spec, KeySpec, Overrides, Scope, KEYS};
use super::{brief, Settings, SettingsError};

/// Name of the root group. It always exists, has no parent and cannot be deleted.
pub const DEFAULT_GROUP: &str = "default";

/// Longest group or location name.
pub const MAX_NAME_LEN: usize = 64;

// === Site, policy, group ===

pub use super::site::{ClientAuth, SiteSettings};

/// Longest notification damper: one year, in seconds.
pub const MAX_DAMPER_S: u64 = 31_536_000;

/// Largest policy document, serialized: 1 MiB. A manager refuses a larger one (413 naming the
/// group) and a node refuses a mirror that holds one.
pub const MAX_POLICY_BYTES: usize = 1 << 20;

/// Deepest group tree: `default` and this many levels below it. Deeper trees are refused at
/// the manager and in a mirror, so that resolving a group's settings stays cheap.
pub const MAX_GROUP_DEPTH: usize = 64;

/// A group's policy document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Policy {
    /// From the directory's one counter, so a serial (and so an ETag) is never reused.
    pub serial: u64,
    /// Any JSON the admin stored, kept as its text: a mirror costs the document's bytes, not
    /// the many times more a parsed JSON value of it would take.
    pub document: Box<serde_json::value::RawValue>,
}

impl PartialEq for Policy {
    fn eq(&self, other: &Policy) -> bool {
        self.serial == other.serial && self.document.get() == other.document.get()
    }
}

impl Policy {
    /// The document as a JSON value.
    pub fn value(&self) -> Value {
        serde_json::from_str(self.document.get()).unwrap_or(Value::Null)
    }
}

/// One group of the tree.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// `None` only for `default`, the root.
    pub parent: Option<String>,
    /// Keys this group sets itself.
    #[serde(default)]
    pub own: Overrides,
    /// Location name -> the keys that location overrides. A location absent here uses the
    /// group's settings (`use_group_settings: true`).
    #[serde(default)]
    pub locations: BTreeMap<String, Overrides>,
    /// This group's own policy; `None` inherits the nearest ancestor's.
    #[serde(default)]
    pub policy: Option<Policy>,
    /// Counter value at the last change of this group's own keys, locations or parent; the
    /// settings ETag is the largest such serial up the chain (see
    /// [`Directory::settings_serial`]).
    #[serde(default)]
    pub serial: u64,
}

/// Result of [`Directory::put_group`]: maps to 201, 200 and 200.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The group did not exist (HTTP 201).
    Created,
    /// The group moved to another parent (HTTP 200).
    Changed,
    /// The group already had this parent (HTTP 200, nothing changed, no serial bump).
    Unchanged,
}

/// One row of the admin group listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupInfo {
    /// Group name.
    pub name: String,
    /// Parent name; `None` for `default`.
    pub parent: Option<String>,
    /// Number of direct children.
    pub children: usize,
    /// The keys the group sets itself, nested JSON.
    pub settings: Value,
    /// Location name -> the keys it overrides, nested JSON.
    pub locations: BTreeMap<String, Value>,
    /// Serial of the group's own policy, if it has one.
    pub policy_serial: Option<u64>,
    /// The group's effective settings serial (see [`Directory::settings_serial`]).
    pub serial: u64,
}

/// Checks a group or location name: 1 to 64 characters of `[A-Za-z0-9._-]`, and not `.` or
/// `..` (they would not survive URL path normalization).
pub fn validate_name(key: &str, name: &str) -> Result<(), SettingsError> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > MAX_NAME_LEN || !ok_chars {
        return Err(SettingsError::bad(
            key,
            format!(
                "{key} name {:?} must be 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 . _ -",
                name.chars().take(80).collect::<String>()
            ),
        ));
    }
    if name == "." || name == ".." {
        return Err(SettingsError::bad(
            key,
            format!("{key} name {name:?} is reserved"),
        ));
    }
    Ok(())
}

// === Directory ===

/// The whole mirrored state: group tree, per-group keys and location overrides, policies and
/// site settings. The manager owns it; a node receives it in `/v1/sync` and computes effective
/// settings with the same code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Directory {
    /// Group name -> group. Always holds `default`.
    pub groups: BTreeMap<String, Group>,
    /// Site-wide settings (a directory stored before there were any reads as what a site
    /// before enrolment was: `client_auth` open).
    #[serde(default = "SiteSettings::before_enrolment")]
    pub site: SiteSettings,
    /// One counter for settings serials, site serials and policy serials, so an ETag is
    /// never reused. Bumped on every change.
    pub counter: u64,
    /// Counter value at the last site settings change; part of every settings serial since
    /// `application_learning` gates `learn_applications` everywhere.
    #[serde(default)]
    pub site_serial: u64,
    /// Revoked client credentials: client id -> the highest serial revoked. Mirrored with
    /// the rest, so a node refuses a revoked client after its next sync. Bounded with the
    /// whole directory by the `/v1/sync` snapshot bound.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub revoked: BTreeMap<String, u64>,
    /// The manager's public key (hex) that client credentials verify with, set by the
    /// manager and mirrored, so a node checks credentials offline without being configured
    /// with it (a node's `upstream.catalog_public_key`, when set, wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_key: Option<String>,
}

impl Default for Directory {
    /// Only `default` (no parent, serial 0), counter 0, default site settings.
    fn default() -> Self {
        let mut groups = BTreeMap::new();
        groups.insert(DEFAULT_GROUP.to_string(), Group::default());
        Directory {
            groups,
            site: SiteSettings::default(),
            counter: 0,
            site_serial: 0,
            revoked: BTreeMap::new(),
            credential_key: None,
        }
    }
}

/// A flattened, validated settings body: dotted path -> new value (`None` = inherit).
type Changes = BTreeMap<&'static str, Option<Value>>;

impl Directory {
    fn bump(&mut self) -> u64 {
        self.counter = self.counter.saturating_add(1);
        self.counter
    }

    /// The group name if it exists, else `default`.
    pub fn resolve_group<'a>(&'a self, name: &str) -> &'a str {
        match self.groups.get_key_value(name) {
            Some((k, _)) => k.as_str(),
            None => DEFAULT_GROUP,
        }
    }

    /// The chain from the resolved group up to the root, nearest first. Cycle-safe and
    /// always ending with `default` (when it exists), even for a corrupt mirror.
    pub fn ancestors<'a>(&'a self, group: &str) -> Vec<(&'a str, &'a Group)> {
        let mut out: Vec<(&'a str, &'a Group)> = Vec::new();
        let mut seen = BTreeSet::new();
        let mut cur = Some(self.resolve_group(group));
        while let Some(name) = cur {
            let Some((k, g)) = self.groups.get_key_value(name) else {
                break;
            };
            if !seen.insert(k.as_str()) {
                break;
            }
            out.push((k.as_str(), g));
            cur = g.parent.as_deref();
        }
        if !seen.contains(DEFAULT_GROUP) {
            if let Some((k, g)) = self.groups.get_key_value(DEFAULT_GROUP) {
                out.push((k.as_str(), g));
            }
        }
        out
    }

    /// The group and all its descendants (pre-order, children sorted by name). Empty for an
    /// unknown group.
    pub fn descendants(&self, group: &str) -> Vec<String> {
        if !self.groups.contains_key(group) {
            return Vec::new();
        }
        let mut children: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, g) in &self.groups {
            if let Some(p) = g.parent.as_deref() {
                children.entry(p).or_default().push(name.as_str());
            }
        }
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        let mut stack = vec![group];
        while let Some(name) = stack.pop() {
            if !seen.insert(name) {
                continue;
            }
            out.push(name.to_string());
            if let Some(kids) = children.get(name) {
                stack.extend(kids.iter().rev());
            }
        }
        out
    }

    /// Creates `name` under `parent`, or moves it there.
    ///
    /// Errors: a bad name (`group`) -> BadRequest; `parent` unknown -> BadRequest naming
    /// `parent`; `default` can never be given a parent -> Conflict; a move that would put a
    /// group under itself or one of its descendants -> Conflict naming the cycle. Creating or
    /// moving bumps the counter and sets the group's serial to it.
    pub fn put_group(&mut self, name: &str, parent: &str) -> Result<PutOutcome, SettingsError> {
        validate_name("group", name)?;
        if name == DEFAULT_GROUP {
            return Err(SettingsError::Conflict(
                "group default is the root of the tree and cannot have a parent".into(),
            ));
        }
        if !self.groups.contains_key(parent) {
            return Err(SettingsError::bad(
                "parent",
                format!("parent group {parent:?} does not exist"),
            ));
        }
        // The deepest group the change makes: the new parent's depth, one for `name`, and
        // the levels below `name` (a moved group takes its subtree along).
        let below = if self.groups.contains_key(name) {
            self.levels_below(name)
        } else {
            0
        };
        let depth = self.ancestors(parent).len() + below;
        if depth > MAX_GROUP_DEPTH {
            return Err(SettingsError::bad(
                "parent",
                format!(
                    "parent {parent} would put group {name} (and what hangs below it) {depth} levels below default; at most {MAX_GROUP_DEPTH}"
                ),
            ));
        }
        match self.groups.get(name) {
            None => {
                let serial = self.bump();
                self.groups.insert(
                    name.to_string(),
                    Group {
                        parent: Some(parent.to_string()),
                        serial,
                        ..Group::default()
                    },
                );
                Ok(PutOutcome::Created)
            }
            Some(g) if g.parent.as_deref() == Some(parent) => Ok(PutOutcome::Unchanged),
            Some(_) => {
                // Walk up from the new parent; meeting `name` means a cycle.
                let chain: Vec<&str> = self.ancestors(parent).iter().map(|(n, _)| *n).collect();
                if let Some(pos) = chain.iter().position(|n| *n == name) {
                    let mut cycle: Vec<&str> = chain.iter().take(pos + 1).copied().collect();
                    cycle.reverse();
                    cycle.push(name);
                    return Err(SettingsError::Conflict(format!(
                        "moving group {name} under {parent} would create a cycle: {} (parent -> child)",
                        cycle.join(" -> ")
                    )));
                }
                let serial = self.bump();
                if let Some(g) = self.groups.get_mut(name) {
                    g.parent = Some(parent.to_string());
                    g.serial = serial;
                }
                Ok(PutOutcome::Changed)
            }
        }
    }

    /// How many levels of groups hang below `group` (0 for a leaf).
    fn levels_below(&self, group: &str) -> usize {
        let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
        for (n, g) in &self.groups {
            if let Some(p) = g.parent.as_deref() {
                children.entry(p).or_default().push(n);
            }
        }
        let mut level = vec![group];
        let mut levels = 0;
        let mut seen = BTreeSet::new();
        while levels <= self.groups.len() {
            let next: Vec<&str> = level
                .iter()
                .flat_map(|g| children.get(g).cloned().unwrap_or_default())
                .filter(|g| seen.insert(*g))
                .collect();
            if next.is_empty() {
                break;
            }
            levels += 1;
            level = next;
        }
        levels
    }

    /// Deletes a group. Unknown -> NotFound; `default` -> Conflict; a group with children ->
    /// Conflict naming them; `has_clients` (the caller's registry knows) -> Conflict.
    pub fn delete_group(&mut self, name: &str, has_clients: bool) -> Result<(), SettingsError> {
        if !self.groups.contains_key(name) {
            return Err(SettingsError::NotFound(format!(
                "group {name} does not exist"
            )));
        }
        if name == DEFAULT_GROUP {
            return Err(SettingsError::Conflict(
                "group default cannot be deleted".into(),
            ));
        }
        let kids: Vec<&str> = self
            .groups
            .iter()
            .filter(|(_, g)| g.parent.as_deref() == Some(name))
            .map(|(n, _)| n.as_str())
            .collect();
        if !kids.is_empty() {
            return Err(SettingsError::Conflict(format!(
                "group {name} still has child groups: {}",
                kids.join(", ")
            )));
        }
        if has_clients {
            return Err(SettingsError::Conflict(format!(
                "group {name} still has clients; move or delete them first"
            )));
        }
        self.groups.remove(name);
        Ok(())
    }

    /// Flattens and validates a partial settings body (nested or dotted keys).
    fn parse_body(
        body: &Value,
        location: Option<&str>,
    ) -> Result<(Changes, Option<bool>), SettingsError> {
        let obj = body.as_object().ok_or_else(|| {
            SettingsError::bad(
                "body",
                format!(
                    "body must be a JSON object of settings (got {})",
                    brief(body)
                ),
            )
        })?;
        let mut raw: Vec<(&'static KeySpec, &Value)> = Vec::new();
        let mut use_group = None;
        for (k, v) in obj {
            if k == "use_group_settings" {
                if location.is_none() {
                    return Err(SettingsError::bad(
                        k,
                        "use_group_settings only applies to a location (?location=L)",
                    ));
                }
                match v {
                    Value::Bool(b) => use_group = Some(*b),
                    other => {
                        return Err(SettingsError::bad(
                            k,
                            format!(
                                "use_group_settings must be a boolean (got {})",
                                brief(other)
                            ),
                        ))
                    }
                }
            } else if let Some(spec) = key_spec(k) {
                raw.push((spec, v));
            } else if is_key_prefix(k) {
                match v {
                    // `"randomization": null` resets every key under it.
                    Value::Null => raw.extend(
                        KEYS.iter()
                            .filter(|s| s.path.starts_with(&format!("{k}.")))
                            .map(|s| (s, v)),
                    ),
                    Value::Object(m) => {
                        for (sub, sv) in m {
                            let full = format!("{k}.{sub}");
                            let spec = key_spec(&full).ok_or_else(|| {
                                SettingsError::bad(&full, format!("unknown settings key {full}"))
                            })?;
                            raw.push((spec, sv));
                        }
                    }
                    other => {
                        return Err(SettingsError::bad(
                            k,
                            format!("{k} must be an object (got {})", brief(other)),
                        ))
                    }
                }
            } else {
                return Err(SettingsError::bad(k, format!("unknown settings key {k}")));
            }
        }
        let mut changes = Changes::new();
        for (spec, v) in raw {
            if location.is_some() && spec.scope == Scope::GroupOnly {
                return Err(SettingsError::bad(
                    spec.path,
                    format!(
                        "{} is group-only and cannot be set on a location",
                        spec.path
                    ),
                ));
            }
            let value = if v.is_null() {
                None
            } else {
                Some(spec.validate(v)?)
            };
            if changes.insert(spec.path, value).is_some() {
                return Err(SettingsError::bad(
                    spec.path,
                    format!("{} is set twice in one body", spec.path),
                ));
            }
        }
        if use_group == Some(true) && !changes.is_empty() {
            return Err(SettingsError::bad(
                "use_group_settings",
                "use_group_settings: true clears the location override and cannot be combined with other keys",
            ));
        }
        Ok((changes, use_group))
    }

    /// Sets some of a group's (or one of its locations') own keys from a partial body.
    ///
    /// The body nests (`{"randomization":{"window_s":60}}`) or uses dotted keys
    /// (`{"randomization.window_s":60}`); a key set to `null` goes back to inheriting. With a
    /// location: group-only keys are rejected naming the key, `{"use_group_settings": true}`
    /// alone removes the location's override, `{"use_group_settings": false}` alone creates an
    /// empty one. All-or-nothing: on any error nothing changes.
    ///
    /// Returns the groups whose effective settings may have changed (the group and all its
    /// descendants), or an empty list when the body changed nothing (then no serial moves).
    pub fn put_settings(
        &mut self,
        group: &str,
        location: Option<&str>,
        body: &Value,
    ) -> Result<Vec<String>, SettingsError> {
        if let Some(l) = location {
            validate_name("location", l)?;
        }
        let current = self
            .groups
            .get(group)
            .ok_or_else(|| SettingsError::NotFound(format!("group {group} does not exist")))?;
        let (changes, use_group) = Self::parse_body(body, location)?;

        let mut next = current.clone();
        match location {
            None => apply_changes(&mut next.own, changes),
            Some(l) if use_group == Some(true) => {
                next.locations.remove(l);
            }
            Some(l) => {
                // Any key (or `use_group_settings: false`) makes the location override; an
                // empty body leaves it as it is.
                if !changes.is_empty() || use_group == Some(false) {
                    let ov = next.locations.entry(l.to_string()).or_default();
                    apply_changes(ov, changes);
                }
            }
        }
        if next == *current {
            return Ok(Vec::new());
        }
        next.serial = self.bump();
        self.groups.insert(group.to_string(), next);
        Ok(self.descendants(group))
    }

    /// Effective settings for a group (unknown -> `default`) at an optional location.
    ///
    /// Per key, the first that sets it among G@L, G, parent@L, parent, ..., default@L,
    /// default, then the built-in default. Group-only keys are never read from a location. A
    /// stored value that fails validation (corrupt mirror) is skipped. `learn_applications`
    /// is forced false unless the site's `application_learning` is on.
    pub fn effective(&self, group: &str, location: Option<&str>) -> Settings {
        let chain = self.ancestors(group);
        let mut s = Settings::default();
        for spec in KEYS {
            'levels: for (_, g) in &chain {
                if let (Some(l), Scope::Location) = (location, spec.scope) {
                    if let Some(v) = g.locations.get(l).and_then(|o| o.get(spec.path)) {
                        if spec.try_apply(&mut s, v) {
                            break 'levels;
                        }
                    }
                }
                if let Some(v) = g.own.get(spec.path) {
                    if spec.try_apply(&mut s, v) {
                        break 'levels;
                    }
                }
            }
        }
        if !self.site.application_learning {
            s.learn_applications = false;
        }
        s
    }

    /// The settings serial of a group (unknown -> `default`): the largest serial over the
    /// group and its ancestors and the site serial, so a change anywhere up the chain or in
    /// the site settings gives a new value.
    pub fn settings_serial(&self, group: &str) -> u64 {
        self.ancestors(group)
            .iter()
            .map(|(_, g)| g.serial)
            .fold(self.site_serial, u64::max)
    }

    /// A strong ETag (quotes included) for `GET /v1/groups/{group}/settings`. It names the
    /// resolved group as well as the serial: once a group is deleted its URL serves
    /// `default`'s settings, whose serial alone may equal one the deleted group once served.
    pub fn settings_etag(&self, group: &str, location: Option<&str>) -> String {
        let resolved = self.resolve_group(group);
        let serial = self.settings_serial(group);
        match location {
            Some(l) => format!("\"s{serial}-{resolved}@{l}\""),
            None => format!("\"s{serial}-{resolved}\""),
        }
    }

    /// Stores a group's policy document; returns its new serial (from the one counter).
    pub fn put_policy(&mut self, group: &str, document: Value) -> Result<u64, SettingsError> {
        if !self.groups.contains_key(group) {
            return Err(SettingsError::NotFound(format!(
                "group {group} does not exist"
            )));
        }
        let document = serde_json::value::to_raw_value(&document)
            .map_err(|e| SettingsError::bad("body", format!("policy of group {group}: {e}")))?;
        if document.get().len() > MAX_POLICY_BYTES {
            return Err(SettingsError::TooLarge(format!(
                "the policy of group {group} is {} bytes; at most {MAX_POLICY_BYTES}",
                document.get().len()
            )));
        }
        let serial = self.bump();
        if let Some(g) = self.groups.get_mut(group) {
            g.policy = Some(Policy { serial, document });
        }
        Ok(serial)
    }

    /// Why application learning is refused for a client of `group` at `location`, if it is:
    /// the site switch first, then the group's effective `learn_applications`.
    pub fn learning_refusal(&self, group: &str, location: Option<&str>) -> Option<String> {
        if !self.site.application_learning {
            return Some("application learning is off for the site (application_learning)".into());
        }
        if !self.effective(group, location).learn_applications {
            return Some(format!(
                "application learning is off for group {group:?} (learn_applications)"
            ));
        }
        None
    }

    /// The policy serial a client of `group` should have (0: no policy anywhere up the tree).
    pub fn policy_serial(&self, group: &str) -> u64 {
        self.policy(group).map_or(0, |(_, p)| p.serial)
    }

    /// The policy that applies to a group (unknown -> `default`'s chain): its own or the
    /// nearest ancestor's, with the name of the group that owns it.
    pub fn policy(&self, group: &str) -> Option<(&str, &Policy)> {
        self.ancestors(group)
            .into_iter()
            .find_map(|(name, g)| g.policy.as_ref().map(|p| (name, p)))
    }

    /// Updates site settings from a partial body `{application_learning: bool,
    /// notification_damper_s: integer >= 0}`; `null` restores a key's default. Unknown key ->
    /// BadRequest. All-or-nothing; a change bumps the counter and the site serial.
    pub fn put_site(&mut self, body: &Value) -> Result<(), SettingsError> {
        let obj = body.as_object().ok_or_else(|| {
            SettingsError::bad(
                "body",
                format!(
                    "body must be a JSON object of site settings (got {})",
                    brief(body)
                ),
            )
        })?;
        let mut next = self.site.clone();
        let defaults = SiteSettings::default();
        for (k, v) in obj {
            match k.as_str() {
                "application_learning" => {
                    next.application_learning = match v {
                        Value::Null => defaults.application_learning,
                        Value::Bool(b) => *b,
                        other => {
                            return Err(SettingsError::bad(
                                k,
                                format!(
                                    "application_learning must be a boolean (got {})",
                                    brief(other)
                                ),
                            ))
                        }
                    }
                }
                "notification_damper_s" => {
                    next.notification_damper_s = match v {
                        Value::Null => defaults.notification_damper_s,
                        other => other
                            .as_u64()
                            .filter(|n| *n <= MAX_DAMPER_S)
                            .ok_or_else(|| {
                                SettingsError::bad(
                                    k,
                                    format!(
                                        "notification_damper_s must be an integer from 0 to {MAX_DAMPER_S} (got {})",
                                        brief(other)
                                    ),
                                )
                            })?,
                    }
                }
                "client_auth" => {
                    next.client_auth = match v {
                        Value::Null => defaults.client_auth,
                        Value::String(s) if s == "required" => ClientAuth::Required,
                        Value::String(s) if s == "open" => ClientAuth::Open,
                        other => {
                            return Err(SettingsError::bad(
                                k,
                                format!(
                                    "client_auth must be \"required\" or \"open\" (got {})",
                                    brief(other)
                                ),
                            ))
                        }
                    }
                }
                other => {
                    return Err(SettingsError::bad(
                        other,
                        format!(
                            "unknown site settings key {other} (known: application_learning, notification_damper_s, client_auth)"
                        ),
                    ))
                }
            }
        }
        if next != self.site {
            self.site = next;
            self.site_serial = self.bump();
        }
        Ok(())
    }

    /// The admin listing: every group with its parent, number of children, own keys, location
    /// overrides, own policy serial and settings serial, sorted by name.
    pub fn groups_list(&self) -> Vec<GroupInfo> {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for g in self.groups.values() {
            if let Some(p) = g.parent.as_deref() {
                *counts.entry(p).or_default() += 1;
            }
        }
        self.groups
            .iter()
            .map(|(name, g)| GroupInfo {
                name: name.clone(),
                parent: g.parent.clone(),
                children: counts.get(name.as_str()).copied().unwrap_or(0),
                settings: g.own.to_nested(),
                locations: g
                    .locations
                    .iter()
                    .map(|(l, o)| (l.clone(), o.to_nested()))
                    .collect(),
                policy_serial: g.policy.as_ref().map(|p| p.serial),
                serial: self.settings_serial(name),
            })
            .collect()
    }
}

fn apply_changes(target: &mut Overrides, changes: Changes) {
    for (path, value) in changes {
        match value {
            Some(v) => {
                target.0.insert(path.to_string(), v);
            }
            None => {
                target.0.remove(path);
            }
        }
    }
}

#[cfg(test)]
#[path = "directory_tests.rs"]
mod tests;
