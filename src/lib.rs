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
pub mod grpc;
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
}
