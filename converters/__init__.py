"""PyTorch checkpoints → jaxdq Flax params (torch needed only for pickled ``.pt``/``.bin`` files)."""
from converters.dit import ConversionError, convert_dit, detect_layout
from converters.state_dict import CheckpointError, StateDict, load_state_dict

__all__ = ["CheckpointError", "ConversionError", "StateDict", "convert_dit", "detect_layout", "load_state_dict"]
