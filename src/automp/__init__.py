"""automp: automated mixed-precision quantization of large language models."""

from automp.allocation import Allocation
from automp.errors import AutompError
from automp.formats import Format, get_format
from automp.model import inventory, load_model
from automp.quantize import GPTQConfig, quantize_

__all__ = ["Allocation", "AutompError", "Format", "GPTQConfig", "get_format", "inventory", "load_model", "quantize_"]
