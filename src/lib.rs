//! tokend keeps Tiki Tini App user tokens valid and serves them over gRPC.

pub mod tiki;

pub mod proto {
    tonic::include_proto!("tokend.v1");
}
