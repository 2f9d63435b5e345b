//! `qcow2rs`: a qemu-img compatible command-line tool over qcow2-core.
//!
//! The library target holds the whole tool behind [`run`], so that the `qcow2rs` binary and
//! the console script of the Python package (`qcow2rs._qcow2rs.cli_main`) run the same code.

mod args;
mod bench;
mod cmds;
mod dump;

const USAGE: &str = "usage: qcow2rs COMMAND [OPTIONS] ...

Commands (options as qemu-img):
  info [-f FMT] [--output=human|json] [--backing-chain] [-U] FILE
  map [-f FMT] [--output=human|json] [-U] FILE
  check [-f FMT] [--output=human|json] [-r leaks|all] [-U] FILE
  compare [-f FMT] [-F FMT] [-s] [-p] [-U] FILE1 FILE2
  convert [-f FMT] [-O raw|qcow2] [-c] [-o OPTS] [-B BACKING [-F FMT]] [-p] [-m N] [-t none|writeback] [-l SNAPSHOT] [-S SPARSE_SIZE] [-n [--target-is-zero]] [-U] SRC DST
  create [-f FMT] [-o OPTS] [-b BACKING -F FMT] [-u] FILE [SIZE]
  resize [--shrink] [-f FMT] FILE [+|-]SIZE
  rebase [-f FMT] [-t CACHE] [-T CACHE] [-p] [-q] [-U] [-u] -b BACKING|\"\" [-F FMT] FILE
  commit [-f FMT] [-t CACHE] [-b BASE] [-d] [-p] [-q] FILE
  amend -o OPTS [-f FMT] [-p] [-q] [--force] FILE
  measure [--output=human|json] [-O raw|qcow2] [-o OPTS] [-f FMT] [-l SNAPSHOT] [-U] (--size SIZE | FILE)
  snapshot [-l | -c NAME | -a NAME | -d NAME] [-U] FILE
  bitmap (--add | --remove | --clear | --enable | --disable | --merge SRC [-b SRC_FILE [-F SRC_FMT]])... [-g GRANULARITY] [-f FMT] FILE BITMAP
  dd [-f FMT] [-O raw|qcow2] [-U] [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT
  dump [-U] FILE
  bench [-c N] [-d DEPTH] [-s SIZE] [-S STEP] [-o OFFSET] [-t none|writeback] [-i io_uring|threads] [-w] [--cache-size SIZE] [-U] FILE
  serve [-k SOCKET | -b ADDR -p PORT] [-r] [-x NAME] [-e SHARED] [-t] [--tls-creds DIR] ... IMG (NBD server; serve --help)

Images are locked as QEMU locks them: an image another process writes is refused, and
-U (--force-share, read-only commands) opens it anyway.
Every command accepts --untrusted: refuse to open files named inside an image.";

/// An error for the user: a message (one line) and an exit code.
pub(crate) struct Fail {
    pub msg: String,
    pub code: u8,
}

impl Fail {
    pub fn new(msg: impl Into<String>) -> Fail {
        Fail {
            msg: msg.into(),
            code: 1,
        }
    }
    pub fn code(mut self, code: u8) -> Fail {
        self.code = code;
        self
    }
}

impl From<qcow2_core::Error> for Fail {
    fn from(e: qcow2_core::Error) -> Fail {
        Fail::new(e.to_string())
    }
}

impl From<String> for Fail {
    fn from(s: String) -> Fail {
        Fail::new(s)
    }
}

/// Run the tool with `argv` (program name first) and return the exit status. Output goes to
/// the process's stdout and stderr (flushed before returning).
pub fn run(argv: &[String]) -> u8 {
    let code = run_inner(argv);
    let _ = std::io::Write::flush(&mut std::io::stdout());
    code
}

fn run_inner(argv: &[String]) -> u8 {
    if argv.len() < 2 {
        eprintln!("{USAGE}");
        return 1;
    }
    let cmd = argv[1].as_str();
    let rest = &argv[2..];
    if cmd == "help" {
        // `qcow2rs help CMD` is `qcow2rs CMD --help`.
        if let Some(c) = rest.first() {
            return run_inner(&[argv[0].clone(), c.clone(), "--help".to_string()]);
        }
    }
    if matches!(cmd, "-h" | "--help" | "help") {
        println!("{USAGE}");
        return 0;
    }
    if matches!(cmd, "-V" | "--version") {
        println!("qcow2rs version {}", env!("CARGO_PKG_VERSION"));
        return 0;
    }
    if let Some(line) = command_help(cmd, rest) {
        println!("usage: qcow2rs {line}\n\nSee `qcow2rs --help` for every command, and the README for each option.");
        return 0;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .thread_name("qcow2rs-worker")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qcow2rs: cannot start the runtime: {e}");
            return 1;
        }
    };
    let res = rt.block_on(cmds::run(cmd, rest));
    match res {
        Ok(code) => code,
        Err(f) => {
            let msg = f.msg.replace('\n', " ");
            eprintln!("qcow2rs: {msg}");
            f.code
        }
    }
}

/// `qcow2rs COMMAND -h|--help` (as `qemu-img COMMAND --help`): the command's usage line, when
/// the command is one of [`USAGE`]'s and a help option comes before any `--`. `serve` prints
/// its own, longer help.
fn command_help(cmd: &str, rest: &[String]) -> Option<&'static str> {
    if cmd == "serve" {
        return None;
    }
    let asked = rest
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "-h" || a == "--help");
    if !asked {
        return None;
    }
    USAGE
        .lines()
        .map(str::trim_start)
        .find(|l| l.split_whitespace().next() == Some(cmd) && l.len() > cmd.len())
}
