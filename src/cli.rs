//! The command line. `serve` runs the daemon, and `api-key`, `migrate` and
//! `check-config` work locally. The other subcommands call a running daemon over gRPC,
//! as any sibling service would.

mod client;
mod local;

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};

use crate::{
    settings::{DEFAULT_DATABASE_URL, DEFAULT_GRPC_ADDR},
    telemetry::LogFormat,
};

/// tokend keeps Tiki Tini App user tokens valid and serves them over gRPC.
#[derive(Debug, Parser)]
#[command(name = "tokend", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    #[command(after_help = SERVE_HELP)]
    Serve(ServeArgs),
    /// Exchange an auth code for a user's token set.
    Exchange {
        #[command(flatten)]
        target: Target,
        /// The auth code from my.getAuthCode. Codes may start with `-`, so the value is
        /// taken as it is.
        #[arg(long, allow_hyphen_values = true)]
        auth_code: String,
    },
    /// Print a user's current access token.
    Token {
        #[command(flatten)]
        target: Target,
        /// Seconds the token must stay valid; 0 means 60. Values above the token's
        /// lifetime minus 60 s (at least half the lifetime) are capped to that.
        #[arg(long, default_value_t = 0)]
        min_valid: u32,
    },
    /// Print a user's token set metadata (never a token).
    #[command(visible_alias = "get")]
    Show {
        #[command(flatten)]
        target: Target,
    },
    /// Delete a user's token set.
    Delete {
        #[command(flatten)]
        target: Target,
    },
    /// Refresh a user's token set now and print when the new access token expires.
    Refresh {
        #[command(flatten)]
        target: Target,
    },
    /// List token sets' metadata (never a token), ordered by user id.
    List {
        #[command(flatten)]
        connection: Connection,
        /// Only token sets with this status; repeat for several.
        #[arg(long = "status", value_name = "STATUS", value_parser = STATUSES)]
        statuses: Vec<String>,
        /// Token sets per page, 1 to 1000; 0 lets the daemon choose (100).
        #[arg(long, default_value_t = 0)]
        page_size: i32,
        /// The page token that the previous page printed on stderr.
        #[arg(long, default_value = "")]
        page_token: String,
        /// Follow the page tokens and print every page.
        #[arg(long, conflicts_with = "page_token")]
        all: bool,
    },
    /// Store a token set obtained elsewhere, read as JSON from stdin:
    /// {"access_token": "...", "refresh_token": "...", "expires_in": 3600, "scopes": [...]}
    /// (`expires_at` as RFC 3339 may replace `expires_in`; `refresh_token` may be absent).
    Import {
        #[command(flatten)]
        target: Target,
        /// Replace a token set the user already has.
        #[arg(long)]
        replace: bool,
    },
    /// Print a user's access token, then each new one after every refresh, one per line
    /// as `EXPIRES_AT TOKEN`.
    Watch {
        #[command(flatten)]
        target: Target,
        /// Seconds the first token must stay valid, as for `token`.
        #[arg(long, default_value_t = 0)]
        min_valid: u32,
        /// Exit after this many tokens; 0 follows until the stream ends.
        #[arg(long, default_value_t = 0)]
        count: u32,
    },
    /// Generate an API key. Prints the key, then the line that grants it the role in
    /// the api_keys_file; the line holds only the key's SHA-256.
    ApiKey {
        /// The role the key grants.
        #[arg(long, value_parser = ["reader", "admin"])]
        role: String,
        /// A name for the caller, shown in the daemon's logs; no spaces.
        #[arg(long)]
        name: Option<String>,
    },
    /// Apply the database migrations and exit.
    Migrate {
        /// sqlite://PATH or postgres://...
        #[arg(long, env = "TOKEND_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
        database_url: String,
    },
    /// Validate the daemon's settings, reach the database and Tiki, and print what was
    /// checked. Tiki is asked to refresh a made-up refresh token, which shows whether it
    /// accepts the client credentials. Exits non-zero when a check fails.
    CheckConfig {
        /// TOML settings file, as for `serve`.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Re-encrypt every stored token set that is not under the first encryption key.
    /// Runs beside the daemon on PostgreSQL; on SQLite, stop the daemon first.
    Reencrypt(ReencryptArgs),
}

#[derive(Debug, Args)]
pub struct ReencryptArgs {
    /// TOML settings file; TOKEND_* environment variables override its keys. Only the
    /// database and encryption settings are read.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Rows read and re-encrypted per batch.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
}

/// Status names that `list --status` accepts, as the database stores them.
const STATUSES: [&str; 3] = ["active", "refresh_failing", "reauth_required"];

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML settings file; TOKEND_* environment variables override its keys.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Run against an in-process Tiki emulator with one-minute tokens, on a fresh
    /// SQLite file tokend-sandbox.db, without real credentials. Only TOKEND_GRPC_ADDR,
    /// TOKEND_ADMIN_ADDR, TOKEND_LOG and TOKEND_LOG_FORMAT apply; the other settings
    /// are ignored.
    #[arg(long)]
    pub sandbox: bool,
    /// Address of the sandbox's Tiki emulator.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:50052",
        requires = "sandbox"
    )]
    pub emulator_addr: std::net::SocketAddr,
    /// Lifetime of the sandbox's access tokens, in seconds. tokend refreshes them
    /// halfway through, so a short lifetime shows refreshes quickly.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = crate::sandbox::SANDBOX_EXPIRES_IN,
        value_parser = clap::value_parser!(u64).range(2..=86_400),
        requires = "sandbox"
    )]
    pub token_lifetime: u64,
    /// Log line format on stderr: text for people, json for one JSON object per line.
    #[arg(long, value_enum, env = "TOKEND_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

/// Settings help shown under `tokend serve --help`.
const SERVE_HELP: &str = "\
Settings come from the --config file and from these environment variables, which win:
  TOKEND_CLIENT_ID            the Tini App's client key (required)
  TOKEND_CLIENT_SECRET        the client secret, or
  TOKEND_CLIENT_SECRET_FILE   a file holding it (required, one of the two)
  TOKEND_TIKI_GRAPHQL_URL     Tiki's generation-1 endpoint
  TOKEND_DATABASE_URL         sqlite://PATH (default sqlite://tokend.db) or postgres://...
  TOKEND_GRPC_ADDR            listen address (default 127.0.0.1:50051)
  TOKEND_ADMIN_ADDR           HTTP address of /metrics, /healthz, /readyz (default 127.0.0.1:9090)
  TOKEND_MAX_TICK_AGE         seconds without a scheduler pass before /healthz fails (default 60)
  TOKEND_REFRESH_BEFORE       seconds before expiry to refresh (default 300)
  TOKEND_HTTP_TIMEOUT         seconds per request to Tiki (default 10)
  TOKEND_REFRESH_CONCURRENCY  refreshes in flight at once (default 16)
  TOKEND_CACHE_CAPACITY       token sets cached in memory (default 100000)
  TOKEND_SHUTDOWN_GRACE       seconds to finish gRPC calls and refreshes on shutdown (default 30)
  TOKEND_REFRESH_LEASE        seconds a claim lasts (default 60)
  TOKEND_REPLICA_ID           this replica's name (default HOST-PID)
  TOKEND_TLS_CERT_FILE        PEM certificate chain for TLS on the gRPC port
  TOKEND_TLS_KEY_FILE         PEM private key of that certificate
  TOKEND_TLS_CLIENT_CA_FILE   PEM CA that client certificates must chain to (mTLS)
  TOKEND_API_KEYS_FILE        API keys file, one `ROLE sha256:HEX [NAME]` per line
  TOKEND_ALLOW_INSECURE_BIND  true to allow a non-loopback address without TLS or keys
  TOKEND_ENCRYPTION_KEY       base64 32-byte keys, comma separated; the first encrypts
                              (required on PostgreSQL; SQLite defaults to DATABASE.key)
  TOKEND_ENCRYPTION_KEY_FILE  a file with one such key per line (instead of the above)
  TOKEND_ALLOW_PLAINTEXT_STORAGE  true stores tokens unencrypted when no key is set
                              (default false)
  TOKEND_EXCHANGE_RETRY_WINDOW  seconds a retried auth code gets the stored token set
                              (default 600)
  TOKEND_TIKI_MAX_CONCURRENT_REQUESTS
                              requests to Tiki in flight at once (default 32)
  TOKEND_TIKI_REQUESTS_PER_SECOND
                              requests to Tiki started per second, 0 for no limit
                              (default 50)
  TOKEND_TIKI_CREDENTIALS_RETRY
                              seconds requests pause after Tiki rejected the client
                              credentials (default 60)
  TOKEND_LOG                  log filter (default info)
  TOKEND_LOG_FORMAT           log format, text or json (default text; same as --log-format)
The config file uses the same names in lower case without TOKEND_, e.g. grpc_addr.
Invalid settings exit with code 78 before any port is bound.";

/// The address, TLS files and API key with which a client subcommand reaches the
/// daemon.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The daemon's gRPC address: HOST:PORT, http://HOST:PORT, or https://HOST:PORT for
    /// TLS (also chosen by any TLS option).
    #[arg(long, env = "TOKEND_GRPC_ADDR", default_value = DEFAULT_GRPC_ADDR)]
    pub addr: String,
    /// API key sent as `authorization: Bearer KEY`. Prefer the variable: other users
    /// of the host can read command lines.
    #[arg(long, env = "TOKEND_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// PEM CA certificate that signed the daemon's certificate; turns on TLS.
    #[arg(long, env = "TOKEND_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for a daemon that requires one.
    #[arg(long, env = "TOKEND_CLIENT_CERT_FILE", value_name = "FILE")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[arg(long, env = "TOKEND_CLIENT_KEY_FILE", value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// The name the daemon's certificate carries, when it differs from the address.
    #[arg(long, env = "TOKEND_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

/// The daemon and user a client subcommand addresses.
#[derive(Debug, Args)]
pub struct Target {
    #[command(flatten)]
    pub connection: Connection,
    /// The user's id in the calling service.
    #[arg(long)]
    pub user_id: String,
}

/// Runs a subcommand other than `serve` and returns the process exit code.
pub async fn run_client(command: Command) -> ExitCode {
    let result = match command {
        Command::ApiKey { role, name } => local::api_key(&role, name.as_deref()),
        Command::Migrate { database_url } => local::migrate(&database_url).await,
        Command::CheckConfig { config } => local::check_config(config.as_deref()).await,
        command => client::call(command).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
