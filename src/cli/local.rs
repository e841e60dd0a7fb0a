//! The subcommands that work without a running daemon: generating an API key, applying
//! migrations, and checking the settings.

use std::path::Path;

use secrecy::ExposeSecret as _;

use crate::{
    access::{Role, api_keys},
    settings::Settings,
    store,
    tiki::{FailureClass, TokenApi as _, graphql::GraphqlClient},
};

/// Prints a new API key and its line for the API keys file.
pub(super) fn api_key(role: &str, name: Option<&str>) -> Result<(), String> {
    let role = Role::parse(role).ok_or_else(|| format!("unknown role {role:?}"))?;
    if let Some(name) = name
        && (name.is_empty() || name.contains(char::is_whitespace))
    {
        return Err(format!("--name {name:?} must be one word without spaces"));
    }
    let generated = api_keys::generate(role, name);
    println!("{}", generated.key.expose_secret());
    println!("{}", generated.line);
    eprintln!(
        "The first line is the key: give it to the caller (TOKEND_API_KEY); tokend does not \
         store it. Append the second line to the api_keys_file and restart tokend."
    );
    Ok(())
}

/// Applies the migrations of the database at `url`.
pub(super) async fn migrate(url: &str) -> Result<(), String> {
    let redacted = store::redact_url(url);
    // Migrations touch no token, so no key is needed.
    let store = store::connect(url, store::encryption::TokenCipher::plaintext())
        .await
        .map_err(|error| format!("migrating {redacted} failed: {error}"))?;
    store.close().await;
    println!("migrated {redacted}");
    Ok(())
}

/// Checks the settings, the database and Tiki, printing one line per check.
pub(super) async fn check_config(config: Option<&Path>) -> Result<(), String> {
    let settings = Settings::load(config).map_err(|error| error.to_string())?;
    println!("ok   settings are valid");
    println!("     client_id: {}", settings.client_id);
    println!("     grpc_addr: {}", settings.grpc_addr);
    let access = &settings.access;
    println!(
        "     tls: {}, client certificates: {}, api keys: {}",
        on_off(access.tls.is_some()),
        on_off(
            access
                .tls
                .as_ref()
                .is_some_and(|tls| tls.client_ca_pem.is_some())
        ),
        access.api_keys.as_ref().map_or(0, |keys| keys.len())
    );

    let mut failures = 0;
    let redacted = store::redact_url(&settings.database_url);
    match store::probe(&settings.database_url).await {
        Ok(state) => println!("ok   database {redacted}: {state}"),
        Err(error) => {
            failures += 1;
            println!("FAIL database {redacted}: {error}");
        }
    }

    let url = &settings.tiki_graphql_url;
    match check_tiki(&settings).await {
        Ok(()) => println!("ok   Tiki at {url} accepted the client credentials"),
        Err(message) => {
            failures += 1;
            println!("FAIL Tiki at {url}: {message}");
        }
    }

    match failures {
        0 => Ok(()),
        count => Err(format!("{count} check(s) failed")),
    }
}

/// Asks Tiki to refresh a made-up refresh token. Rejecting the token means that Tiki
/// verified the signature, so the client id and secret are right.
async fn check_tiki(settings: &Settings) -> Result<(), String> {
    let client = GraphqlClient::new(
        settings.tiki_graphql_url.clone(),
        settings.client_id.clone(),
        settings.client_secret.clone(),
        settings.http_timeout,
    )
    .map_err(|error| format!("building the HTTP client failed: {error}"))?;
    let probe_token = format!("tokend-check-config-{:016x}", rand::random::<u64>());
    let error = match client.refresh(&probe_token.into()).await {
        Ok(_) => return Err("Tiki accepted a made-up refresh token".to_owned()),
        Err(error) => error,
    };
    match error.class() {
        FailureClass::GrantRejected => Ok(()),
        FailureClass::CredentialsRejected => Err(format!(
            "{error}; check client_id and client_secret against Tini Console"
        )),
        FailureClass::Transient | FailureClass::OutcomeUnknown => Err(format!(
            "{error}; check tiki_graphql_url and the network path to it"
        )),
    }
}

fn on_off(value: bool) -> &'static str {
    if value { "on" } else { "off" }
}
