"""`python -m sanitizer` is the `sanitize` command."""
import sys

from .cli import main

sys.exit(main())
