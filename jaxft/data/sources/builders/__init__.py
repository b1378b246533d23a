"""jaxft's own TFDS builders: built-in datasets prepared locally from registry packages (see builtin.py).
A new one is a module here whose `Builder` is a tfds.core.GeneratorBasedBuilder, and its name below."""

NAMES = ("vader_movie_reviews", "wnut16", "fashion_mnist", "mnist_5k", "jane_austen")
