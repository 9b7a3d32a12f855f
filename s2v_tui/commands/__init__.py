"""The command line's subcommands and faces, one module each; s2v_tui/cli.py dispatches to them."""
