"""vlft: parameter-efficient fine-tuning for Qwen2.5-VL with its own exact modeling code."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes (QLoRA, vlft/quant.py; peft imports it whenever it is installed) looks, on CPUs with AVX512-BF16, for
# the optional `kernels` package, which downloads compiled code from a model hub, and logs a warning urging its
# installation when it is missing. vlft never installs it and turns the CPU inference path that uses it off, so the
# warning is dropped here, before any import of peft can trigger it.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage())
