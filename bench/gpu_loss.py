"""Issue 6, question 3, one piece: the training loss through the frozen output layer.

``gpu/loss.py`` computes cross-entropy and its gradient for the hidden states chunk by chunk.
On a GPU each chunk's softmax, loss and gradient are one Triton kernel (``fused``); elsewhere,
plain torch (``torch``: float copy, logsumexp, subtract, exp, one-hot, cast back). This script
checks both against float32 full logits (the loss and the gradient for the hidden states) and
times them on a step's worth of positions (8 × 512), forward with gradient.

Usage: python bench/gpu_loss.py [OUT.json] [--hidden 896,1536,4096] [--vocab 151936,128256]
       [--positions 4096] [--reps 10]
"""
import argparse
import time

import torch

import gpu_common as C


def run(path: str, h, w, labels, weights, reps: int) -> dict:
    from idletune.gpu import loss as L

    saved = L._fused_rows
    if path == "torch":
        L._fused_rows = lambda: None
    try:
        x = h.detach().requires_grad_()
        out = L.linear_cross_entropy(x, w, labels)
        (out * weights).sum().backward()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            y = h.detach().requires_grad_()
            (L.linear_cross_entropy(y, w, labels) * weights).sum().backward()
        torch.cuda.synchronize()
        ms = 1e3 * (time.perf_counter() - t) / reps
    finally:
        L._fused_rows = saved
    return {"loss": out.detach(), "grad": x.grad, "ms": ms}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--hidden", default="896,1536,4096")
    ap.add_argument("--vocab", default="151936,128256")
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    res = C.header()
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for vocab in map(int, a.vocab.split(",")):
        for hidden in map(int, a.hidden.split(",")):
            n = a.positions
            h = (torch.randn(n, hidden, device="cuda", generator=g) * 2).to(torch.bfloat16)
            w = (torch.randn(vocab, hidden, device="cuda", generator=g) / hidden ** 0.5).to(torch.bfloat16)
            labels = torch.randint(0, vocab, (n,), device="cuda", generator=g)
            weights = torch.rand(n, device="cuda", generator=g)
            # reference: float32 logits of the same bf16 inputs
            x = h.float().requires_grad_()
            ref = torch.nn.functional.cross_entropy(x @ w.float().t(), labels, reduction="none")
            (ref * weights).sum().backward()
            ref_grad = x.grad
            key = f"V{vocab}_C{hidden}"
            res[key] = {}
            for path in ("fused", "torch"):
                r = run(path, h, w, labels, weights, a.reps)
                err_loss = (r["loss"] - ref).abs().max().item()
                err_grad = ((r["grad"].float() - ref_grad).norm() / ref_grad.norm()).item()
                res[key][path] = {"ms": r["ms"], "loss_max_abs_err": err_loss, "grad_rel_err": err_grad}
                rows.append([vocab, hidden, path, r["ms"], err_loss, err_grad])
            del h, w, x, ref_grad
            torch.cuda.empty_cache()
    print(f"loss through the output layer, {a.positions} positions, bf16, forward with gradient ({res['device']})")
    C.table(rows, ["vocab", "hidden", "path", "ms", "loss max abs err", "grad rel err"])
    C.write(res, "gpu_loss.json")


if __name__ == "__main__":
    main()
