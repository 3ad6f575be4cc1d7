"""The `prefixtune` command: one module per subcommand (parse arguments, call the library,
print). Nothing in the library imports this package."""
