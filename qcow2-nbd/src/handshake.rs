//! The fixed newstyle handshake as a plain state machine: the I/O driver feeds it each option
//! the client sends and writes out the bytes it returns. No I/O here, so it can be fuzzed.

use crate::proto::*;

/// What the handshake needs to know about the export.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    /// Export name (`-x`).
    pub name: String,
    /// Description (`-D`), empty for none.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Read-only export.
    pub read_only: bool,
    /// Minimum block size advertised.
    pub min_block: u32,
    /// Preferred block size advertised.
    pub pref_block: u32,
    /// TLS is configured: options other than STARTTLS are refused until it is started.
    pub tls: bool,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN` (more than one client may connect: a client
    /// opening several connections to a server serving one at a time would wait forever).
    pub multi_conn: bool,
    /// Names of the dirty bitmaps offered as `qemu:dirty-bitmap:NAME`, in context order
    /// (bitmap `i` has the context id `CTX_DIRTY_BITMAP + i`).
    pub bitmaps: Vec<String>,
}

impl ExportInfo {
    /// Transmission flags for a connection (`structured`: structured replies or extended
    /// headers negotiated; `status_payload`: extended headers and metadata contexts
    /// negotiated, so block status takes the payload form).
    pub fn transmission_flags(&self, structured: bool, status_payload: bool) -> u16 {
        let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE;
        if status_payload {
            f |= TF_BLOCK_STATUS_PAYLOAD;
        }
        if self.multi_conn {
            f |= TF_CAN_MULTI_CONN;
        }
        if structured {
            f |= TF_SEND_DF;
        }
        if self.read_only {
            f |= TF_READ_ONLY;
        } else {
            f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
        }
        f
    }

    fn matches(&self, name: &[u8]) -> bool {
        // The empty name is the default export.
        name.is_empty() || name == self.name.as_bytes()
    }
}

/// Metadata context ids.
pub const CTX_BASE_ALLOCATION: u32 = 1;
/// `qemu:allocation-depth`.
pub const CTX_ALLOCATION_DEPTH: u32 = 2;

/// The first `qemu:dirty-bitmap:NAME` context (`-B`); the others follow.
pub const CTX_DIRTY_BITMAP: u32 = 3;
/// Most bitmaps one export offers (context ids are bits of a 64-bit mask).
pub const MAX_BITMAPS: usize = 64 - CTX_DIRTY_BITMAP as usize;
/// Prefix of the dirty bitmap contexts' names.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

impl ExportInfo {
    /// The metadata contexts offered, with their ids, in id order (QEMU's order: the
    /// allocation contexts, then the bitmaps).
    pub fn contexts(&self) -> Vec<(String, u32)> {
        let mut v = vec![
            ("base:allocation".to_string(), CTX_BASE_ALLOCATION),
            ("qemu:allocation-depth".to_string(), CTX_ALLOCATION_DEPTH),
        ];
        for (i, b) in self.bitmaps.iter().take(MAX_BITMAPS).enumerate() {
            v.push((
                format!("{DIRTY_BITMAP_PREFIX}{b}"),
                CTX_DIRTY_BITMAP + i as u32,
            ));
        }
        v
    }
}

/// What the transmission phase uses from the negotiation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// Structured replies (also true with extended headers).
    pub structured: bool,
    /// Extended headers.
    pub extended: bool,
    /// Selected metadata contexts (ids).
    pub contexts: Vec<u32>,
    /// The client promised to honour the advertised block sizes.
    pub block_size_agreed: bool,
}

/// The handshake's next step, decided by one option.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send these bytes and read the next option.
    Reply(Vec<u8>),
    /// Send these bytes (the ACK), then run the TLS handshake, then go on with options.
    StartTls(Vec<u8>),
    /// Send these bytes, then enter transmission.
    Transmission(Vec<u8>, Negotiated),
    /// Send these bytes (if any), then close the connection.
    Close(Vec<u8>),
}

/// The negotiation state of one connection.
#[derive(Debug)]
pub struct Handshake {
    info: ExportInfo,
    tls_active: bool,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// Contexts selected by the last SET_META_CONTEXT, with the export name it named.
    meta: Option<(Vec<u8>, Vec<u32>)>,
    shutting_down: bool,
}

/// The server's greeting (fixed newstyle).
pub fn greeting() -> Vec<u8> {
    let mut v = Vec::with_capacity(18);
    v.extend_from_slice(&NBDMAGIC.to_be_bytes());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    v
}

/// Encode an option reply.
pub fn opt_reply(opt: u32, typ: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&typ.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn err(opt: u32, typ: u32, msg: &str) -> Step {
    Step::Reply(opt_reply(
        opt,
        typ,
        truncate_str(msg, MAX_STRING).as_bytes(),
    ))
}

/// A reader of option data that never reads past its end.
struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn u16(&mut self) -> Option<u16> {
        let (h, t) = self.b.split_at_checked(2)?;
        self.b = t;
        Some(u16::from_be_bytes([h[0], h[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.b.split_at_checked(4)?;
        self.b = t;
        Some(u32::from_be_bytes(h.try_into().ok()?))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (h, t) = self.b.split_at_checked(n)?;
        self.b = t;
        Some(h)
    }
    /// A string: 32-bit length then that many bytes, at most `MAX_STRING`.
    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        self.bytes(n)
    }
}

impl Handshake {
    /// A new negotiation for `info`.
    pub fn new(info: ExportInfo) -> Handshake {
        Handshake {
            info,
            tls_active: false,
            no_zeroes: false,
            structured: false,
            extended: false,
            meta: None,
            shutting_down: false,
        }
    }

    /// The server is shutting down: further options get `NBD_REP_ERR_SHUTDOWN`.
    pub fn set_shutting_down(&mut self) {
        self.shutting_down = true;
    }

    /// Check the client flags; `Err` means drop the connection.
    pub fn client_flags(&mut self, flags: u32) -> Result<(), String> {
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(format!("unknown client flags {flags:#x}"));
        }
        if flags & FLAG_C_FIXED_NEWSTYLE == 0 && self.info.tls {
            return Err("the client does not speak fixed newstyle, which TLS requires".into());
        }
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        Ok(())
    }

    /// TLS has been started: forget what was negotiated before (the protocol requires it).
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.structured = false;
        self.extended = false;
        self.meta = None;
    }

    fn negotiated(&self, name: &[u8], block_size_agreed: bool) -> Negotiated {
        let contexts = match &self.meta {
            Some((n, ids)) if self.info.matches(n) && self.info.matches(name) => ids.clone(),
            _ => Vec::new(),
        };
        Negotiated {
            structured: self.structured || self.extended,
            extended: self.extended,
            contexts,
            block_size_agreed,
        }
    }

    /// Handle one option (`opt` with its `data`).
    pub fn option(&mut self, opt: u32, data: &[u8]) -> Step {
        if opt == OPT_ABORT {
            return Step::Close(opt_reply(opt, REP_ACK, &[]));
        }
        if self.info.tls && !self.tls_active {
            return match opt {
                OPT_STARTTLS if data.is_empty() => Step::StartTls(opt_reply(opt, REP_ACK, &[])),
                OPT_STARTTLS => err(opt, REP_ERR_INVALID, "STARTTLS takes no data"),
                // It cannot be refused with an error: the connection is closed.
                OPT_EXPORT_NAME => Step::Close(Vec::new()),
                _ => err(opt, REP_ERR_TLS_REQD, "TLS is required: start TLS first"),
            };
        }
        if self.shutting_down {
            return match opt {
                OPT_EXPORT_NAME => Step::Close(Vec::new()),
                _ => err(opt, REP_ERR_SHUTDOWN, "the server is shutting down"),
            };
        }
        match opt {
            OPT_EXPORT_NAME => {
                if !self.info.matches(data) || self.extended {
                    return Step::Close(Vec::new());
                }
                let mut v = Vec::with_capacity(134);
                v.extend_from_slice(&self.info.size.to_be_bytes());
                v.extend_from_slice(
                    &self
                        .info
                        .transmission_flags(self.structured, false)
                        .to_be_bytes(),
                );
                if !self.no_zeroes {
                    v.extend_from_slice(&[0u8; 124]);
                }
                Step::Transmission(v, self.negotiated(data, false))
            }
            OPT_LIST => {
                if !data.is_empty() {
                    return err(opt, REP_ERR_INVALID, "LIST takes no data");
                }
                let mut d = Vec::new();
                d.extend_from_slice(&(self.info.name.len() as u32).to_be_bytes());
                d.extend_from_slice(self.info.name.as_bytes());
                d.extend_from_slice(self.info.description.as_bytes());
                let mut v = opt_reply(opt, REP_SERVER, &d);
                v.extend(opt_reply(opt, REP_ACK, &[]));
                Step::Reply(v)
            }
            OPT_STARTTLS => {
                if self.tls_active {
                    err(opt, REP_ERR_INVALID, "TLS is already active")
                } else {
                    err(opt, REP_ERR_POLICY, "TLS is not configured on this server")
                }
            }
            OPT_INFO | OPT_GO => self.info_or_go(opt, data),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    err(opt, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
                } else if self.extended {
                    err(
                        opt,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    )
                } else {
                    self.structured = true;
                    Step::Reply(opt_reply(opt, REP_ACK, &[]))
                }
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    err(opt, REP_ERR_INVALID, "EXTENDED_HEADERS takes no data")
                } else {
                    self.extended = true;
                    Step::Reply(opt_reply(opt, REP_ACK, &[]))
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(opt, data),
            _ => err(
                opt,
                REP_ERR_UNSUP,
                &format!("option {opt} is not supported"),
            ),
        }
    }

    fn info_or_go(&mut self, opt: u32, data: &[u8]) -> Step {
        let mut c = Cursor { b: data };
        let parsed = (|| {
            let name = c.string()?;
            let n = c.u16()?;
            let mut reqs = Vec::new();
            for _ in 0..n {
                reqs.push(c.u16()?);
            }
            c.b.is_empty().then_some((name, reqs))
        })();
        let Some((name, reqs)) = parsed else {
            return err(opt, REP_ERR_INVALID, "malformed INFO/GO request");
        };
        if !self.info.matches(name) {
            return err(
                opt,
                REP_ERR_UNKNOWN,
                &format!("export '{}' not found", String::from_utf8_lossy(name)),
            );
        }
        let mut v = Vec::new();
        let mut export = Vec::with_capacity(12);
        export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        export.extend_from_slice(&self.info.size.to_be_bytes());
        let status_payload = self.extended && !self.negotiated(name, false).contexts.is_empty();
        export.extend_from_slice(
            &self
                .info
                .transmission_flags(self.structured || self.extended, status_payload)
                .to_be_bytes(),
        );
        v.extend(opt_reply(opt, REP_INFO, &export));
        if reqs.contains(&INFO_NAME) {
            let mut d = INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(self.info.name.as_bytes());
            v.extend(opt_reply(opt, REP_INFO, &d));
        }
        if reqs.contains(&INFO_DESCRIPTION) && !self.info.description.is_empty() {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(self.info.description.as_bytes());
            v.extend(opt_reply(opt, REP_INFO, &d));
        }
        let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        bs.extend_from_slice(&self.info.min_block.to_be_bytes());
        bs.extend_from_slice(&self.info.pref_block.to_be_bytes());
        bs.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
        v.extend(opt_reply(opt, REP_INFO, &bs));
        v.extend(opt_reply(opt, REP_ACK, &[]));
        if opt == OPT_GO {
            let neg = self.negotiated(name, reqs.contains(&INFO_BLOCK_SIZE));
            Step::Transmission(v, neg)
        } else {
            Step::Reply(v)
        }
    }

    fn meta_context(&mut self, opt: u32, data: &[u8]) -> Step {
        let set = opt == OPT_SET_META_CONTEXT;
        if set {
            // Replaced even when the request fails.
            self.meta = None;
        }
        if !self.structured && !self.extended {
            return err(
                opt,
                REP_ERR_INVALID,
                "structured replies must be negotiated first",
            );
        }
        let mut c = Cursor { b: data };
        let parsed = (|| {
            let name = c.string()?;
            let n = c.u32()?;
            // Each query takes at least 4 bytes: bound the count by the data.
            if n as usize > c.b.len() / 4 {
                return None;
            }
            let mut queries = Vec::new();
            for _ in 0..n {
                queries.push(c.string()?);
            }
            c.b.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            return err(opt, REP_ERR_INVALID, "malformed meta context request");
        };
        if !self.info.matches(name) {
            return err(
                opt,
                REP_ERR_UNKNOWN,
                &format!("export '{}' not found", String::from_utf8_lossy(name)),
            );
        }
        let all = self.info.contexts();
        let mut found: Vec<(&str, u32)> = Vec::new();
        if queries.is_empty() && !set {
            found.extend(all.iter().map(|(c, id)| (c.as_str(), *id)));
        }
        for q in &queries {
            if !q.contains(&b':') {
                return err(opt, REP_ERR_INVALID, "a query has no namespace");
            }
            for (ctx, id) in &all {
                let exact = *q == ctx.as_bytes();
                // A query ending with ':' ("qemu:", "qemu:dirty-bitmap:") lists every
                // context under it (LIST only).
                let wildcard = !set && q.ends_with(b":") && ctx.as_bytes().starts_with(q);
                if (exact || wildcard) && !found.iter().any(|&(_, i)| i == *id) {
                    found.push((ctx.as_str(), *id));
                }
            }
        }
        // Replies in id order whatever the order of the queries, as QEMU sends them.
        found.sort_by_key(|&(_, id)| id);
        let mut v = Vec::new();
        for &(ctx, id) in &found {
            let mut d = (if set { id } else { 0 }).to_be_bytes().to_vec();
            d.extend_from_slice(ctx.as_bytes());
            v.extend(opt_reply(opt, REP_META_CONTEXT, &d));
        }
        v.extend(opt_reply(opt, REP_ACK, &[]));
        if set {
            self.meta = Some((name.to_vec(), found.iter().map(|&(_, id)| id).collect()));
        }
        Step::Reply(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ExportInfo {
        ExportInfo {
            name: "disk".into(),
            description: String::new(),
            size: 1 << 20,
            read_only: false,
            min_block: 1,
            pref_block: 4096,
            tls: false,
            multi_conn: true,
            bitmaps: vec!["b1".into(), "b0".into()],
        }
    }

    fn go_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[test]
    fn go_with_contexts() {
        let mut h = Handshake::new(info());
        h.client_flags(FLAG_C_FIXED_NEWSTYLE).unwrap();
        assert!(matches!(
            h.option(OPT_STRUCTURED_REPLY, &[]),
            Step::Reply(_)
        ));
        let d = meta_data("disk", &["base:allocation", "qemu:allocation-depth", "x:y"]);
        let Step::Reply(r) = h.option(OPT_SET_META_CONTEXT, &d) else {
            panic!()
        };
        // Two contexts then ACK.
        assert_eq!(r.len(), 2 * 20 + 4 + 15 + 4 + 21 + 20);
        match h.option(OPT_GO, &go_data("", &[INFO_BLOCK_SIZE])) {
            Step::Transmission(_, n) => {
                assert!(n.structured && !n.extended && n.block_size_agreed);
                assert_eq!(n.contexts, vec![CTX_BASE_ALLOCATION, CTX_ALLOCATION_DEPTH]);
            }
            s => panic!("{s:?}"),
        }
    }

    /// The (id, name) of each NBD_REP_META_CONTEXT in `r`.
    fn meta_replies(r: &[u8]) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        let mut p = r;
        while !p.is_empty() {
            let typ = u32::from_be_bytes(p[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(p[16..20].try_into().unwrap()) as usize;
            let d = &p[20..20 + len];
            if typ == REP_META_CONTEXT {
                let id = u32::from_be_bytes(d[..4].try_into().unwrap());
                out.push((id, String::from_utf8(d[4..].to_vec()).unwrap()));
            }
            p = &p[20 + len..];
        }
        out
    }

    #[test]
    fn bitmap_contexts() {
        let mut h = Handshake::new(info());
        h.option(OPT_STRUCTURED_REPLY, &[]);
        let mut ask = |opt, q: &[&str]| match h.option(opt, &meta_data("disk", q)) {
            Step::Reply(r) => meta_replies(&r),
            s => panic!("{s:?}"),
        };
        let names = |v: Vec<(u32, String)>| v.into_iter().map(|x| x.1).collect::<Vec<_>>();
        assert_eq!(
            names(ask(OPT_LIST_META_CONTEXT, &[])),
            [
                "base:allocation",
                "qemu:allocation-depth",
                "qemu:dirty-bitmap:b1",
                "qemu:dirty-bitmap:b0"
            ]
        );
        assert_eq!(
            names(ask(OPT_LIST_META_CONTEXT, &["qemu:dirty-bitmap:"])),
            ["qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:b0"]
        );
        assert_eq!(
            names(ask(OPT_LIST_META_CONTEXT, &["qemu:"])),
            [
                "qemu:allocation-depth",
                "qemu:dirty-bitmap:b1",
                "qemu:dirty-bitmap:b0"
            ]
        );
        assert!(ask(OPT_LIST_META_CONTEXT, &["qemu:dirty-bitmap:nope"]).is_empty());
        // SET: exact names only, answered in id order.
        assert!(ask(OPT_SET_META_CONTEXT, &["qemu:dirty-bitmap:"]).is_empty());
        assert_eq!(
            ask(
                OPT_SET_META_CONTEXT,
                &["qemu:dirty-bitmap:b0", "base:allocation"]
            ),
            [
                (CTX_BASE_ALLOCATION, "base:allocation".to_string()),
                (CTX_DIRTY_BITMAP + 1, "qemu:dirty-bitmap:b0".to_string())
            ]
        );
        match h.option(OPT_GO, &go_data("", &[])) {
            Step::Transmission(_, n) => {
                assert_eq!(n.contexts, vec![CTX_BASE_ALLOCATION, CTX_DIRTY_BITMAP + 1])
            }
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn refusals() {
        let mut h = Handshake::new(info());
        let e = |s: Step| match s {
            Step::Reply(r) => u32::from_be_bytes(r[12..16].try_into().unwrap()),
            s => panic!("{s:?}"),
        };
        assert_eq!(e(h.option(OPT_GO, &go_data("other", &[]))), REP_ERR_UNKNOWN);
        assert_eq!(e(h.option(OPT_GO, &[0, 0, 0, 9])), REP_ERR_INVALID);
        assert_eq!(
            e(h.option(OPT_SET_META_CONTEXT, &meta_data("disk", &[]))),
            REP_ERR_INVALID
        );
        assert_eq!(e(h.option(99, &[])), REP_ERR_UNSUP);
        assert_eq!(e(h.option(OPT_STARTTLS, &[])), REP_ERR_POLICY);
        assert_eq!(h.option(OPT_EXPORT_NAME, b"nope"), Step::Close(Vec::new()));
        let mut t = Handshake::new(ExportInfo {
            tls: true,
            ..info()
        });
        assert_eq!(e(t.option(OPT_GO, &go_data("", &[]))), REP_ERR_TLS_REQD);
        assert!(matches!(t.option(OPT_STARTTLS, &[]), Step::StartTls(_)));
        assert!(t.client_flags(0).is_err());
    }
}
