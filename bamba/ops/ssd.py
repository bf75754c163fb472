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


def _segment_sum(a: torch.Tensor) -> torch.Tensor:
    """[..., Q] log-decays -> [..., Q, Q] with out[i, j] = a[j+1] + ... + a[i] for j <= i, else -inf.

    Summing a masked copy (rather than subtracting two cumulative sums) keeps it exact when the
    cumulative sums are large and close together.
    """
    q = a.shape[-1]
    strict = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device), diagonal=-1)
    lower = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device), diagonal=0)
    sums = torch.cumsum(a[..., None, :].expand(*a.shape, q).transpose(-1, -2)
                        .masked_fill(~strict, 0.0), dim=-2)
    return sums.masked_fill(~lower, float("-inf"))


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                C: torch.Tensor, chunk_size: int, initial_state: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked matmul form. Same contract as ``ssd_naive``; L need not divide chunk_size."""
    b, l, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    q = chunk_size
    pad = (-l) % q
    c = (l + pad) // q
    # 1. Discretise in float32: x·dt and the per-step log-decay a = dt·A (<= 0).
    xdt = x.float() * dt.float()[..., None]  # [B, L, H, P]
    a = dt.float() * A.float()  # [B, L, H]
    Bf, Cf = B.float(), C.float()
    if pad:  # padded steps have a = 0 and x = 0: they neither decay nor feed the state
        xdt, a, Bf, Cf = (torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
                          for t in (xdt, a, Bf, Cf))
        if seq_idx is not None:
            seq_idx = torch.cat((seq_idx, seq_idx[:, -1:].expand(-1, pad)), dim=1)
    xdt = xdt.view(b, c, q, h, p)
    Bf, Cf = Bf.view(b, c, q, g, n), Cf.view(b, c, q, g, n)
    a = a.view(b, c, q, h).permute(0, 3, 1, 2)  # [B, H, C, Q]

    # 2. Within each chunk: decay from step s to step l, masked across documents.
    decay = torch.exp(_segment_sum(a))  # [B, H, C, Q(l), Q(s)]
    if seq_idx is not None:
        doc = seq_idx.view(b, c, q)
        decay = decay * (doc[:, None, :, :, None] == doc[:, None, :, None, :])
    # 3. Diagonal blocks: y_l = sum_s (C_l·B_s) decay[l, s] xdt_s.
    cb = torch.einsum("bclgn,bcsgn->bcgls", Cf, Bf)  # [B, C, G, Q, Q]
    cb = cb.repeat_interleave(h // g, dim=2) if g != h else cb  # [B, C, H, Q, Q]
    scores = cb * decay.permute(0, 2, 1, 3, 4)  # [B, C, H, Q, Q]
    y = torch.einsum("bchls,bcshp->bclhp", scores, xdt)

    # 4. Each chunk's own contribution to the state at its last step.
    to_end = decay[..., -1, :]  # [B, H, C, Q]: decay from s to the chunk's end (0 if other doc)
    Bh = _heads(Bf, h)  # [B, C, Q, H, N]
    chunk_states = torch.einsum("bhcs,bcshn,bcshp->bchpn", to_end, Bh, xdt)

    # 5. Pass states chunk to chunk (a short sequential loop over C).
    chunk_decay = torch.exp(a.sum(-1))  # [B, H, C]
    state = x.new_zeros(b, h, p, n, dtype=torch.float32) if initial_state is None \
        else initial_state.float()
    entering = []  # state before each chunk
    prev_last = seq_idx[:, :1] if seq_idx is not None else None
    for i in range(c):
        entering.append(state)
        keep = chunk_decay[:, :, i, None, None]
        if seq_idx is not None:  # a chunk that starts a new document drops what came before
            last = doc[:, i, -1:]
            keep = keep * (last == prev_last).float()[:, :, None, None]
            prev_last = last
        state = state * keep + chunk_states[:, i]
    entering = torch.stack(entering, dim=1)  # [B, C, H, P, N]

    # 6. Off-diagonal: the entering state decayed to each step, read out by C.
    from_start = torch.exp(torch.cumsum(a, dim=-1))  # [B, H, C, Q]
    if seq_idx is not None:
        before = torch.cat((seq_idx[:, :1], doc[:, :-1, -1]), dim=1)  # doc entering each chunk
        from_start = from_start * (doc == before[:, :, None])[:, None]
    Ch = _heads(Cf, h)  # [B, C, Q, H, N]
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, entering, from_start)
    return y.reshape(b, c * q, h, p)[:, :l], state


def ssd_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
             B: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step. state [B, H, P, N] (float32); x [B, H, P]; dt [B, H]; B, C [B, G, N].

    Returns y [B, H, P] (float32) and the new state; the input state is not modified.
    """
    h = x.shape[1]
    dt = dt.float()
    decay = torch.exp(dt * A.float())[..., None, None]  # [B, H, 1, 1]
    Bh, Ch = _heads(B.float(), h), _heads(C.float(), h)  # [B, H, N]
    new_state = state * decay + (dt[..., None] * x.float())[..., None] * Bh[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new_state, Ch)
    return y, new_state
