"""Datamodules and the synthetic benchmark generator (``marbench.datasets``)."""
