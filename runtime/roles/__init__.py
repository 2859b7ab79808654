"""Role loops of a node: what it does between "links are up" and "model exported".

``vertical`` (split learning), ``horizontal`` (sync parameter server and FedAvg), ``distributed`` (a chief
streams shards to untrusted workers, then sync PS training). ``common`` holds what they share.
"""

from __future__ import annotations

from fldsl.artifacts import Plan


def role_main(plan: Plan):
    """The ``run(ctx) -> dict`` function for a plan's role (imported lazily: each pulls in TensorFlow)."""
    family = plan.role.split(".")[0]
    if family == "vertical":
        from fldsl.runtime.roles import vertical

        return vertical.run
    if family == "horizontal":
        from fldsl.runtime.roles import horizontal

        return horizontal.run
    from fldsl.runtime.roles import distributed

    return distributed.run
