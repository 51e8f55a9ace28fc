# Copied verbatim from ../shared/bench/gpu_baseline.py so it travels to the GPU with the repo.
"""Usage: python gpu_baseline.py [RESULTS.json]
Anchor figures on a GPU for 'the usual way': HF generate for chat, a plain PEFT LoRA loop for
training, and what naive concurrency does to chat latency. Random weights, real shapes."""
import os, time, threading, json, statistics as st
import torch
from transformers import AutoModelForCausalLM, Qwen2Config
from peft import LoraConfig, get_peft_model

dev = "cuda"
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
import transformers, peft
res["transformers"], res["peft"] = transformers.__version__, peft.__version__

def build(name):
    cfg = Qwen2Config(**SHAPES[name], max_position_embeddings=4096)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).to(dev)
    return m

def copy_bw():
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device=dev); y = torch.empty_like(x)
    for _ in range(3): y.copy_(x)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(10): y.copy_(x)
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
    del x, y; torch.cuda.empty_cache()
    return 2 * 2 * 1024**3 / dt / 1e12  # TB/s read+write

def gen_latency(m, prompt_len=256, new=128, reps=5):
    ids = torch.randint(0, 1000, (1, prompt_len), device=dev)
    m.eval(); lat = []; ttft = []
    with torch.no_grad():
        m.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        for _ in range(reps):
            torch.cuda.synchronize(); t = time.perf_counter()
            m.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False); torch.cuda.synchronize()
            ttft.append(time.perf_counter() - t)
            t = time.perf_counter()
            m.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False); torch.cuda.synchronize()
            lat.append(time.perf_counter() - t)
    per_tok = [(l - f) / (new - 1) for l, f in zip(lat, ttft)]
    return dict(ttft_ms=1e3 * st.median(ttft), per_token_ms=1e3 * st.median(per_tok), tok_s=1 / st.median(per_tok))

def peft_train(m, seq=512, bs=8, steps=20):
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"], task_type="CAUSAL_LM")
    pm = get_peft_model(m, cfg)
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    pm.train()
    x = torch.randint(0, 1000, (bs, seq), device=dev)
    torch.cuda.reset_peak_memory_stats(); base_mem = torch.cuda.memory_allocated()
    for i in range(steps + 3):
        if i == 3: torch.cuda.synchronize(); t = time.perf_counter()
        out = pm(input_ids=x, labels=x); out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in pm.parameters() if p.requires_grad], 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / steps
    tok_s = bs * seq / dt
    n = sum(p.numel() for p in m.parameters())
    flops = 6 * n * bs * seq  # counts full backward; LoRA does ~4N
    return pm, dict(trainable=trainable, step_ms=1e3 * dt, tok_s=tok_s, mfu_6N=flops / dt / 989e12,
                    peak_extra_mb=(torch.cuda.max_memory_allocated() - base_mem) / 2**20)

res["copy_TBs"] = copy_bw()
for name in SHAPES:
    m = build(name)
    n = sum(p.numel() for p in m.parameters())
    r = {"params_M": n / 1e6}
    r["generate"] = gen_latency(m)
    r["bw_limit_tok_s"] = res["copy_TBs"] * 1e12 / (2 * n)
    pm, r["peft_train"] = peft_train(m)
    # naive concurrency: a training thread running while chat requests are served
    stop = threading.Event()
    def trainer():
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
        x = torch.randint(0, 1000, (8, 512), device=dev)
        while not stop.is_set():
            pm(input_ids=x, labels=x).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    pm.eval()
    r["generate_peft_idle"] = gen_latency(pm, reps=3)
    th = threading.Thread(target=trainer); th.start(); time.sleep(1)
    r["generate_peft_with_naive_training_thread"] = gen_latency(pm, reps=3)
    stop.set(); th.join()
    res[name] = r
    del pm, m; torch.cuda.empty_cache()
    print(name, json.dumps(r, indent=1), flush=True)
import sys
if len(sys.argv) > 1:  # optional: where to write all figures as JSON
    json.dump(res, open(sys.argv[1], "w"), indent=1)
print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}))
