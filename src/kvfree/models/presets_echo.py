"""Echo presets (Sridhar & Johansen, arXiv 2605.06997; docs/ska.md §13): the sub-million synthetic
models, Echo-50M and Echo-180M (Mamba-2 + SKA, Spectral Koopman MLPs), and the small CPU
models of the SKA recall experiment.

Parameter counts (``kvfree info --preset NAME``) against the paper, measured with this
project's Mamba-2 (mamba_ssm layout: expand 2, head_dim 64, ngroups 1) — see ``DEVIATIONS``:

    preset             ours          paper     diff
    echo-ssm-1m        1,025,840     1.11M    −7.6 %
    echo-ssm-attn-1m     947,672     998K     −5.0 %
    echo-ssm-ska-1m      931,292     982K     −5.2 %
    echo-50m          50,100,160    ~50.7M    −1.2 %
    echo-180m        187,109,172     180M     +3.9 %  (repository TRAINING.md: ~191M, −2.0 %)
"""

from __future__ import annotations

from kvfree.models.config import ModelConfig
from kvfree.models.presets_recall import INIT_STD as RECALL_INIT_STD

# ----- sub-million synthetic models (paper §4.1, Table 3; repo configs/1m.yaml) -------------
_SMALL = dict(vocab_size=128, d_model=128, mlp="swiglu", tie_embeddings=True)
_MAMBA_1M = dict(expand=2, head_dim=64, d_state=16, d_conv=4)
_SKA_1M = dict(num_heads=4, rank=24, chunk_size=16, K=2, eps=1e-3, mode="chunk")


def echo_ssm_1m() -> ModelConfig:
    return ModelConfig(layers=["mamba2"] * 4, mixer_options={"mamba2": _MAMBA_1M}, **_SMALL)


def echo_ssm_attn_1m() -> ModelConfig:
    return ModelConfig(
        layers=["mamba2", "mamba2", "attention", "attention"],
        mixer_options={"mamba2": _MAMBA_1M, "attention": dict(num_heads=4, positions="rope")},
        **_SMALL,
    )


def echo_ssm_ska_1m() -> ModelConfig:
    """SKA (r = 24, 4 heads, chunk 16, K = 2) at layers {2, 3}."""
    return ModelConfig(
        layers=["mamba2", "mamba2", "ska", "ska"],
        mixer_options={"mamba2": _MAMBA_1M, "ska": _SKA_1M},
        **_SMALL,
    )


def echo_ssm_ska_1m_recipe() -> ModelConfig:
    """echo-ssm-ska-1m with kvfree's SKA recall recipe (presets_recall.SKA_RECIPE: K = 1 and
    the β write gate; docs/ska.md §19), the rest unchanged."""
    cfg = echo_ssm_ska_1m()
    cfg.mixer_options["ska"] = dict(_SKA_1M, K=1, beta_gate=True)
    return cfg


# ----- language models (paper §3.4, §4.3; docs/ska.md §13.2) -------------------------------------
def _echo_lm(
    d: int, n_layers: int, ska_at: tuple[int, ...], rank: int, heads: int, d_state: int
) -> ModelConfig:
    layers = ["ska" if i in ska_at else "mamba2" for i in range(n_layers)]
    return ModelConfig(
        vocab_size=32000,
        d_model=d,
        layers=layers,
        mlp="koopman",
        tie_embeddings=True,
        mixer_options={
            "mamba2": dict(expand=2, head_dim=64, d_state=d_state, d_conv=4),
            "ska": dict(
                num_heads=heads, rank=rank, head_dim=64, chunk_size=64, K=2, eps=1e-3, mode="chunk"
            ),
        },
    )


def echo_50m() -> ModelConfig:
    """d = 448, 16 layers, SKA at {3, 7, 11, 15} (r = 56, H = 7, P = 64), d_state 64."""
    return _echo_lm(448, 16, (3, 7, 11, 15), rank=56, heads=7, d_state=64)


def echo_180m() -> ModelConfig:
    """d = 768, 24 layers, SKA at {8, 16} (r = 48, H = 12, P = 64), d_state 128."""
    return _echo_lm(768, 24, (8, 16), rank=48, heads=12, d_state=128)


# ----- the CPU recall experiment (tests/slow/test_ska_recall.py) ----------------------------
_RECALL = dict(vocab_size=192, d_model=64, mlp="swiglu", init_std=RECALL_INIT_STD)
_MAMBA_RECALL = dict(expand=2, head_dim=32, d_state=16)


def echo_recall_ska(mode: str = "token") -> ModelConfig:
    """2 layers, Mamba-2 then SKA (4 heads × r 16, P 16) at d = 64 for mqar_gap. The prefix
    (oracle-mask) variant normalises by the sequence max as the paper does for MQAR (§3);
    causal modes must use ℓ2."""
    norm = "seqmax" if mode == "prefix" else "l2"
    return ModelConfig(
        layers=["mamba2", "ska"],
        mixer_options={
            "mamba2": _MAMBA_RECALL,
            "ska": dict(num_heads=4, rank=16, chunk_size=16, mode=mode, norm=norm),
        },
        **_RECALL,
    )


def echo_recall_mamba2() -> ModelConfig:
    return ModelConfig(
        layers=["mamba2", "mamba2"], mixer_options={"mamba2": _MAMBA_RECALL}, **_RECALL
    )


PRESETS = {
    "echo-ssm-1m": echo_ssm_1m,
    "echo-ssm-attn-1m": echo_ssm_attn_1m,
    "echo-ssm-ska-1m": echo_ssm_ska_1m,
    "echo-ssm-ska-1m-recipe": echo_ssm_ska_1m_recipe,
    "echo-50m": echo_50m,
    "echo-180m": echo_180m,
    "echo-recall-ska": lambda: echo_recall_ska("token"),
    "echo-recall-ska-chunk": lambda: echo_recall_ska("chunk"),
    "echo-recall-ska-prefix": lambda: echo_recall_ska("prefix"),
    "echo-recall-mamba2": echo_recall_mamba2,
}

PAPER_PARAMS = {
    "echo-ssm-1m": 1_110_000,
    "echo-ssm-attn-1m": 998_000,
    "echo-ssm-ska-1m": 982_000,
    "echo-50m": 50_700_000,
    "echo-180m": 180_000_000,
}

#: Presets whose count differs from the paper by more than 2 %: (lowest, highest) accepted
#: ratio ours/paper, and why.
DEVIATIONS: dict[str, tuple[float, float, str]] = {
    "echo-ssm-1m": (
        0.92,
        0.93,
        (
            "The paper gives totals only. With mamba_ssm-layout Mamba-2 (expand 2, head_dim 64, "
            "d_state 16: 104.6K per layer) and SwiGLU d_ff 384 all three sub-million models come "
            "out low by a near-constant amount: 84K here, 50K for the 2-Mamba models, i.e. about "
            "17K per Mamba-2 layer plus about 16.5K shared (one 128×128 matrix, e.g. an untied "
            "head). The paper's exact Mamba-2 variant (it cites the Mamba-3 paper for the "
            "backbone) and MLP (configs/1m.yaml says mlp_gated: false next to 'SwiGLU MLPs') are "
            "not published; the ordering SSM > SSM+Attn > SSM+SKA is reproduced."
        ),
    ),
    "echo-ssm-attn-1m": (
        0.945,
        0.955,
        "Same cause as echo-ssm-1m (≈50K = 2 Mamba-2 layers × 17K + 16.5K shared).",
    ),
    "echo-ssm-ska-1m": (
        0.945,
        0.955,
        "Same cause as echo-ssm-1m (≈50K = 2 Mamba-2 layers × 17K + 16.5K shared).",
    ),
    "echo-180m": (
        1.035,
        1.045,
        (
            "'180M' is the paper's nominal label; the repository's TRAINING.md quotes about 191M "
            "for the same configuration (d 768, 24 layers, SKA r 48 at {8, 16}, d_state 128, "
            "Koopman MLP d_k 2048, vocab 32000). Ours, 187.1M, lies between the two (+3.9 % / "
            "−2.0 %); r = 56 (paper §6.2) would add 0.3M."
        ),
    ),
}
