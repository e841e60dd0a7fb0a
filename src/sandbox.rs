//! Sandbox mode: the daemon on its own SQLite file against an in-process Tiki emulator
//! with one-minute tokens, so that a newcomer can watch exchanges and refreshes without
//! Tiki credentials.

use std::{fs, net::SocketAddr, path::Path, time::Duration};

use anyhow::Context as _;
use secrecy::SecretString;
use tracing::info;

use crate::{
    emulator::{Emulator, EmulatorConfig},
    server::Daemon,
    settings::{AccessSettings, Settings},
    store::sqlite::lock_database,
};

/// The sandbox's database file, in the working directory.
pub const SANDBOX_DATABASE: &str = "tokend-sandbox.db";

/// Default lifetime of the sandbox's access tokens, in seconds.
pub const SANDBOX_EXPIRES_IN: u64 = 60;

/// Runs the sandbox, whose access tokens live `expires_in` seconds, until SIGINT or
/// SIGTERM.
pub async fn run(
    grpc_addr: SocketAddr,
    admin_addr: SocketAddr,
    emulator_addr: SocketAddr,
    expires_in: u64,
) -> anyhow::Result<()> {
    // The sandbox has no TLS and no API keys, so it serves only this host.
    if !grpc_addr.ip().is_loopback() {
        anyhow::bail!(
            "the sandbox serves tokens without TLS or API keys, so it binds only loopback \
             addresses; set TOKEND_GRPC_ADDR to one such as 127.0.0.1:50051 instead of {grpc_addr}"
        );
    }
    // The emulator keeps its token families in memory, so tokens stored by an earlier
    // sandbox run would be unknown to it and fail their first refresh. The database's
    // lock is held while the files go, so that a running sandbox keeps its database.
    let lock = lock_database(Path::new(SANDBOX_DATABASE))
        .context("another sandbox seems to be running in this directory; stop it first")?;
    for suffix in ["", "-wal", "-shm"] {
        let path = format!("{SANDBOX_DATABASE}{suffix}");
        match fs::remove_file(&path) {
            Ok(()) => info!(path, "removed the previous sandbox database"),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error).with_context(|| format!("removing {path} failed")),
        }
    }
    drop(lock);

    let config = EmulatorConfig {
        expires_in,
        ..EmulatorConfig::default()
    };
    let settings = Settings {
        client_id: config.client_id.clone(),
        client_secret: SecretString::from(config.client_secret.clone()),
        tiki_graphql_url: String::new(),
        database_url: format!("sqlite://{SANDBOX_DATABASE}"),
        grpc_addr,
        admin_addr,
        max_tick_age: Duration::from_secs(60),
        refresh_before: Duration::from_secs(300),
        http_timeout: Duration::from_secs(10),
        refresh_concurrency: 16,
        cache_capacity: 100_000,
        shutdown_grace: Duration::from_secs(10),
        refresh_lease: Duration::from_secs(60),
        replica_id: "sandbox".to_owned(),
        access: AccessSettings::default(),
    };
    let emulator = Emulator::start_on(emulator_addr, config)
        .await
        .with_context(|| {
            format!("starting the Tiki emulator on {emulator_addr} failed; pass --emulator-addr with a free address")
        })?;
    let settings = Settings {
        tiki_graphql_url: emulator.graphql_url(),
        ..settings
    };
    let daemon = Daemon::start(&settings).await?;
    println!(
        "{}",
        walkthrough(daemon.grpc_addr(), emulator.addr(), expires_in)
    );

    let result = daemon.run_until_signal().await;
    emulator.shutdown().await;
    result
}

fn walkthrough(grpc_addr: SocketAddr, emulator_addr: SocketAddr, expires_in: u64) -> String {
    // `cargo run` sets CARGO for the program it runs. Otherwise repeat the command as
    // it was typed, which works whether or not tokend is on the PATH.
    let program = if std::env::var_os("CARGO").is_some() {
        "cargo run -q --".to_owned()
    } else {
        std::env::args()
            .next()
            .unwrap_or_else(|| "tokend".to_owned())
    };
    let addr = if grpc_addr.to_string() == crate::settings::DEFAULT_GRPC_ADDR {
        String::new()
    } else {
        format!(" --addr {grpc_addr}")
    };
    // The refresh policy never refreshes before halfway through a token's lifetime.
    let refresh_interval = expires_in / 2;
    format!(
        "\n\
         tokend sandbox is running\n\
         \x20 gRPC service:   {grpc_addr}\n\
         \x20 Tiki emulator:  http://{emulator_addr} (access tokens live {expires_in} s)\n\
         \x20 database:       {SANDBOX_DATABASE}\n\
         \n\
         Try it from another terminal in this directory:\n\
         \x20 code=$(curl -s -X POST http://{emulator_addr}/emulator/auth-codes)\n\
         \x20 {program} exchange{addr} --user-id alice --auth-code \"$code\"\n\
         \x20 {program} token{addr} --user-id alice\n\
         \x20 curl -s -H \"Authorization: Bearer $({program} token{addr} --user-id alice)\" http://{emulator_addr}/ecom/v1/customers/profile\n\
         \x20 {program} show{addr} --user-id alice\n\
         \x20 sqlite3 -header -column {SANDBOX_DATABASE} 'select user_id, status, expires_at, next_refresh_at, refreshed_at from token_sets'\n\
         \x20 {program} delete{addr} --user-id alice\n\
         \n\
         This log shows \"token set refreshed\" about every {refresh_interval} seconds, before each token expires.\n\
         Stop the sandbox with Ctrl-C.\n"
    )
}
