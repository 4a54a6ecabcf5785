"""How long the calibrated passes that rewrite a graph stage by stage take on MiniLM (real weights),
with their calibration runs resumed where the previous stage's rewrite began against runs from the
graph's inputs at every stage (as before resuming existed), in one process.

Prints, per pipeline and way, the pass's seconds (from the compile report), the whole compile's,
and whether the two ways gave the same weights bit for bit (they must). ``lowrank`` resumes between
its groups of layers, whose input sums fit a memory budget together: MiniLM's all fit in one, so it
gains nothing there (12.1 s either way, measured), hence not in the default pipelines.

    python benchmarks/calibration_cpu.py
    python benchmarks/calibration_cpu.py --sentences 128 --pipelines "quantize.int4_weight(method='gptq')"
"""

from __future__ import annotations

import argparse
import time

import torch

import bevel
from bevel.data import sentences
from bevel.models import minilm
from bevel.passes import lowrank
from bevel.passes.quantize import calibration, rewrite

PIPELINES = ['quantize.int4_weight(group_size=64, method="gptq")']


def compile_timed(model, pipeline: str, batches: list, resumed: bool) -> tuple[float, float, dict]:
    """(pass seconds, compile seconds, weights) of one compile, its runs resumed or not."""
    resume = calibration.Resume if resumed else (lambda: None)
    rewrite.Resume, lowrank.Resume = resume, resume
    start = time.perf_counter()
    compiled = bevel.compile(model, pipeline, example_inputs=minilm.example_inputs(), calibration=batches)
    seconds = time.perf_counter() - start
    rewrite.Resume, lowrank.Resume = calibration.Resume, calibration.Resume
    entry = compiled.report.passes[-1]
    return entry.seconds, seconds, compiled.graph_module.state_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=512, help="calibration sentences, in batches of 16")
    parser.add_argument("--pipelines", nargs="*", default=PIPELINES, help="the pipelines compiled")
    args = parser.parse_args()

    model = minilm.load_minilm()
    texts = sentences(args.sentences, seed=1)
    batches = [minilm.encode(texts[i:i + 16]) for i in range(0, len(texts), 16)]
    print(f"MiniLM, {len(texts)} calibration sentences in {len(batches)} batches, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for pipeline in args.pipelines:
        fresh_pass, fresh_all, fresh_weights = compile_timed(model, pipeline, batches, resumed=False)
        pass_s, all_s, weights = compile_timed(model, pipeline, batches, resumed=True)
        same = weights.keys() == fresh_weights.keys() and all(torch.equal(weights[k], fresh_weights[k])
                                                              for k in weights)
        print(f"{pipeline}: pass {fresh_pass:.1f} s from the inputs, {pass_s:.1f} s resumed "
              f"({fresh_pass / pass_s:.1f}x); compile {fresh_all:.1f} s -> {all_s:.1f} s; "
              f"same weights: {same}")


if __name__ == "__main__":
    main()
