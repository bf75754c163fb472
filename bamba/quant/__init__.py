"""Quantized weights: the compressed-tensors formats (``formats``), the quantized linear layer
(``linear``)."""
