"""Command lines of the tools that read a trained checkpoint (``cssfe evaluate``, ``predict``,
``visualize``, ``export``): each module parses its arguments and calls the library; ``main(argv)``
returns the exit code. The table of every ``cssfe`` command is ``cssfe.cli.COMMANDS``."""
