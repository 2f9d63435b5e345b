//! The command line, declared once with clap (derive): it parses the arguments and produces
//! every `--help`, the shell completions and the man page, so they cannot drift apart.
//!
//! Spellings follow qemu-img's getopt: `-f fmt` and `-ffmt`, `--output=json` and `--output
//! json`, grouped short flags (`-pq`), options after operands, repeated `-o` lists, option
//! values that start with `-`, and the last of a repeated option winning. Operands are
//! collected in order and checked by each command, which keeps qemu-img's messages for a
//! missing or extra file name; `dd`'s `if=`/`of=`/`bs=`/`count=`/`skip=` operands are read
//! by the command itself.

use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand};

/// Top of every subcommand's `--help` (qemu-img prints a usage line first, too).
const SUB_TEMPLATE: &str = "usage: {usage}\n\n{about-with-newline}\n{all-args}{after-help}";
const TOP_TEMPLATE: &str = "usage: {usage}\n\n{about-with-newline}\n{all-args}{after-help}";

const TOP_AFTER: &str = "\
Options, messages, JSON keys and exit codes follow qemu-img's. Images are locked as QEMU
locks them: an image another process writes is refused, and -U (--force-share, read-only
commands) opens it anyway. Every command accepts --untrusted: refuse to open files named
inside an image. `qcow2rs help COMMAND` is `qcow2rs COMMAND --help`.";

#[derive(Parser, Debug)]
#[command(
    name = "qcow2rs",
    bin_name = "qcow2rs",
    version,
    about = "A qemu-img compatible tool for qcow2 and raw disk images",
    after_help = TOP_AFTER,
    help_template = TOP_TEMPLATE,
    subcommand_value_name = "COMMAND",
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Options every command accepts (`serve` declares its own: qcow2-nbd's `ServeArgs`).
#[derive(Args, Debug, Clone, Default)]
pub struct Common {
    /// Refuse to open files named inside an image (backing file, external data file)
    #[arg(long)]
    pub untrusted: bool,
    /// Accepted for qemu-img compatibility; option strings are not supported as file names
    #[arg(long = "image-opts")]
    pub image_opts: bool,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Show image information (JSON keys as qemu-img info)
    Info(InfoArgs),
    /// Show the allocation map (as qemu-img map)
    Map(MapArgs),
    /// Check refcounts and metadata; -r repairs
    Check(CheckArgs),
    /// Compare the guest content of two images
    Compare(CompareArgs),
    /// Copy an image between raw and qcow2
    Convert(ConvertArgs),
    /// Create a new image
    Create(CreateArgs),
    /// Grow or shrink an image
    Resize(ResizeArgs),
    /// Change the backing file of an image
    Rebase(RebaseArgs),
    /// Write an overlay's data into its backing file
    Commit(CommitArgs),
    /// Change options of a qcow2 image
    Amend(AmendArgs),
    /// Compute the file size a new image needs
    Measure(MeasureArgs),
    /// List, create, apply or delete internal snapshots
    Snapshot(SnapshotArgs),
    /// Add, remove, clear, enable, disable or merge persistent dirty bitmaps
    Bitmap(BitmapArgs),
    /// Copy an image as dd does (qemu-img dd)
    Dd(DdArgs),
    /// Show the qcow2 metadata for humans
    Dump(DumpArgs),
    /// Run a read or write benchmark (qemu-img bench)
    Bench(BenchArgs),
    /// Export an image over NBD (options as qemu-nbd's)
    Serve(qcow2_nbd::cli::ServeArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions(CompletionsArgs),
    /// Write the man pages: qcow2rs.1 to stdout, or every page into DIR
    #[command(hide = true)]
    Manpage(ManpageArgs),
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Image format (qcow2 or raw; probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Output format: human or json
    #[arg(long, value_name = "human|json")]
    pub output: Option<String>,
    /// Show every image of the backing chain
    #[arg(long = "backing-chain")]
    pub backing_chain: bool,
    /// Open the image even when another process writes it
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[command(flatten)]
    pub common: Common,
    /// The image
    #[arg(value_name = "FILE")]
    pub file: Option<String>,
    #[arg(hide = true)]
    pub extra: Vec<String>,
}

#[derive(Args, Debug)]
pub struct MapArgs {
    /// Image format (qcow2 or raw; probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Output format: human or json
    #[arg(long, value_name = "human|json")]
    pub output: Option<String>,
    /// Map from this guest offset on (default 0; suffixes k, M, G, ...)
    #[arg(long = "start-offset", value_name = "OFFSET")]
    pub start_offset: Option<String>,
    /// Map at most this many bytes (default: to the end of the image)
    #[arg(long = "max-length", value_name = "LENGTH")]
    pub max_length: Option<String>,
    /// Open the image even when another process writes it
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[command(flatten)]
    pub common: Common,
    /// The image
    #[arg(value_name = "FILE")]
    pub file: Option<String>,
    #[arg(hide = true)]
    pub extra: Vec<String>,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Exit status: 0 clean, 2 corruptions, 3 leaks only, 1 check not completed, \
63 format without checks."
)]
pub struct CheckArgs {
    /// Image format (qcow2 or raw; probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Output format: human or json
    #[arg(long, value_name = "human|json")]
    pub output: Option<String>,
    /// Repair: leaks (leaked clusters only) or all
    #[arg(short = 'r', long = "repair", value_name = "leaks|all")]
    pub repair: Option<String>,
    /// Print nothing (the exit status tells)
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Open the image even when another process writes it
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[command(flatten)]
    pub common: Common,
    /// The image
    #[arg(value_name = "FILE")]
    pub file: Option<String>,
    #[arg(hide = true)]
    pub extra: Vec<String>,
}

#[derive(Args, Debug)]
#[command(after_help = "Exit status: 0 identical, 1 different (or a usage error), 2 error.")]
pub struct CompareArgs {
    /// Format of FILE1
    #[arg(short = 'f', long = "a-format", value_name = "FMT")]
    pub a_format: Option<String>,
    /// Format of FILE2
    #[arg(short = 'F', long = "b-format", value_name = "FMT")]
    pub b_format: Option<String>,
    /// Strict mode: images of different sizes differ
    #[arg(short = 's', long = "strict")]
    pub strict: bool,
    /// Accepted for qemu-img compatibility
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Print nothing (the exit status tells)
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Cache mode of the images (accepted for qemu-img compatibility)
    #[arg(short = 'T', long = "cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// Open the images even when another process writes them
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[command(flatten)]
    pub common: Common,
    /// The first image
    #[arg(value_name = "FILE1")]
    pub file1: Option<String>,
    /// The second image
    #[arg(value_name = "FILE2")]
    pub file2: Option<String>,
    #[arg(hide = true)]
    pub extra: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Source format (qcow2 or raw; probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Target format: raw (default) or qcow2
    #[arg(short = 'O', long = "target-format", value_name = "FMT")]
    pub target_format: Option<String>,
    /// Target create options, a=b,c=d (may be repeated; `-o help` lists them)
    #[arg(short = 'o', long = "options", value_name = "OPTS", action = ArgAction::Append)]
    pub options: Vec<String>,
    /// Backing file of the target (qcow2): only the differences are written
    #[arg(short = 'B', long = "backing", value_name = "BACKING")]
    pub backing: Option<String>,
    /// Format of the target's backing file
    #[arg(short = 'F', long = "backing-format", value_name = "FMT")]
    pub backing_format: Option<String>,
    /// Write compressed clusters
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// Show progress
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Requests in flight (1 to 64, default 8)
    #[arg(short = 'm', long = "parallel", value_name = "N")]
    pub parallel: Option<String>,
    /// Target cache mode: writeback (default), writethrough, none (O_DIRECT), directsync
    /// (O_DIRECT) or unsafe (flushes ignored: exits before the output is on disk)
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// Source cache mode (checked; the source is only read)
    #[arg(short = 'T', long = "source-cache", value_name = "CACHE")]
    pub source_cache: Option<String>,
    /// Out-of-order writes (accepted, no effect: writes to an O_DIRECT raw target overlap
    /// anyway, others go in order, as qemu-img writes without -W)
    #[arg(short = 'W')]
    pub out_of_order: bool,
    /// Write into an existing target instead of creating it
    #[arg(short = 'n')]
    pub no_create: bool,
    /// Print nothing but errors
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// I/O engine: io_uring, threads or auto
    #[arg(long = "aio", value_name = "ENGINE")]
    pub aio: Option<String>,
    /// Convert an internal snapshot: snapshot.name=NAME, snapshot.id=ID or an ID or name
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    pub snapshot: Option<String>,
    /// Shortest run of zeros left unallocated (a multiple of 512 up to 16M; 0 allocates all)
    #[arg(short = 'S', value_name = "SPARSE_SIZE")]
    pub sparse_size: Option<String>,
    /// With -n: the target reads as zeros already, so zeros are not written
    #[arg(long = "target-is-zero")]
    pub target_is_zero: bool,
    /// Open the source even when another process writes it
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[command(flatten)]
    pub common: Common,
    /// The source image
    #[arg(value_name = "SRC")]
    pub src: Option<String>,
    /// The target
    #[arg(value_name = "DST")]
    pub dst: Option<String>,
    #[arg(hide = true)]
    pub extra: Vec<String>,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Image format: raw (default) or qcow2
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Create options, a=b,c=d (may be repeated; `-o help` lists them)
    #[arg(short = 'o', long = "options", value_name = "OPTS", action = ArgAction::Append)]
    pub options: Vec<String>,
    /// Backing file
    #[arg(short = 'b', long = "backing", value_name = "BACKING")]
    pub backing: Option<String>,
    /// Backing file format
    #[arg(short = 'F', long = "backing-format", value_name = "FMT")]
    pub backing_format: Option<String>,
    /// Do not open the backing file (SIZE must then be given)
    #[arg(short = 'u', long = "unsafe")]
    pub unsafe_backing: bool,
    /// Print nothing but errors
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    #[command(flatten)]
    pub common: Common,
    /// The new image
    #[arg(value_name = "FILE")]
    pub file: Option<String>,
    /// Virtual size, with qemu-img's suffixes (k, M, G, T, ...)
    #[arg(value_name = "SIZE")]
    pub size: Option<String>,
    #[arg(hide = true)]
    pub extra: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ResizeArgs {
    /// Image format (qcow2 or raw; probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Allow a smaller size (data past it is lost)
    #[arg(long)]
    pub shrink: bool,
    /// Print nothing but errors
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Only `off` (the new space is not preallocated); metadata, falloc and full are refused
    #[arg(long, value_name = "MODE")]
    pub preallocation: Option<String>,
    #[command(flatten)]
    pub common: Common,
    /// The image
    #[arg(value_name = "FILE")]
    pub file: Option<String>,
    /// New size, or +SIZE / -SIZE relative to the current one
    #[arg(value_name = "[+|-]SIZE")]
    pub size: Option<String>,
    #[arg(hide = true)]
    pub extra: Vec<String>,
}

#[derive(Args, Debug)]
pub struct RebaseArgs {
    /// Image format
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// New backing file ("" makes the image standalone)
    #[arg(short = 'b', long = "backing", value_name = "BACKING")]
    pub backing: Option<String>,
    /// Format of the new backing file (required with a non-empty -b)
    #[arg(short = 'F', long = "backing-format", value_name = "FMT")]
    pub backing_format: Option<String>,
    /// Unsafe mode: only switch the header, copy no data
    #[arg(short = 'u', long = "backing-unsafe")]
    pub unsafe_mode: bool,
    /// Show progress
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Print nothing but errors
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Cache mode of the image: none, writeback, writethrough, directsync or unsafe (flushes
    /// ignored)
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// Cache mode of the backing files (checked, otherwise unused)
    #[arg(short = 'T', long = "backing-cache", value_name = "CACHE")]
    pub backing_cache: Option<String>,
    /// Compress the copied data (not supported)
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// Accepted for qemu-img compatibility (the image is opened for writing)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[command(flatten)]
    pub common: Common,
    /// The image
    #[arg(value_name = "FILE")]
    pub file: Option<String>,
    #[arg(hide = true)]
    pub extra: Vec<String>,
}

#[derive(Args, Debug)]
pub struct CommitArgs {
    /// Image format
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Commit into BASE further down the backing chain (implies -d)
    #[arg(short = 'b', long = "base", value_name = "BASE")]
    pub base: Option<String>,
    /// Do not empty the image afterwards
    #[arg(short = 'd', long = "drop")]
    pub drop: bool,
    /// Show progress
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Print nothing but errors
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Cache mode: none, writeback, writethrough, directsync or unsafe (flushes ignored)
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// Rate limit (checked, otherwise unused)
    #[arg(short = 'r', long = "rate", value_name = "RATE")]
    pub rate: Option<String>,
    #[command(flatten)]
    pub common: Common,
    /// The overlay
    #[arg(value_name = "FILE")]
    pub file: Option<String>,
    #[arg(hide = true)]
    pub extra: Vec<String>,
}

#[derive(Args, Debug)]
pub struct AmendArgs {
    /// Image format (qcow2)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Options to change, a=b,c=d (may be repeated; `-o help` lists them)
    #[arg(short = 'o', long = "options", value_name = "OPTS", action = ArgAction::Append)]
    pub options: Vec<String>,
    /// Cache mode of the image: none, writeback (default), writethrough, directsync or
    /// unsafe (flushes ignored)
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// Accepted for qemu-img compatibility
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Print nothing but errors
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Accepted for qemu-img compatibility
    #[arg(long)]
    pub force: bool,
    /// Not supported
    #[arg(long, value_name = "OBJECT")]
    pub object: Option<String>,
    #[command(flatten)]
    pub common: Common,
    /// The image
    #[arg(value_name = "FILE")]
    pub file: Option<String>,
    #[arg(hide = true)]
    pub extra: Vec<String>,
}

#[derive(Args, Debug)]
pub struct MeasureArgs {
    /// Format of FILE
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Format of the new image: raw (default) or qcow2
    #[arg(short = 'O', long = "target-format", value_name = "FMT")]
    pub target_format: Option<String>,
    /// Create options of the new image, a=b,c=d (may be repeated)
    #[arg(short = 'o', long = "options", value_name = "OPTS", action = ArgAction::Append)]
    pub options: Vec<String>,
    /// Measure an empty image of this virtual size instead of FILE
    #[arg(short = 's', long = "size", value_name = "SIZE")]
    pub size: Option<String>,
    /// Measure an internal snapshot of FILE
    #[arg(short = 'l', long = "snapshot", value_name = "SNAPSHOT")]
    pub snapshot: Option<String>,
    /// Output format: human or json
    #[arg(long, value_name = "human|json")]
    pub output: Option<String>,
    /// Not supported
    #[arg(long, value_name = "OBJECT")]
    pub object: Option<String>,
    /// Open FILE even when another process writes it
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[command(flatten)]
    pub common: Common,
    /// The image to measure
    #[arg(value_name = "FILE")]
    pub file: Option<String>,
    #[arg(hide = true)]
    pub extra: Vec<String>,
}

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// List the snapshots (the default)
    #[arg(short = 'l', long = "list")]
    pub list: bool,
    /// Create a snapshot named NAME
    #[arg(short = 'c', long = "create", value_name = "NAME")]
    pub create: Option<String>,
    /// Apply (revert to) a snapshot, by ID or name
    #[arg(short = 'a', long = "apply", value_name = "SNAP")]
    pub apply: Option<String>,
    /// Delete a snapshot, by ID or name
    #[arg(short = 'd', long = "delete", value_name = "SNAP")]
    pub delete: Option<String>,
    /// Image format
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Print nothing but errors
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Open the image even when another process writes it (-l only)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[command(flatten)]
    pub common: Common,
    /// The image
    #[arg(value_name = "FILE")]
    pub file: Option<String>,
    #[arg(hide = true)]
    pub extra: Vec<String>,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Several operations run in command-line order, stopping at the first failure."
)]
pub struct BitmapArgs {
    /// Add BITMAP (enabled)
    #[arg(long, num_args = 0, default_missing_value = "", action = ArgAction::Append)]
    pub add: Vec<String>,
    /// Remove BITMAP
    #[arg(long, num_args = 0, default_missing_value = "", action = ArgAction::Append)]
    pub remove: Vec<String>,
    /// Clear BITMAP
    #[arg(long, num_args = 0, default_missing_value = "", action = ArgAction::Append)]
    pub clear: Vec<String>,
    /// Enable BITMAP
    #[arg(long, num_args = 0, default_missing_value = "", action = ArgAction::Append)]
    pub enable: Vec<String>,
    /// Disable BITMAP
    #[arg(long, num_args = 0, default_missing_value = "", action = ArgAction::Append)]
    pub disable: Vec<String>,
    /// Merge bitmap SRC (of FILE, or of -b SRC_FILE) into BITMAP
    #[arg(long, value_name = "SRC", action = ArgAction::Append)]
    pub merge: Vec<String>,
    /// Granularity of an added bitmap (a power of two, 512 to 2G)
    #[arg(short = 'g', long = "granularity", value_name = "GRANULARITY")]
    pub granularity: Option<String>,
    /// File holding the --merge source
    #[arg(short = 'b', long = "source-file", value_name = "SRC_FILE")]
    pub source_file: Option<String>,
    /// Format of SRC_FILE
    #[arg(short = 'F', long = "source-format", value_name = "SRC_FMT")]
    pub source_format: Option<String>,
    /// Image format
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    #[command(flatten)]
    pub common: Common,
    /// The image
    #[arg(value_name = "FILE")]
    pub file: Option<String>,
    /// The bitmap's name
    #[arg(value_name = "BITMAP")]
    pub bitmap: Option<String>,
    #[arg(hide = true)]
    pub extra: Vec<String>,
}

/// The bitmap operations, in command-line order: (name, --merge source or "").
pub fn bitmap_actions(m: &clap::ArgMatches) -> Vec<(String, String)> {
    let mut acts: Vec<(usize, String, String)> = Vec::new();
    for id in ["add", "remove", "clear", "enable", "disable"] {
        if let Some(ix) = m.indices_of(id) {
            acts.extend(ix.map(|i| (i, id.to_string(), String::new())));
        }
    }
    if let (Some(ix), Some(vals)) = (m.indices_of("merge"), m.get_many::<String>("merge")) {
        acts.extend(
            ix.zip(vals)
                .map(|(i, v)| (i, "merge".to_string(), v.clone())),
        );
    }
    acts.sort_by_key(|a| a.0);
    acts.into_iter().map(|(_, k, v)| (k, v)).collect()
}

#[derive(Args, Debug)]
#[command(
    after_help = "Operands: if=INPUT of=OUTPUT [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS] \
(bs defaults to 512 and takes size suffixes)."
)]
pub struct DdArgs {
    /// Input format (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Output format: raw (default) or qcow2
    #[arg(short = 'O', long = "target-format", value_name = "FMT")]
    pub target_format: Option<String>,
    /// Open the input even when another process writes it
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[command(flatten)]
    pub common: Common,
    /// if=INPUT, of=OUTPUT, bs=BLOCK_SIZE, count=BLOCKS, skip=BLOCKS
    #[arg(value_name = "KEY=VALUE")]
    pub operands: Vec<String>,
}

#[derive(Args, Debug)]
pub struct DumpArgs {
    /// Image format (qcow2 only)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Output format: human or json
    #[arg(long, value_name = "human|json")]
    pub output: Option<String>,
    /// Open the image even when another process writes it
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[command(flatten)]
    pub common: Common,
    /// The image
    #[arg(value_name = "FILE")]
    pub file: Option<String>,
    #[arg(hide = true)]
    pub extra: Vec<String>,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Number of requests (default 75000)
    #[arg(short = 'c', value_name = "COUNT")]
    pub count: Option<String>,
    /// Requests in flight (default 64)
    #[arg(short = 'd', value_name = "DEPTH")]
    pub depth: Option<String>,
    /// Image format
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// I/O engine: io_uring (or native) or threads
    #[arg(short = 'i', value_name = "AIO")]
    pub aio: Option<String>,
    /// Native I/O (io_uring) unless -i says otherwise
    #[arg(short = 'n')]
    pub native: bool,
    /// Offset of the first request
    #[arg(short = 'o', value_name = "OFFSET")]
    pub offset: Option<String>,
    /// Accepted (qemu-img prints the result even with it)
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Request size (default 4k)
    #[arg(short = 's', value_name = "SIZE")]
    pub size: Option<String>,
    /// Distance between request offsets (default the request size)
    #[arg(short = 'S', value_name = "STEP")]
    pub step: Option<String>,
    /// Cache mode: none (O_DIRECT), writeback, writethrough, directsync or unsafe (flushes
    /// ignored)
    #[arg(short = 't', value_name = "CACHE")]
    pub cache: Option<String>,
    /// Write instead of read
    #[arg(short = 'w')]
    pub write: bool,
    /// Byte written by a write test (default 0)
    #[arg(long, value_name = "N")]
    pub pattern: Option<String>,
    /// Flush after every N requests of a write test
    #[arg(long = "flush-interval", value_name = "N")]
    pub flush_interval: Option<String>,
    /// With --flush-interval: do not wait for the requests in flight before flushing
    #[arg(long = "no-drain")]
    pub no_drain: bool,
    /// Metadata cache size of the image and its chain (ours)
    #[arg(long = "cache-size", value_name = "SIZE")]
    pub cache_size: Option<String>,
    /// Open the image even when another process writes it
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[command(flatten)]
    pub common: Common,
    /// The image
    #[arg(value_name = "FILE")]
    pub file: Option<String>,
    #[arg(hide = true)]
    pub extra: Vec<String>,
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell
    #[arg(value_enum, value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub struct ManpageArgs {
    /// Directory to write qcow2rs.1 and one qcow2rs-COMMAND.1 per command into
    #[arg(value_name = "DIR")]
    pub dir: Option<std::path::PathBuf>,
}

/// The whole command line, with qemu-img's getopt habits applied to every command: the last
/// of a repeated option wins, and an option's value may start with `-` (`-b -x` is `-x`).
pub fn command() -> clap::Command {
    Cli::command().mut_subcommands(|sc| {
        let ids: Vec<clap::Id> = sc
            .get_arguments()
            .filter(|a| !a.is_positional() && a.get_action().takes_values())
            .map(|a| a.get_id().clone())
            .collect();
        let mut sc = sc.args_override_self(true).help_template(SUB_TEMPLATE);
        for id in ids {
            sc = sc.mut_arg(id, |a| a.allow_hyphen_values(true));
        }
        sc
    })
}

/// The operands of a command in order: its named ones that were given, then any extra.
pub fn operands(named: &[&Option<String>], extra: &[String]) -> Vec<String> {
    named
        .iter()
        .filter_map(|o| (*o).clone())
        .chain(extra.iter().cloned())
        .collect()
}

/// One line for a clap error: its first paragraph, lines joined, without the "error: "
/// prefix (the caller adds "qcow2rs: ").
pub fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let para: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty())
        .collect();
    let line = para.join(" ");
    match line.strip_prefix("error: ") {
        Some(l) => l.to_string(),
        None if line.is_empty() => "invalid arguments".to_string(),
        None => line,
    }
}

/// The man pages. With a directory: `qcow2rs.1` and one `qcow2rs-COMMAND.1` per command
/// written into it. Without: one page, `qcow2rs.1`, with a section per command (its
/// synopsis, options and notes), written to `out`.
pub fn manpages(
    dir: Option<&std::path::Path>,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut cmd = command();
    if let Some(d) = dir {
        std::fs::create_dir_all(d)?;
        return clap_mangen::generate_to(cmd, d);
    }
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        let mut buf = Vec::new();
        let part = clap_mangen::Man::new(sub.clone());
        part.render_synopsis_section(&mut buf)?;
        part.render_description_section(&mut buf)?;
        part.render_options_section(&mut buf)?;
        if sub.get_after_help().is_some() || sub.get_after_long_help().is_some() {
            part.render_extra_section(&mut buf)?;
        }
        // One section per command; its parts become subsections.
        writeln!(page, ".SH \"COMMAND: {}\"", sub.get_name().to_uppercase())?;
        for line in String::from_utf8_lossy(&buf).lines() {
            match line.strip_prefix(".SH ") {
                Some("EXTRA") => writeln!(page, ".SS NOTES")?,
                Some(h) => writeln!(page, ".SS {h}")?,
                None => writeln!(page, "{line}")?,
            }
        }
    }
    man.render_extra_section(&mut page)?;
    man.render_version_section(&mut page)?;
    // Each part starts with the same string definitions: keep the first, name the notes.
    let text = String::from_utf8_lossy(&page).replace(".SH EXTRA", ".SH NOTES");
    let mut seen = std::collections::HashSet::new();
    for line in text.lines() {
        let definition = line.starts_with(".ie ") || line.starts_with(".el ");
        if definition && !seen.insert(line.to_string()) {
            continue;
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let m = command()
            .try_get_matches_from(std::iter::once("qcow2rs").chain(args.iter().copied()))?;
        <Cli as clap::FromArgMatches>::from_arg_matches(&m)
    }

    #[test]
    fn definitions_are_consistent() {
        command().debug_assert();
    }

    #[test]
    fn qemu_img_spellings() {
        let Cmd::Convert(c) = parse(&[
            "convert",
            "-fraw",
            "-pq",
            "src",
            "-O",
            "qcow2",
            "-o",
            "a=b,c=d",
            "-o",
            "e=f",
            "dst",
            "-l",
            "snapshot.name=x",
            "-f",
            "qcow2",
        ])
        .unwrap()
        .cmd
        else {
            panic!()
        };
        assert_eq!(c.format.as_deref(), Some("qcow2"), "the last -f wins");
        assert!(c.progress && c.quiet);
        assert_eq!(c.target_format.as_deref(), Some("qcow2"));
        assert_eq!(c.options, ["a=b,c=d", "e=f"]);
        assert_eq!(c.snapshot.as_deref(), Some("snapshot.name=x"));
        assert_eq!(
            (c.src.as_deref(), c.dst.as_deref()),
            (Some("src"), Some("dst"))
        );
        let Cmd::Info(i) = parse(&["info", "--output", "json", "x", "-U"]).unwrap().cmd else {
            panic!()
        };
        assert_eq!(i.output.as_deref(), Some("json"));
        assert!(i.force_share);
        let Cmd::Info(i) = parse(&["info", "--output=json", "--", "-x"]).unwrap().cmd else {
            panic!()
        };
        assert_eq!(i.file.as_deref(), Some("-x"));
        let Cmd::Rebase(r) = parse(&["rebase", "-b", "", "-u", "img"]).unwrap().cmd else {
            panic!()
        };
        assert_eq!(r.backing.as_deref(), Some(""));
        let Cmd::Rebase(r) = parse(&["rebase", "-b", "-x", "img"]).unwrap().cmd else {
            panic!()
        };
        assert_eq!(r.backing.as_deref(), Some("-x"));
        let Cmd::Info(i) = parse(&["info", "-f", "qcow2", "-U", "x"]).unwrap().cmd else {
            panic!()
        };
        assert!(i.force_share, "a value-taking option takes one value only");
        assert_eq!(i.file.as_deref(), Some("x"));
        let Cmd::Bitmap(b) = parse(&["bitmap", "--add", "-fqcow2", "img", "bm"])
            .unwrap()
            .cmd
        else {
            panic!()
        };
        assert_eq!((b.add.len(), b.format.as_deref()), (1, Some("qcow2")));
        assert!(parse(&["bitmap", "--add=x", "img", "bm"]).is_err());
        let Cmd::Dd(d) = parse(&["dd", "if=a", "-O", "qcow2", "of=b", "bs=1k"])
            .unwrap()
            .cmd
        else {
            panic!()
        };
        assert_eq!(d.operands, ["if=a", "of=b", "bs=1k"]);
        assert!(parse(&["info", "-z", "x"]).is_err());
        assert!(parse(&["info", "x", "--output"]).is_err());
        assert!(parse(&["info", "--backing-chain=yes", "x"]).is_err());
    }

    #[test]
    fn serve_is_parsed_by_its_definitions() {
        let Cmd::Serve(s) = parse(&[
            "serve",
            "-rt",
            "-x",
            "--fork",
            "-Bb0",
            "--bitmap=b1",
            "-e4",
            "-k",
            "s",
            "img",
            "-v",
        ])
        .unwrap()
        .cmd
        else {
            panic!()
        };
        assert!(s.read_only && s.persistent && s.verbose && !s.fork);
        assert_eq!((s.name.as_str(), s.shared), ("--fork", 4));
        assert_eq!(s.bitmaps, ["b0", "b1"]);
        assert_eq!(s.socket.as_deref(), Some(std::path::Path::new("s")));
        assert_eq!(s.image.as_deref(), Some(std::path::Path::new("img")));
        assert_eq!((s.cache.as_str(), s.handshake_limit), ("writeback", 10));
        for bad in [
            &["serve", "--cache=bogus", "img"][..],
            &["serve", "-p", "65536", "img"],
            &["serve", "-f", "vmdk", "img"],
            &["serve", "--nope", "img"],
            &["serve", "-k"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let help = command()
            .find_subcommand_mut("serve")
            .unwrap()
            .render_help()
            .to_string();
        for opt in [
            "--socket",
            "--bitmap",
            "--tls-verify-peer",
            "--fork",
            "--cache",
        ] {
            assert!(help.contains(opt), "{opt}: {help}");
        }
    }

    #[test]
    fn bitmap_actions_in_order() {
        let args = [
            "qcow2rs", "bitmap", "--merge", "a", "--add", "img", "--clear", "bm", "--merge", "b",
            "--clear",
        ];
        let m = command().try_get_matches_from(args).unwrap();
        let (_, sub) = m.subcommand().unwrap();
        let acts = bitmap_actions(sub);
        let want = [
            ("merge", "a"),
            ("add", ""),
            ("clear", ""),
            ("merge", "b"),
            ("clear", ""),
        ];
        assert_eq!(
            acts,
            want.map(|(k, v)| (k.to_string(), v.to_string())).to_vec()
        );
    }
}
