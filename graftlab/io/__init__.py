"""Durable writes and output checks every stage shares: nothing here knows of grafting.

Modules: ``fsutil`` (temporary names, fsync, durable renames), ``outputs`` (checking an output path
before anything is written, atomic writes), ``jsonable`` (values made JSON-safe), ``termination``
(SIGTERM handled like Ctrl-C, deferred while a checkpoint is committed).
"""
