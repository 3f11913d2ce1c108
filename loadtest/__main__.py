"""Entry point for ``python -m loadtest``."""

from loadtest.harness import main

if __name__ == "__main__":
    raise SystemExit(main())
