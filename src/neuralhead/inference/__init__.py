"""File-level pipelines: reenactment from files to files, shared by the CLI and the web app."""
