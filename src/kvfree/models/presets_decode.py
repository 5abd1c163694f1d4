"""CPU-sized presets for ``kvfree bench decode``: matched width and depth (d=256, 4 layers,
SwiGLU 8/3, vocab 512), random weights. Only the token mixer differs.

| preset            | layers                          | carried state per layer            |
|-------------------|---------------------------------|------------------------------------|
| decode-attention  | 4 × attention (4 heads × 64)    | 2·T·d (KV cache, grows)            |
| decode-swa        | 4 × attention, window W=128     | 2·W·d (ring buffer)                |
| decode-mamba2     | 4 × mamba2 (P=64, N=64, ×2)     | H·P·N + conv                       |
| decode-gdn        | 4 × gated_deltanet (4 × 64)     | H·d_k·d_v + conv                   |
| decode-deltanet   | 4 × deltanet (4 × 64)           | H·d_k·d_v + conv                   |
| decode-mesanet    | 4 × mesanet (4 × 64)            | H·(d_k² + d_k·d_v) + conv          |
| decode-echo       | mamba2, ska, ska, mamba2        | SKA chunk mode: H·(2(2r²+Pr)+r+1)  |
| decode-fdm        | 4 × fdm block (W=256, K=16)     | 4D + 3D + (W+K)·D + 2K             |
| decode-linear     | 4 × linear_attention (4 × 64)   | H·F·d_v + H·F                      |

For the FDM paper's memory table (``kvfree bench decode --suite fdm-paper``):

- ``decode-transformer-576``: the honest baseline at FDM-137M's own width *and depth*:
  12 × attention (8 heads × 72, no RoPE), learned positions, GELU 2304, LayerNorm, cl100k
  vocabulary tied — ``fdm-137m-transformer`` (20 layers, parameter-matched) with 12 layers.

SWA's window (128) is the smallest prompt of the default grid, so its ring is full at every
measured N (state_size is 2·min(T, W)·d). Attention uses RoPE; no model has a learned position
table, so nothing limits N. The FDM block has its own norms, FFN (given the same SwiGLU width,
704) and position term. Echo's SKA layers: 4 heads, P=64, r=32, chunk-causal mode (S=64).
"""

from __future__ import annotations

from kvfree.blocks import ffn_width
from kvfree.models.config import ModelConfig

D, L, VOCAB = 256, 4, 512
D_FF = ffn_width(D, 8 / 3)  # 704: the SwiGLU width of the other presets, given to FDM's FFN
HEADS = {"num_heads": 4, "head_dim": 64}


def _decode(layers: list[str], **options) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, d_model=D, layers=layers, mixer_options=options)


PRESETS = {
    "decode-attention": lambda: _decode(["attention"] * L, attention=dict(num_heads=4)),
    "decode-swa": lambda: _decode(["attention"] * L, attention=dict(num_heads=4, window=128)),
    "decode-mamba2": lambda: _decode(
        ["mamba2"] * L, mamba2=dict(expand=2, head_dim=64, d_state=64)
    ),
    "decode-gdn": lambda: _decode(["gated_deltanet"] * L, gated_deltanet=dict(HEADS)),
    "decode-deltanet": lambda: _decode(["deltanet"] * L, deltanet=dict(HEADS)),
    "decode-mesanet": lambda: _decode(["mesanet"] * L, mesanet=dict(HEADS)),
    "decode-echo": lambda: _decode(
        ["mamba2", "ska", "ska", "mamba2"],
        mamba2=dict(expand=2, head_dim=64, d_state=64),
        ska=dict(num_heads=4, head_dim=64, rank=32, mode="chunk"),
    ),
    "decode-fdm": lambda: _decode(["fdm"] * L, fdm=dict(window=256, top_k=16, d_ff=D_FF)),
    "decode-transformer-576": lambda: ModelConfig(
        vocab_size=100_277,
        d_model=576,
        layers=["attention"] * 12,
        mixer_options={"attention": {"num_heads": 8, "positions": "none"}},
        mlp="gelu",
        d_ff=2304,
        norm="layer",
        pos_emb="learned",
        max_len=1040,
    ),
    "decode-linear": lambda: _decode(["linear_attention"] * L, linear_attention=dict(HEADS)),
}
