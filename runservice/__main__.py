"""`python -m runservice` is the `runservice` command."""

from runservice.cli import main

raise SystemExit(main())
