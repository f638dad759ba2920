#!/usr/bin/env python
"""The pretraining demo (same as `python -m lowbit.examples.pretrain`; --help for options)."""
import sys

from lowbit.examples.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
