//! A minimal OAuth2 token service for a token-auth registry: it trades one
//! known refresh token (`grant_type=refresh_token`, as kubelet's
//! `identity_token` is used) for an ES256 JWT the registry accepts, signed
//! by a self-signed P-256 key sent along in the `x5c` header.

use anyhow::{bail, Context, Result};
use base64::Engine;
use p256::ecdsa::{signature::Signer, Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::registry::{TOKEN_ISSUER, TOKEN_SERVICE};

pub struct TokenService {
    /// `http://127.0.0.1:PORT/token`
    pub realm: String,
    /// The certificate the registry trusts.
    pub cert: PathBuf,
    /// Tokens handed out so far.
    pub issued: Arc<AtomicUsize>,
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn jwt(key: &SigningKey, cert_der: &[u8], scope: &str) -> String {
    let header = serde_json::json!({
        "typ": "JWT", "alg": "ES256",
        "x5c": [base64::engine::general_purpose::STANDARD.encode(cert_der)],
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    // scope: repository:<name>:<actions>
    let mut parts = scope.splitn(3, ':');
    let (typ, name, actions) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER, "sub": "kubelet", "aud": TOKEN_SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{now}"),
        "access": [{"type": typ, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}],
    });
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig: Signature = key.sign(signing_input.as_bytes());
    format!("{signing_input}.{}", b64(&sig.to_bytes()))
}

impl TokenService {
    /// Starts the service; only `refresh_token` is accepted.
    pub async fn start(dir: &Path, refresh_token: &str) -> Result<TokenService> {
        std::fs::create_dir_all(dir)?;
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "token.key",
                "-out",
                "token.crt",
                "-subj",
                "/CN=imacri-test-token",
                "-days",
                "2",
            ])
            .current_dir(dir)
            .output()
            .context("openssl")?;
        if !out.status.success() {
            bail!("openssl: {}", String::from_utf8_lossy(&out.stderr));
        }
        let out = std::process::Command::new("openssl")
            .args([
                "x509",
                "-in",
                "token.crt",
                "-outform",
                "DER",
                "-out",
                "token.der",
            ])
            .current_dir(dir)
            .output()?;
        if !out.status.success() {
            bail!("openssl: {}", String::from_utf8_lossy(&out.stderr));
        }
        let key = SigningKey::from_pkcs8_pem(&std::fs::read_to_string(dir.join("token.key"))?)
            .map_err(|e| anyhow::anyhow!("token key: {e}"))?;
        let der = std::fs::read(dir.join("token.der"))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let issued = Arc::new(AtomicUsize::new(0));
        let (want, count) = (refresh_token.to_string(), issued.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (key, der, want, count) =
                    (key.clone(), der.clone(), want.clone(), count.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Headers, then Content-Length bytes of form body.
                    let body = loop {
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break buf[end + 4..end + 4 + len].to_vec();
                        }
                    };
                    let form: std::collections::HashMap<String, String> =
                        url::form_urlencoded::parse(&body).into_owned().collect();
                    let ok = form.get("grant_type").map(String::as_str) == Some("refresh_token")
                        && form.get("refresh_token") == Some(&want)
                        && form.get("service").map(String::as_str) == Some(TOKEN_SERVICE);
                    let (status, reply) = if ok {
                        count.fetch_add(1, Ordering::SeqCst);
                        let scope = form.get("scope").cloned().unwrap_or_default();
                        let t = jwt(&key, &der, &scope);
                        (
                            "200 OK",
                            serde_json::json!({"access_token": t, "expires_in": 300}),
                        )
                    } else {
                        (
                            "401 Unauthorized",
                            serde_json::json!({"error": "invalid_grant"}),
                        )
                    };
                    let text = reply.to_string();
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                                text.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                });
            }
        });
        Ok(TokenService {
            realm: format!("http://127.0.0.1:{port}/token"),
            cert: dir.join("token.crt"),
            issued,
        })
    }
}
