//! The read path: guest reads split into runs and served from data, zeros, backing or compressed clusters.

use crate::engine::disk::check_range;
use crate::engine::image::Image;
use crate::engine::mappings::Run;
use crate::format::l2::SubState;
use crate::{Error, Result};

impl Image {
    /// Read `buf.len()` bytes of guest data at `off`.
    pub async fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let _req = self.enter_request().await;
        self.read_inner(buf, off).await.map_err(|e| self.named(e))
    }

    /// Prefix an error with the image's name unless it already names it.
    pub(crate) fn named(&self, e: Error) -> Error {
        let p = self.inner.path.display().to_string();
        if e.message().starts_with(&p) {
            e
        } else {
            e.context(p)
        }
    }

    pub(crate) async fn read_inner(&self, buf: &mut [u8], off: u64) -> Result<()> {
        check_range(off, buf.len() as u64, self.size())?;
        // Held until every piece is read: the host clusters looked up below are not
        // reused meanwhile (`engine/inflight.rs`).
        let _ticket = self.ticket();
        if buf.is_empty() {
            return Ok(());
        }
        let first = self.run_at(off, buf.len() as u64).await?;
        if first.len == buf.len() as u64 {
            // The common case, a read inside one run: awaited right here, without a list of
            // futures (an allocation, and a copy of the large read future into it and out).
            return self.read_run(first, buf, off, true).await;
        }
        let (piece, mut rest) = buf.split_at_mut(first.len as usize);
        let mut futs = vec![self.read_run(first, piece, off, false)];
        let mut pos = off + first.len;
        while !rest.is_empty() {
            let run = self.run_at(pos, rest.len() as u64).await?;
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(run.len as usize);
            rest = tail;
            futs.push(self.read_run(run, piece, pos, false));
            pos += run.len;
        }
        futures::future::try_join_all(futs).await?;
        Ok(())
    }

    /// `alone`: the run is the whole request, so nothing else of it runs beside this one
    /// (a compressed cluster is then inflated right here, see [`decompress_owned`]).
    ///
    /// [`decompress_owned`]: crate::engine::compressed::decompress_owned
    pub(crate) async fn read_run(
        &self,
        run: Run,
        buf: &mut [u8],
        guest: u64,
        alone: bool,
    ) -> Result<()> {
        let lay = &self.inner.layout;
        match run.state {
            SubState::Zero => {
                buf.fill(0);
                Ok(())
            }
            SubState::Unallocated => match &self.inner.backing {
                Some(b) => b.read_padded(buf, guest).await,
                None => {
                    buf.fill(0);
                    Ok(())
                }
            },
            SubState::Data(host) => {
                let host = host + (guest & (lay.sc_size - 1));
                if self.inner.w.is_none()
                    && self.inner.data_path.is_none()
                    && (host & !(lay.cluster_size - 1)) >= self.inner.file_len_at_open
                {
                    return Err(Error::corrupt(format!(
                        "L2 entry for guest offset 0x{guest:x} points at host offset 0x{host:x}, in a cluster beyond the end of the file"
                    )));
                }
                self.inner.data.read_at(buf, host).await.map_err(|e| {
                    Error::io(
                        e,
                        format!(
                            "{}: reading data at host offset 0x{host:x}",
                            self.inner.path.display()
                        ),
                    )
                })
            }
            SubState::Compressed(d) => {
                let cluster = self.decompressed(d, alone).await?;
                let within = (guest & (lay.cluster_size - 1)) as usize;
                buf.copy_from_slice(&cluster[within..within + buf.len()]);
                Ok(())
            }
        }
    }
}
