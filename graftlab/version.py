"""graftlab's version: one definition, read by ``graftlab.__version__`` and written into every trace."""

VERSION = "0.1.0"
