"""`python -m csmd.cli`: the `csmd` command."""

from csmd.cli import main

raise SystemExit(main())
