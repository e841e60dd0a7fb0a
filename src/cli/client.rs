//! The client subcommands: each calls the daemon over gRPC, with TLS and an API key when
//! the connection options set them.

use std::io::Read as _;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use tonic::{
    Request, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

use super::{Command, Connection, Target};
use crate::{
    access::tls::ClientTlsFiles,
    proto::{self, token_service_client::TokenServiceClient},
};

type Client = TokenServiceClient<InterceptedService<Channel, BearerKey>>;

/// Adds `authorization: Bearer KEY` to every request when a key is configured.
#[derive(Clone)]
struct BearerKey(Option<AsciiMetadataValue>);

impl Interceptor for BearerKey {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Runs a subcommand that calls the daemon.
pub(super) async fn call(command: Command) -> Result<(), String> {
    match command {
        Command::Exchange { target, auth_code } => {
            let mut client = connect(&target.connection).await?;
            let request = proto::ExchangeAuthCodeRequest {
                user_id: target.user_id,
                auth_code,
            };
            let info = client
                .exchange_auth_code(request)
                .await
                .map_err(status_message(&target.connection))?;
            print_info(&info.into_inner());
        }
        Command::Token { target, min_valid } => {
            let mut client = connect(&target.connection).await?;
            let request = proto::GetAccessTokenRequest {
                user_id: target.user_id,
                min_valid_seconds: min_valid,
            };
            let token = client
                .get_access_token(request)
                .await
                .map_err(status_message(&target.connection))?;
            println!("{}", token.into_inner().access_token);
        }
        Command::Show { target } => {
            let mut client = connect(&target.connection).await?;
            let request = proto::GetTokenSetRequest {
                user_id: target.user_id,
            };
            let info = client
                .get_token_set(request)
                .await
                .map_err(status_message(&target.connection))?;
            print_info(&info.into_inner());
        }
        Command::Delete { target } => {
            let mut client = connect(&target.connection).await?;
            let request = proto::DeleteTokenSetRequest {
                user_id: target.user_id.clone(),
            };
            client
                .delete_token_set(request)
                .await
                .map_err(status_message(&target.connection))?;
            println!("deleted the token set of {}", target.user_id);
        }
        Command::Refresh { target } => refresh(target).await?,
        Command::List {
            connection,
            statuses,
            page_size,
            page_token,
            all,
        } => list(&connection, &statuses, page_size, page_token, all).await?,
        Command::Import { target, replace } => import(target, replace).await?,
        Command::Watch {
            target,
            min_valid,
            count,
        } => watch(target, min_valid, count).await?,
        Command::Serve(_)
        | Command::Reencrypt(_)
        | Command::ApiKey { .. }
        | Command::Migrate { .. }
        | Command::CheckConfig { .. } => {
            return Err("this subcommand does not call the daemon".to_owned());
        }
    }
    Ok(())
}

/// Returns a closure that turns a status into a message naming the daemon.
fn status_message(connection: &Connection) -> impl Fn(Status) -> String + use<> {
    let addr = connection.addr.clone();
    move |status: Status| {
        format!(
            "tokend at {addr} returned {:?}: {}",
            status.code(),
            status.message()
        )
    }
}

async fn connect(connection: &Connection) -> Result<Client, String> {
    let tls_files = ClientTlsFiles {
        ca_file: connection.ca_file.as_deref(),
        cert_file: connection.cert_file.as_deref(),
        key_file: connection.key_file.as_deref(),
        server_name: connection.tls_server_name.as_deref(),
    };
    let addr = connection.addr.as_str();
    let use_tls = addr.starts_with("https://") || tls_files.any();
    let url = match addr.split_once("://") {
        Some((_, rest)) if use_tls => format!("https://{rest}"),
        Some(_) => addr.to_owned(),
        None if use_tls => format!("https://{addr}"),
        None => format!("http://{addr}"),
    };

    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|error| format!("--addr {addr:?} is not a valid address: {error}"))?;
    if use_tls {
        endpoint = endpoint
            .tls_config(tls_files.client_config()?)
            .map_err(|error| format!("configuring TLS for {url} failed: {error}"))?;
    }
    let channel = endpoint.connect().await.map_err(|error| {
        format!(
            "connecting to tokend at {url} failed: {}; is `tokend serve` running, and do \
             the TLS options match its settings?",
            error_chain(&error)
        )
    })?;

    let key = match &connection.api_key {
        Some(key) => {
            let mut value: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {key}"))
                .map_err(|_| {
                    "the API key contains characters that are not printable ASCII".to_owned()
                })?;
            value.set_sensitive(true);
            Some(value)
        }
        None => None,
    };
    Ok(TokenServiceClient::with_interceptor(
        channel,
        BearerKey(key),
    ))
}

/// Joins an error and its sources, because tonic's transport errors put the cause
/// (a refused connection, a bad certificate) in the source chain.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn refresh(target: Target) -> Result<(), String> {
    let mut client = connect(&target.connection).await?;
    let request = proto::RefreshAccessTokenRequest {
        user_id: target.user_id.clone(),
    };
    let token = client
        .refresh_access_token(request)
        .await
        .map_err(status_message(&target.connection))?
        .into_inner();
    println!(
        "refreshed the token set of {}; the access token expires at {}",
        target.user_id,
        format_time(&token.expires_at)
    );
    Ok(())
}

async fn list(
    connection: &Connection,
    statuses: &[String],
    page_size: i32,
    mut page_token: String,
    all: bool,
) -> Result<(), String> {
    let mut client = connect(connection).await?;
    let statuses: Vec<i32> = statuses
        .iter()
        .map(|name| status_from_name(name) as i32)
        .collect();
    println!("user_id\tstatus\texpires_at\tnext_refresh_at\tfailure_count");
    loop {
        let request = proto::ListTokenSetsRequest {
            page_size,
            page_token,
            statuses: statuses.clone(),
        };
        let page = client
            .list_token_sets(request)
            .await
            .map_err(status_message(connection))?
            .into_inner();
        for info in &page.token_sets {
            println!(
                "{}\t{}\t{}\t{}\t{}",
                info.user_id,
                status_name(info.status),
                format_time(&info.expires_at),
                format_time(&info.next_refresh_at),
                info.failure_count
            );
        }
        if page.next_page_token.is_empty() {
            return Ok(());
        }
        if !all {
            eprintln!(
                "more token sets: pass --page-token {}",
                page.next_page_token
            );
            return Ok(());
        }
        page_token = page.next_page_token;
    }
}

/// A token set to import, in the shape of Tiki's token response.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportInput {
    access_token: String,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    expires_in: Option<i64>,
    #[serde(default)]
    /// RFC 3339, for example 2026-01-31T12:00:00Z.
    expires_at: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
}

async fn import(target: Target, replace: bool) -> Result<(), String> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|error| format!("reading the token set from stdin failed: {error}"))?;
    // serde_json's messages quote no input values, only positions and field names.
    let input: ImportInput = serde_json::from_str(&text).map_err(|error| {
        format!(
            "stdin is not a token set in JSON such as {{\"access_token\": \"...\", \
             \"refresh_token\": \"...\", \"expires_in\": 3600, \"scopes\": [\"offline\"]}}: {error}"
        )
    })?;
    let expiry = match (input.expires_in, input.expires_at) {
        (Some(seconds), None) => proto::import_token_set_request::Expiry::ExpiresIn(seconds),
        (None, Some(text)) => {
            let time = DateTime::parse_from_rfc3339(&text)
                .map_err(|error| format!("expires_at {text:?} is not an RFC 3339 time: {error}"))?;
            proto::import_token_set_request::Expiry::ExpiresAt(prost_types::Timestamp {
                seconds: time.timestamp(),
                nanos: time.timestamp_subsec_nanos() as i32,
            })
        }
        _ => return Err("give exactly one of expires_in and expires_at".to_owned()),
    };

    let mut client = connect(&target.connection).await?;
    let request = proto::ImportTokenSetRequest {
        user_id: target.user_id,
        access_token: input.access_token,
        refresh_token: input.refresh_token.unwrap_or_default(),
        expiry: Some(expiry),
        scopes: input.scopes,
        replace_existing: replace,
    };
    let info = client
        .import_token_set(request)
        .await
        .map_err(status_message(&target.connection))?;
    print_info(&info.into_inner());
    Ok(())
}

async fn watch(target: Target, min_valid: u32, count: u32) -> Result<(), String> {
    use proto::watch_access_token_response::Event;

    let mut client = connect(&target.connection).await?;
    let request = proto::WatchAccessTokenRequest {
        user_id: target.user_id.clone(),
        min_valid_seconds: min_valid,
    };
    let mut stream = client
        .watch_access_token(request)
        .await
        .map_err(status_message(&target.connection))?
        .into_inner();
    let mut printed = 0;
    while let Some(message) = stream
        .message()
        .await
        .map_err(status_message(&target.connection))?
    {
        match message.event {
            Some(Event::AccessToken(token)) => {
                println!("{} {}", format_time(&token.expires_at), token.access_token);
                printed += 1;
                if count != 0 && printed >= count {
                    return Ok(());
                }
            }
            Some(Event::StatusChange(change)) => {
                eprintln!(
                    "the token set of {} is now {}: {}",
                    target.user_id,
                    status_name(change.status),
                    change.reason
                );
            }
            None => {}
        }
    }
    Ok(())
}

fn status_from_name(name: &str) -> proto::TokenStatus {
    let upper = format!("TOKEN_STATUS_{}", name.to_ascii_uppercase());
    proto::TokenStatus::from_str_name(&upper).unwrap_or(proto::TokenStatus::Unspecified)
}

/// Returns the status as the database stores it, e.g. `reauth_required`.
fn status_name(status: i32) -> String {
    proto::TokenStatus::try_from(status)
        .map(|status| {
            status
                .as_str_name()
                .trim_start_matches("TOKEN_STATUS_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn format_time(timestamp: &Option<prost_types::Timestamp>) -> String {
    timestamp
        .as_ref()
        .and_then(|ts| DateTime::<Utc>::from_timestamp(ts.seconds, ts.nanos.max(0) as u32))
        .map(|time| time.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| "-".to_owned())
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
