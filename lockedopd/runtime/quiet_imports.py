"""Import-time notices of dependencies that say nothing a lockedopd user can act on, filtered (imported first).

bitsandbytes (which peft imports) logs at import, on every AVX512-BF16 CPU, that it could not fetch an optional 4-bit
CPU kernel from the Hugging Face hub (the ``kernels`` package): one warning line before every command's output. Its
4-bit layers work without that kernel, and nothing is downloaded at run time here.
"""

import logging

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def _not_kernel_hub_notice(record: logging.LogRecord) -> bool:
    return "kernels-community" not in str(record.msg)


logging.getLogger(BITSANDBYTES_CPU_LOGGER).addFilter(_not_kernel_hub_notice)
