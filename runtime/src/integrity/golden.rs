//! Reference values from an image's layers, the way the node sees its root
//! filesystem: layers applied in order (OCI whiteouts and opaque
//! directories honoured, hard links resolved), then every regular file's
//! sha256 at its in-container path. The result equals what the node's
//! GoldenPolicy computes from the mounted snapshot, so a verifier can make
//! its policy from the registry without asking the node it will judge.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;

use super::allowlist::Allowlist;

/// What a path is after some layers.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    File(String),
    Dir,
    Other,
}

/// `./a/b/` or `/a/b` -> `/a/b` (as bytes: paths need not be UTF-8).
fn normalize(raw: &[u8]) -> Option<Vec<u8>> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for p in raw.split(|b| *b == b'/') {
        match p {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for p in parts {
        out.push(b'/');
        out.extend_from_slice(p);
    }
    Some(out)
}

fn remove_tree(tree: &mut BTreeMap<Vec<u8>, Node>, path: &[u8]) {
    tree.remove(path);
    let mut prefix = path.to_vec();
    prefix.push(b'/');
    let children: Vec<Vec<u8>> = tree
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .map(|(k, _)| k.clone())
        .collect();
    for c in children {
        tree.remove(&c);
    }
}

/// One layer's entries, read before any is applied (whiteouts in a layer
/// apply to the layers below it only).
enum Change {
    Whiteout(Vec<u8>),
    Opaque(Vec<u8>),
    Put(Vec<u8>, Node),
    HardLink(Vec<u8>, Vec<u8>),
}

fn read_layer(r: impl Read) -> std::io::Result<Vec<Change>> {
    let mut out = Vec::new();
    let mut ar = tar::Archive::new(r);
    for e in ar.entries()? {
        let mut e = e?;
        let raw = e.path_bytes().into_owned();
        let Some(path) = normalize(&raw) else {
            continue;
        };
        let (dir, base) = match path.iter().rposition(|b| *b == b'/') {
            Some(i) => (path[..i].to_vec(), path[i + 1..].to_vec()),
            None => (Vec::new(), path.clone()),
        };
        if base == b".wh..wh..opq" {
            out.push(Change::Opaque(dir));
            continue;
        }
        if let Some(hidden) = base.strip_prefix(b".wh.") {
            let mut p = dir.clone();
            p.push(b'/');
            p.extend_from_slice(hidden);
            out.push(Change::Whiteout(p));
            continue;
        }
        match e.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut h = Sha256::new();
                std::io::copy(&mut e, &mut h)?;
                let d = format!("sha256:{}", hex::encode(h.finalize()));
                out.push(Change::Put(path, Node::File(d)));
            }
            tar::EntryType::Directory => out.push(Change::Put(path, Node::Dir)),
            tar::EntryType::Link => {
                let target = e
                    .link_name_bytes()
                    .and_then(|t| normalize(&t))
                    .unwrap_or_default();
                out.push(Change::HardLink(path, target));
            }
            _ => out.push(Change::Put(path, Node::Other)),
        }
    }
    Ok(out)
}

fn apply(tree: &mut BTreeMap<Vec<u8>, Node>, changes: Vec<Change>) {
    for c in &changes {
        match c {
            Change::Whiteout(p) => remove_tree(tree, p),
            Change::Opaque(d) => {
                let keep = tree.get(d).cloned();
                remove_tree(tree, d);
                if let Some(k) = keep {
                    tree.insert(d.clone(), k);
                }
            }
            _ => {}
        }
    }
    for c in changes {
        match c {
            Change::Put(p, n) => {
                // A directory over a directory keeps its children; anything
                // else replaces what was there, children included.
                if !(n == Node::Dir && tree.get(&p) == Some(&Node::Dir)) {
                    remove_tree(tree, &p);
                }
                tree.insert(p, n);
            }
            Change::HardLink(p, target) => {
                let n = tree.get(&target).cloned().unwrap_or(Node::Other);
                remove_tree(tree, &p);
                tree.insert(p, n);
            }
            Change::Whiteout(_) | Change::Opaque(_) => {}
        }
    }
}

/// Why an image's layers give no golden policy.
#[derive(Debug, thiserror::Error)]
pub enum GoldenError {
    #[error("layer media type {0} is not supported (tar, tar+gzip)")]
    MediaType(String),
    #[error("{path}: {source}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading layer {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Layer media types this reads: tar, gzip-compressed tar.
fn decompress<'a>(media_type: &str, f: std::fs::File) -> Result<Box<dyn Read + 'a>, GoldenError> {
    let r = std::io::BufReader::new(f);
    if media_type.ends_with("+gzip") || media_type.ends_with(".gzip") {
        Ok(Box::new(flate2::read::GzDecoder::new(r)))
    } else if media_type.ends_with(".tar") || media_type.ends_with("tar") {
        Ok(Box::new(r))
    } else {
        Err(GoldenError::MediaType(media_type.to_string()))
    }
}

/// The policy allowing every regular file of the image whose layers are
/// `layers` (path and media type, lowest first).
pub fn from_layers(
    layers: &[(std::path::PathBuf, String)],
    source: &str,
) -> Result<Allowlist, GoldenError> {
    let mut tree = BTreeMap::new();
    for (path, media_type) in layers {
        let f = std::fs::File::open(path).map_err(|source| GoldenError::Open {
            path: path.clone(),
            source,
        })?;
        let changes =
            read_layer(decompress(media_type, f)?).map_err(|source| GoldenError::Read {
                path: path.clone(),
                source,
            })?;
        apply(&mut tree, changes);
    }
    let mut a = Allowlist {
        version: 1,
        source: source.to_string(),
        ..Default::default()
    };
    for (p, n) in tree {
        if let Node::File(d) = n {
            let text = super::digest::path_text(std::ffi::OsStr::from_bytes(&p[1..]));
            a.files.entry(format!("/{text}")).or_default().insert(d);
        }
    }
    Ok(a)
}

/// The policy of `image` straight from its registry (no containerd): the
/// source line names the image and its ID exactly as the node's
/// GoldenPolicy does, so both paths write the same file.
pub async fn from_registry(
    image: &str,
    hosts_dir: &std::path::Path,
    creds: &crate::image::Credentials,
    scratch: &std::path::Path,
) -> crate::Result<Allowlist> {
    let img = crate::image::remote::fetch(image, hosts_dir, creds, scratch).await?;
    let layers: Vec<(std::path::PathBuf, String)> = img
        .layers
        .iter()
        .map(|l| (l.path.clone(), l.media_type.clone()))
        .collect();
    let source = source_line(image, &img.id);
    let res = tokio::task::spawn_blocking(move || from_layers(&layers, &source))
        .await
        .map_err(|e| crate::Error::Internal(e.to_string()))?
        .map_err(|e| crate::Error::Registry(e.to_string()));
    drop(img);
    res
}

/// The `source` of a golden policy, the same on the node and off it.
pub fn source_line(image: &str, id: &str) -> String {
    format!("golden policy of image {image} ({id})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(entries: &[(&str, Option<&[u8]>)], links: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (p, data) in entries {
            let mut h = tar::Header::new_gnu();
            match data {
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    h.set_mode(0o644);
                    h.set_cksum();
                    b.append_data(&mut h, p, *d).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    h.set_cksum();
                    b.append_data(&mut h, p, std::io::empty()).unwrap();
                }
            }
        }
        for (p, target) in links {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Link);
            h.set_size(0);
            b.append_link(&mut h, p, target).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn sha(d: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(d)))
    }

    #[test]
    fn layers_flatten_with_whiteouts_opaque_dirs_and_hard_links() {
        let dir = tempfile::tempdir().unwrap();
        let l0 = layer(
            &[
                ("bin/", None),
                ("bin/sh", Some(b"sh0")),
                ("bin/gone", Some(b"x")),
                ("etc/", None),
                ("etc/old/a", Some(b"a")),
                ("opt/x/y", Some(b"y")),
            ],
            &[("bin/ln", "bin/sh")],
        );
        let l1 = layer(
            &[
                ("bin/sh", Some(b"sh1")),
                ("bin/.wh.gone", Some(b"")),
                ("etc/old/.wh..wh..opq", Some(b"")),
                ("etc/old/b", Some(b"b")),
                ("./opt/x", Some(b"now a file")),
            ],
            &[],
        );
        let mut layers = Vec::new();
        for (i, l) in [l0, l1].iter().enumerate() {
            let p = dir.path().join(format!("l{i}"));
            std::fs::write(&p, l).unwrap();
            layers.push((p, "application/vnd.oci.image.layer.v1.tar".to_string()));
        }
        let a = from_layers(&layers, "s").unwrap();
        let files: Vec<(&str, &str)> = a
            .files
            .iter()
            .map(|(p, d)| (p.as_str(), d.iter().next().unwrap().as_str()))
            .collect();
        let (sh0, sh1) = (sha(b"sh0"), sha(b"sh1"));
        let (b, opt) = (sha(b"b"), sha(b"now a file"));
        assert_eq!(
            files,
            [
                ("/bin/ln", sh0.as_str()),
                ("/bin/sh", sh1.as_str()),
                ("/etc/old/b", b.as_str()),
                ("/opt/x", opt.as_str()),
            ]
        );
    }

    #[test]
    fn gzip_layers_and_unknown_media_types() {
        let dir = tempfile::tempdir().unwrap();
        let raw = layer(&[("f", Some(b"data"))], &[]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &raw).unwrap();
        let p = dir.path().join("l");
        std::fs::write(&p, gz.finish().unwrap()).unwrap();
        let a = from_layers(
            &[(
                p.clone(),
                "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            )],
            "s",
        )
        .unwrap();
        assert_eq!(a.files["/f"].iter().next().unwrap(), &sha(b"data"));
        let e = from_layers(
            &[(p, "application/vnd.oci.image.layer.v1.tar+zstd".into())],
            "s",
        )
        .unwrap_err();
        assert!(
            matches!(&e, GoldenError::MediaType(m) if m.ends_with("zstd")),
            "{e}"
        );
    }
}
