"""The ``deltatune`` command line."""
