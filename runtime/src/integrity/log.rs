//! The measurement log: one entry per measurement, in an ascii format like
//! IMA's `ima-ng`, with a template whose hashed data also binds the pod and
//! container ID, so an entry cannot be moved to another pod without
//! changing its template hash (and so the PCR it replays to).
//!
//! Line: `<pcr> <template-hash> <template> sha256:<digest> <path> <pod> <container> <event>`
//! Paths are escaped (`\xNN` for space, backslash and control bytes) so a
//! line always splits into eight fields.
//!
//! Template data (what the template hash is sha256 of), each field as a
//! little-endian u32 length followed by its bytes, as IMA encodes ima-ng:
//! - `imacri-ng2` (written now): `content`, `pod\0`, `container\0`,
//!   `event\0`, where `content` = sha256 of the fields `"sha256:\0" +
//!   digest` and `path\0`. A pod's evidence shows another pod's entries
//!   *redacted*: `<pcr> <template-hash> imacri-ng2-redacted content:<hex> -
//!   <pod> <container> <event>`. The verifier still checks each against its
//!   template hash and replays the PCR, and sees whose entry it is (so a
//!   pod's own entries cannot pass as someone else's), but never its path
//!   or digest.
//! - `imacri-ng` (older logs, read only): `"sha256:\0" + digest`, `path\0`,
//!   `pod\0`, `container\0`, `event\0`. Such entries cannot be redacted.

use sha2::{Digest, Sha256};
use std::fmt;

/// The first template (read, never written now).
pub const TEMPLATE: &str = "imacri-ng";
/// The template of new entries.
pub const TEMPLATE_V2: &str = "imacri-ng2";
/// A v2 entry with its digest and path replaced by their commitment.
pub const TEMPLATE_V2_REDACTED: &str = "imacri-ng2-redacted";

/// Which template an entry's hash follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Template {
    V1,
    #[default]
    V2,
}

/// What caused an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    /// An execution (FAN_OPEN_EXEC_PERM), allowed.
    Exec,
    /// An executable mapping of a file (mmap/mprotect with PROT_EXEC),
    /// allowed.
    Mmap,
    /// An open for reading (the policy's FILE_CHECK rules).
    Read,
    /// An execution or executable mapping denied by an enforce policy.
    Deny,
    /// imacri was not measuring this container for a while (daemon restart);
    /// digest is zero and path is "-".
    Gap,
    /// Measurement of a container began: digest is its image's, path is
    /// `<image> <RFC 3339 time marking began>`. Every container's entries
    /// start with one; the verifier trusts no container without it.
    Start,
    /// A file was executed or mapped executable while open for writing (IMA's
    /// open-writers violation): what runs may differ from what was measured.
    Writers,
    /// The pod reached its entry quota (`ima.max_entries_per_pod`): nothing
    /// new is measured, so every new execution is refused from here on.
    Quota,
    /// A file mapped executable in the container was opened for writing or
    /// written afterwards, while the container ran (IMA's ToMToU
    /// violation): a mapping that outlived the write runs what was written,
    /// not what was measured. Digest is zero, as IMA's.
    Tomtou,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Exec => "exec",
            Event::Mmap => "mmap",
            Event::Read => "read",
            Event::Deny => "deny",
            Event::Gap => "gap",
            Event::Start => "start",
            Event::Writers => "writers",
            Event::Quota => "quota",
            Event::Tomtou => "tomtou",
        }
    }

    fn parse(s: &str) -> Option<Event> {
        Some(match s {
            "exec" => Event::Exec,
            "mmap" => Event::Mmap,
            "read" => Event::Read,
            "deny" => Event::Deny,
            "gap" => Event::Gap,
            "start" => Event::Start,
            "writers" => Event::Writers,
            "quota" => Event::Quota,
            "tomtou" => Event::Tomtou,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub pcr: u32,
    /// sha256 of the template data.
    pub template_hash: [u8; 32],
    /// sha256 of the file's content.
    pub digest: [u8; 32],
    /// Path as seen inside the container.
    pub path: String,
    pub pod: String,
    pub container: String,
    pub event: Event,
    #[serde(default)]
    pub template: Template,
    /// A redacted entry: the commitment to digest and path (which are
    /// zero and "-"), never the values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<[u8; 32]>,
}

impl Entry {
    /// A new entry with its template hash computed.
    pub fn new(
        pcr: u32,
        digest: [u8; 32],
        path: &str,
        pod: &str,
        container: &str,
        event: Event,
    ) -> Entry {
        let mut e = Entry {
            pcr,
            template_hash: [0; 32],
            digest,
            path: path.to_string(),
            pod: pod.to_string(),
            container: container.to_string(),
            event,
            template: Template::V2,
            content: None,
        };
        e.template_hash = e.computed_hash();
        e
    }

    /// This entry in the first template (as older logs hold them).
    pub fn in_v1(mut self) -> Entry {
        self.template = Template::V1;
        self.content = None;
        self.template_hash = self.computed_hash();
        self
    }

    /// The template hash the fields call for.
    fn computed_hash(&self) -> [u8; 32] {
        match self.template {
            Template::V1 => template_hash(
                &self.digest,
                &self.path,
                &self.pod,
                &self.container,
                self.event,
            ),
            Template::V2 => {
                let content = self
                    .content
                    .unwrap_or_else(|| content_hash(&self.digest, &self.path));
                template_hash_v2(&content, &self.pod, &self.container, self.event)
            }
        }
    }

    /// True when the template hash matches the fields (no field was edited).
    pub fn is_consistent(&self) -> bool {
        self.template_hash == self.computed_hash()
    }

    /// Whether digest and path were withheld.
    pub fn is_redacted(&self) -> bool {
        self.content.is_some()
    }

    /// This entry as another pod's evidence shows it: digest and path
    /// replaced by their commitment. None for v1 entries, whose hash needs
    /// the values themselves.
    pub fn redacted(&self) -> Option<Entry> {
        if self.template != Template::V2 {
            return None;
        }
        Some(Entry {
            digest: [0; 32],
            path: "-".into(),
            content: Some(
                self.content
                    .unwrap_or_else(|| content_hash(&self.digest, &self.path)),
            ),
            ..self.clone()
        })
    }

    pub fn digest_hex(&self) -> String {
        format!("sha256:{}", hex::encode(self.digest))
    }

    /// Parses one log line; the error says what is wrong.
    pub fn parse(line: &str) -> Result<Entry, ParseError> {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() != 8 {
            return Err(ParseError::Fields(f.len()));
        }
        let bad = |field: &'static str, value: &str| ParseError::Bad {
            field,
            value: value.to_string(),
        };
        let pcr = f[0].parse().map_err(|_| bad("pcr", f[0]))?;
        let template_hash = hex32(f[1]).ok_or_else(|| bad("template hash", f[1]))?;
        let event = Event::parse(f[7]).ok_or_else(|| bad("event", f[7]))?;
        let (template, digest, path, content) = match f[2] {
            TEMPLATE_V2_REDACTED => {
                let c = f[3]
                    .strip_prefix("content:")
                    .and_then(hex32)
                    .ok_or_else(|| bad("content commitment", f[3]))?;
                if f[4] != "-" {
                    return Err(ParseError::RedactedPath);
                }
                (Template::V2, [0; 32], "-".to_string(), Some(c))
            }
            t @ (TEMPLATE | TEMPLATE_V2) => {
                let digest = f[3]
                    .strip_prefix("sha256:")
                    .and_then(hex32)
                    .ok_or_else(|| bad("digest", f[3]))?;
                let path = unescape(f[4]).ok_or_else(|| bad("path", f[4]))?;
                let template = if t == TEMPLATE {
                    Template::V1
                } else {
                    Template::V2
                };
                (template, digest, path, None)
            }
            other => return Err(bad("template", other)),
        };
        Ok(Entry {
            pcr,
            template_hash,
            digest,
            path,
            pod: f[5].to_string(),
            container: f[6].to_string(),
            event,
            template,
            content,
        })
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (template, value, path) = match (self.template, self.content) {
            (_, Some(c)) => (
                TEMPLATE_V2_REDACTED,
                format!("content:{}", hex::encode(c)),
                "-".to_string(),
            ),
            (t, None) => (
                if t == Template::V1 {
                    TEMPLATE
                } else {
                    TEMPLATE_V2
                },
                format!("sha256:{}", hex::encode(self.digest)),
                escape(&self.path),
            ),
        };
        write!(
            f,
            "{} {} {template} {value} {path} {} {} {}",
            self.pcr,
            hex::encode(self.template_hash),
            self.pod,
            self.container,
            self.event.as_str()
        )
    }
}

pub fn template_hash(
    digest: &[u8; 32],
    path: &str,
    pod: &str,
    container: &str,
    event: Event,
) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut field = |bytes: &[&[u8]]| {
        let len: usize = bytes.iter().map(|b| b.len()).sum();
        h.update((len as u32).to_le_bytes());
        for b in bytes {
            h.update(b);
        }
    };
    field(&[b"sha256:\0", digest]);
    field(&[path.as_bytes(), b"\0"]);
    field(&[pod.as_bytes(), b"\0"]);
    field(&[container.as_bytes(), b"\0"]);
    field(&[event.as_str().as_bytes(), b"\0"]);
    h.finalize().into()
}

/// The commitment to an entry's digest and path (v2 template).
pub fn content_hash(digest: &[u8; 32], path: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    for bytes in [
        [b"sha256:\0".as_slice(), digest].concat(),
        [path.as_bytes(), b"\0"].concat(),
    ] {
        h.update((bytes.len() as u32).to_le_bytes());
        h.update(&bytes);
    }
    h.finalize().into()
}

/// The v2 template hash: the content commitment, pod, container, event.
pub fn template_hash_v2(content: &[u8; 32], pod: &str, container: &str, event: Event) -> [u8; 32] {
    let mut h = Sha256::new();
    let fields: [&[u8]; 4] = [
        content,
        &[pod.as_bytes(), b"\0"].concat(),
        &[container.as_bytes(), b"\0"].concat(),
        &[event.as_str().as_bytes(), b"\0"].concat(),
    ];
    for bytes in fields {
        h.update((bytes.len() as u32).to_le_bytes());
        h.update(bytes);
    }
    h.finalize().into()
}

/// PCR extend as the TPM does it: sha256(old || new).
pub fn extend(pcr: &[u8; 32], template_hash: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(pcr);
    h.update(template_hash);
    h.finalize().into()
}

/// The PCR value a log replays to, from an all-zero PCR.
pub fn replay<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> [u8; 32] {
    replay_from([0u8; 32], entries)
}

/// The PCR value `entries` extend `pcr` to (a log continued from a point
/// already verified).
pub fn replay_from<'a>(pcr: [u8; 32], entries: impl IntoIterator<Item = &'a Entry>) -> [u8; 32] {
    entries
        .into_iter()
        .fold(pcr, |pcr, e| extend(&pcr, &e.template_hash))
}

/// Why a log line is not an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("expected 8 fields, found {0}")]
    Fields(usize),
    #[error("bad {field} {value:?}")]
    Bad { field: &'static str, value: String },
    #[error("a redacted entry carries a path")]
    RedactedPath,
    #[error("log line {line}: {error}")]
    Line { line: usize, error: Box<ParseError> },
}

/// Parses a whole log; errors name the line.
pub fn parse_log(text: &str) -> Result<Vec<Entry>, ParseError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| {
            Entry::parse(l).map_err(|e| ParseError::Line {
                line: i + 1,
                error: Box::new(e),
            })
        })
        .collect()
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    let v = hex::decode(s).ok()?;
    v.try_into().ok()
}

fn escape(path: &str) -> String {
    // Only ASCII bytes are replaced, so the result stays valid UTF-8.
    let mut out = Vec::with_capacity(path.len());
    for b in path.bytes() {
        if b <= b' ' || b == b'\\' || b == 0x7f {
            out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
        } else {
            out.push(b);
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn unescape(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            let h = s.get(i + 2..i + 4)?;
            if b.get(i + 1) != Some(&b'x') {
                return None;
            }
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_round_trips_with_awkward_paths() {
        for path in ["/bin/sh", "/tmp/a b\\c\nd", "/opt/ünï", "/tmp/a\\xffb"] {
            let e = Entry::new(15, [7; 32], path, "pod1", "ctr1", Event::Exec);
            let line = e.to_string();
            assert_eq!(line.split(' ').count(), 8, "{line}");
            let back = Entry::parse(&line).unwrap();
            assert_eq!(back, e);
            assert!(back.is_consistent());
        }
    }

    #[test]
    fn template_hash_binds_pod_and_container() {
        let a = Entry::new(15, [1; 32], "/bin/sh", "podA", "c", Event::Exec);
        let b = Entry::new(15, [1; 32], "/bin/sh", "podB", "c", Event::Exec);
        let c = Entry::new(15, [1; 32], "/bin/sh", "podA", "d", Event::Exec);
        assert_ne!(a.template_hash, b.template_hash);
        assert_ne!(a.template_hash, c.template_hash);
        // Moving an entry to another pod by editing the line is detected.
        let moved = a.to_string().replace("podA", "podB");
        assert!(!Entry::parse(&moved).unwrap().is_consistent());
    }

    #[test]
    fn redacted_entries_keep_their_hash_and_owner_but_not_their_content() {
        let e = Entry::new(15, [9; 32], "/secret/tool", "podB", "c", Event::Exec);
        let r = e.redacted().unwrap();
        let line = r.to_string();
        assert!(
            !line.contains("secret") && !line.contains(&hex::encode([9u8; 32])),
            "{line}"
        );
        assert_eq!(line.split(' ').count(), 8, "{line}");
        let back = Entry::parse(&line).unwrap();
        assert!(back.is_redacted() && back.is_consistent());
        assert_eq!(back.template_hash, e.template_hash);
        // Relabelling it (to pass an own entry off as another pod's, or the
        // reverse) breaks its hash.
        for (from, to) in [("podB", "podA"), (" c ", " d "), ("exec", "read")] {
            let moved = Entry::parse(&line.replace(from, to)).unwrap();
            assert!(!moved.is_consistent(), "{from} -> {to}");
        }
        // v1 entries cannot be redacted; they still parse and verify.
        let old = Entry::new(15, [1; 32], "/bin/sh", "p", "c", Event::Exec).in_v1();
        assert!(old.redacted().is_none());
        let back = Entry::parse(&old.to_string()).unwrap();
        assert!(back.is_consistent() && back.template == Template::V1);
        assert!(old.to_string().contains(" imacri-ng "));
    }

    #[test]
    fn replay_matches_sequential_extends() {
        let es: Vec<Entry> = (0..3)
            .map(|i| Entry::new(15, [i; 32], "/x", "p", "c", Event::Exec))
            .collect();
        let mut pcr = [0u8; 32];
        for e in &es {
            pcr = extend(&pcr, &e.template_hash);
        }
        assert_eq!(replay(&es), pcr);
        assert_ne!(replay(&es[..2]), pcr);
    }

    #[test]
    fn parse_errors_name_the_problem() {
        let good = Entry::new(15, [0; 32], "/x", "p", "c", Event::Gap).to_string();
        assert!(parse_log(&format!("{good}\n{good}\n")).unwrap().len() == 2);
        let e = parse_log(&format!("{good}\n15 zz\n")).unwrap_err();
        assert!(matches!(e, ParseError::Line { line: 2, .. }), "{e}");
        assert!(e.to_string().starts_with("log line 2: "), "{e}");
        let e = Entry::parse(&good.replace("imacri-ng2", "ima-ng")).unwrap_err();
        assert!(
            matches!(&e, ParseError::Bad { field: "template", value } if value == "ima-ng"),
            "{e}"
        );
    }
}
