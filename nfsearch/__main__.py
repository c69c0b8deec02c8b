"""`python -m nfsearch`: the same as the `nfsearch` command."""

from __future__ import annotations

from nfsearch.cli import main

raise SystemExit(main())
