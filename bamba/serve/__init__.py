"""OpenAI-compatible HTTP server over the engine (``bamba serve``); needs the ``serve`` extra."""
