"""GGUF, llama.cpp's file format, both ways: ``export`` writes a model and its tokenizer
(``granitehybrid`` / ``llama``), ``reader`` loads such files (``from_pretrained("x.gguf")``).
``layout`` holds the name and tensor mapping both share, ``vocab`` the tokenizer's,
``quantized`` the Q8_0 / Q4_0 blocks as ``bamba.quant``'s int8 / int4 formats. The ``gguf``
package (the ``gguf`` extra) is imported only when a file is read or written."""
