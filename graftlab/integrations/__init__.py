"""Grafting and recording inside the training stacks people use; each module is an optional extra.

- :mod:`graftlab.integrations.hf`: Hugging Face ``transformers.Trainer`` (``pip install 'graftlab[hf]'``):
  :func:`~graftlab.integrations.hf.graft_optimizer` builds M#D with M as the Trainer would build
  its own optimizer, :class:`~graftlab.integrations.hf.RecorderCallback` records the trace.
- :mod:`graftlab.integrations.lightning`: PyTorch Lightning (``pip install 'graftlab[lightning]'``):
  ``configure_optimizers`` returns a ``Graft`` (with a scheduler on it), and
  :class:`~graftlab.integrations.lightning.RecorderCallback` records the trace.
- :mod:`graftlab.integrations.tensorboard`: a live view of the per-kind median ratio in TensorBoard,
  written by the Recorder at each flush (``pip install 'graftlab[tensorboard]'``).

A plain loop, torchrun/DDP/FSDP2 and accelerate need nothing from here: ``graftlab.Recorder`` is
rank-aware by itself and finds the ``Graft`` inside accelerate's optimizer wrapper. The core package
never imports these libraries; importing one of these modules without its library raises an
ImportError that names the extra to install. See ``docs/trainers.md``.
"""


def require(module: str, extra: str, what: str):
    """Import ``module`` or raise an ImportError that says which graftlab extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{what} needs {module.split('.')[0]}: pip install 'graftlab[{extra}]'") from err
