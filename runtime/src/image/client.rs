//! Registry clients (oci-client), and the ones kept between pulls.

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::Client;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use super::hosts::Endpoint;
use crate::{Error, Result};

pub(super) fn ensure_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A new client for `ep`.
pub(super) fn client_for(ep: &Endpoint) -> Result<Client> {
    Ok(build(ep, read_cas(ep)?))
}

/// The endpoint's CA files, read now.
fn read_cas(ep: &Endpoint) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    ep.ca
        .iter()
        .map(|ca| {
            std::fs::read(ca)
                .map(|data| (ca.clone(), data))
                .map_err(|e| Error::io("reading registry CA", ca, e))
        })
        .collect()
}

fn build(ep: &Endpoint, cas: Vec<(PathBuf, Vec<u8>)>) -> Client {
    ensure_crypto_provider();
    let extra_root_certificates = cas
        .into_iter()
        .map(|(_, data)| Certificate {
            encoding: CertificateEncoding::Pem,
            data,
        })
        .collect();
    let protocol = if ep.scheme == "http" {
        ClientProtocol::HttpsExcept(vec![ep.host.clone()])
    } else {
        ClientProtocol::Https
    };
    Client::new(ClientConfig {
        protocol,
        accept_invalid_certificates: ep.skip_verify,
        extra_root_certificates,
        connect_timeout: Some(std::time::Duration::from_secs(10)),
        ..Default::default()
    })
}

/// How many clients are kept; past it, all are dropped.
const KEPT: usize = 16;

/// Clients kept between pulls, one per endpoint *and credentials*:
/// building one loads the system's root certificates (~4 ms here) and a
/// kept one reuses its connections. Never shared across credentials: a
/// client keeps the first credentials it is given for a registry, and the
/// tokens they bought, so a pull with other (or no) credentials must not
/// reach it. The key covers everything the client is built from (CA files
/// read again for every pull), and the credentials only as a digest.
#[derive(Default)]
pub(super) struct Clients {
    kept: Mutex<HashMap<[u8; 32], Client>>,
}

impl Clients {
    pub(super) fn get(&self, ep: &Endpoint, auth: &RegistryAuth) -> Result<Client> {
        let cas = read_cas(ep)?;
        let key = key(ep, &cas, auth);
        if let Some(c) = self.kept.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(c);
        }
        let client = build(ep, cas);
        if let Ok(mut m) = self.kept.lock() {
            if m.len() >= KEPT {
                m.clear();
            }
            m.insert(key, client.clone());
        }
        Ok(client)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept.lock().map(|m| m.len()).unwrap_or(0)
    }
}

/// A digest of what a client is built from and the credentials it is
/// given; each part length-prefixed, so no two inputs run together.
fn key(ep: &Endpoint, cas: &[(PathBuf, Vec<u8>)], auth: &RegistryAuth) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut part = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    part(ep.scheme.as_bytes());
    part(ep.host.as_bytes());
    part(&[u8::from(ep.skip_verify)]);
    for (path, data) in cas {
        part(path.as_os_str().as_encoded_bytes());
        part(data);
    }
    match auth {
        RegistryAuth::Anonymous => part(b"anonymous"),
        RegistryAuth::Basic(u, p) => {
            part(b"basic");
            part(u.as_bytes());
            part(p.as_bytes());
        }
        RegistryAuth::Bearer(t) => {
            part(b"bearer");
            part(t.as_bytes());
        }
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(host: &str) -> Endpoint {
        Endpoint {
            scheme: "http".into(),
            host: host.into(),
            capabilities: vec!["pull".into()],
            skip_verify: false,
            ca: vec![],
            headers: Default::default(),
        }
    }

    #[test]
    fn a_client_is_kept_per_endpoint_and_credentials() {
        let clients = Clients::default();
        let basic = |u: &str, p: &str| RegistryAuth::Basic(u.into(), p.into());
        clients
            .get(&ep("r:5000"), &RegistryAuth::Anonymous)
            .unwrap();
        clients
            .get(&ep("r:5000"), &RegistryAuth::Anonymous)
            .unwrap();
        assert_eq!(clients.len(), 1, "the same endpoint and credentials");
        // Other credentials never get a client that holds someone else's.
        clients.get(&ep("r:5000"), &basic("alice", "pw")).unwrap();
        clients
            .get(&ep("r:5000"), &basic("alice", "other"))
            .unwrap();
        clients.get(&ep("r:5000"), &basic("alicep", "w")).unwrap();
        clients
            .get(&ep("r:5000"), &RegistryAuth::Bearer("alice".into()))
            .unwrap();
        assert_eq!(clients.len(), 5);
        clients
            .get(&ep("r:5001"), &RegistryAuth::Anonymous)
            .unwrap();
        let mut insecure = ep("r:5000");
        insecure.skip_verify = true;
        clients.get(&insecure, &RegistryAuth::Anonymous).unwrap();
        assert_eq!(clients.len(), 7);
    }

    #[test]
    fn a_changed_ca_file_is_a_new_client() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "one").unwrap();
        let mut e = ep("r:5000");
        e.scheme = "https".into();
        e.ca = vec![ca.clone()];
        let clients = Clients::default();
        clients.get(&e, &RegistryAuth::Anonymous).unwrap();
        std::fs::write(&ca, "two").unwrap();
        clients.get(&e, &RegistryAuth::Anonymous).unwrap();
        assert_eq!(clients.len(), 2);
        // A CA that cannot be read is an error, as for a new client.
        std::fs::remove_file(&ca).unwrap();
        assert!(clients.get(&e, &RegistryAuth::Anonymous).is_err());
    }
}
