//! NBD wire format: constants, and plain (I/O-free) encoders and parsers for requests and
//! replies. Everything here is a pure function of its input, so it can be fuzzed directly.
//!
//! Names follow the protocol document (`doc/proto.md` of the NBD project, with its
//! extended-headers extension).

/// `NBDMAGIC`, first word of the greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second word of the newstyle greeting, and the magic of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Compact request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Extended (64-bit) request magic.
pub const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Extended reply chunk magic.
pub const EXT_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: no zeroes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 2;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
#[allow(missing_docs)]
pub const OPT_ABORT: u32 = 2;
#[allow(missing_docs)]
pub const OPT_LIST: u32 = 3;
#[allow(missing_docs)]
pub const OPT_STARTTLS: u32 = 5;
#[allow(missing_docs)]
pub const OPT_INFO: u32 = 6;
#[allow(missing_docs)]
pub const OPT_GO: u32 = 7;
#[allow(missing_docs)]
pub const OPT_STRUCTURED_REPLY: u32 = 8;
#[allow(missing_docs)]
pub const OPT_LIST_META_CONTEXT: u32 = 9;
#[allow(missing_docs)]
pub const OPT_SET_META_CONTEXT: u32 = 10;
#[allow(missing_docs)]
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option replies.
pub const REP_ACK: u32 = 1;
#[allow(missing_docs)]
pub const REP_SERVER: u32 = 2;
#[allow(missing_docs)]
pub const REP_INFO: u32 = 3;
#[allow(missing_docs)]
pub const REP_META_CONTEXT: u32 = 4;
#[allow(missing_docs)]
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
#[allow(missing_docs)]
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
#[allow(missing_docs)]
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
#[allow(missing_docs)]
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
#[allow(missing_docs)]
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
#[allow(missing_docs)]
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
#[allow(missing_docs)]
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
#[allow(missing_docs)]
pub const REP_ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;

/// `NBD_INFO_*` types.
pub const INFO_EXPORT: u16 = 0;
#[allow(missing_docs)]
pub const INFO_NAME: u16 = 1;
#[allow(missing_docs)]
pub const INFO_DESCRIPTION: u16 = 2;
#[allow(missing_docs)]
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
#[allow(missing_docs)]
pub const TF_READ_ONLY: u16 = 1 << 1;
#[allow(missing_docs)]
pub const TF_SEND_FLUSH: u16 = 1 << 2;
#[allow(missing_docs)]
pub const TF_SEND_FUA: u16 = 1 << 3;
#[allow(missing_docs)]
pub const TF_SEND_TRIM: u16 = 1 << 5;
#[allow(missing_docs)]
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
#[allow(missing_docs)]
pub const TF_SEND_DF: u16 = 1 << 7;
#[allow(missing_docs)]
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
#[allow(missing_docs)]
pub const TF_SEND_CACHE: u16 = 1 << 10;
#[allow(missing_docs)]
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;
/// `NBD_FLAG_BLOCK_STATUS_PAYLOAD`: block status accepts a payload naming the contexts
/// wanted (extended headers only).
pub const TF_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
#[allow(missing_docs)]
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
#[allow(missing_docs)]
pub const CMD_FLAG_DF: u16 = 1 << 2;
#[allow(missing_docs)]
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
#[allow(missing_docs)]
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
#[allow(missing_docs)]
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Commands.
pub const CMD_READ: u16 = 0;
#[allow(missing_docs)]
pub const CMD_WRITE: u16 = 1;
#[allow(missing_docs)]
pub const CMD_DISC: u16 = 2;
#[allow(missing_docs)]
pub const CMD_FLUSH: u16 = 3;
#[allow(missing_docs)]
pub const CMD_TRIM: u16 = 4;
#[allow(missing_docs)]
pub const CMD_CACHE: u16 = 5;
#[allow(missing_docs)]
pub const CMD_WRITE_ZEROES: u16 = 6;
#[allow(missing_docs)]
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Reply chunk flag: last chunk.
pub const REPLY_FLAG_DONE: u16 = 1;
/// Reply chunk types.
pub const REPLY_TYPE_NONE: u16 = 0;
#[allow(missing_docs)]
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
#[allow(missing_docs)]
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
#[allow(missing_docs)]
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
#[allow(missing_docs)]
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
#[allow(missing_docs)]
pub const REPLY_TYPE_ERROR: u16 = 0x8001;

/// Error values.
pub const EPERM: u32 = 1;
#[allow(missing_docs)]
pub const EIO: u32 = 5;
#[allow(missing_docs)]
pub const ENOMEM: u32 = 12;
#[allow(missing_docs)]
pub const EINVAL: u32 = 22;
#[allow(missing_docs)]
pub const ENOSPC: u32 = 28;
#[allow(missing_docs)]
pub const EOVERFLOW: u32 = 75;
#[allow(missing_docs)]
pub const ENOTSUP: u32 = 95;
#[allow(missing_docs)]
pub const ESHUTDOWN: u32 = 108;

/// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1;
#[allow(missing_docs)]
pub const STATE_ZERO: u32 = 2;
/// `NBD_STATE_DIRTY` (`qemu:dirty-bitmap:` contexts): the range is dirty in the bitmap.
pub const STATE_DIRTY: u32 = 1;

/// Largest payload of a request or read reply we accept (the protocol's portable maximum).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Longest string (export name, context name, query) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// Length of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Length of an extended request header.
pub const EXT_REQUEST_LEN: usize = 32;

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// A request header as sent by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub typ: u16,
    /// The client's cookie (handle), echoed in the reply.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Effect length (or payload length for a write).
    pub length: u64,
    /// Bytes of payload that follow the header on the wire.
    pub payload: u64,
}

/// A request header that cannot be parsed: the connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadHeader(pub String);

/// Parse a request header (`REQUEST_LEN` bytes, or `EXT_REQUEST_LEN` with extended headers).
pub fn parse_request_header(buf: &[u8], extended: bool) -> Result<RequestHeader, BadHeader> {
    let need = if extended {
        EXT_REQUEST_LEN
    } else {
        REQUEST_LEN
    };
    if buf.len() < need {
        return Err(BadHeader(format!(
            "request header of {} bytes, expected {need}",
            buf.len()
        )));
    }
    let magic = be32(buf, 0);
    let want = if extended {
        EXT_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != want {
        return Err(BadHeader(format!("bad request magic {magic:#010x}")));
    }
    let flags = be16(buf, 4);
    let typ = be16(buf, 6);
    let cookie = be64(buf, 8);
    let offset = be64(buf, 16);
    let (length, payload) = if extended {
        let l = be64(buf, 24);
        // The specification wants the payload flag on every write; QEMU's client leaves it
        // off. A write carries its data either way.
        let has = flags & CMD_FLAG_PAYLOAD_LEN != 0 || typ == CMD_WRITE;
        (l, if has { l } else { 0 })
    } else {
        let l = be32(buf, 24) as u64;
        if flags & CMD_FLAG_PAYLOAD_LEN != 0 {
            // Not valid without extended headers; the length cannot be trusted as payload.
            return Err(BadHeader(
                "payload-length flag without extended headers".into(),
            ));
        }
        (l, if typ == CMD_WRITE { l } else { 0 })
    };
    if payload > MAX_PAYLOAD as u64 {
        return Err(BadHeader(format!(
            "request payload of {payload} bytes is larger than the maximum ({MAX_PAYLOAD})"
        )));
    }
    Ok(RequestHeader {
        flags,
        typ,
        cookie,
        offset,
        length,
        payload,
    })
}

/// Encode a compact request header (for clients and tests).
pub fn encode_request(flags: u16, typ: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(REQUEST_LEN);
    v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&typ.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&length.to_be_bytes());
    v
}

/// Encode an extended request header (for clients and tests).
pub fn encode_ext_request(flags: u16, typ: u16, cookie: u64, offset: u64, length: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(EXT_REQUEST_LEN);
    v.extend_from_slice(&EXT_REQUEST_MAGIC.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&typ.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&length.to_be_bytes());
    v
}

/// What the transmission phase knows when validating a request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Export size.
    pub size: u64,
    /// Writes refused.
    pub read_only: bool,
    /// Structured replies (or extended headers) negotiated.
    pub structured: bool,
    /// Extended headers negotiated.
    pub extended: bool,
    /// Number of selected metadata contexts.
    pub contexts: usize,
    /// The selected context ids as a bit set (bit `id`; ids are below 64).
    pub context_mask: u64,
    /// Alignment the client promised (1 when it did not negotiate block sizes).
    pub min_block: u32,
}

/// A validated command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes; `df`: one content chunk.
    Read {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
        /// Do not fragment.
        df: bool,
    },
    /// Write the payload.
    Write {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
        /// Force unit access.
        fua: bool,
    },
    /// Disconnect.
    Disc,
    /// Flush.
    Flush,
    /// Trim (discard).
    Trim {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
        /// Force unit access.
        fua: bool,
    },
    /// Prefetch.
    Cache {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// Write zeroes.
    WriteZeroes {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
        /// Force unit access.
        fua: bool,
        /// Keep the range allocated.
        no_hole: bool,
        /// Fail with `ENOTSUP` unless fast.
        fast: bool,
    },
    /// Block status.
    BlockStatus {
        /// Offset.
        off: u64,
        /// Length (a hint).
        len: u64,
        /// One extent per context.
        req_one: bool,
        /// The contexts to answer for (bit `id`): all selected ones, or those the client
        /// named in the payload form.
        contexts: u64,
    },
}

/// A request the server answers with an error (and the message for the client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// NBD error value.
    pub errno: u32,
    /// Message for a structured error chunk.
    pub msg: String,
}

fn refuse(errno: u32, msg: impl Into<String>) -> Refusal {
    Refusal {
        errno,
        msg: msg.into(),
    }
}

/// The payload form of `NBD_CMD_BLOCK_STATUS` (extended headers): a 64-bit effect length,
/// then the ids of the contexts wanted (at least one, each selected, no repeats). Returns the
/// effect length and the ids as a bit set.
pub fn parse_block_status_payload(payload: &[u8], selected: u64) -> Result<(u64, u64), Refusal> {
    if payload.len() < 12 || !(payload.len() - 8).is_multiple_of(4) {
        return Err(refuse(
            EINVAL,
            format!(
                "block status payload of {} bytes (8 + 4 per context id expected)",
                payload.len()
            ),
        ));
    }
    let len = be64(payload, 0);
    let mut mask = 0u64;
    for c in payload[8..].chunks_exact(4) {
        let id = u32::from_be_bytes(c.try_into().unwrap());
        let bit = if id < 64 { 1u64 << id } else { 0 };
        if bit & selected == 0 {
            return Err(refuse(
                EINVAL,
                format!("metadata context {id} was not selected"),
            ));
        }
        if mask & bit != 0 {
            return Err(refuse(EINVAL, format!("metadata context {id} named twice")));
        }
        mask |= bit;
    }
    Ok((len, mask))
}

/// Check a request (and its `payload`, read already) against the negotiated state and the
/// export: the command to run, or the error to reply with. Never panics, whatever the input.
pub fn validate(h: &RequestHeader, payload: &[u8], lim: &Limits) -> Result<Command, Refusal> {
    let allowed = CMD_FLAG_FUA
        | match h.typ {
            CMD_READ if lim.structured => CMD_FLAG_DF,
            CMD_WRITE if lim.extended => CMD_FLAG_PAYLOAD_LEN,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS if lim.extended => CMD_FLAG_REQ_ONE | CMD_FLAG_PAYLOAD_LEN,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    if h.typ > CMD_BLOCK_STATUS {
        return Err(refuse(EINVAL, format!("unknown command {}", h.typ)));
    }
    if h.flags & !allowed != 0 {
        return Err(refuse(
            EINVAL,
            format!("unsupported flags {:#x} for command {}", h.flags, h.typ),
        ));
    }
    let (off, mut len) = (h.offset, h.length);
    let mut contexts = lim.context_mask;
    if h.typ == CMD_BLOCK_STATUS && h.flags & CMD_FLAG_PAYLOAD_LEN != 0 {
        if lim.contexts == 0 {
            return Err(refuse(EINVAL, "no metadata context was selected"));
        }
        (len, contexts) = parse_block_status_payload(payload, lim.context_mask)?;
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let in_range = off.checked_add(len).is_some_and(|e| e <= lim.size);
    let aligned = lim.min_block <= 1
        || (off % lim.min_block as u64 == 0
            && (len % lim.min_block as u64 == 0 || off + len == lim.size));
    let range = |write: bool| -> Result<(), Refusal> {
        if !in_range {
            return Err(refuse(
                if write { ENOSPC } else { EINVAL },
                format!(
                    "request at offset {off} length {len} is past the end of the export ({} bytes)",
                    lim.size
                ),
            ));
        }
        if !aligned {
            return Err(refuse(
                EINVAL,
                format!(
                    "request at offset {off} length {len} is not aligned to {} bytes",
                    lim.min_block
                ),
            ));
        }
        Ok(())
    };
    let writable = || {
        if lim.read_only {
            Err(refuse(EPERM, "the export is read-only"))
        } else {
            Ok(())
        }
    };
    match h.typ {
        CMD_READ => {
            if len > MAX_PAYLOAD as u64 {
                return Err(refuse(
                    if lim.structured { EOVERFLOW } else { EINVAL },
                    format!("read of {len} bytes is larger than the maximum ({MAX_PAYLOAD})"),
                ));
            }
            range(false)?;
            Ok(Command::Read {
                off,
                len,
                df: h.flags & CMD_FLAG_DF != 0,
            })
        }
        CMD_WRITE => {
            writable()?;
            range(true)?;
            Ok(Command::Write { off, len, fua })
        }
        CMD_DISC => Ok(Command::Disc),
        CMD_FLUSH => Ok(Command::Flush),
        CMD_TRIM => {
            writable()?;
            range(false)?;
            Ok(Command::Trim { off, len, fua })
        }
        CMD_CACHE => {
            range(false)?;
            Ok(Command::Cache { off, len })
        }
        CMD_WRITE_ZEROES => {
            writable()?;
            range(true)?;
            Ok(Command::WriteZeroes {
                off,
                len,
                fua,
                no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
                fast: h.flags & CMD_FLAG_FAST_ZERO != 0,
            })
        }
        CMD_BLOCK_STATUS => {
            if lim.contexts == 0 {
                return Err(refuse(EINVAL, "no metadata context was selected"));
            }
            if len == 0 {
                return Err(refuse(EINVAL, "block status of length 0"));
            }
            range(false)?;
            Ok(Command::BlockStatus {
                off,
                len,
                req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
                contexts,
            })
        }
        _ => Err(refuse(EINVAL, format!("unknown command {}", h.typ))),
    }
}

/// How replies are framed on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    /// Simple replies only.
    Simple,
    /// Structured reply chunks.
    Structured,
    /// Extended reply chunks.
    Extended,
}

/// Encode a simple reply header.
pub fn simple_reply(cookie: u64, error: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v
}

/// Encode a structured or extended chunk header for a payload of `len` bytes. `req_offset`
/// is the request's offset (extended replies echo it).
pub fn chunk_header(
    mode: ReplyMode,
    flags: u16,
    typ: u16,
    cookie: u64,
    req_offset: u64,
    len: u64,
) -> Vec<u8> {
    let mut v = Vec::with_capacity(32);
    if mode == ReplyMode::Extended {
        v.extend_from_slice(&EXT_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&typ.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&req_offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
    } else {
        v.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&typ.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&(len as u32).to_be_bytes());
    }
    v
}

/// Encode a complete error reply (simple, or one error chunk with the message).
pub fn error_reply(
    mode: ReplyMode,
    cookie: u64,
    req_offset: u64,
    errno: u32,
    msg: &str,
) -> Vec<u8> {
    if mode == ReplyMode::Simple {
        return simple_reply(cookie, errno);
    }
    let msg = truncate_str(msg, MAX_STRING);
    let mut v = chunk_header(
        mode,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        req_offset,
        6 + msg.len() as u64,
    );
    v.extend_from_slice(&errno.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg.as_bytes());
    v
}

/// Encode a complete success reply without payload.
pub fn ok_reply(mode: ReplyMode, cookie: u64, req_offset: u64) -> Vec<u8> {
    match mode {
        ReplyMode::Simple => simple_reply(cookie, 0),
        // A simple reply is allowed with structured replies, not with extended headers.
        ReplyMode::Structured => simple_reply(cookie, 0),
        ReplyMode::Extended => chunk_header(
            mode,
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            cookie,
            req_offset,
            0,
        ),
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut n = max;
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s[..n]
}

/// One extent of a block status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (non-zero).
    pub len: u64,
    /// Status flags of the context.
    pub flags: u32,
}

/// Encode one block status chunk for context `id` (flags: DONE or not).
pub fn block_status_chunk(
    mode: ReplyMode,
    flags: u16,
    cookie: u64,
    req_offset: u64,
    id: u32,
    extents: &[Extent],
) -> Vec<u8> {
    if mode == ReplyMode::Extended {
        let len = 8 + 16 * extents.len() as u64;
        let mut v = chunk_header(
            mode,
            flags,
            REPLY_TYPE_BLOCK_STATUS_EXT,
            cookie,
            req_offset,
            len,
        );
        v.extend_from_slice(&id.to_be_bytes());
        v.extend_from_slice(&(extents.len() as u32).to_be_bytes());
        for e in extents {
            v.extend_from_slice(&e.len.to_be_bytes());
            v.extend_from_slice(&(e.flags as u64).to_be_bytes());
        }
        v
    } else {
        let len = 4 + 8 * extents.len() as u64;
        let mut v = chunk_header(
            mode,
            flags,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            req_offset,
            len,
        );
        v.extend_from_slice(&id.to_be_bytes());
        for e in extents {
            v.extend_from_slice(&(e.len as u32).to_be_bytes());
            v.extend_from_slice(&e.flags.to_be_bytes());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> Limits {
        Limits {
            size: 1 << 20,
            read_only: false,
            structured: true,
            extended: false,
            contexts: 1,
            context_mask: 1 << 1,
            min_block: 1,
        }
    }

    #[test]
    fn parse_compact_and_extended() {
        let b = encode_request(CMD_FLAG_FUA, CMD_WRITE, 7, 4096, 512);
        let h = parse_request_header(&b, false).unwrap();
        assert_eq!(
            (h.flags, h.typ, h.cookie, h.offset, h.length, h.payload),
            (1, 1, 7, 4096, 512, 512)
        );
        assert!(parse_request_header(&b, true).is_err());
        let b = encode_ext_request(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 9, 0, 4096);
        let h = parse_request_header(&b, true).unwrap();
        assert_eq!((h.length, h.payload), (4096, 4096));
        let b = encode_ext_request(0, CMD_BLOCK_STATUS, 9, 0, 1 << 40);
        let h = parse_request_header(&b, true).unwrap();
        assert_eq!((h.length, h.payload), (1 << 40, 0));
        let b = encode_request(0, CMD_WRITE, 1, 0, MAX_PAYLOAD + 1);
        assert!(parse_request_header(&b, false).is_err());
        assert!(parse_request_header(&b[..10], false).is_err());
    }

    #[test]
    fn validate_errors() {
        let l = lim();
        let h = |flags, typ, offset, length| RequestHeader {
            flags,
            typ,
            cookie: 1,
            offset,
            length,
            payload: 0,
        };
        assert_eq!(
            validate(&h(0, CMD_READ, 0, 512), &[], &l).unwrap(),
            Command::Read {
                off: 0,
                len: 512,
                df: false
            }
        );
        assert_eq!(
            validate(&h(0, CMD_READ, 1 << 20, 1), &[], &l)
                .unwrap_err()
                .errno,
            EINVAL
        );
        assert_eq!(
            validate(&h(0, CMD_WRITE, u64::MAX, 2), &[], &l)
                .unwrap_err()
                .errno,
            ENOSPC
        );
        assert_eq!(
            validate(&h(0, CMD_WRITE_ZEROES, 1 << 20, 1), &[], &l)
                .unwrap_err()
                .errno,
            ENOSPC
        );
        assert_eq!(
            validate(&h(CMD_FLAG_DF, CMD_WRITE, 0, 1), &[], &l)
                .unwrap_err()
                .errno,
            EINVAL
        );
        assert_eq!(
            validate(&h(0, 99, 0, 1), &[], &l).unwrap_err().errno,
            EINVAL
        );
        assert_eq!(
            validate(&h(0, CMD_READ, 0, 64 << 20), &[], &l)
                .unwrap_err()
                .errno,
            EOVERFLOW
        );
        let ro = Limits {
            read_only: true,
            ..l
        };
        assert_eq!(
            validate(&h(0, CMD_TRIM, 0, 1), &[], &ro).unwrap_err().errno,
            EPERM
        );
        let none = Limits {
            contexts: 0,
            context_mask: 0,
            ..l
        };
        assert_eq!(
            validate(&h(0, CMD_BLOCK_STATUS, 0, 1), &[], &none)
                .unwrap_err()
                .errno,
            EINVAL
        );
        let al = Limits {
            min_block: 512,
            ..l
        };
        assert_eq!(
            validate(&h(0, CMD_READ, 1, 512), &[], &al)
                .unwrap_err()
                .errno,
            EINVAL
        );
        assert!(validate(&h(0, CMD_READ, 512, 512), &[], &al).is_ok());
    }
}
