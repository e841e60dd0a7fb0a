//! tokend keeps Tiki Tini App user tokens valid and serves them over gRPC.
//!
//! A request flows from [`grpc`] to the [`tokens`] manager, which reads the [`store`],
//! calls Tiki through [`tiki`] when a refresh is needed, and commits before it responds.
//! The [`scheduler`] enters the manager like any other caller, following the timing
//! rules in [`refresh`]. [`server`] wires these from the [`settings`]; [`emulator`] is a
//! strict stand-in for Tiki used by the tests and by [`sandbox`] mode.

#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod cli;
pub mod emulator;
pub mod failpoint;
pub mod grpc;
pub mod reencrypt;
pub mod refresh;
pub mod sandbox;
pub mod scheduler;
pub mod server;
pub mod settings;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod tiki;
pub mod tokens;

/// Code generated from `proto/tokend/v1/tokend.proto`.
pub mod proto {
    #![allow(missing_debug_implementations, clippy::all)]
    tonic::include_proto!("tokend.v1");

    /// The encoded descriptors of tokend's proto and its imports, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/tokend_descriptor.bin"));

    impl std::fmt::Debug for ExchangeAuthCodeRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("ExchangeAuthCodeRequest")
                .field("user_id", &self.user_id)
                .field("auth_code", &"[redacted]")
                .finish()
        }
    }

    impl std::fmt::Debug for AccessToken {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("AccessToken")
                .field("access_token", &"[redacted]")
                .field("expires_at", &self.expires_at)
                .field("scopes", &self.scopes)
                .finish()
        }
    }

    // Skipping the generated `Debug` of a message skips its oneof's too.
    impl std::fmt::Debug for import_token_set_request::Expiry {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Self::ExpiresAt(time) => f.debug_tuple("ExpiresAt").field(time).finish(),
                Self::ExpiresIn(seconds) => f.debug_tuple("ExpiresIn").field(seconds).finish(),
            }
        }
    }

    impl std::fmt::Debug for ImportTokenSetRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("ImportTokenSetRequest")
                .field("user_id", &self.user_id)
                .field("access_token", &"[redacted]")
                .field("refresh_token", &"[redacted]")
                .field("expiry", &self.expiry)
                .field("scopes", &self.scopes)
                .field("replace_existing", &self.replace_existing)
                .finish()
        }
    }
}
