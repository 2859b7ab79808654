"""Semantic checks: AST -> checked IR (``fldsl.compiler.ir.Program``).

Resolves names (parameters, stdlib modules, parties, nodes, data sets and their fields, tensors, ops and
their parameters), infers every tensor's shape and dtype, checks the partition rules of the scenario, then
derives the cross-node flows and checks each against the trust block's ``allow`` rules (information flow:
every value carries the private sources it depends on, see :mod:`fldsl.compiler.flows`).

Errors are collected (as many as can be found in one pass) and raised together as one ``FldslError``.

This module is the driver: :class:`Checker` runs the passes (``resolve``, ``schema``, ``scenario``,
``shapes``, ``train``, ``trust``, then ``flows``), each a module of functions over the one
:class:`~fldsl.compiler.checkstate.CheckState`; between passes it stops at the first errors.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fldsl.compiler import ast, resolve, scenario, schema, shapes
from fldsl.compiler.checkstate import CheckState, Rule, Tensor, _Fatal
from fldsl.compiler.ir import IRParty, Program
from fldsl.compiler.train import check_train
from fldsl.compiler.trust import check_trust
from fldsl.diagnostics import FldslError


class Checker(CheckState):
    """Runs the passes in order over one shared state."""

    def run(self) -> Program:
        try:
            env = resolve.check_params(self)
            resolve.check_uses(self)
            # The loss decides the csv label dtype (float32 for mse), so peek at it before reading data.
            self.loss_name = next(
                (s.call.func.value for m in self.m.models for s in m.stmts if isinstance(s, ast.LossStmt)),
                None,
            )
            resolve.check_parties(self, env)
            scenario.check_partition_kind(self)
            schema.check_fitted_vocabularies(self)
            self.fail_if_errors()
            self.roles = scenario.check_partition_nodes(self)
            self.fail_if_errors()
            shapes.check_model(self, env)
            self.fail_if_errors()
            train = check_train(self, env)
            trust = check_trust(self, env)
            self.fail_if_errors()
            from fldsl.compiler.flows import FlowBuilder

            builder = FlowBuilder(self, train)
            flows = builder.build()  # information-flow errors are collected, not raised
            program = Program(
                pipeline=self.m.name.value,
                source_name=Path(self.file).name,
                source_sha256=hashlib.sha256(self.source.encode()).hexdigest(),
                params=dict(sorted(env.params.items())),
                uses=sorted(self.uses),
                scenario=self.scenario,  # type: ignore[arg-type]
                parties=[
                    IRParty(
                        name=p.name,
                        description=p.description,
                        family=p.family,
                        index=p.index,
                        nodes=[f"{p.name}.{n}" for n in p.nodes],
                    )
                    for p in self.parties.values()
                ],
                nodes=builder.nodes,
                datasets=[d for p in self.parties.values() for d in p.datasets.values()],
                ops=self.ops,
                param_counts=self.param_counts,
                loss=self.loss,
                train=train,
                alignment=builder.alignment,
                aggregation=builder.aggregation,
                sharding=builder.sharding,
                trust=trust,
                flows=flows,
            )
        except _Fatal:
            raise FldslError(self.diags, {self.file: self.source}) from None
        if any(d.severity == "error" for d in self.diags):
            # Only flow errors are left: the partial program (refused flows removed) and the refused flows
            # let `fldsl graph` draw the pipeline with the violations in red.
            err = FldslError(self.diags, {self.file: self.source})
            err.program = program
            err.violations = list(builder.violations)
            raise err
        program._warnings = [d for d in self.diags if d.severity == "warning"]
        return program


__all__ = ["Checker", "Rule", "Tensor"]
