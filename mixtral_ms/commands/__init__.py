"""The tools' command lines (console scripts `mixtral-ms-*`, pyproject.toml; thin shims in scripts/)."""
