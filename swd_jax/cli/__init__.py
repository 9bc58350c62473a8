"""The console scripts (swd-train, swd-convert, ...): argument parsing and one contract (`error:` + exit 2,
--debug, --verbose, prog = the script name) over the parts below; nothing below imports this package."""
