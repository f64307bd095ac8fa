"""Local reasoner: GPT-OSS generation on the encoder's own weights, KV cache, harmony parsing.

The reference is transformers' ``GptOssForCausalLM`` built from the same random state dict, plus
a from-scratch recomputation through the encoder's own layer ``forward`` (no cache).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lens_core.loading import load_text_encoder
from lens_core.mxfp4 import dequantize_expert_weight
from lens_core.random_weights import (
    encoder_config_json,
    random_state_dicts,
    tiny_configs,
    write_random_pipeline,
)
from lens_core.reasoner import (
    CALL_ID,
    END_ID,
    ENDOFTEXT_ID,
    RETURN_ID,
    HarmonyStream,
    LocalReasoner,
    ReasonerError,
    ReasonerSettings,
    RefinementCache,
    final_channel_text,
    parse_harmony,
    refine,
    render_harmony,
    sample_token,
)
from lens_core.safetensors_io import TensorSource, save_file_atomic
from lens_core.text_encoder import GptOssConfig, GptOssEncoder
from lens_core.tokenizer import load_tokenizer

SEED = 3
STEPS = 20


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def configs():
    return tiny_configs()


def head_tensors(cfg: GptOssConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return {
        "model.norm.weight": 1 + 0.1 * torch.randn(cfg.hidden_size, generator=g),
        # Larger than N(0, 1/H) so the logits are peaked and greedy choices are far from ties.
        "lm_head.weight": torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g)
        * (4 / cfg.hidden_size**0.5),
    }


def write_checkpoint(root: Path, configs, mxfp4: bool) -> Path:
    write_random_pipeline(root, configs, seed=SEED, mxfp4=mxfp4, tokenizer_json=False)
    # The LM head and final norm in an extra shard, as in the full openai/gpt-oss checkpoint.
    save_file_atomic(head_tensors(configs[1]), root / "text_encoder" / "model-head.safetensors")
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, configs) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("reasoner-dense"), configs, mxfp4=False)


@pytest.fixture(scope="module")
def ckpt_mxfp4(tmp_path_factory, configs) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("reasoner-mxfp4"), configs, mxfp4=True)


@pytest.fixture(scope="module")
def full_state(configs) -> dict[str, torch.Tensor]:
    """The encoder tensors written to ``ckpt`` (all layers, HF names) plus the head."""
    state = dict(random_state_dicts(configs, seed=SEED)["text_encoder"])
    state.update(head_tensors(configs[1]))
    return state


@pytest.fixture(scope="module")
def hf_model(configs, full_state):
    transformers = pytest.importorskip("transformers")
    cfg: GptOssConfig = configs[1]
    # The same HF config.json fields our checkpoints are written with.
    hf_cfg = transformers.GptOssConfig(
        **encoder_config_json(cfg),
        eos_token_id=None,
        tie_word_embeddings=False,
        attn_implementation="eager",
        experts_implementation="eager",
    )
    model = transformers.GptOssForCausalLM(hf_cfg).eval()
    model.load_state_dict(full_state, strict=True)
    return model


@pytest.fixture(scope="module")
def reasoner(ckpt, tok) -> LocalReasoner:
    # Layers 0 and 2 selected: layer 3 is not built by the encoder and must be loaded lazily.
    encoder = load_text_encoder(ckpt, selected_layers=(0, 2))
    assert len(encoder.model.layers) == 3
    return LocalReasoner(encoder, ckpt, tok)


@pytest.fixture(scope="module")
def prompt_ids(tok) -> list[int]:
    ids = tok.encode(render_harmony("Describe the picture in detail.", "a red cube on a blue table"))
    assert len(ids) > 3 * 8  # several sliding windows (window 8 in the tiny config)
    return ids


def greedy_full(
    reasoner: LocalReasoner, prompt: list[int], steps: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by recomputing the whole sequence every step (no cache)."""
    ids = list(prompt)
    out, logits = [], []
    for _ in range(steps):
        last = reasoner.forward_full(torch.tensor([ids]), last_only=True)[0]
        token = int(last.argmax())
        out.append(token)
        logits.append(last)
        ids.append(token)
    return out, logits


# ----------------------------------------------------------------------------------------------
# Numerics


def test_render_harmony_layout(tok):
    text = render_harmony("INSTR", "a cat", "low")
    assert text.startswith("<|start|>system<|message|>You are ChatGPT")
    assert "Reasoning: low\n\n" in text
    assert "<|start|>developer<|message|># Instructions\n\nINSTR\n\n<|end|>" in text
    assert text.endswith("<|start|>user<|message|>a cat<|end|><|start|>assistant")
    ids = tok.encode(text)
    assert ids[0] == 200006 and ids[-2:] == [200006, tok.encode("assistant")[0]]


def test_reuses_encoder_modules_and_loads_only_what_is_missing(reasoner):
    reasoner._ensure_weights()
    layers = reasoner._all_layers()
    assert len(layers) == 4
    for mine, theirs in zip(layers[:3], reasoner.encoder.model.layers, strict=True):
        assert mine is theirs  # no copy of the encoder's layers
    assert len(reasoner._extra_layers) == 1  # only layer 3
    assert reasoner._lm_head.shape == (201088, 32)


def test_full_recompute_matches_transformers(reasoner, hf_model, prompt_ids):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        want = hf_model(ids).logits
    got = reasoner.forward_full(ids)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_kv_cache_matches_full_recompute(reasoner, prompt_ids):
    want_tokens, want_logits = greedy_full(reasoner, prompt_ids, STEPS)
    seen_logits = []
    cache = reasoner.new_cache()
    logits = reasoner.forward_cached(torch.tensor([prompt_ids]), cache)[0]
    tokens = []
    for _ in range(STEPS):
        seen_logits.append(logits)
        tokens.append(int(logits.argmax()))
        logits = reasoner.forward_cached(torch.tensor([[tokens[-1]]]), cache)[0]
    assert tokens == want_tokens
    # Prefilling in chunks (here smaller than the sliding window) changes nothing.
    assert reasoner.generate(prompt_ids, STEPS, prefill_chunk=5).tokens == tokens
    for got, want in zip(seen_logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Sliding layers keep one window of keys, full layers every key.
    window = reasoner.config.sliding_window
    lengths = [kv.length for kv in cache.layers]
    assert lengths[0] == window and lengths[1] == len(prompt_ids) + STEPS


def test_generate_matches_transformers_generate(reasoner, hf_model, prompt_ids):
    result = reasoner.generate(prompt_ids, STEPS, temperature=0.0)
    assert result.finish_reason == "length" and len(result.tokens) == STEPS
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=ENDOFTEXT_ID,
        )
    assert out.sequences[0, len(prompt_ids) :].tolist() == result.tokens
    # Our cached logits at each step equal transformers' cached logits.
    cache = reasoner.new_cache()
    logits = reasoner.forward_cached(ids, cache)[0]
    for step, token in enumerate(result.tokens):
        torch.testing.assert_close(logits, out.logits[step][0].float(), atol=2e-4, rtol=1e-4)
        logits = reasoner.forward_cached(torch.tensor([[token]]), cache)[0]


def test_all_layers_built_needs_no_extra_layer(ckpt, tok, reasoner, prompt_ids):
    encoder = load_text_encoder(ckpt, selected_layers=(0, 1, 2, 3))
    full = LocalReasoner(encoder, ckpt, tok)
    assert full.generate(prompt_ids, 6).tokens == reasoner.generate(prompt_ids, 6).tokens
    assert full._extra_layers == []


def test_mxfp4_encoder(ckpt_mxfp4, tok, configs, prompt_ids):
    encoder = load_text_encoder(ckpt_mxfp4, selected_layers=(1,))
    assert encoder.expert_format == "mxfp4"
    mx = LocalReasoner(encoder, ckpt_mxfp4, tok)
    tokens = mx.generate(prompt_ids, 12).tokens
    assert tokens == greedy_full(mx, prompt_ids, 12)[0]
    assert all(layer.mlp.experts.expert_format == "mxfp4" for layer in mx._all_layers())
    assert mx._all_layers()[3].mlp.experts.gate_up_proj_blocks.dtype == torch.uint8  # kept quantised

    # Same logits as a dense model holding the dequantised experts (a plain tensor mapping works too).
    source = TensorSource.open(ckpt_mxfp4 / "text_encoder")
    dense: dict[str, torch.Tensor] = {}
    for k in source:
        if k.endswith("_scales"):
            continue
        if k.endswith("_blocks"):
            base = k[: -len("_blocks")]
            dense[base] = dequantize_expert_weight(
                source[k], source[base + "_scales"], torch.float32
            ).contiguous()
        else:
            dense[k] = source[k]
    dense_encoder = GptOssEncoder(configs[1], selected_layers=(1,), device="meta")
    dense_encoder.load_state_dict(dense_encoder.filter_state_dict(dense), strict=True, assign=True)
    dense_reasoner = LocalReasoner(dense_encoder.eval(), dense, tok)
    ids = torch.tensor([prompt_ids[:40]])
    torch.testing.assert_close(mx.forward_full(ids), dense_reasoner.forward_full(ids), atol=1e-5, rtol=1e-5)


def test_missing_lm_head_is_a_clear_error(tmp_path, configs, tok):
    root = write_random_pipeline(tmp_path, configs, seed=SEED, tokenizer_json=False)  # no head shard
    encoder = load_text_encoder(root, selected_layers=(3,))
    r = LocalReasoner(encoder, root, tok)
    with pytest.raises(ReasonerError, match="lm_head.weight"):
        r.generate([1, 2, 3], 2)
    s = ReasonerSettings(mode="local", on_error="passthrough", max_new_tokens=4)
    (out,) = refine(["a cat"], s, r, cache=RefinementCache())
    assert out.fell_back and out.text == "a cat" and "lm_head" in out.warnings[0]
    with pytest.raises(ReasonerError, match="lm_head"):
        refine(["a cat"], dataclasses.replace(s, on_error="fail"), r, cache=RefinementCache())


# ----------------------------------------------------------------------------------------------
# Sampling


def test_seeded_sampling_is_reproducible(reasoner, prompt_ids):
    a = reasoner.generate(prompt_ids, 10, temperature=1.0, top_p=0.95, seed=7).tokens
    b = reasoner.generate(prompt_ids, 10, temperature=1.0, top_p=0.95, seed=7).tokens
    c = reasoner.generate(prompt_ids, 10, temperature=1.0, top_p=0.95, seed=8).tokens
    assert a == b and a != c
    greedy = reasoner.generate(prompt_ids, 10, temperature=0.0).tokens
    assert reasoner.generate(prompt_ids, 10, temperature=1.0, top_p=1e-6, seed=3).tokens == greedy


def test_sample_token_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_token(logits, 1.0, 0.75, g) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.75, 0.5 + 0.3 >= 0.75: the nucleus is {0, 1}
    draws = {sample_token(logits, 1.0, 1.0, g) for _ in range(2000)}
    assert draws == {0, 1, 2, 3}
    assert sample_token(logits, 0.0, 0.5, None) == 0


# ----------------------------------------------------------------------------------------------
# Stop tokens and channels


def harmony_tokens(tok, text: str) -> list[int]:
    """Hand-written completions (after the prompt's ``<|start|>assistant``)."""
    return tok.encode(text)


def test_stream_stops_at_final_end_not_analysis_end(tok):
    stream = HarmonyStream(tok)
    analysis = harmony_tokens(tok, "<|channel|>analysis<|message|>Need detail.<|end|>")
    assert [stream.push(t) for t in analysis] == [False] * len(analysis)  # <|end|> of analysis: go on
    final = harmony_tokens(tok, "<|start|>assistant<|channel|>final<|message|>A red cube.<|end|>")
    flags = [stream.push(t) for t in final]
    assert flags[-1] is True and not any(flags[:-1])
    messages = stream.finish()
    assert [(m.channel, m.text, m.complete) for m in messages] == [
        ("analysis", "Need detail.", True),
        ("final", "A red cube.", True),
    ]


@pytest.mark.parametrize("stop", [RETURN_ID, CALL_ID, ENDOFTEXT_ID])
def test_stream_stop_tokens(tok, stop):
    stream = HarmonyStream(tok)
    body = harmony_tokens(tok, "<|channel|>analysis<|message|>thinking")
    assert not any(stream.push(t) for t in body)
    assert stream.push(stop) is True


def test_final_channel_extraction(tok):
    cases = {
        "<|channel|>analysis<|message|>We need a long prompt.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>  A glossy red cube.  <|return|>": "A glossy red cube.",
        # Commentary with a recipient and a constrained format, then the answer.
        "<|channel|>commentary to=functions.x <|constrain|>json<|message|>{}<|call|>"
        "<|start|>assistant<|channel|>final<|message|>Two cats.<|end|>": "Two cats.",
        # Final straight away.
        "<|channel|>final<|message|>Only final.<|return|>": "Only final.",
    }
    for text, want in cases.items():
        got, warnings = final_channel_text(parse_harmony(harmony_tokens(tok, text), tok))
        assert got == want and warnings == []
    # Analysis only: nothing to keep.
    only = parse_harmony(harmony_tokens(tok, "<|channel|>analysis<|message|>hmm<|end|>"), tok)
    assert final_channel_text(only) == (None, [])
    # A final message cut off by the token limit is kept, with a warning.
    cut = parse_harmony(
        harmony_tokens(
            tok,
            "<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>final<|message|>A blue sph",
        ),
        tok,
    )
    text, warnings = final_channel_text(cut)
    assert text == "A blue sph" and warnings


class ScriptedModel:
    """Replaces the forward passes: emits the tokens of ``script`` one by one (one-hot logits)."""

    def __init__(self, reasoner: LocalReasoner, script: list[int]) -> None:
        self.script, self.calls = script, 0
        self.vocab = reasoner.config.vocab_size

    def __call__(self, ids, cache):
        if ids.shape[1] > 1:  # a prefill starts a new generation
            self.calls = 0
            self.generations = getattr(self, "generations", 0) + 1
        logits = torch.full((1, self.vocab), -1e4)
        logits[0, self.script[min(self.calls, len(self.script) - 1)]] = 0.0
        self.calls += 1
        return logits


def test_complete_keeps_only_final_and_stops(reasoner, tok, monkeypatch):
    script = harmony_tokens(
        tok,
        "<|channel|>analysis<|message|>User wants a cube.<|end|><|start|>assistant<|channel|>final"
        "<|message|>A small matte red cube on a blue table.<|return|>",
    ) + harmony_tokens(tok, " never reached")
    fake = ScriptedModel(reasoner, script)
    monkeypatch.setattr(reasoner, "forward_cached", fake)
    settings = ReasonerSettings(mode="local", temperature=0.0, max_new_tokens=500)
    completion = reasoner.complete("instructions", "a cube", settings)
    assert completion.text == "A small matte red cube on a blue table."
    assert fake.calls == script.index(RETURN_ID) + 1  # one prefill + one step per token before <|return|>

    # No final channel before max_new_tokens: fall back to the user's prompt with a warning.
    monkeypatch.setattr(
        reasoner,
        "forward_cached",
        ScriptedModel(reasoner, harmony_tokens(tok, "<|channel|>analysis<|message|>" + "think " * 50)),
    )
    (out,) = refine(
        ["a cube"],
        dataclasses.replace(settings, max_new_tokens=20, on_error="passthrough"),
        reasoner,
        cache=RefinementCache(),
    )
    assert out.fell_back and out.text == "a cube" and "max_new_tokens=20" in out.warnings[0]
    with pytest.raises(ReasonerError, match="final"):
        refine(
            ["a cube"], dataclasses.replace(settings, max_new_tokens=20), reasoner, cache=RefinementCache()
        )


def test_refine_local_is_cached(reasoner, tok, monkeypatch):
    script = harmony_tokens(tok, "<|channel|>final<|message|>Dense prompt.<|end|>")
    assert script[-1] == END_ID
    fake = ScriptedModel(reasoner, script)
    monkeypatch.setattr(reasoner, "forward_cached", fake)
    cache = RefinementCache()
    settings = ReasonerSettings(mode="local", seed=1)
    first = refine(["a cube", "", "a cube"], settings, reasoner, cache=cache)
    assert [r.text for r in first] == ["Dense prompt.", "", "Dense prompt."]
    assert first[0].mode == "local" and not first[0].fell_back and not first[0].cached
    assert first[2].cached  # the repeat inside one call is a hit too
    assert fake.generations == 1
    again = refine(["a cube"], settings, reasoner, cache=cache)
    assert again[0].cached and again[0].text == "Dense prompt." and fake.generations == 1
    # Another seed or system prompt is another key.
    refine(["a cube"], dataclasses.replace(settings, seed=2), reasoner, cache=cache)
    refine(["a cube"], dataclasses.replace(settings, system_prompt="other"), reasoner, cache=cache)
    assert len(cache) == 3


def test_off_mode_passes_through():
    out = refine(["a cat", ""], ReasonerSettings())
    assert [(r.text, r.mode, r.fell_back) for r in out] == [("a cat", "off", False), ("", "off", False)]
    with pytest.raises(ValueError, match="mode"):
        refine(["a"], ReasonerSettings(mode="bogus"))


def test_local_without_backend(tok):
    with pytest.raises(ReasonerError, match="local"):
        refine(["a cat"], ReasonerSettings(mode="local"))
    (out,) = refine(["a cat"], ReasonerSettings(mode="local", on_error="passthrough"))
    assert out.fell_back and out.text == "a cat"


def test_system_prompt_sources(tmp_path):
    from lens_core.reasoner import DEFAULT_SYSTEM_PROMPT_FILE, load_system_prompt

    default = load_system_prompt(ReasonerSettings())
    assert default == DEFAULT_SYSTEM_PROMPT_FILE.read_text(encoding="utf-8").strip()
    assert "paragraph" in default and len(default.split()) > 100
    f = tmp_path / "sp.txt"
    f.write_text("  From a file.\n", encoding="utf-8")
    assert load_system_prompt(ReasonerSettings(system_prompt_file=str(f))) == "From a file."
    assert (
        load_system_prompt(ReasonerSettings(system_prompt="Inline.", system_prompt_file=str(f))) == "Inline."
    )
    with pytest.raises(ReasonerError, match="missing.txt"):
        load_system_prompt(ReasonerSettings(system_prompt_file=str(tmp_path / "missing.txt")))


def test_pipeline_backend_borrows_the_pipelines_encoder(ckpt, monkeypatch):
    from lens_core.pipeline import LensPipeline
    from lens_core.reasoner import PipelineLocalReasoner

    pipe = LensPipeline.from_pretrained(ckpt, device="cpu", tokenizer=None)
    backend = PipelineLocalReasoner(pipe)
    assert backend.identity.startswith("local|")
    settings = ReasonerSettings(mode="local", max_new_tokens=3, on_error="passthrough", temperature=0.0)
    (out,) = refine(["a cube"], settings, backend, cache=RefinementCache())
    assert out.fell_back and "max_new_tokens=3" in out.warnings[0]  # random weights: no final answer
    assert backend._reasoner.encoder is None  # no reference kept between sessions
    head = backend._reasoner._lm_head
    with backend.session() as local:
        assert local.encoder is pipe._models["text_encoder"]  # the pipeline's own encoder object
        assert local.generate([1, 2, 3], 2).tokens
        assert local._lm_head is head  # loaded once, kept across sessions
    pipe.release("text_encoder")  # the pipeline reloads it: a new object, same weights
    with backend.session() as local:
        assert local.encoder is pipe._models["text_encoder"]
