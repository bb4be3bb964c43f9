//! The node's `[upstream]` keys that are more than a scalar: the entries of `upstream.servers`
//! (a URL, or a table carrying that server's own token) and the outbound proxy URL.
//!
//! Owns their file shapes, their checks (every message names the key: `upstream.servers[1]`,
//! `upstream.servers[1].token_file`, `upstream.proxy`), and the redaction of credentials in a
//! proxy URL, so that a password given there never reaches a log line, an error or a page.
//! It must never read a token file's content beyond checking it holds one, nor echo a proxy
//! URL without [`redact_credentials`].

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::{bad, validate_token_file, validate_url, ConfigError};

/// One entry of `upstream.servers`: in the file either a URL string or a table
/// `{ url = "...", token = "...", token_file = "..." }`. An entry without a token of its own
/// presents the section's `token` / `token_file` (the default for the whole list), so a list
/// whose servers have different node tokens (another node first, the manager second) can
/// still fail over.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpstreamServer {
    pub url: String,
    /// This server's node token; empty: `token_file`, else the section's default.
    pub token: String,
    /// A file holding this server's node token (used when `token` is empty).
    pub token_file: String,
}

impl UpstreamServer {
    /// Whether this entry names a token of its own (else the section's default applies).
    pub fn has_own_token(&self) -> bool {
        !self.token.is_empty() || !self.token_file.is_empty()
    }
}

impl From<&str> for UpstreamServer {
    fn from(url: &str) -> Self {
        UpstreamServer {
            url: url.to_string(),
            ..Default::default()
        }
    }
}

impl From<String> for UpstreamServer {
    fn from(url: String) -> Self {
        UpstreamServer {
            url,
            ..Default::default()
        }
    }
}

/// The table form of an entry, as written in the file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryTable {
    url: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    token: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    token_file: String,
}

impl Serialize for UpstreamServer {
    /// A plain string when the entry has no token of its own (the shape of older files).
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.has_own_token() {
            EntryTable {
                url: self.url.clone(),
                token: self.token.clone(),
                token_file: self.token_file.clone(),
            }
            .serialize(s)
        } else {
            s.serialize_str(&self.url)
        }
    }
}

/// Reads one entry: a string or a table (an untagged enum would only say "did not match any
/// variant", which names neither the entry nor the field that is wrong).
struct EntryVisitor;

impl<'de> Visitor<'de> for EntryVisitor {
    type Value = UpstreamServer;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(
            "a URL string or a table { url = \"...\", token = \"...\", token_file = \"...\" }",
        )
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<UpstreamServer, E> {
        Ok(UpstreamServer::from(v))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<UpstreamServer, A::Error> {
        let t = EntryTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(UpstreamServer {
            url: t.url,
            token: t.token,
            token_file: t.token_file,
        })
    }
}

impl<'de> Deserialize<'de> for UpstreamServer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(EntryVisitor)
    }
}

/// `upstream.servers`: the list, each element's error prefixed with its key
/// (`upstream.servers[1]: unknown field ...`), which [`super::toml_error`] reads as the key.
pub(super) fn deserialize_servers<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<UpstreamServer>, D::Error> {
    struct ListVisitor;
    impl<'de> Visitor<'de> for ListVisitor {
        type Value = Vec<UpstreamServer>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of upstream URLs or { url, token, token_file } tables")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            // Bounded by the file, which toml has already read whole.
            loop {
                let i = out.len();
                match seq.next_element_seed(EntrySeed) {
                    Ok(Some(entry)) => out.push(entry),
                    Ok(None) => return Ok(out),
                    Err(e) => {
                        return Err(de::Error::custom(format!("upstream.servers[{i}]: {e}")));
                    }
                }
            }
        }
    }
    struct EntrySeed;
    impl<'de> de::DeserializeSeed<'de> for EntrySeed {
        type Value = UpstreamServer;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<UpstreamServer, D::Error> {
            UpstreamServer::deserialize(d)
        }
    }
    d.deserialize_seq(ListVisitor)
}

/// Checks every entry of `upstream.servers`: an http(s) URL, and a token file that will be
/// read exists and holds a token.
pub(super) fn validate_servers(servers: &[UpstreamServer]) -> Result<(), ConfigError> {
    for (i, s) in servers.iter().enumerate() {
        validate_url(&s.url).map_err(|m| bad(&format!("upstream.servers[{i}]"), m))?;
        validate_token_file(
            &format!("upstream.servers[{i}].token_file"),
            "--upstream-token-file-for",
            &s.token,
            &s.token_file,
        )?;
    }
    Ok(())
}

/// Checks `upstream.proxy` (empty: none configured): an http or https URL of a host, with
/// credentials allowed (percent-encoded), nothing after the port. The message never repeats
/// the credentials.
pub fn validate_proxy(s: &str) -> Result<(), ConfigError> {
    if s.is_empty() {
        return Ok(());
    }
    let shown = redact_credentials(s);
    let key = "upstream.proxy";
    // Without a scheme, `user:pw@host` would parse as the scheme `user`: say what is missing
    // rather than name that scheme.
    if !s.contains("://") {
        return Err(bad(
            key,
            format!("{shown:?} must start with http:// or https://"),
        ));
    }
    let u = url::Url::parse(s).map_err(|e| {
        bad(
            key,
            format!("{shown:?} is not a URL: {e} (write it as http://HOST:PORT)"),
        )
    })?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(bad(
            key,
            format!(
                "{shown:?} must be an http or https URL (got scheme {:?})",
                u.scheme()
            ),
        ));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(bad(key, format!("{shown:?} has no host")));
    }
    if u.path() != "/" || u.query().is_some() || u.fragment().is_some() {
        return Err(bad(
            key,
            format!("{shown:?}: a proxy URL ends after the host and port"),
        ));
    }
    Ok(())
}

/// `s` with any user name and password replaced by `***`: `http://user:pw@host:3128` shows as
/// `http://***@host:3128`. Works on strings that are not URLs too (an environment variable
/// may hold `user:pw@host:3128` without a scheme): everything before the last `@` of the
/// part that names the host goes.
pub fn redact_credentials(s: &str) -> String {
    let (scheme, rest) = match s.find("://") {
        Some(at) => s.split_at(at + 3),
        None => ("", s),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rfind('@') {
        Some(at) => format!("{scheme}***@{}{tail}", &authority[at + 1..]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_survive_redaction() {
        for (given, shown) in [
            (
                "http://user:pass@127.0.0.1:3128",
                "http://***@127.0.0.1:3128",
            ),
            ("http://user@proxy:3128/", "http://***@proxy:3128/"),
            ("user:p%40ss@proxy:80", "***@proxy:80"),
            ("https://a:b@c@proxy", "https://***@proxy"),
            ("http://proxy:3128", "http://proxy:3128"),
            ("", ""),
        ] {
            assert_eq!(redact_credentials(given), shown, "{given}");
        }
    }

    #[test]
    fn a_bad_proxy_is_named_and_its_password_not_repeated() {
        for bad_url in [
            "ftp://u:secretpw@host:21",
            "u:secretpw@host:3128",
            "not a url u:secretpw@host",
            "http://u:secretpw@host:3128/path",
            "socks5://u:secretpw@host:1080",
        ] {
            let e = validate_proxy(bad_url).unwrap_err();
            assert_eq!(e.key, "upstream.proxy", "{bad_url}");
            let text = e.to_string();
            assert!(!text.contains("secretpw"), "{text}");
            assert!(!text.contains('\n'), "{text}");
        }
        for good in [
            "",
            "http://127.0.0.1:3128",
            "http://user:pass@127.0.0.1:3128",
            "https://proxy.example:8443/",
        ] {
            validate_proxy(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
    }
}
