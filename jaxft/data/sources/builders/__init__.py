"""jaxft's own TFDS builders: built-in datasets prepared locally from registry packages (see builtin.py)."""
