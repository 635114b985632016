"""``python -m sparsemom_ext.train``: see :mod:`sparsemom_ext.train.cli`."""

from .cli import console_main

console_main()
