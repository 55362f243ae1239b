"""`python -m postroom.store.migrations revision MESSAGE`: a new revision generated from schema.py."""

import sys

from postroom.store.migrations import _main

_main(sys.argv[1:])
