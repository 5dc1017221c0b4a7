//! Metrics over TLS, as the Tigera operator configures it (`TLS_CRT_PATH`, `TLS_KEY_PATH`,
//! `CA_CRT_PATH`, `CLIENT_COMMON_NAME`): the rustls server configuration of the metrics listener
//! and the client-certificate check that admits only the named client.
//!
//! With a CA every client must present a certificate that chains to it (TLS 1.2 or 1.3); with a
//! common name as well, the certificate's subject must carry that CN, or the handshake fails.
//!
//! Owns: reading the PEM files (errors name their setting), the verifier, and the pure DER walk
//! that finds a certificate's subject common names.
//! Must not: serve requests (`http` does) or touch the health listener, which stays plain HTTP
//! for `calico health` on loopback.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::config::{MetricsTlsConfig, Setting};

#[derive(Debug, thiserror::Error)]
#[error("metrics TLS: {0}")]
pub struct TlsSetupError(String);

fn read_file(setting: &Setting) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(&setting.value).map_err(|e| {
        TlsSetupError(format!(
            "{}={}: cannot read the file: {e}",
            setting.var, setting.value
        ))
    })
}

/// Every certificate of a PEM file; at least one.
pub fn read_certificates(setting: &Setting) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let pem = read_file(setting)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            TlsSetupError(format!(
                "{}={}: not a PEM certificate file: {e}",
                setting.var, setting.value
            ))
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError(format!(
            "{}={}: holds no PEM certificate",
            setting.var, setting.value
        )));
    }
    Ok(certs)
}

/// The acceptor of the metrics listener, from the operator's settings.
pub fn acceptor(cfg: &MetricsTlsConfig) -> Result<tokio_rustls::TlsAcceptor, TlsSetupError> {
    Ok(tokio_rustls::TlsAcceptor::from(server_config(cfg)?))
}

pub fn server_config(cfg: &MetricsTlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certificates(&cfg.cert_file)?;
    let key_pem = read_file(&cfg.key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        TlsSetupError(format!(
            "{}={}: no usable PEM private key: {e}",
            cfg.key_file.var, cfg.key_file.value
        ))
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError(format!("TLS setup: {e}")))?;
    let builder = match &cfg.client_ca_file {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certificates(ca)? {
                roots.add(cert).map_err(|e| {
                    TlsSetupError(format!(
                        "{}={}: unusable CA certificate: {e}",
                        ca.var, ca.value
                    ))
                })?;
            }
            let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| TlsSetupError(format!("{}={}: {e}", ca.var, ca.value)))?;
            builder.with_client_cert_verifier(Arc::new(CommonNameVerifier {
                inner,
                common_name: cfg.client_common_name.clone(),
            }))
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        TlsSetupError(format!(
            "{}={} and {}={}: the key does not fit the certificate: {e}",
            cfg.cert_file.var, cfg.cert_file.value, cfg.key_file.var, cfg.key_file.value
        ))
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// webpki's chain check, then (when configured) the subject's common name.
#[derive(Debug)]
struct CommonNameVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    common_name: Option<String>,
}

impl ClientCertVerifier for CommonNameVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| {
                tracing::warn!(error = %e, "metrics client certificate refused");
            })?;
        if let Some(want) = &self.common_name {
            let names = subject_common_names(end_entity.as_ref()).ok_or(
                rustls::Error::InvalidCertificate(CertificateError::BadEncoding),
            )?;
            if !names.iter().any(|n| n == want) {
                tracing::warn!(presented = %names.join(","), expected = %want, "metrics client refused: its certificate's common name is not CLIENT_COMMON_NAME");
                return Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ));
            }
        }
        Ok(verified)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// One DER element at the start of `der`: (tag, contents, what follows). `None` when truncated
/// or longer than 4 GiB (no certificate is).
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (
            rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | *b as usize),
            &rest[n..],
        )
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OBJECT_ID: u8 = 0x06;
/// id-at-commonName, 2.5.4.3.
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// The common names in an X.509 certificate's subject (RFC 5280 §4.1: Certificate → TBSCertificate
/// → [version], serialNumber, signature, issuer, validity, subject), in order; `None` when the DER
/// is not shaped like a certificate. Pure: no clock, no I/O, never panics on any input.
pub fn subject_common_names(cert: &[u8]) -> Option<Vec<String>> {
    let (tag, cert, _) = element(cert)?;
    (tag == SEQUENCE).then_some(())?;
    let (tag, tbs, _) = element(cert)?;
    (tag == SEQUENCE).then_some(())?;
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = element(rest)?.2;
    }
    for _ in 0..4 {
        rest = element(rest)?.2;
    }
    let (tag, mut name, _) = element(rest)?;
    (tag == SEQUENCE).then_some(())?;
    let mut names = Vec::new();
    while !name.is_empty() {
        let (tag, mut rdn, next) = element(name)?;
        (tag == SET).then_some(())?;
        name = next;
        while !rdn.is_empty() {
            let (tag, attribute, next) = element(rdn)?;
            (tag == SEQUENCE).then_some(())?;
            rdn = next;
            let (tag, oid, value) = element(attribute)?;
            (tag == OBJECT_ID).then_some(())?;
            if oid != COMMON_NAME {
                continue;
            }
            let (string_tag, text, _) = element(value)?;
            names.push(match string_tag {
                // UTF8String, PrintableString, TeletexString (Latin-1 in practice), IA5String
                0x0c | 0x13 | 0x16 => String::from_utf8(text.to_vec()).ok()?,
                0x14 => text.iter().map(|&b| b as char).collect(),
                // BMPString: UTF-16BE.
                0x1e if text.len() % 2 == 0 => String::from_utf16(
                    &text
                        .chunks(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .collect::<Vec<_>>(),
                )
                .ok()?,
                _ => return None,
            });
        }
    }
    Some(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        match content.len() {
            n if n < 0x80 => out.push(n as u8),
            n if n < 0x100 => out.extend([0x81, n as u8]),
            n => out.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend_from_slice(content);
        out
    }

    fn attribute(oid: &[u8], string_tag: u8, value: &[u8]) -> Vec<u8> {
        der(
            SET,
            &der(
                SEQUENCE,
                &[der(OBJECT_ID, oid), der(string_tag, value)].concat(),
            ),
        )
    }

    /// A certificate shaped as RFC 5280 says, with `subject` as the subject Name's RDNs.
    fn certificate(with_version: bool, subject: &[Vec<u8>]) -> Vec<u8> {
        let mut tbs = Vec::new();
        if with_version {
            tbs.extend(der(0xa0, &der(0x02, &[2])));
        }
        tbs.extend(der(0x02, &[0x01, 0x23]));
        tbs.extend(der(SEQUENCE, &der(OBJECT_ID, &[0x2a, 0x86, 0x48])));
        let issuer = attribute(COMMON_NAME, 0x0c, b"test-ca");
        tbs.extend(der(SEQUENCE, &issuer));
        tbs.extend(der(
            SEQUENCE,
            &[der(0x17, b"260101000000Z"), der(0x17, b"270101000000Z")].concat(),
        ));
        tbs.extend(der(SEQUENCE, &subject.concat()));
        tbs.extend(der(SEQUENCE, &[0u8; 200]));
        der(
            SEQUENCE,
            &[der(SEQUENCE, &tbs), der(SEQUENCE, &[]), der(0x03, &[0])].concat(),
        )
    }

    #[test]
    fn the_subjects_common_name_is_found_and_the_issuers_is_not() {
        let organization = [0x55, 0x04, 0x0a];
        let cert = certificate(
            true,
            &[
                attribute(&organization, 0x13, b"system:masters"),
                attribute(COMMON_NAME, 0x0c, b"calico-node-prometheus-client-tls"),
            ],
        );
        assert_eq!(
            subject_common_names(&cert),
            Some(vec!["calico-node-prometheus-client-tls".to_string()])
        );
        let cert = certificate(false, &[attribute(COMMON_NAME, 0x13, b"prom")]);
        assert_eq!(
            subject_common_names(&cert),
            Some(vec!["prom".to_string()]),
            "v1 certificates have no version field"
        );
        let bmp: Vec<u8> = "prøm".encode_utf16().flat_map(u16::to_be_bytes).collect();
        assert_eq!(
            subject_common_names(&certificate(true, &[attribute(COMMON_NAME, 0x1e, &bmp)])),
            Some(vec!["prøm".to_string()])
        );
        assert_eq!(
            subject_common_names(&certificate(true, &[attribute(&organization, 0x0c, b"x")])),
            Some(vec![]),
            "no CN at all"
        );
    }

    #[test]
    fn malformed_or_truncated_input_is_none_and_never_panics() {
        let cert = certificate(true, &[attribute(COMMON_NAME, 0x0c, b"prom")]);
        for cut in 0..cert.len() {
            assert_eq!(subject_common_names(&cert[..cut]), None, "cut at {cut}");
        }
        assert_eq!(subject_common_names(&[]), None);
        assert_eq!(
            subject_common_names(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            None,
            "a length beyond the input"
        );
        assert_eq!(
            subject_common_names(&certificate(true, &[der(SEQUENCE, &[])])),
            None,
            "an RDN must be a SET"
        );
        // Arbitrary bytes (a fixed linear congruential sequence) must only ever give None or names.
        let mut x: u32 = 12345;
        for _ in 0..2000 {
            let bytes: Vec<u8> = (0..64)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8
                })
                .collect();
            let _ = subject_common_names(&bytes);
        }
    }
}
