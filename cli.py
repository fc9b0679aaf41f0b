"""`python cli.py <command> ...`: see seq2seq_diff/cli.py (and `python cli.py --help`)."""
import sys

from seq2seq_diff.cli import main

if __name__ == "__main__":
    sys.exit(main())
