"""ControlNet 1.0 canny on Stable Diffusion 1.5 ("CNSD") in PyTorch: the course's model.

Chapter 1 introduces everything here::

    from course_lib.cnsd import get_config, build_cnsd, contracts
    cnsd = build_cnsd(get_config("tiny"), seed=0)        # random weights that test something
"""
from course_lib.cnsd.config import LATENT_SCALE, CNSDConfig, get_config
from course_lib.cnsd.contract import CONTROL_NAMES, MODEL_NAMES, ModelContract, TensorSpec, contracts, example_inputs
from course_lib.cnsd.checkpoint import LoadReport, load_checkpoint
from course_lib.cnsd.init import randomize_weights
from course_lib.cnsd.model import CNSD, build_cnsd

__all__ = [
    "CNSD", "CNSDConfig", "LoadReport", "load_checkpoint", "CONTROL_NAMES", "LATENT_SCALE", "MODEL_NAMES", "ModelContract", "TensorSpec",
    "build_cnsd", "contracts", "example_inputs", "get_config", "randomize_weights",
]
