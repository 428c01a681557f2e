"""The ``relic`` command line: one module per subcommand (``add_arguments(parser)``, ``run(args)``),
apart from the Ray wiring in ``cluster/`` that ``train``, ``eval`` and ``demo`` call."""
