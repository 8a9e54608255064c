"""The ``w2wkit`` command line (installed as the package ``w2wkit.cli``)."""
