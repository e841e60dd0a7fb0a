//! The command line: `serve` runs the daemon, and the other subcommands call a running
//! daemon over gRPC, as any sibling service would.

use std::{path::PathBuf, process::ExitCode};

use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Parser, Subcommand};
use tonic::transport::Channel;

use crate::{
    proto::{self, token_service_client::TokenServiceClient},
    settings::DEFAULT_GRPC_ADDR,
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
        /// The auth code from my.getAuthCode.
        #[arg(long)]
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
    Show {
        #[command(flatten)]
        target: Target,
    },
    /// Delete a user's token set.
    Delete {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML settings file; TOKEND_* environment variables override its keys.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Run against an in-process Tiki emulator with one-minute tokens, on a fresh
    /// SQLite file tokend-sandbox.db, without real credentials. Only TOKEND_GRPC_ADDR
    /// and TOKEND_LOG apply; the other settings are ignored.
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
  TOKEND_REFRESH_BEFORE       seconds before expiry to refresh (default 300)
  TOKEND_HTTP_TIMEOUT         seconds per request to Tiki (default 10)
  TOKEND_REFRESH_CONCURRENCY  refreshes in flight at once (default 16)
  TOKEND_CACHE_CAPACITY       token sets cached in memory (default 100000)
  TOKEND_SHUTDOWN_GRACE       seconds to finish refreshes on shutdown (default 30)
  TOKEND_REFRESH_LEASE        seconds a claim lasts (default 60)
  TOKEND_REPLICA_ID           this replica's name (default HOST-PID)
  TOKEND_TIKI_MAX_CONCURRENT_REQUESTS
                              requests to Tiki in flight at once (default 32)
  TOKEND_TIKI_REQUESTS_PER_SECOND
                              requests to Tiki started per second, 0 for no limit
                              (default 50)
  TOKEND_TIKI_CREDENTIALS_RETRY
                              seconds requests pause after Tiki rejected the client
                              credentials (default 60)
  TOKEND_LOG                  log filter (default info)
The config file uses the same names in lower case without TOKEND_, e.g. grpc_addr.
Invalid settings exit with code 78 before any port is bound.";

/// The daemon and user a client subcommand addresses.
#[derive(Debug, Args)]
pub struct Target {
    /// The daemon's gRPC address.
    #[arg(long, env = "TOKEND_GRPC_ADDR", default_value = DEFAULT_GRPC_ADDR)]
    pub addr: String,
    /// The user's id in the calling service.
    #[arg(long)]
    pub user_id: String,
}

/// Runs a client subcommand and returns the process exit code.
pub async fn run_client(command: Command) -> ExitCode {
    match call(command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn call(command: Command) -> Result<(), String> {
    let addr = match &command {
        Command::Serve(_) => String::new(),
        Command::Exchange { target, .. }
        | Command::Token { target, .. }
        | Command::Show { target }
        | Command::Delete { target } => target.addr.clone(),
    };
    let status_message = |status: tonic::Status| {
        format!(
            "tokend at {addr} returned {:?}: {}",
            status.code(),
            status.message()
        )
    };
    match command {
        Command::Serve(_) => Err("serve is not a client subcommand".to_owned()),
        Command::Exchange { target, auth_code } => {
            let mut client = connect(&target.addr).await?;
            let request = proto::ExchangeAuthCodeRequest {
                user_id: target.user_id,
                auth_code,
            };
            let info = client
                .exchange_auth_code(request)
                .await
                .map_err(status_message)?;
            print_info(&info.into_inner());
            Ok(())
        }
        Command::Token { target, min_valid } => {
            let mut client = connect(&target.addr).await?;
            let request = proto::GetAccessTokenRequest {
                user_id: target.user_id,
                min_valid_seconds: min_valid,
            };
            let token = client
                .get_access_token(request)
                .await
                .map_err(status_message)?;
            println!("{}", token.into_inner().access_token);
            Ok(())
        }
        Command::Show { target } => {
            let mut client = connect(&target.addr).await?;
            let request = proto::GetTokenSetRequest {
                user_id: target.user_id,
            };
            let info = client
                .get_token_set(request)
                .await
                .map_err(status_message)?;
            print_info(&info.into_inner());
            Ok(())
        }
        Command::Delete { target } => {
            let mut client = connect(&target.addr).await?;
            let request = proto::DeleteTokenSetRequest {
                user_id: target.user_id.clone(),
            };
            client
                .delete_token_set(request)
                .await
                .map_err(status_message)?;
            println!("deleted the token set of {}", target.user_id);
            Ok(())
        }
    }
}

async fn connect(addr: &str) -> Result<TokenServiceClient<Channel>, String> {
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    TokenServiceClient::connect(url.clone())
        .await
        .map_err(|error| {
            format!("connecting to tokend at {url} failed: {error}; is `tokend serve` running?")
        })
}

fn print_info(info: &proto::TokenSetInfo) {
    // Print the status as the database stores it, e.g. `reauth_required`.
    let status = proto::TokenStatus::try_from(info.status)
        .map(|status| {
            status
                .as_str_name()
                .trim_start_matches("TOKEN_STATUS_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "unknown".to_owned());
    let time = |timestamp: &Option<prost_types::Timestamp>| {
        timestamp
            .as_ref()
            .and_then(|ts| DateTime::<Utc>::from_timestamp(ts.seconds, ts.nanos.max(0) as u32))
            .map(|time| time.to_rfc3339_opts(SecondsFormat::Millis, true))
            .unwrap_or_else(|| "-".to_owned())
    };
    println!("user_id:         {}", info.user_id);
    println!("status:          {status}");
    println!("scopes:          {}", info.scopes.join(" "));
    println!("expires_at:      {}", time(&info.expires_at));
    println!("next_refresh_at: {}", time(&info.next_refresh_at));
    println!("refreshed_at:    {}", time(&info.refreshed_at));
    println!("failure_count:   {}", info.failure_count);
    let last_error = if info.last_error.is_empty() {
        "-"
    } else {
        info.last_error.as_str()
    };
    println!("last_error:      {last_error}");
    println!("created_at:      {}", time(&info.created_at));
    println!("updated_at:      {}", time(&info.updated_at));
}
