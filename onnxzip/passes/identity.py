"""The identity pass: changes nothing. It proves the pass contract end to end and is a handy
baseline in recipes (validation and reporting run as for any other pass)."""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from onnxzip.passes.base import Pass, PassContext, PassResult, Plan, register_pass


@dataclass
class IdentityConfig:
    pass


@register_pass
class IdentityPass(Pass):
    name = "identity"
    config_class = IdentityConfig
    weight_only = True
    reduces_bytes = False
    summary = "Change nothing (a baseline; validation and reports still run)."

    def apply(self, model: onnx.ModelProto, plan: Plan, context: PassContext) -> PassResult:
        report = self.new_report()
        cost = context.cost(model)
        for node in cost.nodes:
            if node.params or node.flops:
                report.skip(node.name, node.op_type, "the identity pass changes nothing",
                            params_before=node.params, params_after=node.params,
                            flops_before=node.flops, flops_after=node.flops)
        return PassResult(model, report, plan)
