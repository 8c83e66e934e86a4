"""`python -m dpop ...` is the same as the `dpop` command (and is what `accelerate launch -m dpop` runs)."""

from dpop.cli import main

raise SystemExit(main())
