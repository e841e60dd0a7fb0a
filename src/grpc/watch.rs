//! The `WatchAccessToken` stream: the current access token first, then every new one
//! that a refresh or exchange stores, here or on another replica.
//!
//! A watch only follows the token manager's change announcements and re-reads its
//! token set when one concerns it, so it never refreshes by itself. It ends when the
//! user must consent again (after a status message), when the token set is deleted
//! (NOT_FOUND), when the caller leaves, and when shutdown starts (UNAVAILABLE).

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use secrecy::ExposeSecret;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use super::{WatchStream, access_token_message, to_status};
use crate::{
    proto,
    store::{TokenSetKey, TokenStatus},
    tokens::{ServedToken, TokenError, TokenManager, TokenSetChange},
};

/// Messages buffered for a slow caller before the watch waits for it.
const WATCH_BUFFER: usize = 4;

/// Wait before reading the token set again after the store failed.
const STORE_RETRY_DELAY: Duration = Duration::from_secs(1);

type Item = Result<proto::WatchAccessTokenResponse, tonic::Status>;

/// Starts a watch of `key`'s access token. Fails as `GetAccessToken` does when no first
/// token can be served.
pub async fn start(
    manager: Arc<TokenManager>,
    key: TokenSetKey,
    min_valid_seconds: u32,
    shutdown: CancellationToken,
) -> Result<WatchStream, TokenError> {
    // Subscribing before the first read means no change after it can be missed.
    let changes = manager.subscribe_changes();
    let first = manager.access_token(&key, min_valid_seconds).await?;

    let (sender, receiver) = mpsc::channel(WATCH_BUFFER);
    let message = token_message(&first);
    // The channel is new and empty, so this cannot fail for lack of room.
    let _ = sender.try_send(Ok(message));
    let span = info_span!("WatchAccessToken", app = %key.app, user_id = %key.user_id);
    let watch = Watch {
        manager,
        key,
        last: first,
        sender,
        shutdown,
    };
    tokio::spawn(watch.follow(changes).instrument(span));
    Ok(Box::pin(ReceiverStream::new(receiver)))
}

/// The action a watch takes after reading its token set.
enum Step {
    Send(ServedToken),
    Wait,
    End(Item),
}

struct Watch {
    manager: Arc<TokenManager>,
    key: TokenSetKey,
    /// The access token sent last.
    last: ServedToken,
    sender: mpsc::Sender<Item>,
    shutdown: CancellationToken,
}

impl Watch {
    async fn follow(mut self, mut changes: broadcast::Receiver<TokenSetChange>) {
        loop {
            let change = tokio::select! {
                () = self.shutdown.cancelled() => return self.end_for_shutdown().await,
                () = self.sender.closed() => {
                    debug!("watcher left");
                    return;
                }
                change = changes.recv() => change,
            };
            match change {
                Ok(TokenSetChange::One(changed)) if changed != self.key => continue,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }

            let item = match self.next_step().await {
                Step::Wait => continue,
                Step::Send(token) => {
                    let message = token_message(&token);
                    self.last = token;
                    Ok(message)
                }
                Step::End(item) => {
                    self.send(item).await;
                    return;
                }
            };
            if !self.send(item).await {
                if self.shutdown.is_cancelled() {
                    self.end_for_shutdown().await;
                }
                return;
            }
        }
    }

    /// Reads the token set, retrying while the store fails, and decides what to send.
    async fn next_step(&self) -> Step {
        loop {
            let set = match self.manager.token_set(&self.key).await {
                Ok(set) => set,
                Err(error @ TokenError::NotFound(_)) => return Step::End(Err(to_status(error))),
                Err(error) => {
                    warn!(%error, "reading a watched token set failed; retrying");
                    tokio::select! {
                        () = self.shutdown.cancelled() => return Step::Wait,
                        () = tokio::time::sleep(STORE_RETRY_DELAY) => continue,
                    }
                }
            };

            let now = Utc::now();
            if set.status == TokenStatus::ReauthRequired {
                let change = proto::TokenStatusChange {
                    status: proto::TokenStatus::ReauthRequired.into(),
                    reason: set.last_error.clone().unwrap_or_default(),
                };
                let event = proto::watch_access_token_response::Event::StatusChange(change);
                return Step::End(Ok(proto::WatchAccessTokenResponse { event: Some(event) }));
            }
            // A claimed token set is being refreshed, and the write that ends the
            // refresh is announced too.
            let unchanged =
                set.access_token.expose_secret() == self.last.access_token.expose_secret();
            if set.is_claimed(now) || unchanged || set.servable_for(now) <= chrono::Duration::zero()
            {
                return Step::Wait;
            }
            return Step::Send(ServedToken::from_set(&set));
        }
    }

    /// Sends one message unless the caller left or shutdown started; returns whether it
    /// was sent.
    async fn send(&self, item: Item) -> bool {
        tokio::select! {
            sent = self.sender.send(item) => sent.is_ok(),
            () = self.shutdown.cancelled() => false,
        }
    }

    async fn end_for_shutdown(&self) {
        debug!("ending the watch for shutdown");
        let status = tonic::Status::unavailable(
            "tokend is shutting down; watch again, on another replica if there is one",
        );
        // A caller that reads nothing must not hold up shutdown.
        let _ = self.sender.try_send(Err(status));
    }
}

fn token_message(token: &ServedToken) -> proto::WatchAccessTokenResponse {
    let event = proto::watch_access_token_response::Event::AccessToken(access_token_message(token));
    proto::WatchAccessTokenResponse { event: Some(event) }
}
