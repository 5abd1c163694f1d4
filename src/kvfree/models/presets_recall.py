"""Presets of the recall benchmark's main job (``kvfree demo``; docs/tasks.md §2): CPU-sized
2-layer models at d = 64 on Echo's MQAR-with-gap vocabulary (V = 192).

| preset                   | layers                        | memory                                |
|--------------------------|-------------------------------|---------------------------------------|
| recall-attention         | attention ×2 (RoPE, 2 h)      | KV cache, grows with the length       |
| recall-mamba2            | mamba2 ×2 (N = 16)            | fixed                                 |
| recall-gdn               | gated_deltanet ×2 (2 h)       | fixed                                 |
| recall-mamba2-ska        | mamba2, ska (chunk, β, K = 1) | fixed; **no mask**: recipe, headline  |
| recall-mamba2-ska-paper  | mamba2, ska (chunk, K = 2)    | fixed; no mask, the paper's SKA       |
| recall-mamba2-ska-prefix | mamba2, ska (prefix, K = 2)   | fixed; **oracle** prefix mask, seqmax |
| recall-gdn-ska           | gated_deltanet, ska (recipe)  | fixed                                 |
| recall-mesanet           | mesanet ×2 (2 h, CG solve)    | fixed                                 |
| recall-fdm               | fdm ×2 (MQAR variant)         | fixed: scan + global top-16 cache     |
| recall-kda               | kda ×2 (2 h, per-channel α)   | fixed                                 |
| recall-gdn2              | gdn2 ×2 (2 h, erase/write b, w) | fixed                               |
| recall-mamba3            | mamba3 ×2 (SISO, N = 16)      | fixed                                 |
| recall-mamba3-mimo       | mamba3 ×2 (MIMO r = 4, N = 16) | fixed (r rotated keys carried)       |
| recall-mla               | mla ×2 (d_c 32, d_r 16)       | latent cache: 48 values per token     |
| recall-gdn-attn          | gated_deltanet, attention     | hybrid: grows in the attention layer  |
| recall-gdn-swa           | gated_deltanet, attention W64 | hybrid: fixed (GDN + a 64-token ring) |
| recall-swa-ska           | attention W32, ska (recipe)   | hybrid: fixed (a 32-token ring + SKA) |

Quantised or evicting caches need no preset: ``recall-attention[attention.kv_bits=8]`` (the same
parameters: load a trained attention model), or a model whose layers are ``attention_h2o`` /
``attention_snapkv`` with a ``budget`` (docs/frontier.md §5).

**The SKA recall recipe** (``recall-mamba2-ska``, ``recall-gdn-ska``) deviates from the paper in
two named ways (docs/ska.md §19, measured by ``kvfree bench ridge-study``):

* **K = 1 Koopman power** (paper: K = 2). The readout η C (G̃⁻¹M)^K G̃⁻¹ q̂ advances the
  matched key K tokens along the lag-one operator M = Σ ẑ_t ẑ_{t−1}ᵀ before reading its value.
  In MQAR the value is the token *right after* its key, so K = 1 lands on it; K = 2 lands on the
  next pair's key and K = 0 on the key itself, and both must first learn to shift tokens in the
  layer below — within the main job's cap they stay on the no-binding plateau H_M/M.
* **β write gate** σ(w·h + b) (docs/ska.md §4), zero-initialised (0.5), as before.

**MesaNet's recipe** (``recall-mesanet``) deviates from fla's layer in one named way and runs
another solver:

* **forget-gate bias 5 at init** (γ = σ(W_a x + b_a) ≈ 0.99; fla: nn.Linear's default, γ ≈ 0.5,
  a memory of a couple of tokens, so nothing written before a 32-token gap survives and the
  gradient that would open the gate vanishes as 0.5^gap — the model sat at chance).
* **conjugate-gradient solves** (``solver="cg"``, mesa_cg.py, as fla's chunked kernel) instead
  of per-token Cholesky factorisations, to a relative residual of 1e-4 (about 11 iterations in
  an ad hoc count; fla runs a fixed 30): the same function to that tolerance, 5× faster per
  training step than the exact form (``kvfree bench train-speed``); the exact solve stays the
  reference in the tests and in the recurrent decoder.

``recall-mamba2-ska-paper`` keeps the paper's causal chunk form (K = 2, no gate) as its own
row. The oracle-mask row divides by the sequence max (seqmax) as the paper does for MQAR.

Which presets read the oracle mask is decided by :func:`oracle_mask` (SKA in prefix/masked
mode). ``vocab_size`` is overridden by the bench for other tasks.
"""

from __future__ import annotations

from kvfree.models.config import ModelConfig

D, VOCAB = 64, 192
#: Embedding init std of the recall models. With the LM default 0.02 (tied, d = 64) every model
#: sat on a plateau for most of the CPU budget: 2-layer attention on M = 4, gap 8 stayed at 0.52
#: after 800 steps, 0.3 reached 1.0 by step ~480 (1.0: 0.93); Gated DeltaNet on M = 8, gap 64
#: reached 0.975 in 1200 steps with 0.3. (zoology's and FDM's mqar.py models use nn.Embedding's
#: default, std 1.)
INIT_STD = 0.3
#: chunk 16 (layer default 64): at the recall lengths (T ≤ 288) the intra-chunk work grows with
#: T·C, so smaller chunks train faster with the same math (kvfree bench train-speed)
_MAMBA = dict(expand=2, head_dim=32, d_state=16, chunk_size=16)
_SKA = dict(num_heads=4, rank=16, chunk_size=16)
#: the SKA recall recipe (module docstring): causal chunk mode, β write gate, K = 1
SKA_RECIPE = dict(_SKA, mode="chunk", beta_gate=True, K=1)
#: MesaNet's recall recipe (module docstring): forget gate opened at init, CG solves
MESANET_RECIPE = dict(num_heads=2, chunk_size=64, solver="cg", cg_tol=1e-4, forget_bias_init=5.0)


def _cfg(layers: list[str], **options) -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB, d_model=D, layers=layers, mixer_options=options, init_std=INIT_STD
    )


PRESETS = {
    "recall-attention": lambda: _cfg(
        ["attention", "attention"], attention=dict(num_heads=2, positions="rope")
    ),
    "recall-mamba2": lambda: _cfg(["mamba2", "mamba2"], mamba2=_MAMBA),
    "recall-gdn": lambda: _cfg(
        ["gated_deltanet", "gated_deltanet"], gated_deltanet=dict(num_heads=2, chunk_size=16)
    ),
    "recall-mamba2-ska": lambda: _cfg(["mamba2", "ska"], mamba2=_MAMBA, ska=dict(SKA_RECIPE)),
    "recall-mamba2-ska-paper": lambda: _cfg(
        ["mamba2", "ska"], mamba2=_MAMBA, ska=dict(_SKA, mode="chunk", K=2)
    ),
    "recall-gdn-ska": lambda: _cfg(
        ["gated_deltanet", "ska"],
        gated_deltanet=dict(num_heads=2, chunk_size=16),
        ska=dict(SKA_RECIPE),
    ),
    "recall-mamba2-ska-token": lambda: _cfg(
        ["mamba2", "ska"], mamba2=_MAMBA, ska=dict(_SKA, mode="token")
    ),
    "recall-mamba2-ska-prefix": lambda: _cfg(
        ["mamba2", "ska"], mamba2=_MAMBA, ska=dict(_SKA, mode="prefix", norm="seqmax")
    ),
    "recall-mesanet": lambda: _cfg(["mesanet", "mesanet"], mesanet=dict(MESANET_RECIPE)),
    "recall-kda": lambda: _cfg(["kda", "kda"], kda=dict(num_heads=2, chunk_size=16)),
    "recall-gdn2": lambda: _cfg(["gdn2", "gdn2"], gdn2=dict(num_heads=2, chunk_size=16)),
    "recall-mamba3": lambda: _cfg(["mamba3", "mamba3"], mamba3=dict(chunk_size=16)),
    "recall-mamba3-mimo": lambda: _cfg(
        ["mamba3", "mamba3"], mamba3=dict(chunk_size=16, mimo_rank=4)
    ),
    "recall-mla": lambda: _cfg(
        ["mla", "mla"], mla=dict(num_heads=2, latent_dim=32, rope_dim=16, positions="rope")
    ),
    "recall-gdn-attn": lambda: _cfg(
        ["gated_deltanet", "attention"],
        gated_deltanet=dict(num_heads=2, chunk_size=16),
        attention=dict(num_heads=2, positions="rope"),
    ),
    "recall-gdn-swa": lambda: _cfg(
        ["gated_deltanet", "attention"],
        gated_deltanet=dict(num_heads=2, chunk_size=16),
        attention=dict(num_heads=2, positions="rope", window=64),
    ),
    "recall-swa-ska": lambda: _cfg(
        ["attention", "ska"],
        attention=dict(num_heads=2, positions="rope", window=32),
        ska=dict(SKA_RECIPE),
    ),
    "recall-fdm": lambda: ModelConfig(
        vocab_size=VOCAB,
        d_model=D,
        layers=["fdm", "fdm"],
        mixer_options={"fdm": {"variant": "mqar", "top_k": 16}},
        norm="layer",
        init_std=INIT_STD,
    ),
}


def oracle_mask(cfg: ModelConfig) -> bool:
    """True when a layer is SKA in ``prefix``/``masked`` mode: it must be fed the task's
    oracle prefix mask (reported separately, labelled, docs/ska.md §16)."""
    return any(
        name == "ska" and cfg.options_for(i).get("mode") in ("prefix", "masked")
        for i, name in enumerate(cfg.layers)
    )
