//! The webhook's TLS: a CA and a serving certificate the operator makes itself, kept in a
//! Secret its replicas share, with the CA in the MutatingWebhookConfiguration's caBundle.
//!
//! The serving certificate is renewed, signed by the same CA, once a third of its life is
//! left, so the caBundle never changes during a renewal and no admission fails on it.
//!
//! With `--webhook-certificates=secret` a certificate manager (cert-manager) issues them
//! instead: the operator only reads the Secret (`tls.crt`, `tls.key`, `ca.crt`), serves
//! what it holds now, and puts its `ca.crt` into the caBundle.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff;
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The Secret's annotation holding when the serving certificate expires (RFC 3339).
const NOT_AFTER: &str = "snapcache.io/serving-not-after";
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("making a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the Secret {0} holds no usable {1}; delete it and the operator makes a new one")]
    Unusable(String, &'static str),
    #[error("loading the serving certificate: {0}")]
    Tls(#[from] rustls::Error),
    #[error(
        "the Secret {0} holds no usable {1}: has cert-manager issued it? (kubectl describe certificate)"
    )]
    NotIssued(String, &'static str),
}

/// Who makes the webhook's certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// The operator makes and renews a CA and a serving certificate in the Secret.
    Operator,
    /// Something else (cert-manager) issues them into the Secret; the operator reads it.
    Secret,
}

/// What the webhook serves, and the CA the API server is told to trust.
#[derive(Debug, Clone, PartialEq)]
pub struct Serving {
    pub ca_cert: String,
    pub cert: String,
    pub key: String,
    pub not_after: jiff::Timestamp,
}

impl Serving {
    /// The serving certificate and key, as rustls takes them.
    pub fn certified_key(&self) -> Result<CertifiedKey, Error> {
        let chain = CertificateDer::pem_slice_iter(self.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Error::Unusable("(in memory)".to_owned(), "tls.crt"))?;
        let key = PrivateKeyDer::from_pem_slice(self.key.as_bytes())
            .map_err(|_| Error::Unusable("(in memory)".to_owned(), "tls.key"))?;
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        Ok(CertifiedKey::from_der(chain, key, &provider)?)
    }

    /// What a certificate manager issued into a `kubernetes.io/tls` Secret; the expiry
    /// comes from the certificate itself.
    pub fn from_issued_secret(secret: &Secret) -> Result<Serving, Error> {
        let name = secret.metadata.name.clone().unwrap_or_default();
        let field = |key: &'static str| {
            text_field(secret, key).ok_or_else(|| Error::NotIssued(name.clone(), key))
        };
        let cert = field("tls.crt")?;
        let not_after = x509_parser::pem::parse_x509_pem(cert.as_bytes())
            .ok()
            .and_then(|(_, pem)| {
                let parsed = pem.parse_x509().ok()?;
                jiff::Timestamp::from_second(parsed.validity().not_after.timestamp()).ok()
            })
            .ok_or_else(|| Error::NotIssued(name.clone(), "tls.crt"))?;
        Ok(Serving {
            ca_cert: field("ca.crt")?,
            key: field("tls.key")?,
            cert,
            not_after,
        })
    }
}

/// Where the certificates live and whom they name.
#[derive(Debug, Clone)]
pub struct Settings {
    pub namespace: String,
    pub secret: String,
    /// The webhook Service: the serving certificate names `<service>.<namespace>.svc`.
    pub service: String,
    /// The MutatingWebhookConfiguration whose caBundle carries the CA.
    pub webhook_configuration: String,
    /// More names or IP addresses for the serving certificate, for an API server that
    /// calls the webhook by URL rather than through the Service.
    pub extra_hosts: Vec<String>,
    /// Lifetime of a serving certificate.
    pub lifetime: Duration,
    /// Who makes the certificates.
    pub source: Source,
}

/// PEM text of a CA and of a serving certificate it signed.
#[derive(Debug, Clone, PartialEq)]
pub struct Bundle {
    pub ca_cert: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
    pub not_after: jiff::Timestamp,
}

impl Bundle {
    /// A new CA and a serving certificate for `dns_names`.
    pub fn generate(
        dns_names: &[String],
        lifetime: Duration,
        now: jiff::Timestamp,
    ) -> Result<Bundle, Error> {
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params(now)?.self_signed(&ca_key)?;
        Bundle::sign(
            ca_cert.pem(),
            ca_key.serialize_pem(),
            dns_names,
            lifetime,
            now,
        )
    }

    /// A new serving certificate for `dns_names`, signed by the CA of this bundle.
    pub fn renewed(
        &self,
        dns_names: &[String],
        lifetime: Duration,
        now: jiff::Timestamp,
    ) -> Result<Bundle, Error> {
        Bundle::sign(
            self.ca_cert.clone(),
            self.ca_key.clone(),
            dns_names,
            lifetime,
            now,
        )
    }

    fn sign(
        ca_cert: String,
        ca_key: String,
        dns_names: &[String],
        lifetime: Duration,
        now: jiff::Timestamp,
    ) -> Result<Bundle, Error> {
        // The CA's name and key are what a signature and its chain check; its dates are not.
        let issuer = Issuer::new(ca_params(now)?, KeyPair::from_pem(&ca_key)?);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params.distinguished_name.push(
            DnType::CommonName,
            dns_names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let not_after = after(now, lifetime);
        params.not_before = a_day_before(now);
        params.not_after = certificate_time(not_after);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Bundle {
            ca_cert,
            ca_key,
            cert: cert.pem(),
            key: key.serialize_pem(),
            not_after,
        })
    }

    /// Whether the serving certificate is in the last third of `lifetime` at `now`.
    pub fn due(&self, lifetime: Duration, now: jiff::Timestamp) -> bool {
        let left = self.not_after.duration_since(now);
        left < jiff::SignedDuration::try_from(lifetime / 3).unwrap_or_default()
    }

    /// What the webhook serves from this bundle.
    pub fn serving(&self) -> Serving {
        Serving {
            ca_cert: self.ca_cert.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            not_after: self.not_after,
        }
    }

    fn to_secret(&self, settings: &Settings) -> Secret {
        let data = [
            ("ca.crt", &self.ca_cert),
            ("ca.key", &self.ca_key),
            ("tls.crt", &self.cert),
            ("tls.key", &self.key),
        ]
        .into_iter()
        .map(|(key, pem)| (key.to_owned(), ByteString(pem.as_bytes().to_vec())))
        .collect();
        Secret {
            metadata: ObjectMeta {
                name: Some(settings.secret.clone()),
                namespace: Some(settings.namespace.clone()),
                annotations: Some(BTreeMap::from([(
                    NOT_AFTER.to_owned(),
                    self.not_after.to_string(),
                )])),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "snapcache-operator".to_owned(),
                )])),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".to_owned()),
            data: Some(data),
            ..Default::default()
        }
    }

    fn from_secret(secret: &Secret) -> Result<Bundle, Error> {
        let name = secret.metadata.name.clone().unwrap_or_default();
        let field = |key: &'static str| {
            text_field(secret, key).ok_or_else(|| Error::Unusable(name.clone(), key))
        };
        let not_after = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(NOT_AFTER))
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| Error::Unusable(name.clone(), NOT_AFTER))?;
        Ok(Bundle {
            ca_cert: field("ca.crt")?,
            ca_key: field("ca.key")?,
            cert: field("tls.crt")?,
            key: field("tls.key")?,
            not_after,
        })
    }
}

/// The Secret's `key`, when it holds non-blank UTF-8 text.
fn text_field(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|data| data.get(key))
        .and_then(|bytes| String::from_utf8(bytes.0.clone()).ok())
        .filter(|text| !text.trim().is_empty())
}

/// The CA: a name, the right to sign serving certificates, ten years.
fn ca_params(now: jiff::Timestamp) -> Result<CertificateParams, Error> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "snapcache webhook CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = a_day_before(now);
    ca.not_after = certificate_time(after(now, CA_LIFETIME));
    Ok(ca)
}

/// A day before `now`: a certificate's not-before, so a node whose clock lags accepts it.
fn a_day_before(now: jiff::Timestamp) -> time::OffsetDateTime {
    certificate_time(now - jiff::SignedDuration::from_hours(24))
}

/// `now` plus `lifetime`.
fn after(now: jiff::Timestamp, lifetime: Duration) -> jiff::Timestamp {
    now + jiff::SignedDuration::try_from(lifetime).unwrap_or_default()
}

/// `at` as rcgen takes it.
fn certificate_time(at: jiff::Timestamp) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(at.as_second())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// The names the API server may use for the webhook Service, then the extra hosts.
pub fn dns_names(settings: &Settings) -> Vec<String> {
    let (service, namespace) = (&settings.service, &settings.namespace);
    let mut names = vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        format!("{service}.{namespace}"),
        service.clone(),
    ];
    names.extend(settings.extra_hosts.iter().cloned());
    names
}

/// The certificates in the Secret, made or renewed there when missing or due. Replicas
/// race safely: a create or update that lost reads the winner's Secret instead.
pub async fn ensure(client: &kube::Client, settings: &Settings) -> Result<Bundle, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let names = dns_names(settings);
    for _ in 0..3 {
        let now = jiff::Timestamp::now();
        match secrets.get_opt(&settings.secret).await? {
            None => {
                let bundle = Bundle::generate(&names, settings.lifetime, now)?;
                match secrets
                    .create(&PostParams::default(), &bundle.to_secret(settings))
                    .await
                {
                    Ok(_) => return Ok(bundle),
                    Err(kube::Error::Api(e)) if e.code == 409 => continue,
                    Err(err) => return Err(err.into()),
                }
            }
            Some(secret) => {
                let current = Bundle::from_secret(&secret)?;
                if !current.due(settings.lifetime, now) {
                    return Ok(current);
                }
                let renewed = current.renewed(&names, settings.lifetime, now)?;
                let mut replacement = renewed.to_secret(settings);
                replacement.metadata.resource_version = secret.metadata.resource_version.clone();
                match secrets
                    .replace(&settings.secret, &PostParams::default(), &replacement)
                    .await
                {
                    Ok(_) => return Ok(renewed),
                    Err(kube::Error::Api(e)) if e.code == 409 => continue,
                    Err(err) => return Err(err.into()),
                }
            }
        }
    }
    Err(Error::Unusable(
        settings.secret.clone(),
        "certificate (three writers raced; retrying later)",
    ))
}

/// Puts the CA into every webhook of the MutatingWebhookConfiguration, if it differs.
pub async fn publish_ca(
    client: &kube::Client,
    settings: &Settings,
    ca_cert: &str,
) -> Result<(), Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(mut configuration) = api.get_opt(&settings.webhook_configuration).await? else {
        tracing::warn!(
            name = %settings.webhook_configuration,
            "no MutatingWebhookConfiguration of this name: pods are not injected until it exists"
        );
        return Ok(());
    };
    let ca = ByteString(ca_cert.as_bytes().to_vec());
    let mut changed = false;
    for webhook in configuration.webhooks.iter_mut().flatten() {
        if webhook.client_config.ca_bundle.as_ref() != Some(&ca) {
            webhook.client_config.ca_bundle = Some(ca.clone());
            changed = true;
        }
    }
    if changed {
        api.replace(
            &settings.webhook_configuration,
            &PostParams::default(),
            &configuration,
        )
        .await?;
        tracing::info!(name = %settings.webhook_configuration, "webhook caBundle updated");
    }
    Ok(())
}

/// The serving certificate rustls hands out, swapped in place on renewal; none until the
/// first is loaded (a handshake then fails, and the API server applies the failure policy).
/// It also keeps the CA that signed it, for the webhook configuration's caBundle.
#[derive(Debug, Default)]
pub struct Resolver {
    key: RwLock<Option<Arc<CertifiedKey>>>,
    ca_cert: RwLock<Option<String>>,
}

impl Resolver {
    pub fn replace(&self, key: CertifiedKey, ca_cert: &str) {
        *self.key.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(key));
        *self.ca_cert.write().unwrap_or_else(|p| p.into_inner()) = Some(ca_cert.to_owned());
    }

    /// PEM of the CA of the certificate served now.
    pub fn ca_cert(&self) -> Option<String> {
        self.ca_cert
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.key.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        dns_names(&Settings {
            namespace: "snapcache-system".to_owned(),
            secret: "s".to_owned(),
            service: "snapcache-webhook".to_owned(),
            webhook_configuration: "w".to_owned(),
            extra_hosts: Vec::new(),
            lifetime: Duration::from_secs(3600),
            source: Source::Operator,
        })
    }

    #[test]
    fn a_generated_bundle_loads_into_rustls_and_names_the_service() {
        let now = jiff::Timestamp::now();
        let bundle =
            Bundle::generate(&names(), Duration::from_secs(90 * 86400), now).expect("bundle");
        assert_eq!(names()[0], "snapcache-webhook.snapcache-system.svc");
        bundle.serving().certified_key().expect("rustls takes it");
        assert!(bundle.cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!bundle.due(Duration::from_secs(90 * 86400), now));
    }

    #[test]
    fn renewal_is_due_in_the_last_third_and_keeps_the_ca() {
        let lifetime = Duration::from_secs(90 * 86400);
        let start = jiff::Timestamp::now();
        let bundle = Bundle::generate(&names(), lifetime, start).expect("bundle");
        let at = |days: i64| start + jiff::SignedDuration::from_hours(24 * days);
        assert!(!bundle.due(lifetime, at(59)));
        assert!(bundle.due(lifetime, at(61)));
        let renewed = bundle.renewed(&names(), lifetime, at(61)).expect("renewed");
        assert_eq!(renewed.ca_cert, bundle.ca_cert);
        assert_ne!(renewed.cert, bundle.cert);
        assert!(!renewed.due(lifetime, at(61)));
    }

    #[test]
    fn a_bundle_survives_its_secret() {
        let settings = Settings {
            namespace: "ns".to_owned(),
            secret: "tls".to_owned(),
            service: "svc".to_owned(),
            webhook_configuration: "w".to_owned(),
            extra_hosts: Vec::new(),
            lifetime: Duration::from_secs(3600),
            source: Source::Operator,
        };
        let bundle = Bundle::generate(
            &dns_names(&settings),
            settings.lifetime,
            jiff::Timestamp::now(),
        )
        .expect("bundle");
        let back = Bundle::from_secret(&bundle.to_secret(&settings)).expect("read back");
        assert_eq!(back.cert, bundle.cert);
        assert_eq!(back.not_after.as_second(), bundle.not_after.as_second());
    }

    #[test]
    fn an_issued_secret_serves_with_the_expiry_of_its_certificate() {
        let now = jiff::Timestamp::now();
        let lifetime = Duration::from_secs(30 * 86400);
        let bundle = Bundle::generate(&names(), lifetime, now).expect("bundle");
        let secret = |keys: &[&str]| Secret {
            metadata: ObjectMeta {
                name: Some("issued".to_owned()),
                ..Default::default()
            },
            data: Some(
                [
                    ("tls.crt", &bundle.cert),
                    ("tls.key", &bundle.key),
                    ("ca.crt", &bundle.ca_cert),
                ]
                .into_iter()
                .filter(|(key, _)| keys.contains(key))
                .map(|(key, pem)| (key.to_owned(), ByteString(pem.as_bytes().to_vec())))
                .collect(),
            ),
            ..Default::default()
        };
        let serving = Serving::from_issued_secret(&secret(&["tls.crt", "tls.key", "ca.crt"]))
            .expect("issued");
        assert_eq!(serving.not_after.as_second(), bundle.not_after.as_second());
        assert_eq!(serving.ca_cert, bundle.ca_cert);
        serving.certified_key().expect("rustls takes it");
        let err = Serving::from_issued_secret(&secret(&["tls.crt", "tls.key"])).expect_err("no CA");
        assert!(err.to_string().contains("ca.crt"), "{err}");
        assert!(err.to_string().contains("cert-manager"), "{err}");
    }

    #[test]
    fn a_secret_without_its_fields_says_which_is_missing() {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some("tls".to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = Bundle::from_secret(&secret).expect_err("unusable");
        assert!(err.to_string().contains("delete it"), "{err}");
    }
}
