// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The migration stream's format: endpoints, the connection, frames, batches of slot records
//! and the token handshake (DESIGN.md, "Live migration", gives the layout byte by byte).
//!
//! Every message is a *frame*: `len: u32` (of the body), the body (`kind: u8`, then the
//! payload), and a CRC-32 (IEEE) of the length and the body. A frame longer than
//! [`MAX_FRAME`] is refused before anything is allocated for it. All integers are
//! little-endian.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::MigrateError;
use crate::store::migrate::StoredPage;
use crate::store::HUGE_THRESHOLD;
use crate::PAGE_SIZE;

/// The stream's magic, first in each side's hello.
pub const MAGIC: [u8; 8] = *b"VUZRMIG\0";
/// The stream's version; a peer speaking another is refused.
pub const VERSION: u16 = 1;
/// The largest frame body: a zstd dictionary (1 MiB) and a little.
pub const MAX_FRAME: usize = (1 << 20) + 4096;
/// A batch is closed once its records pass this many bytes.
pub const BATCH_BYTES: usize = 256 << 10;
/// The nonce each side sends.
pub const NONCE_BYTES: usize = 32;

/// Where a migration stream goes: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket.
    Unix(PathBuf),
    /// A TCP address, `HOST:PORT`.
    Tcp(String),
}

impl FromStr for Endpoint {
    type Err = MigrateError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(MigrateError::Refused("unix: needs a path".into()));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(address) = text.strip_prefix("tcp:") {
            let valid = address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(MigrateError::Refused(format!(
                    "tcp:{address} is not HOST:PORT"
                )));
            }
            return Ok(Endpoint::Tcp(address.to_owned()));
        }
        Err(MigrateError::Refused(format!(
            "{:?} is neither unix:PATH nor tcp:HOST:PORT",
            text.chars().take(200).collect::<String>()
        )))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp(address) => write!(f, "tcp:{address}"),
        }
    }
}

/// The shared secret both sides prove they hold; it never crosses the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Box<[u8]>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// The fewest bytes a token may have.
    pub const MIN_BYTES: usize = 16;

    /// The token in `path`: the file's bytes, trailing whitespace dropped, at least
    /// [`Token::MIN_BYTES`] of them.
    pub fn from_file(path: &Path) -> Result<Token, MigrateError> {
        let mut raw = std::fs::read(path).map_err(|source| MigrateError::Io {
            what: format!("the token file {} could not be read", path.display()),
            source,
        })?;
        while raw.last().is_some_and(u8::is_ascii_whitespace) {
            raw.pop();
        }
        Token::from_bytes(&raw).map_err(|_| {
            MigrateError::Refused(format!(
                "the token in {} has {} bytes; at least {} are needed",
                path.display(),
                raw.len(),
                Token::MIN_BYTES
            ))
        })
    }

    /// A token of these bytes (at least [`Token::MIN_BYTES`]).
    pub fn from_bytes(raw: &[u8]) -> Result<Token, MigrateError> {
        if raw.len() < Token::MIN_BYTES {
            return Err(MigrateError::Refused(format!(
                "a token has {} bytes; at least {} are needed",
                raw.len(),
                Token::MIN_BYTES
            )));
        }
        Ok(Token(raw.into()))
    }

    /// HMAC-SHA256 of `label`, the source's nonce and the destination's nonce.
    pub(crate) fn prove(
        &self,
        label: &[u8],
        source: &[u8; NONCE_BYTES],
        dest: &[u8; NONCE_BYTES],
    ) -> [u8; 32] {
        self.mac(label, source, dest).finalize().into_bytes().into()
    }

    /// Whether `proof` is this token's proof of `label` over the nonces (in constant time).
    pub(crate) fn verify(
        &self,
        label: &[u8],
        source: &[u8; NONCE_BYTES],
        dest: &[u8; NONCE_BYTES],
        proof: &[u8],
    ) -> bool {
        self.mac(label, source, dest).verify_slice(proof).is_ok()
    }

    fn mac(&self, label: &[u8], source: &[u8], dest: &[u8]) -> Hmac<Sha256> {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            unreachable!("HMAC takes a key of any length")
        };
        mac.update(label);
        mac.update(source);
        mac.update(dest);
        mac
    }
}

/// A fresh random nonce from the kernel.
pub(crate) fn nonce() -> Result<[u8; NONCE_BYTES], MigrateError> {
    let mut nonce = [0u8; NONCE_BYTES];
    let mut filled = 0;
    while filled < NONCE_BYTES {
        // SAFETY: the pointer and length describe the unfilled tail of `nonce`, which lives
        // across the call; getrandom writes at most that many bytes.
        let got = unsafe {
            libc::getrandom(nonce[filled..].as_mut_ptr().cast(), NONCE_BYTES - filled, 0)
        };
        match usize::try_from(got) {
            Ok(n) => filled += n,
            Err(_) => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(MigrateError::Io {
                        what: "no random nonce could be drawn".into(),
                        source: error,
                    });
                }
            }
        }
    }
    Ok(nonce)
}

/// A connected stream, either kind.
#[derive(Debug)]
pub(crate) enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    pub(crate) fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    /// Sets both timeouts: no progress for `stall` fails a read or a write.
    pub(crate) fn set_stall_timeout(&self, stall: Duration) -> io::Result<()> {
        match self {
            Conn::Unix(s) => {
                s.set_read_timeout(Some(stall))?;
                s.set_write_timeout(Some(stall))
            }
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(stall))?;
                s.set_write_timeout(Some(stall))?;
                s.set_nodelay(true)
            }
        }
    }

    /// Ends both directions; a thread blocked on the stream returns.
    pub(crate) fn shutdown(&self) {
        // A stream already closed by the peer may refuse: nothing to do then.
        let _ = match self {
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The kinds of frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// Magic, version, role, whether a token is used, nonce.
    Hello = 1,
    /// An HMAC proof of the token.
    Proof = 2,
    /// The source's geometry and algorithms.
    Shape = 3,
    /// A zstd dictionary the following pages may use.
    Dictionary = 4,
    /// Slot records.
    Batch = 5,
    /// A round ended: round number, dirty pages left.
    RoundEnd = 6,
    /// Every page is sent and the source's queues are stopped.
    Synced = 7,
    /// The source's queues started again after a Synced: the destination must not serve.
    Resumed = 8,
    /// The source will never serve again; the stream ends.
    Close = 9,
    /// The migration is cancelled by the side that sends this.
    Cancel = 10,
    /// A heartbeat (each side answers the source's).
    Alive = 11,
    /// The destination's queues started (it asks to serve).
    Started = 12,
    /// The source grants the destination's Started: it will never serve again.
    Granted = 13,
    /// A refusal, with its sentence.
    Refused = 14,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Hello,
            2 => Kind::Proof,
            3 => Kind::Shape,
            4 => Kind::Dictionary,
            5 => Kind::Batch,
            6 => Kind::RoundEnd,
            7 => Kind::Synced,
            8 => Kind::Resumed,
            9 => Kind::Close,
            10 => Kind::Cancel,
            11 => Kind::Alive,
            12 => Kind::Started,
            13 => Kind::Granted,
            14 => Kind::Refused,
            _ => return None,
        })
    }
}

/// Writes frames, encoding each into one reused buffer.
#[derive(Debug)]
pub(crate) struct FrameWriter {
    conn: Conn,
    buf: Vec<u8>,
    /// Bytes written so far.
    pub(crate) written: u64,
    /// A test hook: what to do to the next frames.
    pub(crate) fault: Option<super::Fault>,
    frames: u64,
}

impl FrameWriter {
    pub(crate) fn new(conn: Conn) -> FrameWriter {
        FrameWriter {
            conn,
            buf: Vec::with_capacity(BATCH_BYTES + 8192),
            written: 0,
            fault: None,
            frames: 0,
        }
    }

    /// Starts a frame of `kind`: push the payload into the buffer returned, then
    /// [`FrameWriter::send`].
    pub(crate) fn begin(&mut self, kind: Kind) -> &mut Vec<u8> {
        self.buf.clear();
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.push(kind as u8);
        &mut self.buf
    }

    /// Seals and writes the frame being built.
    pub(crate) fn send(&mut self) -> Result<(), MigrateError> {
        let body = self.buf.len() - 4;
        debug_assert!(body <= MAX_FRAME);
        let len = u32::try_from(body).unwrap_or(u32::MAX);
        self.buf[..4].copy_from_slice(&len.to_le_bytes());
        let crc = crc32fast::hash(&self.buf);
        self.buf.extend_from_slice(&crc.to_le_bytes());
        self.frames += 1;
        let mut bytes = &self.buf[..];
        match self.fault {
            Some(super::Fault::CorruptFrame(n)) if n == self.frames => {
                // Flip one bit in the middle of the frame's body.
                let at = 4 + body / 2;
                self.buf[at] ^= 0x10;
                bytes = &self.buf[..];
            }
            Some(super::Fault::TruncateFrame(n)) if n == self.frames => {
                bytes = &self.buf[..self.buf.len() / 2];
                self.conn.write_all(bytes).map_err(write_error)?;
                self.conn.shutdown();
                return Err(MigrateError::Protocol(format!(
                    "fault injection: frame {n} truncated"
                )));
            }
            Some(super::Fault::DropAfter(n)) if n == self.frames => {
                self.conn.shutdown();
                return Err(MigrateError::Protocol(format!(
                    "fault injection: the connection dropped before frame {n}"
                )));
            }
            Some(super::Fault::StallAfter(n)) if n <= self.frames => {
                // Hold the connection open and send nothing more.
                std::thread::sleep(Duration::from_millis(200));
                return Ok(());
            }
            _ => {}
        }
        self.conn.write_all(bytes).map_err(write_error)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Writes a frame of `kind` with `payload`.
    pub(crate) fn send_frame(&mut self, kind: Kind, payload: &[u8]) -> Result<(), MigrateError> {
        self.begin(kind).extend_from_slice(payload);
        self.send()
    }
}

fn write_error(source: io::Error) -> MigrateError {
    let what = match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            "the peer took nothing for the stall timeout".to_owned()
        }
        _ => "the stream could not be written".to_owned(),
    };
    MigrateError::Io { what, source }
}

/// Reads frames into one reused buffer, checking each frame's length and checksum.
#[derive(Debug)]
pub(crate) struct FrameReader {
    conn: Conn,
    buf: Vec<u8>,
    /// Bytes read so far.
    pub(crate) read: u64,
}

impl FrameReader {
    pub(crate) fn new(conn: Conn) -> FrameReader {
        FrameReader {
            conn,
            buf: Vec::new(),
            read: 0,
        }
    }

    /// The next frame: its kind and payload. `Ok(None)` at a clean end of the stream (before
    /// a frame's first byte).
    pub(crate) fn next(&mut self) -> Result<Option<(Kind, &[u8])>, MigrateError> {
        let mut header = [0u8; 4];
        match read_full(&mut self.conn, &mut header)? {
            0 => return Ok(None),
            4 => {}
            _ => {
                return Err(MigrateError::Protocol(
                    "the stream ended inside a frame".into(),
                ))
            }
        }
        let len = u32::from_le_bytes(header) as usize;
        if !(1..=MAX_FRAME).contains(&len) {
            return Err(MigrateError::Protocol(format!(
                "a frame of {len} bytes is announced; frames have 1 to {MAX_FRAME}"
            )));
        }
        self.buf.clear();
        self.buf.resize(len + 4, 0);
        if read_full(&mut self.conn, &mut self.buf)? != len + 4 {
            return Err(MigrateError::Protocol(format!(
                "the stream ended inside a frame of {len} bytes"
            )));
        }
        self.read += len as u64 + 8;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&header);
        hasher.update(&self.buf[..len]);
        let crc = u32::from_le_bytes(self.buf[len..].try_into().unwrap_or([0; 4]));
        if hasher.finalize() != crc {
            return Err(MigrateError::Protocol(format!(
                "a frame of {len} bytes fails its checksum"
            )));
        }
        let kind = Kind::from_byte(self.buf[0]).ok_or_else(|| {
            MigrateError::Protocol(format!("a frame of unknown kind {}", self.buf[0]))
        })?;
        Ok(Some((kind, &self.buf[1..len])))
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(conn: &mut Conn, buf: &mut [u8]) -> Result<usize, MigrateError> {
    let mut filled = 0;
    while filled < buf.len() {
        match conn.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                let what = match source.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        "the peer sent nothing for the stall timeout".to_owned()
                    }
                    _ => "the stream could not be read".to_owned(),
                };
                return Err(MigrateError::Io { what, source });
            }
        }
    }
    Ok(filled)
}

/// A sentence the peer sent (a refusal), made safe to show: at most 512 characters, on
/// one line.
pub(crate) fn peer_sentence(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(2048)])
        .chars()
        .take(512)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The roles in a hello.
pub(crate) const ROLE_SOURCE: u8 = 1;
pub(crate) const ROLE_DEST: u8 = 2;

/// A hello's payload.
pub(crate) fn hello(role: u8, authenticated: bool, nonce: &[u8; NONCE_BYTES]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 2 + 2 + NONCE_BYTES);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(role);
    out.push(u8::from(authenticated));
    out.extend_from_slice(nonce);
    out
}

/// Checks a peer's hello: magic, version, the role expected, the same use of a token.
/// Returns its nonce.
pub(crate) fn check_hello(
    payload: &[u8],
    role: u8,
    authenticated: bool,
) -> Result<[u8; NONCE_BYTES], MigrateError> {
    if payload.len() != 12 + NONCE_BYTES || payload[..8] != MAGIC {
        return Err(MigrateError::Protocol(
            "the peer does not speak the vhost-user-zram migration stream".into(),
        ));
    }
    let version = u16::from_le_bytes([payload[8], payload[9]]);
    if version != VERSION {
        return Err(MigrateError::Refused(format!(
            "the peer speaks stream version {version}, this daemon version {VERSION}"
        )));
    }
    if payload[10] != role {
        return Err(MigrateError::Refused(
            "the peer has the same role as this daemon (both source or both destination)".into(),
        ));
    }
    let theirs = payload[11] != 0;
    if theirs != authenticated {
        return Err(MigrateError::Refused(format!(
            "the peer {} a migration token and this daemon {}",
            if theirs { "uses" } else { "does not use" },
            if authenticated { "does" } else { "does not" }
        )));
    }
    let mut nonce = [0u8; NONCE_BYTES];
    nonce.copy_from_slice(&payload[12..]);
    Ok(nonce)
}

/// Record kinds in a batch.
const RECORD_EMPTY: u8 = 0;
const RECORD_SAME: u8 = 1;
const RECORD_COMPRESSED: u8 = 2;
const RECORD_RAW: u8 = 3;
const RECORD_DAMAGED: u8 = 4;

/// Appends one slot record to a batch: `index: u64`, `kind: u8`, then the kind's payload
/// (same-filled: 8 bytes; compressed: `priority: u8`, `len: u16`, the object; raw: 4096
/// bytes). Returns the stored bytes it carries.
pub(crate) fn put_record(out: &mut Vec<u8>, index: u64, page: &StoredPage<'_>) -> u64 {
    out.extend_from_slice(&index.to_le_bytes());
    match page {
        StoredPage::Empty => {
            out.push(RECORD_EMPTY);
            0
        }
        StoredPage::SameFilled(word) => {
            out.push(RECORD_SAME);
            out.extend_from_slice(word);
            0
        }
        StoredPage::Compressed { priority, object } => {
            out.push(RECORD_COMPRESSED);
            out.push(*priority);
            // At most HUGE_THRESHOLD bytes.
            #[allow(clippy::cast_possible_truncation)]
            out.extend_from_slice(&(object.len() as u16).to_le_bytes());
            out.extend_from_slice(object);
            object.len() as u64
        }
        StoredPage::Raw(raw) => {
            out.push(RECORD_RAW);
            out.extend_from_slice(&raw[..]);
            PAGE_SIZE as u64
        }
        StoredPage::Damaged => {
            out.push(RECORD_DAMAGED);
            0
        }
    }
}

/// Takes the first `n` bytes off `rest`.
fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
    *rest = tail;
    Some(head)
}

/// Parses the records of a batch, checking each (index below `pages`, a known kind, lengths
/// within a page) before any is used: the batch is valid whole or refused whole.
pub(crate) fn parse_batch(
    payload: &[u8],
    pages: u64,
) -> Result<Vec<(u64, StoredPage<'_>)>, MigrateError> {
    let bad = |what: String| MigrateError::Protocol(format!("a batch is malformed: {what}"));
    let mut records = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        let index_bytes = take(&mut rest, 8).ok_or_else(|| bad("a record is cut short".into()))?;
        let index = u64::from_le_bytes(index_bytes.try_into().unwrap_or([0xff; 8]));
        if index >= pages {
            return Err(bad(format!(
                "page {index} is past the end of the device ({pages} pages)"
            )));
        }
        let kind = take(&mut rest, 1).ok_or_else(|| bad("a record is cut short".into()))?[0];
        let short = || bad(format!("the record of page {index} is cut short"));
        let page = match kind {
            RECORD_EMPTY => StoredPage::Empty,
            RECORD_SAME => {
                let word = take(&mut rest, 8).ok_or_else(short)?;
                StoredPage::SameFilled(word.try_into().unwrap_or([0; 8]))
            }
            RECORD_COMPRESSED => {
                let head = take(&mut rest, 3).ok_or_else(short)?;
                let priority = head[0];
                let len = usize::from(u16::from_le_bytes([head[1], head[2]]));
                if !(1..=HUGE_THRESHOLD).contains(&len) {
                    return Err(bad(format!(
                        "page {index} is a compressed object of {len} bytes; objects have 1 \
                         to {HUGE_THRESHOLD}"
                    )));
                }
                if usize::from(priority) > crate::store::MAX_SECONDARY {
                    return Err(bad(format!("page {index} names priority {priority}")));
                }
                let object = take(&mut rest, len).ok_or_else(short)?;
                StoredPage::Compressed { priority, object }
            }
            RECORD_RAW => {
                let raw = take(&mut rest, PAGE_SIZE).ok_or_else(short)?;
                let raw: &[u8; PAGE_SIZE] = raw.try_into().map_err(|_| short())?;
                StoredPage::Raw(raw)
            }
            RECORD_DAMAGED => StoredPage::Damaged,
            other => return Err(bad(format!("page {index} has unknown record kind {other}"))),
        };
        records.push((index, page));
    }
    Ok(records)
}
