"""The ``sotu-delta`` command that ``pip install`` puts into the environment's bin folder: the
command line of the Rust library, run through the extension module (one implementation)."""

import sys

from . import _sotu_delta


def main() -> None:
    """Runs ``sotu-delta`` with this process's arguments and exits with its status."""
    sys.stdout.flush()
    sys.exit(_sotu_delta.run_cli(["sotu-delta", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
