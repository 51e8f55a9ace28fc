"""Issue 6: are CUDA-graphed training layers (``training.compile = "auto"``) correct?

The same rounds on two copies of one random-weight model — eager layers vs compiled layers
replayed as CUDA graphs — with what the service throws at a step: batches of changing lengths
(padded to bucketed shapes under graphs, empty rows included), several micro-batches per step,
a request preempting a step in the forward pass and another in the backward pass, evaluations
between rounds. Both runs see the same preemptions and batches and must end with the same
adapter (LoRA dropout off, so both compute the same function; they differ by bf16 rounding
only), and every step's loss must agree. Also prints what the graphs cost: the first round's seconds (compiling, capturing)
and the steady step time vs eager.

With ``--layers-per-unit K`` the graphed copy compiles its layers in units of K (as the service
does for small micro-batches), preempted at the same points in units; with ``--recompute-cheap``
it keeps fewer activations (``gpu/training.py``, ``RECOMPUTE_CHEAP``; run BR, docs/BENCHMARKS.md).

Exits non-zero when a check fails. Usage: python bench/gpu_graphs_check.py [OUT.json] [--shape qwen2.5-0.5b]
       [--layers-per-unit 1] [--recompute-cheap]
"""
import argparse
import sys
import threading
import time

import torch

import gpu_common as C

LENGTHS = [200, 512, 331, 64, 470, 128, 512, 257]


def examples_of(tok, n_rounds: int):
    """Rounds of 6 text examples each, lengths from LENGTHS; returns (rounds, patch encode)."""
    import idletune.training.engine as E
    from idletune.examples import TrainingExample
    from idletune.training.data import IGNORE, Encoded

    g = torch.Generator().manual_seed(0)
    items, rounds = {}, []
    k = 0
    for r in range(n_rounds):
        exs = []
        for i in range(6):
            n = LENGTHS[(r * 6 + i) % len(LENGTHS)] - 7 * i
            ids = torch.randint(100, len(tok) - 1, (n,), generator=g).tolist()
            ex = TrainingExample.from_text(f"check {k}")
            k += 1
            ex.id = k
            items[ex.id] = Encoded(ex.id, ids, [IGNORE] + ids[1:], "text")
            exs.append(ex)
        rounds.append(exs)
    E.encode = lambda e, tokenizer, max_len: items.get(e.id)
    return rounds


def engine_for(pm, tok, graphs: bool, max_steps: int, per_unit: int = 1, recompute: bool = False):
    """An engine on ``pm`` (CUDA-graphed layers if ``graphs``) with 2–3 micro-batches per step,
    and the switch that preempts it: set ``state["at"] = k`` to preempt at the k-th layer
    boundary from the moment ``state["n"]`` was reset to 0. Returns (engine, state)."""
    from idletune.config import TrainingConfig
    from idletune.gpu.training import compile_layers
    from idletune.training.engine import TrainingEngine

    if graphs:
        compile_layers(pm, graphs=True, layers_per_unit=per_unit, recompute_cheap=recompute)
    cfg = TrainingConfig(batch_size=6, max_steps=max_steps, max_seq_len=512, target_loss=0.0, target_loss_text=0.0,
                         warmup_steps=0, replay_examples=0)
    state = {"n": 0, "at": None}

    def should_yield():
        if eng._step_thread is None or state["at"] is None:
            return False
        state["n"] += 1
        return state["n"] == state["at"]

    eng = TrainingEngine(pm, tok, cfg, lock=threading.Lock(), should_yield=should_yield)
    eng.graphs = graphs
    eng.micro_batch_tokens = 1536
    return eng, state


def run(shape, tok, graphs: bool, rounds, preempt_at: dict, probe_weights=None, per_unit: int = 1,
        recompute: bool = False):
    """Train every round (4 steps each) with ``preempt_at[round] = boundary index`` preempting
    that round's second step. Then the gradient probe: with the adapter set to ``probe_weights``
    (default: this run's result), the gradients of the last round's batch (three micro-batches),
    computed twice. Returns (losses, adapter, eval losses, seconds per round, start adapter,
    [gradients of each probe pass])."""
    from idletune.training import adapters

    m = C.build(shape, tok)
    pm = C.attach(m)
    start = {k: v.float().clone() for k, v in adapters.adapter_tensors(pm, adapters.TRAIN).items()}
    for mod in pm.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    eng, boundaries = engine_for(pm, tok, graphs, max_steps=4, per_unit=per_unit, recompute=recompute)
    losses, evals, secs = [], [], []
    lo = torch.cuda.Stream(priority=0)
    with torch.cuda.stream(lo):
        for r, exs in enumerate(rounds):
            t = time.perf_counter()
            if r in preempt_at:  # one step, then a step preempted at boundary preempt_at[r]
                eng.config.max_steps = 1
                res = eng.train_round(exs)
                losses.append(eng.get_latest_metrics()["loss"])
                boundaries.update(n=0, at=preempt_at[r])
                res = eng.train_round(exs)
                boundaries["at"] = None
                assert res.preempted and res.steps == 0, f"round {r}: expected a preempted step, got {res}"
                eng.config.max_steps = 3
            else:
                eng.config.max_steps = 4
            done = 0
            while done < eng.config.max_steps:
                res = eng.train_round(exs)
                done += res.steps
                losses.append(eng.get_latest_metrics()["loss"])
            torch.cuda.synchronize()
            secs.append(time.perf_counter() - t)
            evals.append(eng.evaluate(exs[:3], adapters.TRAIN))
        tensors = {k: v.float().clone() for k, v in adapters.adapter_tensors(pm, adapters.TRAIN).items()}
        adapters.load_adapter_tensors(pm, adapters.TRAIN, probe_weights or tensors)
        import idletune.training.engine as E

        batch = [E.encode(e, tok, 512) for e in rounds[-1]]
        shipped = eng._backward

        def synced(loss):
            loss.backward()
            torch.cuda.synchronize()
        ways = {"engine": shipped}
        if graphs:  # what the engine does vs autograd's own accumulation (with and without a sync)
            ways.update(accumulate=lambda loss: loss.backward(), accumulate_sync=synced)
        probes = {}
        for way, fn in ways.items():
            eng._backward = fn
            for _ in range(2):  # with graphs: the second pass replays what the first may have recorded
                eng._enter_training()
                with eng.lock:
                    eng._step_thread = threading.get_ident()
                    eng._forward_backward(batch)
                    eng._step_thread = None
                torch.cuda.synchronize()
                probes.setdefault(way, []).append([p.grad.float().clone() for p in eng._trainable()])
                eng._get_optimizer().zero_grad(set_to_none=not graphs)
        eng._backward = shipped
    del eng, pm, m
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return losses, tensors, evals, secs, start, probes


def sweep(shape):
    """Preempt a graphed step at every layer boundary in turn (forward and backward of each
    micro-batch), a full step between, the device synchronized after each: the first boundary
    whose preemption breaks the graphs is named."""
    tok = C.load_tokenizer()
    rounds = examples_of(tok, 1)
    m = C.build(shape, tok)
    pm = C.attach(m)
    eng, state = engine_for(pm, tok, True, max_steps=1)
    lo = torch.cuda.Stream(priority=0)
    n_layers = C.config(shape).num_hidden_layers
    with torch.cuda.stream(lo):
        eng.train_round(rounds[0])
        eng.train_round(rounds[0])
        torch.cuda.synchronize()
        for b in range(1, 8 * n_layers + 1):
            state.update(n=0, at=b)
            r = eng.train_round(rounds[0])
            state["at"] = None
            torch.cuda.synchronize()
            r2 = eng.train_round(rounds[0])
            torch.cuda.synchronize()
            if b % 16 == 0 or not r.preempted:
                print(f"boundary {b}: preempted={r.preempted}, then a step: {r2.steps}, loss {eng.get_latest_metrics()['loss']:.4f}",
                      flush=True)
            if not r.preempted:
                break  # past the last boundary of the step
    print("sweep done: no failure")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--layers-per-unit", type=int, default=1, help="the graphed copy's layers per compiled unit")
    ap.add_argument("--recompute-cheap", action="store_true", help="the graphed copy keeps fewer activations")
    ap.add_argument("--sweep", action="store_true", help="only: preempt a graphed step at every boundary in turn")
    a = ap.parse_args()
    if a.sweep:
        return sweep(a.shape)
    tok = C.load_tokenizer()
    res = C.header()
    n_layers = C.config(a.shape).num_hidden_layers
    rounds = examples_of(tok, a.rounds)
    # round 1: preempted in the forward pass of its second step (layer 5 of the first
    # micro-batch); round 3: in the backward pass (boundaries past the forward of every micro-batch)
    # (with units: the same places counted in units; a preempted step is dropped wherever it stopped)
    n_units = -(-n_layers // a.layers_per_unit)
    eager = run(a.shape, tok, False, rounds, {1: 5, 3: 3 * n_layers + 4})
    graphs = run(a.shape, tok, True, rounds, {1: min(5, n_units), 3: 3 * n_units + 4}, probe_weights=eager[1],
                 per_unit=a.layers_per_unit, recompute=a.recompute_cheap)
    problems = []
    rel = [abs(x - y) / max(abs(x), 1e-6) for x, y in zip(eager[0], graphs[0])]
    if len(eager[0]) != len(graphs[0]):
        problems.append(f"step counts differ: {len(eager[0])} vs {len(graphs[0])}")
    if max(rel) > 0.02:
        problems.append(f"losses differ by up to {max(rel):.3%}")
    cos = []
    if any(not torch.equal(eager[4][k], graphs[4][k]) for k in eager[4]):
        problems.append("the two copies did not start from the same adapter")
    for k, v in eager[1].items():
        d_e, d_g = v - eager[4][k], graphs[1][k] - eager[4][k]
        cos.append(float(torch.nn.functional.cosine_similarity(d_e.flatten(), d_g.flatten(), dim=0).detach()))
    d_e = torch.cat([(v - eager[4][k]).flatten() for k, v in eager[1].items()])
    d_g = torch.cat([(graphs[1][k] - eager[4][k]).flatten() for k in eager[1]])
    total_cos = float(torch.nn.functional.cosine_similarity(d_e, d_g, dim=0))
    if total_cos < 0.98:
        problems.append(f"adapter updates differ: cosine similarity {total_cos:.4f}")
    # the gradients of one batch from the same weights: eager vs graphs (each way, both passes)
    ref = eager[5]["engine"][1]
    grad_cos, lost = {}, {}
    for way, passes in graphs[5].items():
        cs = [float(torch.nn.functional.cosine_similarity(a_.flatten(), b_.flatten(), dim=0))
              for p in passes for a_, b_ in zip(ref, p) if a_.abs().sum() > 0]
        grad_cos[way] = (min(cs), sorted(cs)[len(cs) // 2])
        lost[way] = sum(c < 0.99 for c in cs)
        print(f"gradients, {way}: cosine vs eager min {min(cs):.5f}, median {sorted(cs)[len(cs) // 2]:.5f}; "
              f"{lost[way]} of {len(cs)} tensors below 0.99")
    if grad_cos["engine"][0] < 0.99:
        problems.append(f"gradients differ: min cosine similarity {grad_cos['engine'][0]:.4f}")
    res.update(shape=a.shape, layers_per_unit=a.layers_per_unit, recompute_cheap=a.recompute_cheap,
               losses_eager=eager[0], losses_graphs=graphs[0], max_rel_loss_diff=max(rel),
               min_update_cosine=min(cos), update_cosine=total_cos, grad_cosine_min_median=grad_cos,
               grad_tensors_off=lost, eval_eager=eager[2], eval_graphs=graphs[2],
               round_s_eager=eager[3], round_s_graphs=graphs[3], problems=problems)
    print(f"{a.shape}: {len(eager[0])} steps each; losses max rel diff {max(rel):.2e}; adapter update cosine "
          f"{total_cos:.5f} (per tensor min {min(cos):.5f}); eval eager {[round(x, 4) for x in eager[2]]} graphs {[round(x, 4) for x in graphs[2]]}")
    print("round seconds eager ", [round(x, 2) for x in eager[3]])
    print("round seconds graphs", [round(x, 2) for x in graphs[3]])
    print("PROBLEMS: " + "; ".join(problems) if problems else "OK: graphed training matches eager")
    C.write(res, "gpu_graphs_check.json")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
