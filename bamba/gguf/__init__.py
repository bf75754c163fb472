"""GGUF, llama.cpp's file format, both ways: ``export`` writes a model and its tokenizer
(``granitehybrid`` / ``llama``), ``reader`` loads such files (``from_pretrained("x.gguf")``).
``layout`` holds the name and tensor mapping both share, ``vocab`` the tokenizer's. The ``gguf``
package (the ``gguf`` extra) is imported only when a file is read or written."""
