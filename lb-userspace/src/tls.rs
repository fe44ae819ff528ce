//! TLS for the HTTP edge: certificate files (chain, key, names, expiry), choosing one by the
//! name a client asks for (SNI), and a listener's rustls settings.
//!
//! The registry loader uses [`Certificate::load`] to check certificate files (so a bad one is
//! a registry problem with its line), and the edge loads them again for each applied registry:
//! certificates change with the registry, atomically, never half.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig, SupportedCipherSuite, SupportedProtocolVersion,
    crypto::{CryptoProvider, ring},
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};

use crate::config::{Tls, TlsVersion, UpstreamTls};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{} is not the private key of the certificate in {}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("cipher suite `{0}` is not one lb offers; it offers {list}", list = suite_names().join(", "))]
    Cipher(String),
    #[error("{0}")]
    Settings(String),
}

/// A certificate chain with its key, as loaded.
#[derive(Debug)]
pub struct Certificate {
    /// DNS names it serves (subject alternative names, else the common name), lowercase.
    pub names: Vec<String>,
    /// End of validity, seconds since the epoch.
    pub not_after: i64,
    pub key: Arc<CertifiedKey>,
}

impl Certificate {
    /// Reads a PEM chain and key (and, with `ocsp`, a stapled OCSP response in `CERT.ocsp` when
    /// there is one).
    pub fn load(cert: &Path, key: &Path, ocsp: bool) -> Result<Self, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
        };
        let mut c = Self::from_pem(&read(cert)?, &read(key)?, cert, key)?;
        if ocsp {
            let mut staple = cert.as_os_str().to_owned();
            staple.push(".ocsp");
            if let Ok(der) = std::fs::read(&staple) {
                let mut k = (*c.key).clone();
                k.ocsp = Some(der);
                c.key = Arc::new(k);
            }
        }
        Ok(c)
    }

    /// Parses a PEM chain and key; the paths only name them in errors.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let invalid = |path: &Path, reason: String| TlsError::Invalid { path: path.to_owned(), reason };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(cert, format!("not a PEM certificate chain: {e}")))?;
        let Some(leaf) = chain.first() else {
            return Err(invalid(cert, "holds no certificate".to_owned()));
        };
        let (names, not_after) = leaf_facts(leaf).map_err(|r| invalid(cert, r))?;
        let der = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| invalid(key, format!("not a PEM private key: {e}")))?;
        let signer = ring::sign::any_supported_type(&der)
            .map_err(|e| invalid(key, format!("unsupported private key: {e}")))?;
        let ck = CertifiedKey::new(chain, signer);
        ck.keys_match().map_err(|_| TlsError::Mismatch { cert: cert.to_owned(), key: key.to_owned() })?;
        Ok(Self { names, not_after, key: Arc::new(ck) })
    }

    /// Whether it serves `name` by an exact name (`exact`) or by a wildcard.
    fn serves(&self, name: &str, exact: bool) -> bool {
        self.names.iter().any(|p| if exact { p == name } else { wildcard_matches(p, name) })
    }

    /// Seconds of validity left at `now` (negative once expired).
    #[must_use]
    pub fn seconds_left(&self, now: SystemTime) -> i64 {
        let now =
            now.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.not_after - now
    }
}

/// The leaf's DNS names and end of validity.
fn leaf_facts(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    use x509_parser::extensions::GeneralName;
    let (_, x) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| format!("unreadable certificate: {e}"))?;
    let mut names: Vec<String> = match x.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::DNSName(n) => Some(n.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if names.is_empty() {
        names.extend(
            x.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_ascii_lowercase),
        );
    }
    Ok((names, x.validity().not_after.timestamp()))
}

/// `*.example.org` serves `a.example.org`: one label, not `example.org` nor `a.b.example.org`.
fn wildcard_matches(pattern: &str, name: &str) -> bool {
    pattern.strip_prefix("*.").is_some_and(|suffix| {
        name.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest == suffix)
    })
}

/// A listener's certificates, the default first.
#[derive(Debug)]
pub struct SniResolver {
    certs: Vec<Arc<Certificate>>,
}

impl SniResolver {
    #[must_use]
    pub fn new(certs: Vec<Arc<Certificate>>) -> Self {
        Self { certs }
    }

    /// The certificate for `sni`: an exact name first, then a wildcard, then the default.
    #[must_use]
    pub fn choose(&self, sni: Option<&str>) -> Option<&Arc<Certificate>> {
        sni.and_then(|name| {
            // rustls hands SNI over lowercase already.
            let by = |exact| self.certs.iter().find(|c| c.serves(name, exact));
            by(true).or_else(|| by(false))
        })
        .or_else(|| self.certs.first())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.choose(hello.server_name()).map(|c| c.key.clone())
    }
}

/// OpenSSL's names for the suites rustls has, by their IANA names.
const OPENSSL_NAMES: &[(&str, &str)] = &[
    ("TLS_AES_128_GCM_SHA256", "TLS13_AES_128_GCM_SHA256"),
    ("TLS_AES_256_GCM_SHA384", "TLS13_AES_256_GCM_SHA384"),
    ("TLS_CHACHA20_POLY1305_SHA256", "TLS13_CHACHA20_POLY1305_SHA256"),
    ("ECDHE-ECDSA-AES128-GCM-SHA256", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
    ("ECDHE-ECDSA-AES256-GCM-SHA384", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"),
    ("ECDHE-ECDSA-CHACHA20-POLY1305", "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"),
    ("ECDHE-RSA-AES128-GCM-SHA256", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
    ("ECDHE-RSA-AES256-GCM-SHA384", "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"),
    ("ECDHE-RSA-CHACHA20-POLY1305", "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"),
];

fn suite_name(s: SupportedCipherSuite) -> String {
    format!("{:?}", s.suite())
}

/// The suites lb offers, by IANA name.
#[must_use]
pub fn suite_names() -> Vec<String> {
    ring::default_provider().cipher_suites.into_iter().map(suite_name).collect()
}

/// The ring provider limited to `ciphers` (plus TLS 1.3's own suites when `ciphers` names
/// none of them, as nginx does). Empty: all.
pub fn provider(ciphers: &[String]) -> Result<CryptoProvider, TlsError> {
    let mut p = ring::default_provider();
    if ciphers.is_empty() {
        return Ok(p);
    }
    let all = std::mem::take(&mut p.cipher_suites);
    for name in ciphers {
        let upper = name.trim().to_ascii_uppercase();
        let iana = OPENSSL_NAMES.iter().find(|(o, _)| *o == upper).map_or(upper.as_str(), |(_, i)| i);
        let suite =
            all.iter().find(|s| suite_name(**s) == iana).ok_or_else(|| TlsError::Cipher(name.clone()))?;
        if !p.cipher_suites.contains(suite) {
            p.cipher_suites.push(*suite);
        }
    }
    let is13 = |s: &SupportedCipherSuite| s.version() == &rustls::version::TLS13;
    if !p.cipher_suites.iter().any(is13) {
        p.cipher_suites.extend(all.iter().filter(|s| is13(s)));
    }
    Ok(p)
}

/// A listener's rustls settings, serving `certs` (the default first).
pub fn server_config(spec: &Tls, certs: Vec<Arc<Certificate>>) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(provider(&spec.ciphers)?);
    let versions: Vec<&'static SupportedProtocolVersion> = spec
        .protocols
        .iter()
        .map(|v| match v {
            TlsVersion::Tls12 => &rustls::version::TLS12,
            TlsVersion::Tls13 => &rustls::version::TLS13,
        })
        .collect();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| TlsError::Settings(format!("protocols and ciphers do not fit together: {e}")))?;
    let builder = match &spec.client_auth {
        None => builder.with_no_client_auth(),
        Some(auth) => {
            let mut v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&auth.ca)?), provider);
            if !auth.required {
                v = v.allow_unauthenticated();
            }
            let v =
                v.build().map_err(|e| TlsError::Invalid { path: auth.ca.clone(), reason: e.to_string() })?;
            builder.with_client_cert_verifier(v)
        }
    };
    let mut cfg = builder.with_cert_resolver(Arc::new(SniResolver::new(certs)));
    cfg.alpn_protocols = spec.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(cfg)
}

/// The system's CA bundle (Debian's ca-certificates), trusted when a backend's `ca` is unset.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| TlsError::Invalid { path: path.to_owned(), reason: e.to_string() })?;
        // The system bundle holds a few certificates webpki cannot parse: skipped there.
        if let Err(e) = roots.add(c)
            && path != Path::new(SYSTEM_ROOTS)
        {
            return Err(TlsError::Invalid { path: path.to_owned(), reason: e.to_string() });
        }
    }
    if roots.is_empty() {
        return Err(TlsError::Invalid { path: path.to_owned(), reason: "no certificate in it".into() });
    }
    Ok(roots)
}

/// The edge's rustls settings towards backends: their CA, the edge's client certificate for
/// mTLS, and ALPN for the protocol spoken.
pub fn client_config(spec: &UpstreamTls, http2: bool) -> Result<ClientConfig, TlsError> {
    let ca = spec.ca.clone().unwrap_or_else(|| PathBuf::from(SYSTEM_ROOTS));
    let builder = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Settings(e.to_string()))?
        .with_root_certificates(roots(&ca)?);
    let mut cfg = match (&spec.cert, &spec.key) {
        (Some(cert), Some(key)) => {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|source| TlsError::Read { path: path.clone(), source })
            };
            let (cert_pem, key_pem) = (read(cert)?, read(key)?);
            // Checked as a listener's would be: a key that does not match is named here.
            let chain = Certificate::from_pem(&cert_pem, &key_pem, cert, key)?.key.cert.clone();
            let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| TlsError::Invalid { path: key.clone(), reason: e.to_string() })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| TlsError::Invalid { path: key.clone(), reason: e.to_string() })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(TlsError::Settings("a client certificate needs both `cert` and `key`".into())),
    };
    cfg.alpn_protocols = vec![if http2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_exactly_one_label() {
        assert!(wildcard_matches("*.example.org", "a.example.org"));
        assert!(!wildcard_matches("*.example.org", "example.org"));
        assert!(!wildcard_matches("*.example.org", "a.b.example.org"));
        assert!(!wildcard_matches("*.example.org", ".example.org"));
        assert!(!wildcard_matches("example.org", "example.org"), "not a wildcard");
    }

    #[test]
    fn ciphers_are_named_the_openssl_or_the_iana_way() {
        // Seed 001's list: TLS 1.2 suites only, so TLS 1.3's stay on.
        let p = provider(&["ECDHE-ECDSA-AES128-GCM-SHA256".into(), "ecdhe-rsa-aes128-gcm-sha256".into()])
            .unwrap();
        let names: Vec<String> = p.cipher_suites.iter().map(|s| suite_name(*s)).collect();
        assert_eq!(
            names[..2],
            ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"]
        );
        assert!(names.iter().any(|n| n == "TLS13_AES_256_GCM_SHA384"));
        assert!(!names.iter().any(|n| n.contains("CHACHA20") && n.starts_with("TLS_ECDHE")));
        let p = provider(&["TLS13_AES_128_GCM_SHA256".into()]).unwrap();
        assert_eq!(p.cipher_suites.len(), 1, "a TLS 1.3 suite named: only it");
        let e = provider(&["AES128-SHA".into()]).unwrap_err().to_string();
        assert!(
            e.contains("`AES128-SHA` is not one lb offers") && e.contains("TLS13_AES_128_GCM_SHA256"),
            "{e}"
        );
    }
}
