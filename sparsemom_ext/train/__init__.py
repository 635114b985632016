"""The training command of sparsemom_ext: ``python -m sparsemom_ext.train --help``.

- :mod:`.cli`: options (the paper's reference settings as defaults) and the command;
- :mod:`.models`: lenet300, lenet5, mlp, vgg16, wide resnets from plain torch layers;
- :mod:`.data`: MNIST / IDX / CIFAR-10 in memory, seeded validation split;
- :mod:`.loop`: the run (per-step order, evaluation, topology updates, final results);
- :mod:`.speedup`: the paper's speed-up estimate and the measured one;
- :mod:`.checkpoint`: ``--save`` / ``--resume`` to the identical result;
- :mod:`.report`, :mod:`.plots`: the printed tables and the PNG figures.
"""

from .cli import main

__all__ = ["main"]
