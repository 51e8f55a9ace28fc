"""FastDecoder (the GPU serving path) on the CPU, in float32: merged fused weights, static cache and
the decode step must give the logits of the Hugging Face model with the live adapter applied."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from idletune.config import LoraConfig
from idletune.gpu import FastDecoder, unsupported_reason
from idletune.training import adapters
from idletune.training.adapters import LIVE, TRAIN

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=97, max_position_embeddings=512)


def tiny(kind: str, **shape):
    torch.manual_seed(0)
    dims = {**TINY, **shape}
    cfg = Qwen2Config(**dims, tie_word_embeddings=True) if kind == "qwen2" else \
        LlamaConfig(**dims, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    peft = adapters.attach_lora(model, LoraConfig(rank=4, target_modules=["attention.q", "attention.v", "ffn.gate",
                                                                          "ffn.up", "ffn.down"]))
    randomize(peft, LIVE, seed=1)
    randomize(peft, TRAIN, seed=2)
    adapters.activate(peft, LIVE)
    peft.eval()
    return peft


@torch.no_grad()
def randomize(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    for t in adapters.adapter_tensors(model, name).values():
        t.copy_(torch.randn(t.shape, generator=g) * 0.1)


@torch.no_grad()
def hf_logits(model, ids):
    adapters.activate(model, LIVE)
    return model(input_ids=torch.tensor([ids])).logits[0].float()  # (T, V)


@pytest.mark.parametrize("kind,attention", [("qwen2", "reductions"), ("llama", "reductions"), ("llama", "sdpa"),
                                            ("qwen2", "compiled forms"), ("llama", "compiled forms")])
def test_prefill_and_decode_match_hf_with_live_adapter(kind, attention):
    """Eager pieces (what the CPU runs), and the forms the GPU compiles (products written as
    reductions, norms folded in, attention as reductions) run uncompiled."""
    from idletune.gpu.decoder import _decode_attend, _decode_post, _decode_pre

    model = tiny(kind)
    assert unsupported_reason(model) is None
    dec = FastDecoder(model, LIVE, max_len=300, use_graphs=False,
                      attention="reductions" if attention == "compiled forms" else attention)
    if attention == "compiled forms":
        dec._pieces.update(pre=_decode_pre, post=_decode_post, attend=_decode_attend)
    ids = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    ref = hf_logits(model, ids)
    prompt = ids[:6]
    got = dec.prefill(prompt).clone()
    torch.testing.assert_close(got, ref[5], rtol=1e-4, atol=1e-4)
    for i, pos in enumerate(range(6, len(ids))):  # feed the reference tokens one at a time
        dec.ids_buf.fill_(ids[pos])
        dec.step(pos)
        torch.testing.assert_close(dec.logits_buf[0], ref[pos], rtol=1e-4, atol=1e-4)
    assert int(dec.pos_buf) == len(ids)


@pytest.mark.parametrize("pad", [False, True], ids=["exact", "padded prompt"])
def test_greedy_tokens_match_hf_greedy(pad):
    """Padded: the prompt runs at its bucket's length, as the GPU's prefill graphs hold it."""
    model = tiny("qwen2")
    dec = FastDecoder(model, LIVE, max_len=300, use_graphs=False, pad_prompts=pad)
    prompt = [5, 6, 7, 8]
    assert dec.prefill_bucket(len(prompt)) == (64 if pad else 4)
    got = list(dec.tokens(prompt, 12))
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(hf_logits(model, seq)[-1].argmax()))
    assert got == seq[len(prompt):]
    # with a pick function (sampling path) the same greedy choice gives the same tokens
    assert list(dec.tokens(prompt, 12, pick=lambda logits: int(logits.argmax()))) == got


@pytest.mark.parametrize("pad", [False, True], ids=["exact", "padded prompt"])
def test_warm_up_leaves_nothing_behind(pad):
    """What the GPU path does at start: afterwards a request gets exactly what a fresh decoder
    gives (padded: the warm-up's longer prompts leave cache positions behind, all masked)."""
    model = tiny("qwen2")
    warm, fresh = (FastDecoder(model, LIVE, max_len=300, use_graphs=False, pad_prompts=pad) for _ in range(2))
    warm.warm_up()
    prompt = [11, 12, 13]  # shorter than the warm-up prompt: its cache positions stay behind
    assert torch.equal(warm.prefill(prompt), fresh.prefill(prompt))
    assert int(warm.pos_buf) == len(prompt) and torch.equal(warm.ids_buf, fresh.ids_buf)
    for pos in range(len(prompt), len(prompt) + 6):
        warm.step(pos)
        fresh.step(pos)
        assert torch.equal(warm.logits_buf, fresh.logits_buf)


def test_decode_attention_forms_agree():
    """Compiled reductions (the GPU default), batched products (eager pieces) and SDPA give the
    same attention for one query over a masked cache, grouped-query heads included."""
    from idletune.gpu.decoder import _decode_attend, _decode_attend_bmm, _decode_sdpa

    g = torch.Generator().manual_seed(0)
    Hkv, G, L, D, pos = 2, 3, 16, 8, 9
    q, k, v = (torch.randn(*shape, generator=g) for shape in ((Hkv, G, D), (Hkv, L, D), (Hkv, L, D)))
    mask = torch.where(torch.arange(L) <= pos, 0.0, float("-inf"))
    ref = torch.softmax(torch.einsum("hgd,hld->hgl", q, k[:, :pos + 1]) / D ** 0.5, -1) @ v[:, :pos + 1]
    for f in (_decode_attend, _decode_attend_bmm, _decode_sdpa):
        torch.testing.assert_close(f(q, k, v, mask), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_decode_layer_forms_agree(bias):
    """The compiled forms of a decode layer's pieces (products written as reductions, the norm's
    sum of squares folded into the product, SiLU·up as an epilogue) compute what the eager forms
    with library products do: same q, same cache write, same residual stream and activation."""
    from idletune.gpu.decoder import _decode_post, _decode_post_eager, _decode_pre, _decode_pre_eager

    g = torch.Generator().manual_seed(0)
    C, I, H, Hkv, D, eps = 32, 48, 4, 2, 8, 0.1  # an eps large enough that leaving it out fails
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    x, ln = r(1, C), r(C).abs() + 0.5
    qkv_w, qkv_b = r((H + 2 * Hkv) * D, C) * 0.2, r((H + 2 * Hkv) * D) if bias else None
    cos, sin, pos = r(1, 1, D), r(1, 1, D), torch.tensor([5])
    caches = [torch.zeros(2, Hkv, 16, D) for _ in range(2)]
    q = [f(x, c, pos, cos, sin, ln, qkv_w, qkv_b, eps, H, Hkv, D) for f, c in zip((_decode_pre, _decode_pre_eager), caches)]
    torch.testing.assert_close(q[0], q[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[0], caches[1], rtol=1e-5, atol=1e-5)
    assert caches[0][:, :, 5].abs().sum() > 0 and caches[0][:, :, :5].abs().sum() == 0
    args = (x, r(1, H * D), r(C, H * D) * 0.2, r(C) if bias else None, ln, r(2 * I, C) * 0.2, r(C, I) * 0.2, eps)
    for got, want in zip(_decode_post(*args), _decode_post_eager(*args)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_refresh_serves_the_new_live_adapter_and_never_the_candidate():
    model = tiny("llama")
    dec = FastDecoder(model, LIVE, max_len=300, use_graphs=False)
    ids = [1, 2, 3, 4, 5]
    before = dec.prefill(ids).clone()
    adapters.copy_adapter(model, TRAIN, LIVE)  # "publish"
    assert torch.allclose(dec.prefill(ids), before)  # not merged yet: still the old version
    dec.refresh()
    torch.testing.assert_close(dec.prefill(ids), hf_logits(model, ids)[-1], rtol=1e-4, atol=1e-4)
    # many publishes never drift: merged weights are recomputed from the base each time
    for seed in range(5):
        randomize(model, LIVE, seed=10 + seed)
        dec.refresh(full=False)  # what a publish does: only the adapted matrices
    torch.testing.assert_close(dec.prefill(ids), hf_logits(model, ids)[-1], rtol=1e-4, atol=1e-4)


def test_zero_adapter_is_the_base_model():
    model = tiny("qwen2")
    for k, t in adapters.adapter_tensors(model, LIVE).items():
        if "lora_B" in k:
            t.data.zero_()
    dec = FastDecoder(model, LIVE, max_len=300, use_graphs=False)
    ids = [9, 8, 7]
    with model.disable_adapter(), torch.no_grad():
        base = model(input_ids=torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(dec.prefill(ids), base, rtol=1e-4, atol=1e-4)


def test_unsupported_models_are_named():
    from transformers import GPT2Config

    m = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert "gpt2" in unsupported_reason(m)
    with pytest.raises(ValueError):
        FastDecoder(m)


def test_buckets():
    dec = FastDecoder(tiny("qwen2"), LIVE, max_len=1000, use_graphs=False)
    assert [dec.bucket(p) for p in (0, 255, 256, 511, 600, 999)] == [256, 256, 512, 512, 1000, 1000]
    assert dec.prefill_bucket(300) == 300  # exact lengths without graphs
    dec = FastDecoder(tiny("qwen2"), LIVE, max_len=3000, use_graphs=False, pad_prompts=True)
    lengths = (1, 64, 65, 300, 1024, 1025, 1600, 2999)
    assert [dec.prefill_bucket(t) for t in lengths] == [64, 64, 128, 512, 1024, 1536, 2048, 3000]
    with pytest.raises(ValueError, match="3001 tokens"):
        dec.prefill([1] * 3001)


def test_a_padded_prompt_gives_the_exact_logits_and_cache():
    """The prompt's padding sits after it: its logits and the cache up to its length are the
    unpadded ones, so decoding goes on exactly as from an unpadded prompt."""
    model = tiny("llama")
    exact = FastDecoder(model, LIVE, max_len=300, use_graphs=False)
    padded = FastDecoder(model, LIVE, max_len=300, use_graphs=False, pad_prompts=True)
    padded.prompt_buf.fill_(7)  # whatever an earlier, longer prompt left
    ids = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    ref = hf_logits(model, ids)
    torch.testing.assert_close(padded.prefill(ids[:5]), exact.prefill(ids[:5]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.kv_cache[:, :, :, :5], exact.kv_cache[:, :, :, :5], rtol=1e-5, atol=1e-5)
    assert int(padded.pos_buf) == 5 and torch.equal(padded.ids_buf, exact.ids_buf)
    for pos in range(5, len(ids)):
        padded.ids_buf.fill_(ids[pos])
        padded.step(pos)
        torch.testing.assert_close(padded.logits_buf[0], ref[pos], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [3, 64, None])
def test_linear_cross_entropy_matches_full_logits(chunk):
    from idletune.gpu.loss import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (10,), generator=g)
    weights = torch.rand(10, generator=g)  # each position's own upstream gradient
    for trains in (False, True):  # a frozen output layer (LoRA), and a trained one (full fine-tuning)
        w.requires_grad_(trains)
        got = linear_cross_entropy(h, w, labels, chunk=chunk)
        (got * weights).sum().backward()
        grad_h, h.grad = h.grad.clone(), None
        grad_w, w.grad = (w.grad.clone(), None) if trains else (None, None)
        ref = torch.nn.functional.cross_entropy(h @ w.t(), labels, reduction="none")
        (ref * weights).sum().backward()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_h, h.grad, rtol=1e-5, atol=1e-5)
        if trains:
            torch.testing.assert_close(grad_w, w.grad, rtol=1e-5, atol=1e-5)
        h.grad = w.grad = None


def test_the_loss_calls_back_between_its_chunks_and_stops_if_that_raises():
    from idletune.gpu.loss import linear_cross_entropy

    h, w, labels = torch.randn(10, 16, requires_grad=True), torch.randn(50, 16), torch.randint(0, 50, (10,))
    calls = []
    full = linear_cross_entropy(h, w, labels, chunk=3, between_chunks=lambda: calls.append(1))
    assert len(calls) == 3  # 4 chunks of 3, 3, 3 and 1 positions
    torch.testing.assert_close(full, linear_cross_entropy(h, w, labels, chunk=3))
    full.sum().backward()
    assert len(calls) == 3  # a frozen output layer: nothing computed in the backward pass
    w.requires_grad_(True)
    linear_cross_entropy(h, w, labels, chunk=3, between_chunks=lambda: calls.append(1)).sum().backward()
    assert len(calls) == 9  # a trained one: its gradient chunk by chunk in the backward pass too

    class Stop(Exception):  # an Exception, as the engine's Preempted is: not taken for a failed kernel
        pass

    def stop():
        raise Stop

    with pytest.raises(Stop):
        linear_cross_entropy(h, w, labels, chunk=3, between_chunks=stop)


def test_loss_chunks_are_balanced_and_a_failed_kernel_falls_back():
    from idletune.gpu import loss

    assert [loss._balanced(n, 883) for n in (0, 1, 883, 884, 4096)] == [1, 1, 883, 442, 820]
    try:
        loss._give_up_fused(RuntimeError("no compiler"))  # what a failed launch calls
        assert loss._fused_rows() is None  # plain torch from then on
    finally:
        loss._fused_failed = False
        loss._fused_rows.cache_clear()


def test_compiled_prefill_matches_and_compiles_once():
    """The prompt's layer as the GPU runs it (torch.compile; here inductor's CPU code): the
    logits and the cache of the eager layer, and one compilation for every padded length,
    the cache's full length included (a slice there once fixed the length to a constant); a
    second model with other head counts in the same process compiles once more and works (left
    to dynamo, its head counts became variables, which attention refused); a third has biases on
    q/k/v and the output product."""
    from torch._dynamo.utils import counters

    biased = tiny("llama", attention_bias=True)
    with torch.no_grad():  # HF starts biases at zero
        g = torch.Generator().manual_seed(3)
        for name, b in biased.named_parameters():
            if "self_attn" in name and name.endswith(".bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    for model in (tiny("llama"), tiny("qwen2", num_attention_heads=8, num_key_value_heads=4), biased):
        dec = FastDecoder(model, LIVE, max_len=128, use_graphs=False, pad_prompts=True, compile_prefill=True)
        eager = FastDecoder(model, LIVE, max_len=128, use_graphs=False, pad_prompts=True)
        for prompt in ([5, 6, 7], list(range(3, 80)), list(range(10, 70))):  # buckets 64, 128 (= max_len), 64
            assert dec.prefill_bucket(len(prompt)) in (64, 128)
            got = dec.prefill(prompt).clone()
            torch.testing.assert_close(got, eager.prefill(prompt), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(dec.kv_cache, eager.kv_cache, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got, hf_logits(model, prompt)[-1], rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] - before == 3
