//! Test certificates made with the openssl command: a CA, server certificates for DNS names,
//! and client certificates for mTLS. All P-256.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// A CA in a directory, and the certificates it signed there.
pub struct Pki {
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Pki {
    /// A new CA, `ca.pem` and `ca.key` in `dir`.
    #[must_use]
    pub fn new(dir: &Path) -> Self {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "30",
                "-subj",
                "/CN=lb test CA",
            ],
        );
        Self { dir: dir.to_owned() }
    }

    #[must_use]
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `FILE.pem` and `FILE.key`: a server certificate for `names` (the first is the common
    /// name), valid for `days`.
    #[must_use]
    pub fn server(&self, file: &str, names: &[&str], days: u32) -> (PathBuf, PathBuf) {
        let san = names.iter().map(|n| format!("DNS:{n}")).collect::<Vec<_>>().join(",");
        self.sign(file, names[0], &format!("subjectAltName={san}\nextendedKeyUsage=serverAuth\n"), days)
    }

    /// `FILE.pem` and `FILE.key`: a client certificate for `name`.
    #[must_use]
    pub fn client(&self, file: &str, name: &str) -> (PathBuf, PathBuf) {
        self.sign(file, name, "extendedKeyUsage=clientAuth\n", 30)
    }

    fn sign(&self, file: &str, cn: &str, ext: &str, days: u32) -> (PathBuf, PathBuf) {
        let (pem, key, csr, extfile) =
            (format!("{file}.pem"), format!("{file}.key"), format!("{file}.csr"), format!("{file}.ext"));
        std::fs::write(self.dir.join(&extfile), format!("basicConstraints=CA:FALSE\n{ext}"))
            .expect("write ext");
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                &days.to_string(),
                "-extfile",
                &extfile,
            ],
        );
        (self.dir.join(pem), self.dir.join(key))
    }
}

/// The `notAfter=` line openssl prints for a certificate file.
#[must_use]
pub fn end_date(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-enddate", "-in"])
        .arg(cert)
        .output()
        .expect("openssl");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
