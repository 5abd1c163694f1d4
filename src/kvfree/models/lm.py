"""``LanguageModel``: embeddings → blocks → final norm → tied head, with exact decoding.

    logits, state = model(ids)                 # parallel forward, returns the decode state
    logits, state = model.prefill(ids)         # same, without gradients (in segments for
                                               # fixed-memory models: bounded memory)
    logits_t, state = model.step(ids_t, state) # one token for every batch row
    out = model.generate(ids, max_new_tokens)  # prefill + step (constant memory for fixed mixers)

Prompts of different lengths share a batch through ``attention_mask`` [B, T] (1 = token,
0 = padding, the Hugging Face convention; left or right padding, one contiguous run of tokens
per row): rows are brought to left padding, the padding neither writes to any layer's memory
nor moves positions, and every row computes what its prompt computes alone (the mixers'
``left_pad``, docs/design.md §1); decoding then continues each row from its own position.

``forward`` and ``prefill`` + ``step`` compute the same function: decoding that does not
reproduce the trained forward is a bug (docs/design.md §1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from kvfree.blocks import ResidualBlock, build_mlp, build_norm, ffn_width
from kvfree.mixers import build_mixer, get_mixer_class
from kvfree.mixers.base import Padding, grow_padding
from kvfree.models.config import ModelConfig
from kvfree.state import RowInts, State, state_bytes

#: Tokens per parallel pass when ``prefill`` segments a prompt (fixed-memory models by default):
#: the activation memory of a prefill stays that of a prompt this long, at any prompt length.
PREFILL_SEGMENT = 512


@dataclass
class ModelState(State):
    layers: list[Any]
    pos: int = 0  # tokens seen so far, padding included (metadata, not counted in state bytes)
    pad: RowInts | None = None  # leading padding per row (metadata; None: no padding)


@dataclass(frozen=True)
class LeftPadded:
    """A batch brought to left padding: row b's tokens sit in its last ``n_b`` positions.
    ``shift`` [B]: original position of left-padded position t is (t + shift_b) mod T."""

    ids: torch.Tensor
    counts: torch.Tensor  # [B] leading padding
    shift: torch.Tensor | None  # None when the batch was left-padded already

    def take(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A [B, T, ...] tensor of the original layout in the left-padded layout."""
        return t if t is None or self.shift is None else _roll_rows(t, self.shift)

    def restore(self, t: torch.Tensor) -> torch.Tensor:
        """Back from the left-padded layout to the original one."""
        return t if self.shift is None else _roll_rows(t, -self.shift)


def _roll_rows(t: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Row b of t [B, T, ...] read from position (t + shift_b) mod T."""
    T = t.shape[1]
    idx = (torch.arange(T, device=t.device) + shift[:, None].to(t.device)) % T
    return t.gather(1, idx.view(*idx.shape, *[1] * (t.dim() - 2)).expand_as(t))


def left_padded(ids: torch.Tensor, attention_mask: torch.Tensor | None) -> LeftPadded | None:
    """Check an ``attention_mask`` [B, T] (1 = token) and bring ``ids`` to left padding
    (None: no mask or no padding)."""
    if attention_mask is None:
        return None
    am = torch.as_tensor(attention_mask, device=ids.device)
    if am.shape != ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of ids {tuple(ids.shape)}, got {tuple(am.shape)}"
        )
    if am.is_floating_point() or bool(((am != 0) & (am != 1)).any()):
        raise ValueError("attention_mask holds 1 for a token and 0 for padding, nothing else")
    am = am.bool()
    if bool(am.all()):
        return None
    T = ids.shape[1]
    n = am.sum(1)
    start = am.int().argmax(1)  # first token of each row
    t = torch.arange(T, device=ids.device)
    contiguous = am == ((t >= start[:, None]) & (t < (start + n)[:, None]))
    if not bool(contiguous.all()):
        bad = (~contiguous.all(1)).nonzero()[:, 0].tolist()[:5]
        raise ValueError(
            f"attention_mask rows {bad} have padding between tokens; each row must hold one "
            "run of tokens (left or right padding)"
        )
    counts = T - n
    shift = (start + n) % T
    shift = None if not bool(shift.any()) else shift  # all rows end at T: left-padded already
    lp = LeftPadded(ids, counts, shift)
    return replace(lp, ids=lp.take(ids))


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_embed = nn.Embedding(c.max_len, c.d_model) if c.pos_emb == "learned" else None
        self.drop = nn.Dropout(c.dropout)
        blocks = []
        for i, name in enumerate(c.layers):
            mixer = build_mixer(name, c.d_model, **c.options_for(i))
            if get_mixer_class(name).is_block:
                blocks.append(mixer)
            else:
                d_ff = c.d_ff or (4 * c.d_model if c.mlp == "gelu" else ffn_width(c.d_model, 8 / 3))
                blocks.append(
                    ResidualBlock(mixer, c.d_model, build_mlp(c.mlp, c.d_model, d_ff), c.norm)
                )
        self.blocks = nn.ModuleList(blocks)
        for cls in dict.fromkeys(type(b) for b in blocks):  # weights shared across layers
            if hasattr(cls, "tie_layers"):  # (e.g. FDM's position term and μ)
                cls.tie_layers([b for b in blocks if type(b) is cls])
        self.norm = build_norm(c.norm, c.d_model) if c.final_norm else nn.Identity()
        self.head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=c.init_std)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed.weight, std=c.init_std)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=c.head_init_std or c.init_std)

    # ----- helpers ---------------------------------------------------------------------------
    def mixers(self) -> list[nn.Module]:
        return [b.mixer if isinstance(b, ResidualBlock) else b for b in self.blocks]

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _check_ids(self, ids: torch.Tensor, pos: int) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"token ids must be an integer tensor, got "
                f"{getattr(ids, 'dtype', type(ids).__name__)}"
            )
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.config.vocab_size)].flatten()[:5].tolist()
            raise ValueError(
                f"token ids out of vocabulary [0, {self.config.vocab_size}): {bad}; "
                "check the tokenizer or the model's vocab_size"
            )
        limit = self.config.max_len
        length = pos + (ids.shape[1] if ids.dim() == 2 else 1)
        if limit is not None and length > limit:
            raise ValueError(
                f"sequence of {length} tokens exceeds this model's max_len={limit}; "
                "shorten the input or build the model with a larger max_len"
            )

    def _embed(self, ids: torch.Tensor, pos: int, pad: RowInts | None = None) -> torch.Tensor:
        x = self.embed(ids)
        if self.pos_embed is not None:
            T = ids.shape[1] if ids.dim() == 2 else 1
            p = torch.arange(pos, pos + T, device=ids.device)
            if pad is not None:  # each row's own positions; padding reads position 0
                p = (p - torch.tensor(pad, device=ids.device)[:, None]).clamp_min(0)
            p = self.pos_embed(p)
            x = x + (p if ids.dim() == 2 else p[..., 0, :])
        return self.drop(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.head(x) if self.head is not None else x @ self.embed.weight.t()

    # ----- contract --------------------------------------------------------------------------
    def init_state(self, batch: int, *, device=None, dtype=None) -> ModelState:
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        return ModelState([b.init_state(batch, device=device, dtype=dtype) for b in self.blocks])

    def forward(
        self,
        ids: torch.Tensor,
        state: ModelState | None = None,
        mask: torch.Tensor | None = None,
        *,
        select: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ModelState]:
        """Parallel forward over ``ids`` [B, T] (continuing from ``state`` if given).

        ``mask`` [B, T] is the oracle write mask, passed only to mixers that accept one.
        ``select`` [B, T] bool: return the logits at the selected positions only, [n, V] in
        row-major order (what a training loss over labelled positions needs; perf.py).
        ``attention_mask`` [B, T]: 1 = token, 0 = padding (module docstring); logits at padded
        positions are those of a zero mixer output and mean nothing.
        """
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(
                f"ids must have shape [batch, seq], got "
                f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else ids}"
            )
        lp = left_padded(ids, attention_mask)
        if lp is None:
            return self._forward(ids, state, mask, select, None)
        if select is not None and bool((select & ~attention_mask.bool()).any()):
            raise ValueError("select picks padded positions (attention_mask 0); select tokens only")
        logits, state = self._forward(lp.ids, state, lp.take(mask), lp.take(select), lp.counts)
        return (logits if select is not None else lp.restore(logits)), state

    def _forward(self, ids, state, mask, select, left_pad):
        """The forward over left-padded ``ids`` (``left_pad`` [B] or None)."""
        pos = state.pos if state is not None else 0
        self._check_ids(ids, pos)
        pad = state.pad if state is not None else None
        if left_pad is not None:
            pad = grow_padding(pad, pos, Padding.of(left_pad, ids.shape[1]), "LanguageModel")
        x = self._embed(ids, pos, pad)
        layer_states = state.layers if state is not None else [None] * len(self.blocks)
        new_states = []
        for block, mixer, s in zip(self.blocks, self.mixers(), layer_states):
            x, s = block(x, s, mask if mixer.supports_mask else None, left_pad=left_pad)
            new_states.append(s)
        if select is not None:
            x = x[select]
        return self._logits(x), ModelState(new_states, pos + ids.shape[1], pad)

    @property
    def fixed_memory(self) -> bool:
        """True when every layer's decode state has a size independent of the length."""
        return all(m.fixed_memory for m in self.mixers())

    @property
    def causal(self) -> bool:
        """True when every layer may prefill a prompt in segments (``Mixer.causal``)."""
        return all(m.causal for m in self.mixers())

    def prefill_segment(self, length: int, segment: int | str | None = "auto") -> int | None:
        """Tokens per parallel pass ``prefill`` uses for a ``length``-token prompt (None: the
        whole prompt in one pass). ``"auto"``: :data:`PREFILL_SEGMENT` for a fixed-memory
        causal model, the whole prompt for one whose state grows (its KV cache dominates
        anyway) or that has a non-causal layer (SKA's oracle modes)."""
        if segment == "auto":
            segment = PREFILL_SEGMENT if self.fixed_memory and self.causal else None
        elif segment is not None and (isinstance(segment, bool) or not isinstance(segment, int)):
            raise ValueError(f"segment must be 'auto', None or a positive int, got {segment!r}")
        if segment is not None and segment < 1:
            raise ValueError(f"segment must be a positive number of tokens, got {segment}")
        if segment is not None and not self.causal and length > segment:
            raise ValueError(
                "this model has a non-causal layer (SKA mode prefix/masked) that fits one operator "
                "per sequence: prefill it in one pass (segment=None)"
            )
        return segment if segment is not None and length > segment else None

    @torch.no_grad()
    def prefill(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        state: ModelState | None = None,
        *,
        last_only: bool = False,
        segment: int | str | None = "auto",
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ModelState]:
        """The parallel forward over a prompt ``ids`` [B, T] without gradients → (logits, state).

        ``last_only``: logits of the last position only, [B, V] (what decoding needs; the full
        [B, T, V] of a long prompt is T × V floats). ``segment``: tokens per parallel pass, each
        continuing from the state the previous one returned — exact for causal mixers, by the
        chunked-prefill invariant (docs/design.md §1); ``"auto"`` segments fixed-memory causal
        models (:meth:`prefill_segment`), ``None`` runs the whole prompt at once. An explicit
        segment on a non-causal model is refused (its operator is fitted on the whole prompt).
        ``attention_mask``: prompts of different lengths (module docstring); ``last_only``
        then gives each row's last token.
        """
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return self.forward(ids, state, mask)  # forward's own message
        lp = left_padded(ids, attention_mask)
        counts = None
        if lp is not None:
            ids, mask, counts = lp.ids, lp.take(mask), lp.counts
        seg = self.prefill_segment(ids.shape[1], segment)
        if seg is None:
            logits, state = self._prefill_pass(ids, mask, state, last_only, counts)
        else:
            outs = []  # every segment's logits; with last_only only the last is kept
            for s in range(0, ids.shape[1], seg):
                part = None if mask is None else mask[:, s : s + seg]
                n = None if counts is None else (counts - s).clamp(0, seg)
                logits, state = self._prefill_pass(ids[:, s : s + seg], part, state, last_only, n)
                if not last_only:
                    outs.append(logits)
            if not last_only:
                logits = torch.cat(outs, dim=1)
        if lp is not None and not last_only:
            logits = lp.restore(logits)
        return logits, state

    def _prefill_pass(self, ids, mask, state, last_only: bool, left_pad=None):
        if not last_only:
            return self._forward(ids, state, mask, None, left_pad)
        last = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        last[:, -1] = True  # [B, V]: one position per row
        return self._forward(ids, state, mask, last, left_pad)

    def step(
        self, ids_t: torch.Tensor, state: ModelState, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ModelState]:
        """One decode step: ``ids_t`` [B] → logits [B, V]."""
        if not isinstance(ids_t, torch.Tensor) or ids_t.dim() != 1:
            raise ValueError("step takes one token per batch row: ids_t of shape [batch]")
        if state is None:
            state = self.init_state(ids_t.shape[0], device=ids_t.device)
        self._check_ids(ids_t, state.pos)
        x = self._embed(ids_t, state.pos, state.pad)
        new_states = []
        for block, mixer, s in zip(self.blocks, self.mixers(), state.layers):
            x, s = block.step(x, s, mask if mixer.supports_mask else None)
            new_states.append(s)
        return self._logits(x), ModelState(new_states, state.pos + 1, state.pad)

    @torch.no_grad()
    def generate(
        self,
        ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prefill ``ids`` [B, T] then decode ``max_new_tokens`` with ``step``.

        Greedy when ``temperature == 0``. Returns [B, T + max_new_tokens] (the new tokens after
        ``ids`` as given, padding included). ``attention_mask``: prompts of different lengths,
        each row continues its own prompt. The state used is left in ``self.last_state_bytes``.
        """
        nxt, state = self.prefill(ids, mask=mask, last_only=True, attention_mask=attention_mask)
        out = [ids]
        for i in range(max_new_tokens):
            tok = sample(nxt, temperature, top_k, generator)
            out.append(tok.unsqueeze(1))
            if i + 1 < max_new_tokens:
                nxt, state = self.step(tok, state)
        self.last_state_bytes = state_bytes(state)
        return torch.cat(out, dim=1)


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy (``temperature == 0``) or temperature/top-k sampling of [B, V] logits."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
