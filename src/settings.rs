//! The daemon's settings: an optional TOML file, then `TOKEND_*` environment variables
//! over it, validated into typed values before any port is bound. Each key is named
//! the same in both places: `grpc_addr` in the file is `TOKEND_GRPC_ADDR` in the
//! environment.

use std::{fs, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use secrecy::SecretString;
use serde::Deserialize;

use crate::access::{ApiKeys, tls::TlsSettings};

/// Tiki's production generation-1 endpoint.
pub const DEFAULT_TIKI_GRAPHQL_URL: &str = "https://api.tiki.vn/tiniapp/api/graphql/query";
pub const DEFAULT_DATABASE_URL: &str = "sqlite://tokend.db";
pub const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:50051";
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9090";

/// Minimum excess of `refresh_lease` over `http_timeout`, for the commit.
const MIN_LEASE_MARGIN: Duration = Duration::from_secs(10);

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub client_id: String,
    pub client_secret: SecretString,
    pub tiki_graphql_url: String,
    /// `sqlite://PATH`, `sqlite:PATH`, or a `postgres://` or `postgresql://` URL.
    pub database_url: String,
    pub grpc_addr: SocketAddr,
    /// Listen address of the HTTP admin server (`/metrics`, `/healthz`, `/readyz`).
    pub admin_addr: SocketAddr,
    /// Time since the scheduler's last pass after which `/healthz` fails and systemd
    /// watchdog pings stop.
    pub max_tick_age: Duration,
    /// How long before expiry a token set is refreshed.
    pub refresh_before: Duration,
    /// Bound on one request to Tiki, from connecting to the last byte of the response.
    pub http_timeout: Duration,
    /// Maximum number of scheduled refreshes in flight at once.
    pub refresh_concurrency: usize,
    /// Maximum number of token sets whose access token is kept in memory.
    pub cache_capacity: u64,
    /// How long shutdown waits for refreshes in flight.
    pub shutdown_grace: Duration,
    /// How long a replica's claim on a token set lasts before another replica may take
    /// the token set over.
    pub refresh_lease: Duration,
    /// Identifies this replica in claims and in the `updated_by` column.
    pub replica_id: String,
    /// Caller authentication on the gRPC port.
    pub access: AccessSettings,
}

/// Caller authentication on the gRPC port. The default, no TLS and no keys, lets every
/// caller do everything, which is safe only on a loopback address.
#[derive(Debug, Clone, Default)]
pub struct AccessSettings {
    /// TLS for the gRPC port, and the client CA when client certificates are required.
    pub tls: Option<TlsSettings>,
    /// API keys and their roles; `None` lets every caller act as an admin.
    pub api_keys: Option<Arc<ApiKeys>>,
}

/// A setting that is missing or invalid, with the key to fix.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("reading the config file {path} failed: {source}")]
    ReadFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the config file {path} is invalid: {message}")]
    ParseFile { path: String, message: String },
    #[error("missing setting {key}: {hint}")]
    Missing { key: &'static str, hint: String },
    #[error("invalid setting {key} ({variable}): {message}", variable = variable_name(key))]
    Invalid { key: &'static str, message: String },
}

/// The settings as read, before validation. Every field is optional so that the file
/// and the environment can each supply any of them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    client_id: Option<String>,
    client_secret: Option<String>,
    client_secret_file: Option<String>,
    tiki_graphql_url: Option<String>,
    database_url: Option<String>,
    grpc_addr: Option<String>,
    admin_addr: Option<String>,
    max_tick_age: Option<u64>,
    refresh_before: Option<u64>,
    http_timeout: Option<u64>,
    refresh_concurrency: Option<u64>,
    cache_capacity: Option<u64>,
    shutdown_grace: Option<u64>,
    refresh_lease: Option<u64>,
    replica_id: Option<String>,
    tls_cert_file: Option<String>,
    tls_key_file: Option<String>,
    tls_client_ca_file: Option<String>,
    api_keys_file: Option<String>,
    allow_insecure_bind: Option<bool>,
}

impl Settings {
    /// Loads the settings from the optional file at `config`, then from the process
    /// environment.
    pub fn load(config: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_with(config, |name| std::env::var(name).ok())
    }

    /// Loads the settings with `env` standing in for the process environment.
    pub fn load_with(
        config: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, SettingsError> {
        let mut raw = match config {
            Some(path) => read_file(path)?,
            None => RawSettings::default(),
        };
        raw.apply_env(&env)?;
        raw.validate()
    }
}

fn read_file(path: &Path) -> Result<RawSettings, SettingsError> {
    let text = fs::read_to_string(path).map_err(|source| SettingsError::ReadFile {
        path: path.display().to_string(),
        source,
    })?;
    toml::from_str(&text).map_err(|error| SettingsError::ParseFile {
        path: path.display().to_string(),
        message: error.to_string().trim_end().to_owned(),
    })
}

impl RawSettings {
    fn apply_env(&mut self, env: &impl Fn(&str) -> Option<String>) -> Result<(), SettingsError> {
        let text = |name: &str| env(name).filter(|value| !value.is_empty());
        let number = |key: &'static str, name: &str| -> Result<Option<u64>, SettingsError> {
            text(name)
                .map(|value| parse_number(key, &value))
                .transpose()
        };

        if let Some(value) = text("TOKEND_CLIENT_ID") {
            self.client_id = Some(value);
        }
        let secret = text("TOKEND_CLIENT_SECRET");
        let secret_file = text("TOKEND_CLIENT_SECRET_FILE");
        if secret.is_some() && secret_file.is_some() {
            return Err(SettingsError::Invalid {
                key: "client_secret",
                message: "TOKEND_CLIENT_SECRET and TOKEND_CLIENT_SECRET_FILE are both set; \
                          unset one of them"
                    .to_owned(),
            });
        }
        if let Some(value) = secret {
            self.client_secret = Some(value);
            self.client_secret_file = None;
        }
        if let Some(value) = secret_file {
            self.client_secret_file = Some(value);
            self.client_secret = None;
        }
        if let Some(value) = text("TOKEND_TIKI_GRAPHQL_URL") {
            self.tiki_graphql_url = Some(value);
        }
        if let Some(value) = text("TOKEND_DATABASE_URL") {
            self.database_url = Some(value);
        }
        if let Some(value) = text("TOKEND_GRPC_ADDR") {
            self.grpc_addr = Some(value);
        }
        if let Some(value) = text("TOKEND_ADMIN_ADDR") {
            self.admin_addr = Some(value);
        }
        if let Some(value) = text("TOKEND_REPLICA_ID") {
            self.replica_id = Some(value);
        }
        let files = [
            ("TOKEND_TLS_CERT_FILE", &mut self.tls_cert_file),
            ("TOKEND_TLS_KEY_FILE", &mut self.tls_key_file),
            ("TOKEND_TLS_CLIENT_CA_FILE", &mut self.tls_client_ca_file),
            ("TOKEND_API_KEYS_FILE", &mut self.api_keys_file),
        ];
        for (name, field) in files {
            if let Some(value) = text(name) {
                *field = Some(value);
            }
        }
        if let Some(value) = text("TOKEND_ALLOW_INSECURE_BIND") {
            self.allow_insecure_bind = Some(parse_bool("allow_insecure_bind", &value)?);
        }
        let numbers = [
            (
                "refresh_before",
                "TOKEND_REFRESH_BEFORE",
                &mut self.refresh_before,
            ),
            (
                "http_timeout",
                "TOKEND_HTTP_TIMEOUT",
                &mut self.http_timeout,
            ),
            (
                "refresh_concurrency",
                "TOKEND_REFRESH_CONCURRENCY",
                &mut self.refresh_concurrency,
            ),
            (
                "cache_capacity",
                "TOKEND_CACHE_CAPACITY",
                &mut self.cache_capacity,
            ),
            (
                "shutdown_grace",
                "TOKEND_SHUTDOWN_GRACE",
                &mut self.shutdown_grace,
            ),
            (
                "refresh_lease",
                "TOKEND_REFRESH_LEASE",
                &mut self.refresh_lease,
            ),
            (
                "max_tick_age",
                "TOKEND_MAX_TICK_AGE",
                &mut self.max_tick_age,
            ),
        ];
        for (key, name, field) in numbers {
            if let Some(value) = number(key, name)? {
                *field = Some(value);
            }
        }
        Ok(())
    }

    fn validate(self) -> Result<Settings, SettingsError> {
        let client_id = self
            .client_id
            .filter(|id| !id.trim().is_empty())
            .ok_or_else(|| SettingsError::Missing {
                key: "client_id",
                hint: "set TOKEND_CLIENT_ID, or client_id in the config file, to the client key \
                       shown in Tini Console (or run `tokend serve --sandbox` to try tokend \
                       without one)"
                    .to_owned(),
            })?;
        let client_secret = client_secret(self.client_secret, self.client_secret_file)?;
        let tiki_graphql_url = http_url(
            "tiki_graphql_url",
            self.tiki_graphql_url
                .unwrap_or_else(|| DEFAULT_TIKI_GRAPHQL_URL.to_owned()),
        )?;
        let database_url = database_url(
            self.database_url
                .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned()),
        )?;
        let grpc_addr = self
            .grpc_addr
            .unwrap_or_else(|| DEFAULT_GRPC_ADDR.to_owned());
        let grpc_addr = grpc_addr.parse().map_err(|_| SettingsError::Invalid {
            key: "grpc_addr",
            message: format!(
                "{grpc_addr:?} is not an IP address and port such as {DEFAULT_GRPC_ADDR}"
            ),
        })?;
        let access = access_settings(
            self.tls_cert_file,
            self.tls_key_file,
            self.tls_client_ca_file,
            self.api_keys_file,
        )?;
        check_bind(
            grpc_addr,
            &access,
            self.allow_insecure_bind.unwrap_or(false),
        )?;

        let admin_addr = socket_addr("admin_addr", self.admin_addr, DEFAULT_ADMIN_ADDR)?;
        if admin_addr == grpc_addr && grpc_addr.port() != 0 {
            return Err(SettingsError::Invalid {
                key: "admin_addr",
                message: format!(
                    "{admin_addr} is also grpc_addr; give the admin server a port of its own"
                ),
            });
        }

        let http_timeout = seconds("http_timeout", self.http_timeout, 10, 1, 300)?;
        let refresh_lease = seconds("refresh_lease", self.refresh_lease, 60, 1, 3600)?;
        if refresh_lease < http_timeout + MIN_LEASE_MARGIN {
            return Err(SettingsError::Invalid {
                key: "refresh_lease",
                message: format!(
                    "{} s must exceed http_timeout ({} s) by at least {} s, so that a claim \
                     outlasts a request to Tiki and the commit after it",
                    refresh_lease.as_secs(),
                    http_timeout.as_secs(),
                    MIN_LEASE_MARGIN.as_secs()
                ),
            });
        }
        let replica_id = match self.replica_id {
            Some(id) if id.trim().is_empty() || id.len() > 200 => {
                return Err(SettingsError::Invalid {
                    key: "replica_id",
                    message: "must be 1 to 200 bytes, or unset to use the host name and process id"
                        .to_owned(),
                });
            }
            Some(id) => id,
            None => default_replica_id(),
        };

        Ok(Settings {
            client_id,
            client_secret,
            tiki_graphql_url,
            database_url,
            grpc_addr,
            admin_addr,
            max_tick_age: seconds("max_tick_age", self.max_tick_age, 60, 2, 3600)?,
            refresh_before: seconds("refresh_before", self.refresh_before, 300, 1, 86_400)?,
            http_timeout,
            refresh_concurrency: bounded(
                "refresh_concurrency",
                self.refresh_concurrency,
                16,
                1,
                1024,
            )? as usize,
            cache_capacity: bounded("cache_capacity", self.cache_capacity, 100_000, 1, u64::MAX)?,
            shutdown_grace: seconds("shutdown_grace", self.shutdown_grace, 30, 0, 3600)?,
            refresh_lease,
            replica_id,
            access,
        })
    }
}

fn access_settings(
    cert_file: Option<String>,
    key_file: Option<String>,
    client_ca_file: Option<String>,
    api_keys_file: Option<String>,
) -> Result<AccessSettings, SettingsError> {
    let tls = match (cert_file, key_file) {
        (Some(cert), Some(key)) => Some(
            TlsSettings::load(
                Path::new(&cert),
                Path::new(&key),
                client_ca_file.as_deref().map(Path::new),
            )
            .map_err(|error| SettingsError::Invalid {
                key: error.key,
                message: error.message,
            })?,
        ),
        (None, None) if client_ca_file.is_some() => {
            return Err(SettingsError::Invalid {
                key: "tls_client_ca_file",
                message: "client certificates need TLS; set tls_cert_file and tls_key_file \
                          as well"
                    .to_owned(),
            });
        }
        (None, None) => None,
        (Some(_), None) => {
            return Err(SettingsError::Missing {
                key: "tls_key_file",
                hint: "tls_cert_file is set, so set TOKEND_TLS_KEY_FILE to the PEM file \
                       holding its private key"
                    .to_owned(),
            });
        }
        (None, Some(_)) => {
            return Err(SettingsError::Missing {
                key: "tls_cert_file",
                hint: "tls_key_file is set, so set TOKEND_TLS_CERT_FILE to the PEM \
                       certificate chain that goes with it"
                    .to_owned(),
            });
        }
    };
    let api_keys = api_keys_file
        .map(|path| {
            ApiKeys::load(Path::new(&path)).map_err(|error| SettingsError::Invalid {
                key: "api_keys_file",
                message: error.to_string(),
            })
        })
        .transpose()?
        .map(Arc::new);
    Ok(AccessSettings { tls, api_keys })
}

/// Rejects a non-loopback address that anyone on the network could call without TLS
/// or a key, unless the operator opted in.
fn check_bind(
    grpc_addr: SocketAddr,
    access: &AccessSettings,
    allow_insecure_bind: bool,
) -> Result<(), SettingsError> {
    let protected = access.tls.is_some() || access.api_keys.is_some();
    if grpc_addr.ip().is_loopback() || protected || allow_insecure_bind {
        return Ok(());
    }
    Err(SettingsError::Invalid {
        key: "grpc_addr",
        message: format!(
            "{grpc_addr} is reachable from other hosts, and with neither TLS nor API keys \
             anyone who reaches it can read every user's tokens; set tls_cert_file and \
             tls_key_file, or api_keys_file, or bind a loopback address, or set \
             allow_insecure_bind = true (TOKEND_ALLOW_INSECURE_BIND=true) if a network \
             policy protects the port"
        ),
    })
}

fn parse_bool(key: &'static str, value: &str) -> Result<bool, SettingsError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(SettingsError::Invalid {
            key,
            message: format!("{}={value:?} must be true or false", variable_name(key)),
        }),
    }
}

fn client_secret(
    inline: Option<String>,
    file: Option<String>,
) -> Result<SecretString, SettingsError> {
    let secret = match (inline, file) {
        (Some(secret), _) => secret,
        (None, Some(path)) => fs::read_to_string(&path)
            .map_err(|error| SettingsError::Invalid {
                key: "client_secret_file",
                message: format!("reading {path} failed: {error}"),
            })?
            .trim_end_matches(['\n', '\r'])
            .to_owned(),
        (None, None) => {
            return Err(SettingsError::Missing {
                key: "client_secret",
                hint: "set TOKEND_CLIENT_SECRET_FILE to a file holding the client secret from \
                       Tini Console, or TOKEND_CLIENT_SECRET to the secret itself"
                    .to_owned(),
            });
        }
    };
    if secret.trim().is_empty() {
        return Err(SettingsError::Invalid {
            key: "client_secret",
            message: "the client secret is empty".to_owned(),
        });
    }
    Ok(SecretString::from(secret))
}

fn http_url(key: &'static str, url: String) -> Result<String, SettingsError> {
    match reqwest::Url::parse(&url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.has_host() => Ok(url),
        _ => Err(SettingsError::Invalid {
            key,
            message: format!("{url:?} is not an http or https URL"),
        }),
    }
}

fn database_url(url: String) -> Result<String, SettingsError> {
    if url.starts_with("sqlite:") && url.contains(":memory:") {
        return Err(SettingsError::Invalid {
            key: "database_url",
            message: "an in-memory SQLite database loses every token set on restart; use a \
                      file such as sqlite://tokend.db"
                .to_owned(),
        });
    }
    let supported = ["sqlite:", "postgres://", "postgresql://"];
    if supported.iter().any(|prefix| url.starts_with(prefix)) {
        return Ok(url);
    }
    Err(SettingsError::Invalid {
        key: "database_url",
        message: format!(
            "{} is not supported; use a SQLite URL such as {DEFAULT_DATABASE_URL} or a \
             PostgreSQL URL such as postgres://tokend@db.example/tokend",
            crate::store::redact_url(&url)
        ),
    })
}

fn socket_addr(
    key: &'static str,
    value: Option<String>,
    default: &str,
) -> Result<SocketAddr, SettingsError> {
    let text = value.unwrap_or_else(|| default.to_owned());
    text.parse().map_err(|_| SettingsError::Invalid {
        key,
        message: format!("{text:?} is not an IP address and port such as {default}"),
    })
}

/// Returns `HOST-PID`, which is unique among replicas on distinct hosts or processes.
fn default_replica_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|host| host.trim().to_owned())
        .filter(|host| !host.is_empty())
        .unwrap_or_else(|| "tokend".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Returns the environment variable that sets the file key `key`.
pub fn variable_name(key: &str) -> String {
    format!("TOKEND_{}", key.to_ascii_uppercase())
}

/// Every environment variable the daemon reads, for spotting misspelled ones.
pub const VARIABLES: &[&str] = &[
    "TOKEND_CLIENT_ID",
    "TOKEND_CLIENT_SECRET",
    "TOKEND_CLIENT_SECRET_FILE",
    "TOKEND_TIKI_GRAPHQL_URL",
    "TOKEND_DATABASE_URL",
    "TOKEND_GRPC_ADDR",
    "TOKEND_ADMIN_ADDR",
    "TOKEND_MAX_TICK_AGE",
    "TOKEND_REFRESH_BEFORE",
    "TOKEND_HTTP_TIMEOUT",
    "TOKEND_REFRESH_CONCURRENCY",
    "TOKEND_CACHE_CAPACITY",
    "TOKEND_SHUTDOWN_GRACE",
    "TOKEND_REFRESH_LEASE",
    "TOKEND_REPLICA_ID",
    "TOKEND_TLS_CERT_FILE",
    "TOKEND_TLS_KEY_FILE",
    "TOKEND_TLS_CLIENT_CA_FILE",
    "TOKEND_API_KEYS_FILE",
    "TOKEND_ALLOW_INSECURE_BIND",
    "TOKEND_LOG",
    "TOKEND_LOG_FORMAT",
];

/// Environment variables that the client subcommands read; the daemon ignores them
/// without a warning, so that one shell can run both.
pub const CLIENT_VARIABLES: &[&str] = &[
    "TOKEND_API_KEY",
    "TOKEND_CA_FILE",
    "TOKEND_CLIENT_CERT_FILE",
    "TOKEND_CLIENT_KEY_FILE",
    "TOKEND_TLS_SERVER_NAME",
];

/// Returns the `TOKEND_*` variables in the environment that the daemon does not read.
pub fn unknown_variables() -> Vec<String> {
    std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| name.starts_with("TOKEND_") && !name.starts_with("TOKEND_TEST_"))
        .filter(|name| !VARIABLES.contains(&name.as_str()))
        .filter(|name| !CLIENT_VARIABLES.contains(&name.as_str()))
        .collect()
}

fn parse_number(key: &'static str, value: &str) -> Result<u64, SettingsError> {
    let name = variable_name(key);
    let message = match value.trim().parse::<i128>() {
        Ok(number) if number < 0 => format!("{name}={value:?} must not be negative"),
        Ok(number) => match u64::try_from(number) {
            Ok(number) => return Ok(number),
            Err(_) => format!("{name}={value:?} is too large"),
        },
        Err(_) => format!("{name}={value:?} is not a whole number"),
    };
    Err(SettingsError::Invalid { key, message })
}

fn bounded(
    key: &'static str,
    value: Option<u64>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, SettingsError> {
    let value = value.unwrap_or(default);
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(SettingsError::Invalid {
            key,
            message: format!("{value} is outside the allowed range {min} to {max}"),
        })
    }
}

fn seconds(
    key: &'static str,
    value: Option<u64>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<Duration, SettingsError> {
    bounded(key, value, default, min, max).map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::{collections::HashMap, io::Write};

    fn load(config: Option<&Path>, vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        Settings::load_with(config, |name| vars.get(name).cloned())
    }

    const CREDENTIALS: [(&str, &str); 2] = [
        ("TOKEND_CLIENT_ID", "client"),
        ("TOKEND_CLIENT_SECRET", "secret"),
    ];

    #[test]
    fn defaults_apply() {
        let settings = load(None, &CREDENTIALS).unwrap();
        assert_eq!(settings.tiki_graphql_url, DEFAULT_TIKI_GRAPHQL_URL);
        assert_eq!(settings.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(settings.grpc_addr.to_string(), DEFAULT_GRPC_ADDR);
        assert_eq!(settings.admin_addr.to_string(), DEFAULT_ADMIN_ADDR);
        assert_eq!(settings.max_tick_age, Duration::from_secs(60));
        assert_eq!(settings.refresh_before, Duration::from_secs(300));
    }

    #[test]
    fn environment_overrides_file() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "client_id = \"from-file\"\nclient_secret = \"s\"\nrefresh_before = 120\n\
             grpc_addr = \"127.0.0.1:6000\""
        )
        .unwrap();
        let settings = load(
            Some(file.path()),
            &[
                ("TOKEND_CLIENT_ID", "from-env"),
                ("TOKEND_REFRESH_BEFORE", "90"),
            ],
        )
        .unwrap();
        assert_eq!(settings.client_id, "from-env");
        assert_eq!(settings.refresh_before, Duration::from_secs(90));
        assert_eq!(settings.grpc_addr.port(), 6000);
    }

    #[test]
    fn secret_file_is_read() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "s3cret").unwrap();
        let path = file.path().to_str().unwrap();
        let settings = load(
            None,
            &[
                ("TOKEND_CLIENT_ID", "c"),
                ("TOKEND_CLIENT_SECRET_FILE", path),
            ],
        )
        .unwrap();
        assert_eq!(settings.client_secret.expose_secret(), "s3cret");
    }

    #[test]
    fn missing_credentials_name_the_key() {
        let error = load(None, &[]).unwrap_err().to_string();
        assert!(error.contains("client_id"), "{error}");
        assert!(error.contains("TOKEND_CLIENT_ID"), "{error}");
        let error = load(None, &[("TOKEND_CLIENT_ID", "c")])
            .unwrap_err()
            .to_string();
        assert!(error.contains("TOKEND_CLIENT_SECRET"), "{error}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let cases = [
            ("TOKEND_REFRESH_BEFORE", "soon", "refresh_before"),
            ("TOKEND_REFRESH_BEFORE", "0", "refresh_before"),
            ("TOKEND_GRPC_ADDR", "localhost", "grpc_addr"),
            ("TOKEND_ADMIN_ADDR", "localhost:9090", "admin_addr"),
            ("TOKEND_ADMIN_ADDR", "127.0.0.1:50051", "admin_addr"),
            ("TOKEND_MAX_TICK_AGE", "1", "max_tick_age"),
            ("TOKEND_TIKI_GRAPHQL_URL", "ftp://x", "tiki_graphql_url"),
            ("TOKEND_DATABASE_URL", "mysql://x", "database_url"),
            ("TOKEND_DATABASE_URL", "sqlite::memory:", "database_url"),
            ("TOKEND_REFRESH_LEASE", "12", "refresh_lease"),
            ("TOKEND_REPLICA_ID", "   ", "replica_id"),
            (
                "TOKEND_CLIENT_SECRET_FILE",
                "/nonexistent/secret",
                "client_secret_file",
            ),
        ];
        for (name, value, key) in cases {
            let mut vars = CREDENTIALS.to_vec();
            if name == "TOKEND_CLIENT_SECRET_FILE" {
                vars.retain(|(existing, _)| *existing != "TOKEND_CLIENT_SECRET");
            }
            vars.push((name, value));
            let error = load(None, &vars).unwrap_err().to_string();
            assert!(error.contains(key), "{name}={value}: {error}");
        }
    }

    #[test]
    fn postgres_url_is_accepted_and_redacted() {
        let mut vars = CREDENTIALS.to_vec();
        vars.push(("TOKEND_DATABASE_URL", "postgresql://tokend:pw@db/tokend"));
        let settings = load(None, &vars).unwrap();
        assert!(settings.database_url.starts_with("postgresql://"));
        let mut vars = CREDENTIALS.to_vec();
        vars.push(("TOKEND_DATABASE_URL", "mysql://user:hunter2@db/x"));
        let error = load(None, &vars).unwrap_err().to_string();
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn number_errors_say_what_is_wrong() {
        let cases = [
            ("-1", "negative"),
            ("99999999999999999999999", "too large"),
            ("5m", "not a whole number"),
            ("0", "range 1 to 86400"),
        ];
        for (value, expected) in cases {
            let mut vars = CREDENTIALS.to_vec();
            vars.push(("TOKEND_REFRESH_BEFORE", value));
            let error = load(None, &vars).unwrap_err().to_string();
            assert!(error.contains(expected), "{value}: {error}");
            assert!(error.contains("TOKEND_REFRESH_BEFORE"), "{value}: {error}");
        }
    }

    #[test]
    fn both_secret_sources_are_rejected() {
        let error = load(
            None,
            &[
                ("TOKEND_CLIENT_ID", "c"),
                ("TOKEND_CLIENT_SECRET", "s"),
                ("TOKEND_CLIENT_SECRET_FILE", "/etc/secret"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("both set"), "{error}");
    }

    #[test]
    fn unknown_file_key_is_rejected() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "grpc_adress = \"127.0.0.1:1\"").unwrap();
        let error = load(Some(file.path()), &CREDENTIALS)
            .unwrap_err()
            .to_string();
        assert!(error.contains("grpc_adress"), "{error}");
    }

    #[test]
    fn secret_stays_out_of_debug() {
        let settings = load(
            None,
            &[
                ("TOKEND_CLIENT_ID", "c"),
                ("TOKEND_CLIENT_SECRET", "hunter2"),
            ],
        )
        .unwrap();
        assert!(!format!("{settings:?}").contains("hunter2"));
    }

    #[test]
    fn non_loopback_bind_needs_protection() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::write(&keys, "reader a-plain-key-of-20-bytes\n").unwrap();
        let keys = keys.to_str().unwrap();
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], bool);
        let cases: [Case; 6] = [
            ("0.0.0.0:50051", &[], false),
            ("[::]:50051", &[], false),
            (
                "0.0.0.0:50051",
                &[("TOKEND_ALLOW_INSECURE_BIND", "true")],
                true,
            ),
            ("0.0.0.0:50051", &[("TOKEND_API_KEYS_FILE", keys)], true),
            ("[::1]:50051", &[], true),
            ("127.0.0.2:50051", &[], true),
        ];
        for (addr, extra, accepted) in cases {
            let mut vars = CREDENTIALS.to_vec();
            vars.push(("TOKEND_GRPC_ADDR", addr));
            vars.extend_from_slice(extra);
            let result = load(None, &vars);
            assert_eq!(result.is_ok(), accepted, "{addr} {extra:?}");
            if let Err(error) = result {
                let error = error.to_string();
                assert!(error.contains("grpc_addr"), "{error}");
                assert!(error.contains("allow_insecure_bind"), "{error}");
            }
        }
    }

    #[test]
    fn access_settings_name_the_key() {
        let cases = [
            (
                "TOKEND_TLS_CERT_FILE",
                "/nonexistent/cert.pem",
                "tls_key_file",
            ),
            (
                "TOKEND_TLS_KEY_FILE",
                "/nonexistent/key.pem",
                "tls_cert_file",
            ),
            (
                "TOKEND_TLS_CLIENT_CA_FILE",
                "/nonexistent/ca.pem",
                "tls_client_ca_file",
            ),
            ("TOKEND_API_KEYS_FILE", "/nonexistent/keys", "api_keys_file"),
            ("TOKEND_ALLOW_INSECURE_BIND", "maybe", "allow_insecure_bind"),
        ];
        for (name, value, key) in cases {
            let mut vars = CREDENTIALS.to_vec();
            vars.push((name, value));
            let error = load(None, &vars).unwrap_err().to_string();
            assert!(error.contains(key), "{name}={value}: {error}");
        }
    }

    #[test]
    fn access_settings_load_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(["localhost".to_owned()]).unwrap();
        let cert_file = dir.path().join("cert.pem");
        let key_file = dir.path().join("key.pem");
        let keys_file = dir.path().join("keys");
        fs::write(&cert_file, cert.cert.pem()).unwrap();
        fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();
        fs::write(&keys_file, "admin a-plain-key-of-20-bytes ops\n").unwrap();
        let config = dir.path().join("tokend.toml");
        fs::write(
            &config,
            format!(
                "grpc_addr = \"0.0.0.0:50051\"\ntls_cert_file = {:?}\ntls_key_file = {:?}\n\
                 api_keys_file = {:?}\nallow_insecure_bind = false\n",
                cert_file, key_file, keys_file
            ),
        )
        .unwrap();
        let settings = load(Some(&config), &CREDENTIALS).unwrap();
        assert!(settings.access.tls.is_some());
        assert_eq!(settings.access.api_keys.as_ref().unwrap().len(), 1);
        assert!(!format!("{settings:?}").contains("PRIVATE KEY"));
    }
}
