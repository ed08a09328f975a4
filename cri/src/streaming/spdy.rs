//! SPDY/3.1 framing, as kubelet's and client-go's streaming clients speak
//! it (moby/spdystream): control and data frames, and header blocks
//! compressed with one zlib stream per direction primed with the spec's
//! dictionary. No crate implements SPDY, so this is ours; flow-control
//! windows are not enforced (spdystream does not send WINDOW_UPDATE either).

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Header names of the SPDY/3 zlib dictionary (draft 3, "Compression").
const DICT_NAMES: [&str; 65] = [
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

/// The dictionary's raw tail: status codes, reasons, dates, media types.
const DICT_TAIL: &str = "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.";

/// The dictionary: each name as a 4-byte big-endian length and the name,
/// then the tail.
pub fn dictionary() -> Vec<u8> {
    let mut d = Vec::with_capacity(1423);
    for n in DICT_NAMES {
        d.extend_from_slice(&(n.len() as u32).to_be_bytes());
        d.extend_from_slice(n.as_bytes());
    }
    d.extend_from_slice(DICT_TAIL.as_bytes());
    d
}

pub const SYN_STREAM: u16 = 1;
pub const SYN_REPLY: u16 = 2;
pub const RST_STREAM: u16 = 3;
pub const SETTINGS: u16 = 4;
pub const PING: u16 = 6;
pub const GOAWAY: u16 = 7;
pub const FLAG_FIN: u8 = 1;

pub type Headers = Vec<(String, String)>;

#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    SynStream {
        id: u32,
        headers: Headers,
        fin: bool,
    },
    SynReply {
        id: u32,
        headers: Headers,
        fin: bool,
    },
    RstStream {
        id: u32,
        status: u32,
    },
    Ping {
        id: u32,
    },
    GoAway,
    Data {
        id: u32,
        fin: bool,
        data: Vec<u8>,
    },
    /// SETTINGS, WINDOW_UPDATE, HEADERS: nothing to do for us.
    Other,
}

/// Header (de)compression state of one connection.
pub struct Codec {
    comp: Compress,
    decomp: Decompress,
    dict: Vec<u8>,
}

fn bad(m: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.to_string())
}

impl Default for Codec {
    fn default() -> Self {
        let dict = dictionary();
        let mut comp = Compress::new(Compression::default(), true);
        let _ = comp.set_dictionary(&dict);
        Codec {
            comp,
            decomp: Decompress::new(true),
            dict,
        }
    }
}

impl Codec {
    fn encode_headers(&mut self, headers: &[(String, String)]) -> io::Result<Vec<u8>> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (k, v) in headers {
            for s in [k.to_ascii_lowercase(), v.clone()] {
                raw.extend_from_slice(&(s.len() as u32).to_be_bytes());
                raw.extend_from_slice(s.as_bytes());
            }
        }
        let start = self.comp.total_in();
        let mut out = Vec::with_capacity(raw.len() + 128);
        loop {
            let used = (self.comp.total_in() - start) as usize;
            if out.capacity() - out.len() < 64 {
                out.reserve(raw.len() + 128);
            }
            self.comp
                .compress_vec(&raw[used..], &mut out, FlushCompress::Sync)
                .map_err(|e| bad(&format!("compressing headers: {e}")))?;
            // Done once all input is in and the flush had room to finish.
            if (self.comp.total_in() - start) as usize == raw.len() && out.len() < out.capacity() {
                break;
            }
        }
        Ok(out)
    }

    fn decode_headers(&mut self, block: &[u8]) -> io::Result<Headers> {
        let mut raw = Vec::with_capacity(block.len() * 4 + 256);
        let mut input = block;
        loop {
            let before = self.decomp.total_in();
            raw.reserve(1024);
            match self
                .decomp
                .decompress_vec(input, &mut raw, FlushDecompress::Sync)
            {
                Ok(Status::Ok | Status::BufError | Status::StreamEnd) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.decomp
                        .set_dictionary(&self.dict)
                        .map_err(|e| bad(&format!("header dictionary: {e}")))?;
                }
                Err(e) => return Err(bad(&format!("decompressing headers: {e}"))),
            }
            let used = (self.decomp.total_in() - before) as usize;
            input = &input[used..];
            if input.is_empty() && raw.len() < raw.capacity() {
                break;
            }
        }
        let mut p = 0usize;
        let mut take = |n: usize| -> io::Result<&[u8]> {
            let s = raw.get(p..p + n).ok_or_else(|| bad("short header block"))?;
            p += n;
            Ok(s)
        };
        let u32_at = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let count = u32_at(take(4)?);
        let mut headers = Vec::with_capacity(count.min(64));
        for _ in 0..count {
            let kl = u32_at(take(4)?);
            let k = String::from_utf8_lossy(take(kl)?).into_owned();
            let vl = u32_at(take(4)?);
            let v = String::from_utf8_lossy(take(vl)?).into_owned();
            headers.push((k, v));
        }
        Ok(headers)
    }

    pub fn encode(&mut self, f: &Frame) -> io::Result<Vec<u8>> {
        let control = |ty: u16, flags: u8, body: Vec<u8>| {
            let mut v = Vec::with_capacity(8 + body.len());
            v.extend_from_slice(&(0x8000u16 | 3).to_be_bytes());
            v.extend_from_slice(&ty.to_be_bytes());
            v.push(flags);
            v.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
            v.extend_from_slice(&body);
            v
        };
        Ok(match f {
            Frame::SynStream { id, headers, fin } => {
                let mut b = id.to_be_bytes().to_vec();
                b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
                b.extend(self.encode_headers(headers)?);
                control(SYN_STREAM, if *fin { FLAG_FIN } else { 0 }, b)
            }
            Frame::SynReply { id, headers, fin } => {
                let mut b = id.to_be_bytes().to_vec();
                b.extend(self.encode_headers(headers)?);
                control(SYN_REPLY, if *fin { FLAG_FIN } else { 0 }, b)
            }
            Frame::RstStream { id, status } => {
                let mut b = id.to_be_bytes().to_vec();
                b.extend_from_slice(&status.to_be_bytes());
                control(RST_STREAM, 0, b)
            }
            Frame::Ping { id } => control(PING, 0, id.to_be_bytes().to_vec()),
            Frame::GoAway => control(GOAWAY, 0, vec![0; 8]),
            Frame::Data { id, fin, data } => {
                let mut v = Vec::with_capacity(8 + data.len());
                v.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
                v.push(if *fin { FLAG_FIN } else { 0 });
                v.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
                v.extend_from_slice(data);
                v
            }
            Frame::Other => Vec::new(),
        })
    }

    /// Reads one frame; None at end of stream.
    pub async fn read<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> io::Result<Option<Frame>> {
        let mut h = [0u8; 8];
        match r.read_exact(&mut h).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let flags = h[4];
        let len = u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize;
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await?;
        if h[0] & 0x80 == 0 {
            let id = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
            return Ok(Some(Frame::Data {
                id,
                fin: flags & FLAG_FIN != 0,
                data: body,
            }));
        }
        let ty = u16::from_be_bytes([h[2], h[3]]);
        let id = || {
            body.get(0..4)
                .map(|b| u32::from_be_bytes([b[0] & 0x7f, b[1], b[2], b[3]]))
                .ok_or_else(|| bad("short control frame"))
        };
        Ok(Some(match ty {
            SYN_STREAM => {
                let id = id()?;
                let headers =
                    self.decode_headers(body.get(10..).ok_or_else(|| bad("short SYN_STREAM"))?)?;
                Frame::SynStream {
                    id,
                    headers,
                    fin: flags & FLAG_FIN != 0,
                }
            }
            SYN_REPLY => {
                let id = id()?;
                let headers =
                    self.decode_headers(body.get(4..).ok_or_else(|| bad("short SYN_REPLY"))?)?;
                Frame::SynReply {
                    id,
                    headers,
                    fin: flags & FLAG_FIN != 0,
                }
            }
            RST_STREAM => Frame::RstStream {
                id: id()?,
                status: body
                    .get(4..8)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(0),
            },
            PING => Frame::Ping { id: id()? },
            GOAWAY => Frame::GoAway,
            _ => Frame::Other,
        }))
    }
}

pub fn header<'a>(h: &'a Headers, name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_is_the_spec_one() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        assert_eq!(&d[..11], b"\x00\x00\x00\x07options");
        assert!(d.ends_with(b"enq=0."));
    }

    #[tokio::test]
    async fn frames_round_trip_with_shared_compression_state() {
        let mut tx = Codec::default();
        let mut rx = Codec::default();
        let frames = vec![
            Frame::SynStream {
                id: 1,
                headers: vec![("streamtype".into(), "error".into())],
                fin: false,
            },
            Frame::SynStream {
                id: 3,
                headers: vec![
                    ("streamtype".into(), "stdout".into()),
                    ("port".into(), "80".into()),
                ],
                fin: false,
            },
            Frame::Data {
                id: 3,
                fin: true,
                data: b"hello".to_vec(),
            },
            Frame::SynReply {
                id: 1,
                headers: vec![],
                fin: false,
            },
            Frame::Ping { id: 7 },
            Frame::RstStream { id: 3, status: 5 },
        ];
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend(tx.encode(f).unwrap());
        }
        let mut r = wire.as_slice();
        for f in &frames {
            assert_eq!(rx.read(&mut r).await.unwrap().as_ref(), Some(f));
        }
        assert_eq!(rx.read(&mut r).await.unwrap(), None);
    }
}
