"""The typer commands, one module each; they parse options and report errors, nothing more."""
