//! API keys and who may call what.
//!
//! Keys come from a file (`--api-keys-file`, one `<scope> <key>` per line) or the environment
//! (`AIAAS_API_KEYS`, comma-separated `<scope>:<key>`). Two scopes: `infer` (predictions and
//! metadata) and `admin` (model management, and everything `infer` may do). Presented keys are
//! compared in constant time against SHA-256 digests of the configured ones, and never logged.

use std::net::SocketAddr;
use std::path::Path;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState, Dialect};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Infer,
    Admin,
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Health probes: always open.
    Public,
    /// `/metrics`: open unless `--metrics-auth`, then any valid key.
    Metrics,
    /// Predictions and metadata: any valid key when keys are configured.
    Infer,
    /// Model management: an admin key; without keys, loopback clients only unless
    /// `--allow-unauthenticated-admin`.
    Admin,
}

/// The configured keys (digests only).
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<(Scope, [u8; 32])>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never the keys themselves
        write!(f, "ApiKeys({} keys)", self.keys.len())
    }
}

/// Shortest key accepted: a guessable key is worse than none.
pub const MIN_KEY_LEN: usize = 16;

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn parse_scope(s: &str) -> Option<Scope> {
    match s {
        "infer" => Some(Scope::Infer),
        "admin" => Some(Scope::Admin),
        _ => None,
    }
}

impl ApiKeys {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    fn add(&mut self, scope: &str, key: &str, whence: &str) -> Result<(), String> {
        let scope = parse_scope(scope)
            .ok_or_else(|| format!("{whence}: unknown scope '{scope}' (infer or admin)"))?;
        if key.len() < MIN_KEY_LEN || key.chars().any(char::is_whitespace) {
            return Err(format!(
                "{whence}: a key must be at least {MIN_KEY_LEN} characters without spaces"
            ));
        }
        self.keys.push((scope, digest(key)));
        Ok(())
    }

    /// Reads `<scope> <key>` lines; blank lines and `#` comments are skipped.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read API keys file {}: {e}", path.display()))?;
        let mut keys = ApiKeys::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let whence = format!("{} line {}", path.display(), i + 1);
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(scope), Some(key), None) => keys.add(scope, key, &whence)?,
                _ => return Err(format!("{whence}: expected '<scope> <key>'")),
            }
        }
        Ok(keys)
    }

    /// Adds comma-separated `<scope>:<key>` entries (the `AIAAS_API_KEYS` variable).
    pub fn add_list(&mut self, list: &str) -> Result<(), String> {
        for (i, entry) in list
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let (scope, key) = entry.split_once(':').ok_or_else(|| {
                format!("AIAAS_API_KEYS entry {}: expected '<scope>:<key>'", i + 1)
            })?;
            self.add(scope, key, &format!("AIAAS_API_KEYS entry {}", i + 1))?;
        }
        Ok(())
    }

    /// The scope of a presented key, comparing against every configured key in constant time.
    pub fn scope_of(&self, presented: &str) -> Option<Scope> {
        let d = digest(presented);
        let mut found = None;
        for (scope, k) in &self.keys {
            if bool::from(k.ct_eq(&d)) {
                // keep looping: the time taken does not depend on which key matched
                found = Some(match (found, *scope) {
                    (Some(Scope::Admin), _) | (_, Scope::Admin) => Scope::Admin,
                    _ => Scope::Infer,
                });
            }
        }
        found
    }
}

/// Who may make a request of `access`: `Ok` or the error to answer with, and the
/// `aiaas_rejected_requests_total` reason it counts as. `bearer` is the key the client
/// presented (HTTP's `Authorization: Bearer`, gRPC's `authorization` metadata), `loopback`
/// whether it connected from a loopback address. Both protocols decide here.
pub fn check_access(
    state: &AppState,
    access: Access,
    bearer: Option<&str>,
    loopback: bool,
) -> Result<(), (ApiError, &'static str)> {
    let s = &state.settings;
    let keys = &s.api_keys;
    let needs_key = match access {
        Access::Public => false,
        Access::Metrics => s.metrics_auth && !keys.is_empty(),
        Access::Infer | Access::Admin => !keys.is_empty(),
    };
    if needs_key {
        let scope = match bearer {
            None => {
                return Err((
                    ApiError::Unauthorized(
                        "an API key is required: Authorization: Bearer <key>".into(),
                    ),
                    "unauthenticated",
                ))
            }
            Some(k) => keys.scope_of(k),
        };
        match (scope, access) {
            (None, _) => {
                return Err((
                    ApiError::Unauthorized("invalid API key".into()),
                    "unauthenticated",
                ))
            }
            (Some(Scope::Infer), Access::Admin) => {
                return Err((
                    ApiError::Forbidden(
                        "this key's scope is 'infer'; model management needs an 'admin' key".into(),
                    ),
                    "forbidden",
                ))
            }
            _ => {}
        }
    } else if access == Access::Admin && !s.allow_unauthenticated_admin && !loopback {
        return Err((
            ApiError::Forbidden(
                "model management without API keys is only allowed from loopback; configure --api-keys-file or start with --allow-unauthenticated-admin".into(),
            ),
            "forbidden",
        ));
    }
    Ok(())
}

/// The key of an `Authorization: Bearer <key>` value.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn bearer(req: &Request) -> Option<&str> {
    bearer_token(req.headers().get(header::AUTHORIZATION)?.to_str().ok()?)
}

fn is_loopback(req: &Request) -> bool {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|c| c.0.ip().is_loopback())
}

/// Middleware: refuses a request its caller may not make ([`check_access`]), in the route's
/// dialect.
pub async fn authorize(
    State((state, access, dialect)): State<(AppState, Access, Dialect)>,
    req: Request,
    next: Next,
) -> Response {
    match check_access(&state, access, bearer(&req), is_loopback(&req)) {
        Ok(()) => next.run(req).await,
        Err((error, reason)) => {
            state.metrics.reject(reason);
            dialect.error_response(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_scope() {
        let mut keys = ApiKeys::default();
        keys.add_list("admin:0123456789abcdef-admin, infer:0123456789abcdef-infer")
            .unwrap();
        assert_eq!(keys.scope_of("0123456789abcdef-admin"), Some(Scope::Admin));
        assert_eq!(keys.scope_of("0123456789abcdef-infer"), Some(Scope::Infer));
        assert_eq!(keys.scope_of("0123456789abcdef-other"), None);
        assert_eq!(keys.scope_of(""), None);
        assert!(keys.add_list("root:0123456789abcdef").is_err());
        assert!(keys.add_list("admin:short").is_err());
        assert!(keys.add_list("admin0123456789abcdef").is_err());
        assert!(!format!("{keys:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn key_files_have_scope_and_key_per_line() {
        let path = std::env::temp_dir().join(format!("aiaas-keys-{}", std::process::id()));
        std::fs::write(
            &path,
            "# keys\nadmin  aaaaaaaaaaaaaaaaaaaa\n\ninfer bbbbbbbbbbbbbbbbbbbb # ci\n",
        )
        .unwrap();
        let keys = ApiKeys::from_file(&path).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.scope_of("bbbbbbbbbbbbbbbbbbbb"), Some(Scope::Infer));
        std::fs::write(&path, "admin aaaaaaaaaaaaaaaaaaaa extra\n").unwrap();
        let err = ApiKeys::from_file(&path).unwrap_err();
        assert!(
            err.contains("line 1") && !err.contains("aaaaaaaaaaaa"),
            "{err}"
        );
        let _ = std::fs::remove_file(&path);
    }
}
