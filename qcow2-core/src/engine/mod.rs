//! The per-request engine: opening an image, mapping guest offsets, reading, writing,
//! allocation, the metadata caches and the ordered flush.
//!
//! One concept per file:
//! - [`image`]: open options, geometry, the shared handle, open, flush and close;
//! - [`mappings`]: L1/L2 lookups and runs of like clusters (block status);
//! - [`read`]: the read path;
//! - [`write`]: the write path and its in-place fast path;
//! - [`cow`]: copy-on-write and cluster/subcluster allocation for a write;
//! - [`batch`]: allocating writes of runs of whole clusters, in batches;
//! - [`zero`]: write-zeroes and discard;
//! - [`compressed`]: compressed clusters (codecs, cached reads, writes);
//! - [`inflight`]: per-guest-cluster in-flight marks;
//! - [`allocation`]: refcounts and host cluster allocation;
//! - [`metadata`]: L2 table updates and the ordered write-back of dirty metadata;
//! - [`cache`]: the sliced LRU cache of L2 tables and refcount blocks;
//! - [`overlap`]: the metadata overlap check;
//! - [`poison`]: refusing changes once memory and file may disagree;
//! - [`dirty`]: recording guest changes in the enabled persistent bitmaps;
//! - [`disk`]: a raw or qcow2 disk, as a backing file or a job's input.

pub mod allocation;
pub mod batch;
pub mod cache;
pub mod compressed;
pub mod cow;
pub mod dirty;
pub mod disk;
pub mod image;
pub mod inflight;
pub mod mappings;
pub mod metadata;
pub mod overlap;
pub mod poison;
pub mod read;
pub mod write;
pub mod zero;
