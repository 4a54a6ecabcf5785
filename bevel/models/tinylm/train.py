"""Train tinylm: ``python -m bevel.models.tinylm.train [--steps N] [--out DIR]``.

Next-byte prediction on the training split of :mod:`bevel.models.tinylm.corpus` with AdamW, a
linear warm-up and a cosine decay. The run is deterministic for a given seed, thread count and
machine: the shipped weights came from the defaults. At the end it measures the held-out
perplexity and writes ``model.safetensors`` and ``metrics.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import torch

from bevel.models.tinylm import corpus
from bevel.models.tinylm.model import CONFIG, build_untrained

WEIGHTS_DIR = pathlib.Path(__file__).parent / "weights"


def batches(stream: torch.Tensor, batch_size: int, seq_len: int, seed: int):
    """Endless random windows of ``seq_len`` ids from the stream, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
        yield torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then a cosine decay to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(steps: int, batch_size: int, seq_len: int, peak_lr: float, seed: int,
          log_every: int = 10) -> torch.nn.Module:
    """A tinylm trained from its seeded initialization; prints the loss every ``log_every`` steps."""
    model = build_untrained(seed=seed).train()
    stream = corpus.training_stream()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=peak_lr, betas=(0.9, 0.95))
    started = time.time()
    for step, window in zip(range(steps), batches(stream, batch_size, seq_len, seed)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, peak_lr, warmup=max(1, steps // 15))
        loss = model(input_ids=window, labels=window).loss  # the model shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            elapsed = time.time() - started
            print(f"step {step + 1}/{steps}  loss {loss.item():.4f}  {elapsed / (step + 1):.2f} s/step", flush=True)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    """The command line: train, save the weights and record the held-out perplexity."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=420, help="optimizer steps (default 420)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per step (default 8)")
    parser.add_argument("--seq-len", type=int, default=1024, help="bytes per window (default 1024)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; results depend on it (default 1)")
    parser.add_argument("--out", type=pathlib.Path, default=WEIGHTS_DIR,
                        help="where the weights go (default: the package)")
    parser.add_argument("--eval-bytes", type=int, default=None,
                        help="score only this many held-out bytes at the end (default: all of them)")
    args = parser.parse_args(argv)

    from safetensors.torch import save_file

    from bevel.eval.perplexity import perplexity

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        model = train(args.steps, args.batch_size, args.seq_len, args.lr, args.seed)
    finally:
        torch.set_num_threads(previous_threads)
    args.out.mkdir(parents=True, exist_ok=True)
    # tied embeddings: the head shares the token table, which is saved once
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(args.out / "model.safetensors"))
    held_out = perplexity(model, corpus.held_out_text(), context=1024, stride=512, max_tokens=args.eval_bytes)
    metrics = {"held_out_perplexity": held_out, "steps": args.steps, "batch_size": args.batch_size,
               "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed, "threads": args.threads,
               "config": CONFIG}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"held-out perplexity {held_out:.3f} per byte; weights in {args.out}")


if __name__ == "__main__":
    main()
