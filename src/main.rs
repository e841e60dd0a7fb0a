//! The `tokend` binary: parses arguments, loads settings, starts logging and hands over
//! to the library.

use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use tokend::{
    cli::{Cli, Command, ReencryptArgs, run_client},
    reencrypt, sandbox,
    server::Daemon,
    settings::{self, Settings, SettingsError},
};
use tracing_subscriber::EnvFilter;

/// Exit code for invalid settings (EX_CONFIG from sysexits.h).
const EXIT_CONFIG: u8 = 78;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Serve(args) => args,
        Command::Reencrypt(args) => {
            init_logging();
            return reencrypt(&args).await;
        }
        command => return run_client(command).await,
    };

    init_logging();
    if args.sandbox {
        let grpc_addr = match std::env::var("TOKEND_GRPC_ADDR") {
            Ok(addr) => match addr.parse() {
                Ok(addr) => addr,
                Err(_) => {
                    eprintln!(
                        "error: invalid setting grpc_addr: TOKEND_GRPC_ADDR={addr:?} is not an IP address and port such as 127.0.0.1:50051"
                    );
                    return ExitCode::from(EXIT_CONFIG);
                }
            },
            Err(_) => tokend::settings::DEFAULT_GRPC_ADDR
                .parse()
                .expect("the default address is valid"),
        };
        return report(sandbox::run(grpc_addr, args.emulator_addr).await);
    }

    let settings = match Settings::load(args.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let daemon = match Daemon::start(&settings).await {
        Ok(daemon) => daemon,
        Err(error) => return report(Err(error)),
    };
    report(daemon.run_until_signal().await)
}

/// Runs `tokend reencrypt`: exit 78 for invalid settings, 1 when it failed or some
/// rows could not be decrypted.
async fn reencrypt(args: &ReencryptArgs) -> ExitCode {
    match reencrypt::run(args.config.as_deref(), args.batch_size).await {
        Ok(summary) if summary.failed == 0 => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(error) if error.is::<SettingsError>() => {
            eprintln!("error: {error}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(error) => report(Err(error)),
    }
}

/// Log filter used when TOKEND_LOG is unset; the cron crate's own start-up lines are
/// noise at info level.
const DEFAULT_LOG_FILTER: &str = "info,tokio_cron_scheduler=warn";

fn init_logging() {
    let (filter, invalid) = match std::env::var("TOKEND_LOG") {
        Ok(text) => match EnvFilter::try_new(&text) {
            Ok(filter) => (filter, None),
            Err(error) => (EnvFilter::new(DEFAULT_LOG_FILTER), Some((text, error))),
        },
        Err(_) => (EnvFilter::new(DEFAULT_LOG_FILTER), None),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Some((text, error)) = invalid {
        tracing::warn!(filter = %text, %error, "TOKEND_LOG is invalid; logging at the default level");
    }
    for name in settings::unknown_variables() {
        tracing::warn!(variable = %name, "unknown TOKEND_ variable ignored; check its spelling");
    }
}

/// Logs a fatal error once, through the logger that already writes to stderr.
fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}
