"""Depthwise causal 1-D convolution (Mamba2's short conv) for prefill and for one decode step."""

import torch


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  state: torch.Tensor | None = None,
                  seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y[t] = bias + sum_k weight[:, k] * x[t - (K-1) + k], channels last.

    x: [B, L, D]; weight: [D, K]; state: [B, K-1, D] inputs that precede x (zeros if None).
    seq_idx: [B, L] document ids; taps never reach into an earlier document (and, with a
    reset at the first token, not into the state either).
    Returns y [B, L, D] (no activation) and the new state [B, K-1, D]: the last K-1 inputs.
    """
    b, l, d = x.shape
    k = weight.shape[1]
    if state is None:
        state = x.new_zeros(b, k - 1, d)
    window = torch.cat((state.to(x.dtype), x), dim=1)  # [B, K-1+L, D]
    current = window[:, k - 1:]  # the current input's tap, plus the bias, in one pass
    y = current * weight[:, k - 1] if bias is None \
        else torch.addcmul(bias, current, weight[:, k - 1])
    for back in range(1, k):  # accumulate in place: one pass per tap
        tap = window[:, k - 1 - back:k - 1 - back + l]
        if seq_idx is not None:
            tap = tap * _same_document(seq_idx, back)[..., None].to(tap.dtype)
        y = y.addcmul_(tap, weight[:, k - 1 - back])
    return y, window[:, -(k - 1):].clone() if k > 1 else window[:, :0]


def _same_document(seq_idx: torch.Tensor, back: int) -> torch.Tensor:
    """[B, L] true where position t-back belongs to the same document as t (state counts as the
    document of position 0)."""
    l = seq_idx.shape[1]
    earlier = torch.cat((seq_idx[:, :1].expand(-1, min(back, l)), seq_idx[:, :max(l - back, 0)]),
                        dim=1)
    return earlier == seq_idx


def causal_conv1d_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: x [B, D], state [B, K-1, D] -> (y [B, D], new state [B, K-1, D])."""
    window = torch.cat((state.to(x.dtype), x[:, None]), dim=1)  # [B, K, D]
    y = (window * weight.t()).sum(1)
    if bias is not None:
        y = y + bias
    return y, window[:, 1:]
