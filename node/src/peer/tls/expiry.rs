//! Certificate validity periods (finding F14): read from the loaded certificates, and what to
//! say about them as time passes.
//!
//! Invariant: [`notice`] is pure (time comes in as arguments), so the warning schedule is
//! tested without waiting days.

use std::time::Duration;

use rustls::pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;

use super::IdentityError;
use crate::observe::health::Validity;

/// A certificate expiring within this is warned about: at start, then daily.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);
/// How often the warning repeats while the expiry approaches.
pub const EXPIRY_WARNING_REPEAT: Duration = Duration::from_secs(24 * 3600);

fn parsed<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, IdentityError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| IdentityError::Unparsable(e.to_string()))
}

fn validity(cert: &X509Certificate<'_>) -> Validity {
    let v = cert.validity();
    Validity {
        not_before_unix_s: v.not_before.timestamp(),
        not_after_unix_s: v.not_after.timestamp(),
    }
}

/// The validity period of one certificate.
pub fn validity_of(der: &CertificateDer<'_>) -> Result<Validity, IdentityError> {
    parsed(der).map(|c| validity(&c))
}

/// The validity of the CA of `cas` that issued `leaf` (subject equals the leaf's issuer), or,
/// when none matches by name, of the one that expires first: the bound that matters.
pub fn issuer_validity(
    leaf: &CertificateDer<'_>,
    cas: &[CertificateDer<'_>],
) -> Result<Validity, IdentityError> {
    let leaf = parsed(leaf)?;
    let mut earliest: Option<Validity> = None;
    for der in cas {
        let ca = parsed(der)?;
        if ca.subject().as_raw() == leaf.issuer().as_raw() {
            return Ok(validity(&ca));
        }
        let v = validity(&ca);
        if earliest.is_none_or(|e| v.not_after_unix_s < e.not_after_unix_s) {
            earliest = Some(v);
        }
    }
    earliest.ok_or_else(|| IdentityError::Unparsable("the CA file holds no certificate".into()))
}

/// What to log about a certificate at one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    Nothing,
    /// Expires within [`EXPIRY_WARNING`]: a WARN (at start, then once per
    /// [`EXPIRY_WARNING_REPEAT`]).
    ExpiresSoon {
        seconds_left: i64,
    },
    /// Has just been seen expired: an ERROR, once.
    Expired {
        seconds_ago: i64,
    },
}

/// What to say about a certificate `seconds_left` before its notAfter (negative: after), given
/// how long ago the last warning was (`None`: never) and whether its expiry was reported.
pub fn notice(
    seconds_left: i64,
    since_last_warning: Option<Duration>,
    expiry_reported: bool,
) -> Notice {
    // notAfter itself is still valid (RFC 5280, and webpki): expired only once past it.
    if seconds_left < 0 {
        return if expiry_reported {
            Notice::Nothing
        } else {
            Notice::Expired {
                seconds_ago: -seconds_left,
            }
        };
    }
    let soon = seconds_left.unsigned_abs() <= EXPIRY_WARNING.as_secs();
    let due = since_last_warning.is_none_or(|d| d >= EXPIRY_WARNING_REPEAT);
    if soon && due {
        Notice::ExpiresSoon { seconds_left }
    } else {
        Notice::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 24 * 3600;

    /// A CA valid until `not_after_unix_s`: its certificate and its issuer.
    fn ca(
        name: &str,
        not_after_unix_s: i64,
    ) -> (
        CertificateDer<'static>,
        rcgen::Issuer<'static, rcgen::KeyPair>,
    ) {
        let params = || {
            let mut params = rcgen::CertificateParams::default();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
            params.not_before = time::OffsetDateTime::from_unix_timestamp(1_000).unwrap();
            params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after_unix_s).unwrap();
            params
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params().self_signed(&key).unwrap().der().clone();
        (cert, rcgen::Issuer::new(params(), key))
    }

    #[test]
    fn validity_is_read_from_the_certificate_and_the_issuing_ca_is_found_in_a_bundle() {
        let (old, _) = ca("old CA", 2_000_000_000);
        let (new, new_issuer) = ca("new CA", 2_100_000_000);
        let mut leaf_params = rcgen::CertificateParams::new(vec!["n".to_string()]).unwrap();
        leaf_params.not_before = time::OffsetDateTime::from_unix_timestamp(1_500).unwrap();
        leaf_params.not_after = time::OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap();
        let leaf = leaf_params
            .signed_by(&rcgen::KeyPair::generate().unwrap(), &new_issuer)
            .unwrap();
        let leaf = leaf.der().clone();
        assert_eq!(
            validity_of(&leaf).unwrap(),
            Validity {
                not_before_unix_s: 1_500,
                not_after_unix_s: 1_900_000_000
            }
        );
        let bundle = [old, new];
        assert_eq!(
            issuer_validity(&leaf, &bundle).unwrap().not_after_unix_s,
            2_100_000_000,
            "the CA that issued the leaf, not the first of the bundle"
        );
        assert_eq!(
            issuer_validity(&leaf, &bundle[..1])
                .unwrap()
                .not_after_unix_s,
            2_000_000_000,
            "no issuer by name: the first to expire"
        );
        assert!(validity_of(&CertificateDer::from(vec![1, 2, 3])).is_err());
    }

    #[test]
    fn warned_at_start_and_daily_within_two_weeks_then_expired_once() {
        // A year left: nothing.
        assert_eq!(notice(365 * DAY, None, false), Notice::Nothing);
        // 10 days left at start: warned at once.
        assert_eq!(
            notice(10 * DAY, None, false),
            Notice::ExpiresSoon {
                seconds_left: 10 * DAY
            }
        );
        // An hour after the warning: quiet; a day after: again.
        let hour = Duration::from_secs(3600);
        assert_eq!(notice(10 * DAY - 3600, Some(hour), false), Notice::Nothing);
        assert_eq!(
            notice(9 * DAY, Some(EXPIRY_WARNING_REPEAT), false),
            Notice::ExpiresSoon {
                seconds_left: 9 * DAY
            }
        );
        // Expired: reported once, whatever the warning schedule.
        assert_eq!(
            notice(-5, Some(hour), false),
            Notice::Expired { seconds_ago: 5 }
        );
        assert_eq!(notice(-6, Some(hour), true), Notice::Nothing);
        assert_eq!(
            notice(0, None, false),
            Notice::ExpiresSoon { seconds_left: 0 },
            "valid until the end of notAfter's second"
        );
        assert_eq!(notice(-1, None, false), Notice::Expired { seconds_ago: 1 });
    }
}
