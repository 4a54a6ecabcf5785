"""Decoding speed on the CPU: bevel's compiled ``generate`` against HF's eager ``generate``.

Two models: the shipped tinylm (12 layers, 192 wide, trained) and a 6-layer, 512-wide Llama config
with random weights (8 query heads, 2 KV heads). For batch 1 and 8, each generates ``--new`` tokens
greedily after prompts of real English text (tinylm's bytes; random ids for the Llama config), with
no early stop. Both run in this process, calls alternating, median of ``--repeats`` runs after one
warm-up; tokens/s counts generated tokens of the whole batch. Beside the speed, the share of
generated tokens on which bevel's output equals HF's (the fidelity: 1.0 means identical text).

    python benchmarks/decode_cpu.py
    python benchmarks/decode_cpu.py --pipeline "cleanup | quantize.int8_dynamic" --new 32
    BEVEL_CPU_LINEAR=aten python benchmarks/decode_cpu.py   # every float linear on MKL, as eager
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import bevel
from bevel.data import sentences
from bevel.models import tinylm


def llama_6x512() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def prompts(name: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    texts = sentences(batch, seed=21)
    if name == "tinylm":
        return tinylm.prompts(texts)
    generator = torch.Generator().manual_seed(batch)
    lengths = [min(64, max(8, len(t) // 4)) for t in texts]  # about a tokenizer's count for the text
    ids = torch.zeros(batch, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, -length:] = torch.randint(3, 32000, (length,), generator=generator)
        mask[row, -length:] = 1
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=64, help="tokens generated per sequence (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model (default 5)")
    parser.add_argument("--pipeline", default="cleanup", help="bevel pipeline (default: cleanup)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; pipeline: {args.pipeline}")
    print(f"{'model':10s} {'batch':>5s} {'HF tok/s':>9s} {'bevel tok/s':>12s} {'speed-up':>9s} {'same tokens':>12s}")
    for name, build in (("tinylm", tinylm.load_tinylm), ("llama-6x512", llama_6x512)):
        model = build()
        cm = bevel.compile(model, args.pipeline, example_inputs=prompts(name, 2), max_cache_len=1024)
        for choice in cm.cpu_linears:  # the CPU kernel of each linear shape (bevel.codegen.cpu_linear)
            print(f"  {name}: {choice}")
        for batch in (1, 8):
            ids, mask = prompts(name, batch)

            def hf():
                with torch.no_grad():
                    return model.generate(ids, attention_mask=mask, max_new_tokens=args.new, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)

            def ours():
                return cm.generate(ids, max_new_tokens=args.new, attention_mask=mask, eos_token_id=None)

            # one warm-up call each, then alternate: one timed call of each per round
            hf_times, our_times = [], []
            hf_out, our_out = hf(), ours()
            for _ in range(args.repeats):
                for fn, times in ((hf, hf_times), (ours, our_times)):
                    start = time.perf_counter()
                    out = fn()
                    times.append(time.perf_counter() - start)
                    if fn is hf:
                        hf_out = out
                    else:
                        our_out = out
            hf_s, our_s = statistics.median(hf_times), statistics.median(our_times)
            tokens = batch * args.new
            same = (hf_out[:, ids.shape[1]:] == our_out[:, ids.shape[1]:]).float().mean().item()
            print(f"{name:10s} {batch:5d} {tokens / hf_s:9.1f} {tokens / our_s:12.1f} {hf_s / our_s:8.2f}x "
                  f"{same:12.3f}")


if __name__ == "__main__":
    main()
