//! Entry points for fuzzing the untrusted input paths: request headers and the handshake.
//! Both take arbitrary bytes and must never panic; a bounded random run is part of the
//! normal tests, and a cargo-fuzz target can call them directly.

use crate::handshake::{ExportInfo, Handshake, Step};
use crate::proto::{self, Limits};

/// Parse `data` as a stream of request headers (compact, then extended) and validate each
/// against a few export states.
pub fn requests(data: &[u8]) {
    for extended in [false, true] {
        let n = if extended {
            proto::EXT_REQUEST_LEN
        } else {
            proto::REQUEST_LEN
        };
        for chunk in data.chunks(n) {
            // Also with the right magic, so the fields past it are exercised.
            let mut fixed = chunk.to_vec();
            if fixed.len() >= 4 {
                let m = if extended {
                    proto::EXT_REQUEST_MAGIC
                } else {
                    proto::REQUEST_MAGIC
                };
                fixed[..4].copy_from_slice(&m.to_be_bytes());
            }
            for buf in [chunk, &fixed[..]] {
                if let Ok(h) = proto::parse_request_header(buf, extended) {
                    assert!(h.payload <= proto::MAX_PAYLOAD as u64);
                    for (size, ro, contexts, min_block) in [
                        (0, false, 0, 1),
                        (1 << 20, true, 1, 512),
                        (u64::MAX, false, 2, 1),
                    ] {
                        let lim = Limits {
                            size,
                            read_only: ro,
                            structured: extended || size == 0,
                            extended,
                            contexts,
                            min_block,
                        };
                        if let Ok(c) = proto::validate(&h, &lim) {
                            check_command(&c, &lim);
                        }
                    }
                }
            }
        }
    }
}

fn check_command(c: &proto::Command, lim: &Limits) {
    use proto::Command::*;
    let (off, len) = match *c {
        Read { off, len, .. }
        | Write { off, len, .. }
        | Trim { off, len, .. }
        | Cache { off, len }
        | WriteZeroes { off, len, .. }
        | BlockStatus { off, len, .. } => (off, len),
        Disc | Flush => return,
    };
    assert!(off.checked_add(len).is_some_and(|e| e <= lim.size));
    if matches!(c, Write { .. } | Trim { .. } | WriteZeroes { .. }) {
        assert!(!lim.read_only);
    }
}

/// Run a handshake on `data` read as a sequence of options: 4 bytes client flags, then
/// (option u32, length u16, that many bytes) records.
pub fn handshake(data: &[u8]) {
    for tls in [false, true] {
        let mut hs = Handshake::new(ExportInfo {
            name: "disk".into(),
            description: "d".into(),
            size: 1 << 30,
            read_only: false,
            min_block: 1,
            pref_block: 4096,
            tls,
            multi_conn: true,
        });
        if data.len() < 4 {
            return;
        }
        let flags = u32::from_be_bytes(data[..4].try_into().unwrap());
        if hs.client_flags(flags).is_err() {
            continue;
        }
        let mut rest = &data[4..];
        while rest.len() >= 6 {
            let opt = u32::from_be_bytes(rest[..4].try_into().unwrap()) % 16;
            let n = (u16::from_be_bytes([rest[4], rest[5]]) as usize).min(rest.len() - 6);
            let body = &rest[6..6 + n];
            rest = &rest[6 + n..];
            match hs.option(opt, body) {
                Step::Reply(r) | Step::StartTls(r) => assert!(r.len() >= 20),
                Step::Transmission(..) | Step::Close(_) => break,
            }
            if tls {
                hs.tls_started();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    /// Bounded random run (the cargo-fuzz targets go further).
    #[test]
    fn random_inputs_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..20_000 {
            let n = rng.gen_range(0..200);
            let mut v: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            super::requests(&v);
            // Bias towards meaningful options: small option numbers and plausible lengths.
            if v.len() >= 10 {
                v[..4].copy_from_slice(&1u32.to_be_bytes());
                v[4..8].copy_from_slice(&(rng.gen_range(0..12u32)).to_be_bytes());
            }
            super::handshake(&v);
        }
    }
}
