"""Mamba2's state-space duality (SSD): the selective scan in three forms.

Recurrence, per head h (state S: [P, N]):
    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t ⊗ B_t
    y_t = S_t · C_t
Inputs: x [B, L, H, P], dt [B, L, H] (already softplus'ed and clamped), A [H] (negative),
B and C [B, L, G, N] with G groups shared by H/G heads each. The D skip and the gate are
applied by the caller. States are float32 whatever the input dtype: they accumulate over
the whole sequence and bf16's 8-bit mantissa would drift.

- ``ssd_naive``: the recurrence as a loop; the reference the tests trust.
- ``ssd_chunked``: the matmul form for prefill; any length, optional initial state, and
  optional document ids (``seq_idx``) so a packed row restarts its state at each document.
- ``ssd_step``: one token for decode.
"""

import torch


def _heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Repeat groups to heads along dim -2: [..., G, N] -> [..., H, N]."""
    g = t.shape[-2]
    return t if g == n_heads else t.repeat_interleave(n_heads // g, dim=-2)


def ssd_naive(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              C: torch.Tensor, initial_state: torch.Tensor | None = None,
              seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential reference. Returns y [B, L, H, P] (float32) and the final state [B, H, P, N]."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    Bh, Ch = _heads(B.float(), h), _heads(C.float(), h)  # [B, L, H, N]
    state = x.new_zeros(b, h, p, n, dtype=torch.float32) if initial_state is None \
        else initial_state.float().clone()
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            new_doc = (seq_idx[:, t] != seq_idx[:, t - 1]).float()[:, None, None, None]
            state = state * (1.0 - new_doc)
        decay = torch.exp(dt[:, t].float() * A.float())  # [B, H]
        state = state * decay[..., None, None] + \
            (dt[:, t].float()[..., None] * x[:, t].float())[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    return torch.stack(ys, dim=1), state


def _segment_decay_t(a: torch.Tensor) -> torch.Tensor:
    """[..., Q] log-decays -> [..., Q(s), Q(l)]: out[s, l] = exp(a[s+1] + ... + a[l]) for s < l,
    and exp(0) = 1 for s >= l (callers zero the s > l half through the factor they multiply).

    Transposed so the cumulative sum runs along contiguous memory. Summing a masked copy (rather
    than subtracting two cumulative sums) keeps it exact when the sums are large and close.
    """
    q = a.shape[-1]
    later = torch.ones(q, q, dtype=torch.bool, device=a.device).triu_(1)  # [s, k]: k > s
    return torch.exp(torch.cumsum(a[..., None, :].masked_fill(~later, 0.0), dim=-1))


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                C: torch.Tensor, chunk_size: int, initial_state: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None,
                matmul_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked matmul form. Same contract as ``ssd_naive``; L need not divide chunk_size.

    The result does not depend on chunk_size beyond rounding; it trades the Q×Q work within
    chunks against the number of chunks. ``matmul_dtype`` (bfloat16 for a bf16 model) is used
    for the read-outs (C·B scores, scores·x, C·state); decays, the state and everything that
    feeds it stay float32.
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    r, q, md = h // g, chunk_size, matmul_dtype  # r heads per group
    pad = (-l) % q
    c = (l + pad) // q
    dt, a = dt.float(), dt.float() * A.float()  # a = dt·A: per-step log-decay (<= 0), float32
    if pad:  # padded steps have a = 0 and x = 0: they neither decay nor feed the state
        x, dt, a, B, C = (torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
                          for t in (x, dt, a, B, C))
        if seq_idx is not None:
            seq_idx = torch.cat((seq_idx, seq_idx[:, -1:].expand(-1, pad)), dim=1)
    x, dt = x.view(b, c, q, h, p), dt.view(b, c, q, h)
    Bf = B.float().view(b, c, q, g, n).transpose(2, 3)  # [B, C, G, Q, N]
    Cm = C.to(md).view(b, c, q, g, n).transpose(2, 3)  # [B, C, G, Q, N]
    a = a.view(b, c, q, h).transpose(2, 3)  # [B, C, H, Q]

    # 1. Within each chunk: decay from step s to step l (transposed: [s, l]); zero where s > l
    #    or s and l lie in different documents, through the factor that multiplies it.
    decay_t = _segment_decay_t(a)  # [B, C, H, Q(s), Q(l)]
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril_()  # [l, s]: s <= l
    if seq_idx is not None:
        doc = seq_idx.view(b, c, q)
        causal = causal & (doc[:, :, :, None] == doc[:, :, None, :])[:, :, None]  # [B,C,1,Q,Q]
    # 2. Diagonal blocks: y_l = sum_s (C_l·B_s) decay[l, s] x_s dt_s; groups broadcast to heads.
    cb = (Cm @ Bf.to(md).transpose(-1, -2)).masked_fill(~causal, 0.0)  # [B, C, G, Q(l), Q(s)]
    scores = decay_t.view(b, c, g, r, q, q).transpose(-1, -2) * cb[:, :, :, None]
    xdt = (x.float() * dt[..., None]).to(md)  # [B, C, Q, H, P]
    y = scores.view(b, c, h, q, q).to(md) @ xdt.transpose(2, 3)  # [B, C, H, Q, P]

    # 3. Each chunk's own contribution to the state at its last step, kept transposed
    #    ([N, H/G·P] per group) so the read-out below is a plain matmul: Bᵀ (x·dt·to_end).
    to_end = decay_t[..., -1].transpose(2, 3)  # [B, C, Q, H] decay from s to the chunk's end
    if seq_idx is not None:
        to_end = to_end * (doc == doc[:, :, -1:])[..., None]
    weighted = x.float() * (dt * to_end)[..., None]  # [B, C, Q, H, P]
    chunk_states = Bf.transpose(-1, -2) @ weighted.view(b, c, q, g, r * p).transpose(2, 3)

    # 4. Pass the state chunk to chunk (a short loop over C); read each chunk's entering state
    #    out with C, decayed from the chunk's start to step l.
    chunk_decay = torch.exp(a.sum(-1))  # [B, C, H]
    state = x.new_zeros(b, g, n, r * p, dtype=torch.float32) if initial_state is None \
        else initial_state.float().reshape(b, g, r * p, n).transpose(-1, -2)  # [B, G, N, R·P]
    from_start = torch.exp(torch.cumsum(a, dim=-1)).transpose(2, 3)  # [B, C, Q, H]
    if seq_idx is not None:
        before = torch.cat((seq_idx[:, :1], doc[:, :-1, -1]), dim=1)  # doc entering each chunk
        from_start = from_start * (doc == before[:, :, None])[..., None]
    entering = []
    for i in range(c):
        entering.append(state.to(md))
        keep = chunk_decay[:, i].view(b, g, 1, r, 1)
        if seq_idx is not None:  # a chunk that ends in another document drops what came before
            keep = keep * (doc[:, i, -1] == before[:, i]).float().view(b, 1, 1, 1, 1)
        state = (state.view(b, g, n, r, p) * keep).view(b, g, n, r * p) + chunk_states[:, i]
    off = Cm @ torch.stack(entering, dim=1)  # [B, C, G, Q, R·P]
    off = off.transpose(2, 3).reshape(b, c, q, h, p)
    y = torch.addcmul(y.transpose(2, 3), off, from_start[..., None])  # [B, C, Q, H, P]
    state = state.transpose(-1, -2).reshape(b, h, p, n)
    return y.float().reshape(b, c * q, h, p)[:, :l], state


def ssd_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
             B: torch.Tensor, C: torch.Tensor,
             inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step. state [B, H, P, N] (float32); x [B, H, P]; dt [B, H]; B, C [B, G, N].

    Returns y [B, H, P] (float32) and the new state. With ``inplace`` the (float32) state
    tensor is updated and returned (no copy of the state per token); otherwise it is untouched.
    """
    b, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    dt = dt.float()
    decay = torch.exp(dt * A.float()).view(b, g, h // g, 1, 1)
    xdt = (dt[..., None] * x.float()).view(b, g, h // g, p, 1)
    Bg = B.float()[:, :, None, None, :]  # [B, G, 1, 1, N]: groups broadcast to their heads
    if inplace:
        if state.dtype != torch.float32:
            raise ValueError(f"in-place ssd_step needs a float32 state, got {state.dtype}")
        new_state = state.view(b, g, h // g, p, n).mul_(decay).addcmul_(xdt, Bg)
    else:
        new_state = torch.addcmul(state.float().reshape(b, g, h // g, p, n) * decay, xdt, Bg)
    new_state = new_state.view(b, h, p, n)
    y = new_state.view(b, g, h // g * p, n) @ C.float()[..., None]  # [B, G, H/G*P, 1]
    return y.view(b, h, p), new_state
