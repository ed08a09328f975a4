//! CRI `auth.identity_token`: an OAuth2 refresh token (what `docker login`
//! stores for token-based registries) traded for a registry access token at
//! the realm the registry names in its `WWW-Authenticate: Bearer`
//! challenge, with `grant_type=refresh_token` (the distribution token
//! spec's OAuth2 flow, as containerd's docker authorizer does it).
//! oci-client only knows the anonymous/basic GET flow, so this one request
//! is ours; the access token then goes to oci-client as a bearer token.

use super::hosts::Endpoint;
use crate::{Error, Result};

/// The parameters of a `Bearer` challenge (`realm`, `service`, ...).
pub(super) fn parse_challenge(header: &str) -> Option<Vec<(String, String)>> {
    let rest = header.trim().strip_prefix("Bearer ")?;
    let mut out = Vec::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (q[..end].to_string(), &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        out.push((key, value));
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some(out)
}

fn client(ep: &Endpoint) -> Result<reqwest::Client> {
    super::client::ensure_crypto_provider();
    let mut b = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(30))
        .danger_accept_invalid_certs(ep.skip_verify);
    for ca in &ep.ca {
        let pem = std::fs::read(ca).map_err(|e| Error::io("reading registry CA", ca, e))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| Error::FailedPrecondition(format!("registry CA {}: {e}", ca.display())))?;
        b = b.add_root_certificate(cert);
    }
    b.build()
        .map_err(|e| Error::Internal(format!("registry HTTP client: {e}")))
}

/// Trades `refresh` for an access token to pull `repository` from `ep`.
pub(super) async fn exchange(ep: &Endpoint, repository: &str, refresh: &str) -> Result<String> {
    let http = client(ep)?;
    let probe = format!("{}://{}/v2/", ep.scheme, ep.host);
    let res = http
        .get(&probe)
        .send()
        .await
        .map_err(|e| Error::Unavailable(format!("registry {} unreachable: {e}", ep.host)))?;
    let challenge = res
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|h| h.to_str().ok())
        .and_then(parse_challenge)
        .ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "auth.identity_token: registry {} asks for no bearer token (status {}), so it \
                 has no token service to trade an identity token at; pass username/password",
                ep.host,
                res.status()
            ))
        })?;
    let param = |k: &str| {
        challenge
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let realm = param("realm").ok_or_else(|| {
        Error::Registry(format!(
            "registry {}: bearer challenge without realm",
            ep.host
        ))
    })?;
    let scope = format!("repository:{repository}:pull");
    // Built before any await: the serializer is not Send.
    let body = {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "refresh_token")
            .append_pair("refresh_token", refresh)
            .append_pair("client_id", "imacri")
            .append_pair("scope", &scope);
        if let Some(service) = param("service") {
            form.append_pair("service", &service);
        }
        form.finish()
    };
    let res = http
        .post(&realm)
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(body)
        .send()
        .await
        .map_err(|e| Error::Unavailable(format!("token service {realm} unreachable: {e}")))?;
    let status = res.status();
    let body = res.bytes().await.unwrap_or_default();
    if !status.is_success() {
        return Err(Error::FailedPrecondition(format!(
            "auth.identity_token: token service {realm} refused it ({status}): {}",
            String::from_utf8_lossy(&body).trim()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| Error::Registry(format!("token service {realm} answered no JSON: {e}")))?;
    v.get("access_token")
        .or_else(|| v.get("token"))
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .ok_or_else(|| Error::Registry(format!("token service {realm} returned no access_token")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            [
                ("realm".into(), "https://auth.example/token".into()),
                ("service".into(), "registry.example".into()),
                ("scope".into(), "repository:a/b:pull,push".into()),
            ]
        );
        assert!(parse_challenge(r#"Basic realm="x""#).is_none());
        let bare = parse_challenge("Bearer realm=http://t/token, service=s").unwrap();
        assert_eq!(bare[1], ("service".into(), "s".into()));
    }
}
