//! `meridian certs`: a development CA and one certificate per node of a topology (rcgen).
//!
//! Architecture invariant: keys are written through a fresh file created with mode 0600 and
//! renamed into place, so a key is never readable by others, not even for a moment.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::config::Topology;

/// Validity of a node certificate.
const NODE_CERT_DAYS: i64 = 365;
/// Validity of the development CA.
const CA_DAYS: i64 = 3650;
/// Certificates start this long in the past, so that a peer whose clock is a little behind
/// does not see them as not yet valid.
const BACKDATE: time::Duration = time::Duration::hours(1);

/// Why certificates could not be generated.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{}: cannot read {what}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{}: {what} is not valid PEM: {message}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{}: cannot write {what}: {source}", path.display())]
    Write {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot generate {what}: {source}")]
    Generate { what: String, source: rcgen::Error },
    #[error("{}: the CA certificate does not belong to the CA key {}", cert.display(), key.display())]
    CaKeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("node {0:?} is not declared in the topology")]
    UnknownNode(String),
}

/// What [`generate_certs`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertsReport {
    /// True if an existing `ca.pem`/`ca.key` pair was kept (and signed the new node
    /// certificates), false if a new CA was created.
    pub ca_reused: bool,
    /// Every file written, in order.
    pub written: Vec<PathBuf>,
}

/// Writes a development CA (`ca.pem`, `ca.key`) and one certificate and key per node
/// (`<node>.pem`, `<node>.key`) into `out_dir`. An existing CA pair in `out_dir` is reused, so
/// that regenerating node certificates keeps the certificates of other runs valid.
pub fn generate_certs(topology: &Topology, out_dir: &Path) -> Result<CertsReport, CertsError> {
    fs::create_dir_all(out_dir).map_err(|source| CertsError::Write {
        what: "certificate folder",
        path: out_dir.to_owned(),
        source,
    })?;
    let ca_cert_path = out_dir.join("ca.pem");
    let ca_key_path = out_dir.join("ca.key");
    let mut written = Vec::new();
    let now = time::OffsetDateTime::from(crate::clock::wall_clock());

    let ca_reused = ca_cert_path.exists() && ca_key_path.exists();
    let issuer = if ca_reused {
        load_issuer(&ca_cert_path, &ca_key_path)?
    } else {
        let key = KeyPair::generate().map_err(|source| CertsError::Generate {
            what: "the CA key".into(),
            source,
        })?;
        let params = ca_params(&topology.cluster, now);
        let cert = params
            .self_signed(&key)
            .map_err(|source| CertsError::Generate {
                what: "the CA certificate".into(),
                source,
            })?;
        let pair = KeyAndCert {
            key_path: ca_key_path.clone(),
            cert_path: ca_cert_path.clone(),
            holder: Holder::Ca,
        };
        pair.write(&key, &cert, &mut written)?;
        Issuer::new(params, key)
    };

    for node in &topology.nodes {
        let Some(uri) = topology.spiffe_id(&node.id) else {
            return Err(CertsError::UnknownNode(node.id.clone()));
        };
        let key = KeyPair::generate().map_err(|source| CertsError::Generate {
            what: format!("the key of node {:?}", node.id),
            source,
        })?;
        let params = node_params(&node.id, &uri, now).map_err(|source| CertsError::Generate {
            what: format!("the certificate of node {:?}", node.id),
            source,
        })?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|source| CertsError::Generate {
                what: format!("the certificate of node {:?}", node.id),
                source,
            })?;
        let pair = KeyAndCert {
            key_path: out_dir.join(format!("{}.key", node.id)),
            cert_path: out_dir.join(format!("{}.pem", node.id)),
            holder: Holder::Node,
        };
        pair.write(&key, &cert, &mut written)?;
    }
    Ok(CertsReport { ca_reused, written })
}

fn ca_params(cluster: &str, now: time::OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Meridian dev CA {cluster}"));
    params.distinguished_name = dn;
    // Path length 0: this CA signs node certificates only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - BACKDATE;
    params.not_after = now + time::Duration::days(CA_DAYS);
    params
}

pub(crate) fn node_params(
    node_id: &str,
    uri: &str,
    now: time::OffsetDateTime,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node_id);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - BACKDATE;
    params.not_after = now + time::Duration::days(NODE_CERT_DAYS);
    Ok(params)
}

pub(crate) fn load_issuer(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Issuer<'static, KeyPair>, CertsError> {
    let cert_pem = read_text(cert_path, "CA certificate")?;
    let key_pem = read_text(key_path, "CA key")?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| CertsError::Pem {
        what: "CA key",
        path: key_path.to_owned(),
        message: e.to_string(),
    })?;
    let cert_der =
        CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| CertsError::Pem {
            what: "CA certificate",
            path: cert_path.to_owned(),
            message: e.to_string(),
        })?;
    // Certificates signed by a key that is not the CA's would chain to nothing: refuse early.
    let (_, parsed) =
        x509_parser::parse_x509_certificate(&cert_der).map_err(|e| CertsError::Pem {
            what: "CA certificate",
            path: cert_path.to_owned(),
            message: e.to_string(),
        })?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CertsError::CaKeyMismatch {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
        });
    }
    Issuer::from_ca_cert_der(&cert_der, key).map_err(|source| CertsError::Generate {
        what: format!("an issuer from {}", cert_path.display()),
        source,
    })
}

/// The existing CA is reused only when both of its files exist, so a read error here is a
/// real failure, never a missing file.
fn read_text(path: &Path, what: &'static str) -> Result<String, CertsError> {
    fs::read_to_string(path).map_err(|source| CertsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Writes through a fresh temporary file created with `mode` and renamed into place, so that a
/// key is never readable by others, not even for a moment or when it replaces an older file
/// with looser permissions, and a crash leaves the old file or the new one, never half of one.
/// Where a key and its certificate go: the key readable by its owner only.
struct KeyAndCert {
    key_path: PathBuf,
    cert_path: PathBuf,
    holder: Holder,
}

enum Holder {
    Ca,
    Node,
}

impl KeyAndCert {
    fn write(
        self,
        key: &KeyPair,
        cert: &rcgen::Certificate,
        written: &mut Vec<PathBuf>,
    ) -> Result<(), CertsError> {
        let (key_what, cert_what) = match self.holder {
            Holder::Ca => ("CA key", "CA certificate"),
            Holder::Node => ("node key", "node certificate"),
        };
        write_file(
            &self.key_path,
            key_what,
            key.serialize_pem().as_bytes(),
            0o600,
        )?;
        written.push(self.key_path);
        write_file(&self.cert_path, cert_what, cert.pem().as_bytes(), 0o644)?;
        written.push(self.cert_path);
        Ok(())
    }
}

fn write_file(
    path: &Path,
    what: &'static str,
    contents: &[u8],
    mode: u32,
) -> Result<(), CertsError> {
    let err = |source| CertsError::Write {
        what,
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    let result = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::tls::tests::{cert_der, cluster};
    use crate::peer::tls::{
        PeerIdentity, PeerTls, identity_of, load_roots, provider, single_uri_san,
    };
    use rustls::client::verify_server_cert_signed_by_trust_anchor;
    use rustls::pki_types::UnixTime;
    use rustls::server::ParsedCertificate;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_certs_carry_one_exact_identity_and_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let topology = cluster(dir.path());
        let certs = dir.path().join("certs");
        for file in ["ca.pem", "ca.key"] {
            assert!(certs.join(file).is_file(), "{file} missing");
        }
        for node in &topology.nodes {
            let cert = topology.tls.node_cert(&node.id);
            let key = topology.tls.node_key(&node.id);
            assert!(cert.starts_with(&certs));
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
            let der = cert_der(&cert);
            assert_eq!(
                single_uri_san(&der).unwrap(),
                format!("spiffe://test/region/{}/node/{}", node.region, node.id)
            );
            let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
            let sans = parsed.subject_alternative_name().unwrap().unwrap();
            assert_eq!(sans.value.general_names.len(), 1);
            let cn = parsed.subject().iter_common_name().next().unwrap();
            assert_eq!(cn.as_str().unwrap(), node.id);
            assert_eq!(
                identity_of(&der, &topology).unwrap(),
                PeerIdentity {
                    node_id: node.id.clone(),
                    region: node.region.clone()
                }
            );
        }
        let ca_key_mode = fs::metadata(certs.join("ca.key")).unwrap().permissions();
        assert_eq!(ca_key_mode.mode() & 0o777, 0o600);
    }

    #[test]
    fn a_second_run_reuses_the_ca_and_old_certificates_stay_valid() {
        let dir = tempfile::tempdir().unwrap();
        let topology = cluster(dir.path());
        let certs = dir.path().join("certs");
        let ca_before = fs::read(certs.join("ca.pem")).unwrap();
        let old_leaf = cert_der(&topology.tls.node_cert("eu-west-1"));
        let report = generate_certs(&topology, &certs).unwrap();
        assert!(report.ca_reused);
        assert!(!report.written.contains(&certs.join("ca.pem")));
        assert_eq!(report.written.len(), 2 * topology.nodes.len());
        assert_eq!(fs::read(certs.join("ca.pem")).unwrap(), ca_before);
        // The old certificate still chains to the (same) CA: a running node keeps working.
        let roots = load_roots(&certs.join("ca.pem")).unwrap();
        let parsed = ParsedCertificate::try_from(&old_leaf).unwrap();
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &[],
            UnixTime::now(),
            provider().signature_verification_algorithms.all,
        )
        .unwrap();
        PeerTls::load(topology, "eu-west-1").unwrap();
    }
}
