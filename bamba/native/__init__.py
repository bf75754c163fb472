"""Native CPU kernels, and the seam that installs them on a model from outside.

``accelerate(model)`` swaps a ``BambaLM``'s modules for subclasses that run the kernels where
``dispatch`` says they fit, the torch reference otherwise; a model built by hand stays plain
torch until then. The C sources here are built once per machine into one shared library
(``library``) and exposed as torch operators:

* ``linear.c``: a linear layer for a few rows (decode) that streams the weights once
  (``linear_ops``);
* ``quant_rows.h`` (through ``linear.c``): the same over fp8, int8 and int4 weights in the
  compressed-tensors layout, dequantized in registers, and weight tiles dequantized for a
  prefill's matmul (``quant_ops``);
* ``ssd_step.c``: the Mamba2 SSM state update of one token in one pass over each state
  (``ssd_ops``);
* ``layer_step.c``: a whole decoder layer for one decode token in one OpenMP region
  (``layer_ops``), and every layer of a model in one call (``decode_ops``: rope, the cache
  write and attention included), where a prompt chunk's tokens may ride beside decoding rows;
* ``attention_step.c``: decode attention over keys and values in place (``attention_ops``);
* ``mixer_prefill.c``: the Mamba2 mixer's prefill between the projections (``prefill_ops``);
* ``elementwise.c``: the SwiGLU product and RMS norm in one pass each (``elementwise_ops``);
* ``conv_train.c``: the mixer's causal conv + silu and its backward, for training
  (``train_ops``).

Without a C compiler, or with ``BAMBA_NATIVE=0``, the library does not load and every module
keeps its torch path, which tests hold the kernels equal to.
"""

from bamba.native.decode_ops import steady_weights
from bamba.native.seam import NativeStepUnavailable, accelerate, decode_rows, is_accelerated

__all__ = ["NativeStepUnavailable", "accelerate", "decode_rows", "is_accelerated",
           "steady_weights"]
