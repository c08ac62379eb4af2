"""Container images for the e2e nodes, built without Docker or a registry (see `build.py`)."""
