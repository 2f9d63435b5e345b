"""The ``qcow2rs`` console script: runs the same CLI code as the Rust binary."""

from __future__ import annotations

import signal
import sys

from . import _qcow2rs


def main() -> None:
    # Behave as the native binary does: Ctrl-C and a closed pipe end the process.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.stdout.flush()
    sys.exit(_qcow2rs.cli_main(sys.argv))


if __name__ == "__main__":
    main()
