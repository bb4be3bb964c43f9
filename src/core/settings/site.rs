//! Site-wide settings: what holds for every group at once.
//!
//! Owns [`SiteSettings`] (the application-learning switch, the notification damper, and
//! `client_auth`, whether clients must present a credential) and their defaults, including
//! what a site stored before enrolment existed reads as. Plain data: the directory changes
//! them (`Directory::put_site`); this file must never do I/O.

use serde::{Deserialize, Serialize};

/// Site-wide settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SiteSettings {
    /// Gate for application learning: off forces every group's effective
    /// `learn_applications` to false and makes `/v1/applications` answer 403.
    pub application_learning: bool,
    /// At most one admin notification per (group, kind) per this many seconds.
    pub notification_damper_s: u64,
    /// Whether clients must present a credential (`core::credential`).
    #[serde(default = "ClientAuth::before_enrolment")]
    pub client_auth: ClientAuth,
}

impl Default for SiteSettings {
    fn default() -> Self {
        SiteSettings {
            application_learning: false,
            notification_damper_s: 3600,
            client_auth: ClientAuth::Required,
        }
    }
}

impl SiteSettings {
    pub(super) fn before_enrolment() -> SiteSettings {
        SiteSettings {
            client_auth: ClientAuth::before_enrolment(),
            ..SiteSettings::default()
        }
    }
}

/// The site setting `client_auth`: whether heartbeats, events, applications and a client's
/// push stream need a valid credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Without a valid credential: 401. The default of a new site.
    #[default]
    Required,
    /// Any client may speak for any client id (labs). A credential presented is still
    /// checked.
    Open,
}

impl ClientAuth {
    /// What a site stored before enrolment existed reads as: its clients have no
    /// credentials yet, so an upgrade must not lock them out. The admin turns `required` on
    /// once they are enrolled.
    fn before_enrolment() -> ClientAuth {
        ClientAuth::Open
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::Required => "required",
            ClientAuth::Open => "open",
        }
    }
}
