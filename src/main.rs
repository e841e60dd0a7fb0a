//! The `tokend` binary: parses arguments, loads settings, starts logging and hands over
//! to the library.

use std::{net::SocketAddr, process::ExitCode};

use clap::Parser;
use tokend::{
    cli::{Cli, Command, run_client},
    sandbox,
    server::Daemon,
    settings::{self, Settings},
    systemd, telemetry,
};

/// Exit code for invalid settings (EX_CONFIG from sysexits.h).
const EXIT_CONFIG: u8 = 78;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let Command::Serve(args) = cli.command else {
        return run_client(cli.command).await;
    };

    telemetry::init_logging(args.log_format);
    if args.sandbox {
        let addrs = sandbox_addr("grpc_addr", settings::DEFAULT_GRPC_ADDR).and_then(|grpc| {
            sandbox_addr("admin_addr", settings::DEFAULT_ADMIN_ADDR).map(|admin| (grpc, admin))
        });
        let (grpc_addr, admin_addr) = match addrs {
            Ok(addrs) => addrs,
            Err(message) => {
                eprintln!("error: {message}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        return report(
            sandbox::run(
                grpc_addr,
                admin_addr,
                args.emulator_addr,
                args.token_lifetime,
            )
            .await,
        );
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
    let notifier = systemd::spawn(
        daemon.grpc_addr(),
        daemon.admin_state().clone(),
        daemon.shutdown_started(),
    );
    let result = daemon.run_until_signal().await;
    if let Some(notifier) = notifier {
        notifier.abort();
    }
    report(result)
}

/// Reads the address setting `key` from its environment variable for sandbox mode, which
/// reads no other settings.
fn sandbox_addr(key: &str, default: &str) -> Result<SocketAddr, String> {
    let variable = settings::variable_name(key);
    let text = std::env::var(&variable).unwrap_or_else(|_| default.to_owned());
    text.parse().map_err(|_| {
        format!(
            "invalid setting {key}: {variable}={text:?} is not an IP address and port such as {default}"
        )
    })
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
