"""Hugging Face integration (optional extra ``kvfree[hf]``; ``transformers`` is imported here only).

    from kvfree.hf import KvfreeForCausalLM            # registers with the Auto classes
    hf = KvfreeForCausalLM.from_kvfree(model)         # wrap a LanguageModel (weights shared)
    out = hf.generate(ids, max_new_tokens=20)         # transformers' generate, kvfree's state
    hf.save_pretrained("out"); AutoModelForCausalLM.from_pretrained("out")  # safetensors

How the state travels through ``generate``: the model's forward takes and returns a
:class:`KvfreeCache` — the kvfree ``ModelState`` of every layer (fixed-size for fixed-memory
models; a KV cache for attention layers) — under the names transformers uses for a cache
(``cache`` in 5.x, ``past_key_values`` before), and ``prepare_inputs_for_generation`` feeds
only the tokens the state has not seen yet: the prompt once (one parallel prefill, in
segments for fixed-memory models), then one token per step (``LanguageModel.step``). So HF
greedy and sampled generation compute exactly what ``LanguageModel.generate`` computes.

Prompts of different lengths: an ``attention_mask`` with zeros (left padding, as generate
expects for decoder-only models; right padding works too) is passed to the prefill, so each row
generates what its prompt generates alone (``LanguageModel``'s padding; layers that do not take
padding say so). Beam search reorders the state's rows (:func:`kvfree.state.select_rows`).

Not supported (each refused with a message): assisted generation (the state cannot be rolled
back), ``inputs_embeds``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

try:
    import transformers
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        GenerationMixin,
        PretrainedConfig,
        PreTrainedModel,
    )
    from transformers.utils import ModelOutput
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "kvfree's Hugging Face integration needs transformers: pip install 'kvfree[hf]'"
    ) from e

from kvfree.models import LanguageModel, ModelConfig
from kvfree.models.lm import ModelState
from kvfree.state import select_rows, state_bytes

_CACHE_NAMES = ("cache", "past_key_values")
#: the name generate reads the state back from: ``cache`` since transformers 5
CACHE_FIELD = "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"


class KvfreeConfig(PretrainedConfig):
    """The kvfree ``ModelConfig`` as a transformers config (``kvfree`` holds its fields)."""

    model_type = "kvfree"

    def __init__(self, kvfree: dict | None = None, **kwargs):
        self.kvfree = dict(kvfree or {})
        if self.kvfree:
            kwargs.setdefault("vocab_size", self.kvfree.get("vocab_size"))
            kwargs.setdefault("hidden_size", self.kvfree.get("d_model"))
            kwargs.setdefault("num_hidden_layers", len(self.kvfree.get("layers", [])))
        kwargs.setdefault("tie_word_embeddings", False)  # kvfree ties (or not) by itself
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.kvfree)


class KvfreeCache:
    """The decode state of a kvfree model inside ``generate``: ``state`` (a ``ModelState``,
    None before the prompt) and ``get_seq_length()`` = tokens seen."""

    is_compileable = False

    def __init__(self, state: ModelState | None = None):
        self.state = state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.state is None else self.state.pos

    def nbytes(self) -> int:
        """Bytes of the carried state (``kvfree.state.state_bytes``)."""
        return 0 if self.state is None else state_bytes(self.state)


@dataclass
class _Output(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


if CACHE_FIELD == "cache":

    @dataclass
    class KvfreeOutput(_Output):
        """Logits [B, T, V] (and the loss with ``labels``) plus the state."""

        cache: KvfreeCache | None = None

else:  # transformers 4.x

    @dataclass
    class KvfreeOutput(_Output):
        """Logits [B, T, V] (and the loss with ``labels``) plus the state."""

        past_key_values: KvfreeCache | None = None


def _new_part(attention_mask, n: int):
    """The attention mask of the ``n`` newest tokens (None: no mask, or no padding in it)."""
    if attention_mask is None:
        return None
    am = torch.as_tensor(attention_mask)[:, -n:]
    return None if bool(am.all()) else am


class KvfreeForCausalLM(PreTrainedModel, GenerationMixin):
    """A kvfree ``LanguageModel`` as a transformers causal LM (``self.model`` is the
    LanguageModel; its weights are saved as ``model.*`` in safetensors)."""

    config_class = KvfreeConfig
    base_model_prefix = "kvfree"
    main_input_name = "input_ids"
    _is_stateful = True  # no assisted generation: the state cannot be rolled back
    _supports_cache_class = False  # transformers 4.x: do not build a DynamicCache for us

    def __init__(self, config: KvfreeConfig, model: LanguageModel | None = None):
        super().__init__(config)
        self.model = model if model is not None else LanguageModel(config.model_config())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:  # transformers 5.x: same as above
        return False

    @classmethod
    def from_kvfree(cls, model: LanguageModel) -> KvfreeForCausalLM:
        """Wrap a kvfree LanguageModel (the weights are shared, not copied)."""
        hf = cls(KvfreeConfig(kvfree=asdict(model.config)), model=model)
        return hf.to(next(model.parameters()).dtype).eval()

    def _init_weights(self, module):  # the kvfree layers initialise themselves
        pass

    def get_input_embeddings(self):
        return self.model.embed

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds=None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> KvfreeOutput:
        """Continue from the cache (``cache`` / ``past_key_values``) over ``input_ids``: one
        token → ``step``; several → the parallel form (a prefill without labels; with
        ``logits_to_keep=1``, what generate asks for, the last position's logits only)."""
        if inputs_embeds is not None:
            raise ValueError("kvfree models take input_ids, not inputs_embeds")
        am = _new_part(attention_mask, input_ids.shape[1])
        cache = next((kwargs[n] for n in _CACHE_NAMES if kwargs.get(n) is not None), None)
        state = cache.state if isinstance(cache, KvfreeCache) else None
        if state is not None and input_ids.shape[1] == 1 and labels is None:
            if am is not None:
                raise ValueError("a decoded token cannot be padding (attention_mask 0)")
            logits, state = self.model.step(input_ids[:, 0], state)
            logits = logits[:, None]
        elif labels is None and not torch.is_grad_enabled():
            last = logits_to_keep == 1
            logits, state = self.model.prefill(
                input_ids, state=state, last_only=last, attention_mask=am
            )
            logits = logits[:, None] if last else logits
        else:
            logits, state = self.model(input_ids, state, attention_mask=am)
        loss = None
        if labels is not None:  # next-token loss, labels shifted inside (the HF convention)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        out = KvfreeCache(state)
        return KvfreeOutput(loss=loss, logits=logits, **{CACHE_FIELD: out})

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """Only the tokens the state has not seen: the prompt first, then the new token."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("kvfree models take input_ids, not inputs_embeds")
        cache = next((kwargs[n] for n in _CACHE_NAMES if kwargs.get(n) is not None), None)
        seen = cache.get_seq_length() if isinstance(cache, KvfreeCache) else 0
        inputs = {"input_ids": input_ids[:, seen:], "attention_mask": attention_mask}
        if isinstance(cache, KvfreeCache):
            inputs[CACHE_FIELD] = cache
        return inputs

    def _reorder_cache(self, cache, beam_idx):
        """Beam search: the state of the beams it keeps (rows ``beam_idx``, repeats allowed)."""
        if not isinstance(cache, KvfreeCache) or cache.state is None:
            return cache
        return KvfreeCache(select_rows(cache.state, beam_idx))


#: written next to config.json by :func:`export_pretrained`, named in its ``auto_map``: loaders
#: that never import kvfree (lm-evaluation-harness's ``--model hf``) find the classes with
#: ``trust_remote_code=True`` — the file only imports them from the installed kvfree
REMOTE_CODE = (
    '"""kvfree model classes for trust_remote_code loaders (needs kvfree installed)."""\n\n'
    "from kvfree.hf import KvfreeConfig, KvfreeForCausalLM  # noqa: F401\n"
)
AUTO_MAP = {
    "AutoConfig": "modeling_kvfree.KvfreeConfig",
    "AutoModelForCausalLM": "modeling_kvfree.KvfreeForCausalLM",
}


def hf_tokenizer(tok):
    """A transformers tokenizer for a kvfree BPE tokenizer (None for others): the same ids, and
    an EOS token — lm-evaluation-harness needs an end-of-text id: the document separator
    (``"\n\n"``, between every training document) when it is one token, else ``"\n"`` (a byte,
    always one token)."""
    if getattr(tok, "tok", None) is None:
        return None
    from transformers import PreTrainedTokenizerFast

    from kvfree.data.stream import DOC_SEP

    sep = tok.encode(DOC_SEP)
    eos = tok.tok.id_to_token((sep if len(sep) == 1 else tok.encode("\n"))[0])
    return PreTrainedTokenizerFast(tokenizer_object=tok.tok, eos_token=eos)


def export_pretrained(model: LanguageModel, out, tok=None) -> str:
    """Write ``out``: config.json (with ``auto_map``), model.safetensors, modeling_kvfree.py and,
    for a BPE tokenizer, tokenizer.json; returns a note on the tokenizer."""
    from pathlib import Path

    hf = KvfreeForCausalLM.from_kvfree(model)
    hf.config.auto_map = dict(AUTO_MAP)
    hf.save_pretrained(out)
    (Path(out) / "modeling_kvfree.py").write_text(REMOTE_CODE)
    ht = hf_tokenizer(tok)
    if ht is None:
        return "no tokenizer written (kvfree's own: kvfree.data.tokenizer.from_spec)"
    ht.save_pretrained(out)
    return f"tokenizer {tok.name} (tokenizer.json, EOS {ht.eos_token!r})"


AutoConfig.register("kvfree", KvfreeConfig, exist_ok=True)
AutoModelForCausalLM.register(KvfreeConfig, KvfreeForCausalLM, exist_ok=True)
