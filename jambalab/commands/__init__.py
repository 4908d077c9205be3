"""CLI subcommands; each module has register(subparsers). See jambalab.cli."""
