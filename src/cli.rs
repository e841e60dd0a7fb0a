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
        /// Seconds the token must stay valid; 0 means 60.
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
    /// Run against an in-process Tiki emulator with short token lifetimes, on the
    /// SQLite file tokend-sandbox.db, without real credentials.
    #[arg(long)]
    pub sandbox: bool,
    /// Address of the sandbox's Tiki emulator.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50052")]
    pub emulator_addr: std::net::SocketAddr,
}

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

fn status_message(status: tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

fn print_info(info: &proto::TokenSetInfo) {
    let status = proto::TokenStatus::try_from(info.status)
        .map(|status| status.as_str_name())
        .unwrap_or("unknown");
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
