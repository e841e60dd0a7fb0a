//! TLS on the gRPC port with rustls: the server's certificate and key, the optional CA
//! that client certificates must chain to, and the client side used by the CLI.

use std::{fmt, path::Path};

use secrecy::{ExposeSecret as _, SecretSlice};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, Server, ServerTlsConfig};

/// The server's TLS material, read from the files the settings name.
#[derive(Clone)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert_pem: Vec<u8>,
    /// PEM private key of the leaf certificate.
    pub key_pem: SecretSlice<u8>,
    /// PEM CA certificates that client certificates must chain to. When set, a client
    /// without a valid certificate fails the handshake.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field(
                "client_certificates_required",
                &self.client_ca_pem.is_some(),
            )
            .finish_non_exhaustive()
    }
}

/// A TLS file that cannot be used, with the setting that names it.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TlsFileError {
    pub key: &'static str,
    pub message: String,
}

impl TlsSettings {
    /// Reads the PEM files and checks that rustls accepts them, so that a bad file
    /// fails before any port is bound.
    pub fn load(
        cert_file: &Path,
        key_file: &Path,
        client_ca_file: Option<&Path>,
    ) -> Result<TlsSettings, TlsFileError> {
        let cert_pem = read_pem("tls_cert_file", cert_file, "CERTIFICATE")?;
        let key_pem = read_pem("tls_key_file", key_file, "PRIVATE KEY")?;
        let client_ca_pem = client_ca_file
            .map(|path| read_pem("tls_client_ca_file", path, "CERTIFICATE"))
            .transpose()?;
        let settings = TlsSettings {
            cert_pem,
            key_pem: key_pem.into(),
            client_ca_pem,
        };

        Server::builder()
            .tls_config(settings.server_config())
            .map_err(|error| TlsFileError {
                key: "tls_cert_file",
                message: format!(
                    "the certificate in {} and the key in {} are not usable together: {error}",
                    cert_file.display(),
                    key_file.display()
                ),
            })?;
        Ok(settings)
    }

    /// Builds tonic's server configuration. Client certificates are required whenever a
    /// client CA is set.
    pub fn server_config(&self) -> ServerTlsConfig {
        let identity = Identity::from_pem(&self.cert_pem, self.key_pem.expose_secret());
        let config = ServerTlsConfig::new().identity(identity);
        match &self.client_ca_pem {
            Some(ca) => config
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(false),
            None => config,
        }
    }
}

/// Reads a PEM file and checks that it holds a block whose label ends with `label`.
fn read_pem(key: &'static str, path: &Path, label: &str) -> Result<Vec<u8>, TlsFileError> {
    let pem = std::fs::read(path).map_err(|error| TlsFileError {
        key,
        message: format!("reading {} failed: {error}", path.display()),
    })?;
    let text = String::from_utf8_lossy(&pem);
    let has_block = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("-----BEGIN "))
        .any(|rest| rest.trim_end_matches('-').ends_with(label));
    if !has_block {
        return Err(TlsFileError {
            key,
            message: format!(
                "{} holds no PEM block labelled {label}; give the PEM file, not DER",
                path.display()
            ),
        });
    }
    Ok(pem)
}

/// The files a client uses to reach a TLS-protected daemon.
#[derive(Debug, Clone, Default)]
pub struct ClientTlsFiles<'a> {
    /// PEM CA certificates that the daemon's certificate must chain to.
    pub ca_file: Option<&'a Path>,
    /// PEM client certificate and key, for a daemon that requires client certificates.
    pub cert_file: Option<&'a Path>,
    pub key_file: Option<&'a Path>,
    /// The name the daemon's certificate must carry, when it differs from the host in
    /// the address.
    pub server_name: Option<&'a str>,
}

impl ClientTlsFiles<'_> {
    /// Returns true when any TLS option is set.
    pub fn any(&self) -> bool {
        self.ca_file.is_some()
            || self.cert_file.is_some()
            || self.key_file.is_some()
            || self.server_name.is_some()
    }

    /// Reads the files into tonic's client configuration. Errors name the option.
    pub fn client_config(&self) -> Result<ClientTlsConfig, String> {
        let read = |option: &str, path: &Path| {
            std::fs::read(path)
                .map_err(|error| format!("reading {option} {} failed: {error}", path.display()))
        };
        let ca_file = self.ca_file.ok_or(
            "TLS needs --ca-file (TOKEND_CA_FILE) naming the CA that signed the daemon's \
             certificate",
        )?;
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("--ca-file", ca_file)?));
        match (self.cert_file, self.key_file) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read("--cert-file", cert)?,
                    read("--key-file", key)?,
                ));
            }
            (None, None) => {}
            _ => return Err("--cert-file and --key-file must be given together".to_owned()),
        }
        if let Some(name) = self.server_name {
            config = config.domain_name(name);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_names_the_key() {
        let error = TlsSettings::load(Path::new("/nonexistent/cert.pem"), Path::new("k"), None)
            .unwrap_err();
        assert_eq!(error.key, "tls_cert_file");
        assert!(error.message.contains("/nonexistent/cert.pem"), "{error}");
    }

    #[test]
    fn non_pem_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cert.der");
        std::fs::write(&path, [0x30, 0x82, 0x01]).unwrap();
        let error = TlsSettings::load(&path, &path, None).unwrap_err();
        assert_eq!(error.key, "tls_cert_file");
        assert!(error.message.contains("CERTIFICATE"), "{error}");
    }

    #[test]
    fn mismatched_pem_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(["localhost".to_owned()]).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&cert_path, cert.cert.pem()).unwrap();
        std::fs::write(
            &key_path,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let error = TlsSettings::load(&cert_path, &key_path, None).unwrap_err();
        assert_eq!(error.key, "tls_cert_file");

        std::fs::write(&key_path, other.serialize_pem()).unwrap();
        let error = TlsSettings::load(&cert_path, &key_path, None).unwrap_err();
        assert!(error.message.contains("not usable"), "{error}");
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
        let settings = TlsSettings::load(&cert_path, &key_path, None).unwrap();
        assert!(!format!("{settings:?}").contains("PRIVATE"));
    }
}
