"""nbtrain: train large models with DeepSpeed from a notebook cell.

>>> %load_ext nbtrain                                   # doctest: +SKIP
>>> %%bigtrain --nproc 2 --zero 3 --steps 100            # doctest: +SKIP
... result = bigtrain.fit(make_model(), make_data())

Importing nbtrain is cheap: torch, deepspeed and IPython are imported only when used.

`from nbtrain import bigtrain` gives the code of the user's own modules the run in progress
(in a worker, during a run; anywhere else using it raises a RuntimeError that says so).
"""

from __future__ import annotations

from typing import Any

from nbtrain.config.tree import TrainConfig
from nbtrain.current import bigtrain
from nbtrain.errors import ConfigError, Problem, RunFailed, ShippingError
from nbtrain.result import RunResult

__version__ = "0.1.0"
__all__ = ["ConfigError", "ConfigPanel", "Problem", "RunFailed", "RunResult", "ShippingError", "TrainConfig",
           "bigtrain", "load_ipython_extension", "quantize"]


def __getattr__(name: str) -> Any:
    # ConfigPanel needs ipywidgets: load it on first use so that `import nbtrain` stays light.
    if name == "ConfigPanel":
        from nbtrain.panel import ConfigPanel

        return ConfigPanel
    if name == "quantize":  # needs torch and torchao
        from nbtrain.quantization import quantize

        return quantize
    raise AttributeError(f"module 'nbtrain' has no attribute {name!r}")


def load_ipython_extension(ipython: Any) -> None:
    """Register `%%bigtrain` (run by `%load_ext nbtrain`)."""
    from nbtrain.magic import BigTrainMagics

    ipython.register_magics(BigTrainMagics)
