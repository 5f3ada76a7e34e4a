"""dpokit: Direct Preference Optimization (Rafailov et al. 2023) for Hugging Face causal LMs.

The Python API runs the same stages as the command line:

    from dpokit import load_config, train
    config = load_config("dpo.yaml", ["model.lora.r=16", "train.max_steps=100"])
    summary = train(config)  # the dict also written to <train.output_dir>/summary.json

`dpokit.train` is the function; the training-loop module it comes from is `sys.modules["dpokit.train"]`.
"""

from importlib.metadata import PackageNotFoundError, version

from dpokit.config import ConfigError, RunConfig, from_dict, load_config, save_config, to_dict
from dpokit.errors import UserError
from dpokit.export import export
from dpokit.precompute import precompute_reference
from dpokit.train import Interrupted, train

try:
    __version__ = version("dpokit")  # pyproject.toml is the one place the version is written
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "ConfigError",
    "Interrupted",
    "RunConfig",
    "UserError",
    "export",
    "from_dict",
    "load_config",
    "precompute_reference",
    "save_config",
    "to_dict",
    "train",
]
