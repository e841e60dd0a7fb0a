//! Generates the gRPC code from `proto/` with a pure-Rust compiler, so no system
//! `protoc` is needed.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");

    let descriptors = protox::Compiler::new(["proto"])?
        .include_imports(true)
        .include_source_info(true)
        .open_file("tokend/v1/tokend.proto")?
        .file_descriptor_set();

    // Kept for server reflection, which `compile_fds` does not write by itself.
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("tokend_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;

    // Messages that carry an auth code or a token get a redacting `Debug` written by
    // hand in `src/lib.rs`.
    tonic_prost_build::configure()
        .codec_path("crate::grpc::codec::RequestCodec")
        .skip_debug([
            ".tokend.v1.ExchangeAuthCodeRequest",
            ".tokend.v1.AccessToken",
            ".tokend.v1.ImportTokenSetRequest",
        ])
        .compile_fds(descriptors)?;
    Ok(())
}
