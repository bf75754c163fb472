"""Pure tensor functions: the math of the model, with no module state.

Shape alphabet used throughout (one letter, one meaning):
  B batch, L sequence (query) length, T key length, H heads, P head dim of a Mamba head,
  G groups of B/C, N state size, K conv width, D channels, V vocabulary, C chunks.

Nothing here imports from the rest of the package.
"""
