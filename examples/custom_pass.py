"""Writing a pass: a registered class with typed parameters that rewrites the graph in place."""

from dataclasses import dataclass

import torch

import bevel
from bevel.passes import Pass, PassParams, PassResult, param, register_pass


@register_pass("example.clamp_weights")
class ClampWeights(Pass):
    """Clamp every Linear weight to [-limit, limit]."""

    @dataclass
    class Params(PassParams):
        limit: float = param(0.1, "largest absolute weight kept", gt=0.0)

    def run(self, graph, ctx):
        changed = 0
        for node in graph.nodes(target=torch.ops.aten.linear.default):
            name = node.args[1].target
            graph.set_param(name, graph.param(name).clamp(-self.params.limit, self.params.limit))
            changed += 1
        return PassResult(changed=changed > 0, stats={"layers": changed})


model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
cm = bevel.compile(model, "cleanup | example.clamp_weights(limit=0.2)", example_inputs=(torch.randn(4, 8),),
                   max_fidelity_drop=0.05)
print(cm.report)
