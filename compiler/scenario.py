"""Pass 3, scenario and roles: the partition kind and its parties and nodes (server, workers, chief).
"""

from __future__ import annotations

from fldsl.compiler import ast
from fldsl.compiler.checkstate import CheckState, Roles, _Fatal


def check_partition_kind(ck: CheckState) -> None:
    if not ck.m.partitions:
        ck.error(
            ck.m.name.span,
            "the pipeline declares no partition",
            "add `partition vertical { align ... }`, `partition horizontal over ...` or "
            "`partition distributed from ...`",
        )
        raise _Fatal
    for extra in ck.m.partitions[1:]:
        ck.error(extra.span, "only one `partition` is allowed per pipeline")
    p = ck.m.partitions[0]
    ck.partition = p
    ck.scenario = {
        ast.VerticalPartition: "vertical",
        ast.HorizontalPartition: "horizontal",
        ast.DistributedPartition: "distributed",
    }[type(p)]


def party_ref(ck: CheckState, name: ast.Name, *, family_ok: bool = True) -> list[str] | None:
    """Party names a name stands for (a family expands to its members)."""
    if name.value in ck.parties:
        return [name.value]
    if family_ok and name.value in ck.families:
        return list(ck.families[name.value])
    ck.unknown(name.span, "party", name.value, [*ck.parties, *ck.families])
    return None


def node_ref(ck: CheckState, ref: ast.Ref, what: str, *, family_ok: bool = False) -> list[str] | None:
    """Node ids a `party.node` (or `party` with one node) stands for."""
    if len(ref.parts) > 2:
        ck.error(ref.span, f"{what} must be `party.node`, got `{ref.text}`")
        return None
    parties = party_ref(ck, ref.parts[0], family_ok=False)
    if parties is None:
        return None
    party = ck.parties[parties[0]]
    if len(ref.parts) == 1:
        if len(party.nodes) != 1:
            ck.error(
                ref.span, f"party `{party.name}` has several nodes; say which: `{party.name}.NODE`"
            )
            return None
        return [f"{party.name}.{party.nodes[0]}"]
    nname = ref.parts[1].value
    if nname in party.nodes:
        return [f"{party.name}.{nname}"]
    members = [n for n in party.nodes if party.node_families.get(n) == nname]
    if family_ok and members:
        return [f"{party.name}.{n}" for n in members]
    cands = list(party.nodes) + (sorted(set(party.node_families.values())) if family_ok else [])
    ck.unknown_in(ref.parts[1].span, f"party `{party.name}`", "node", nname, cands)
    return None


def check_partition_nodes(ck: CheckState) -> Roles:
    """Resolve the partition's parties and nodes (scenario rules on them are in flows.py)."""
    roles = Roles()
    p = ck.partition
    if isinstance(p, ast.HorizontalPartition):
        workers: list[str] = []
        for n in p.over:
            got = party_ref(ck, n)
            if got:
                workers += [w for w in got if w not in workers]
        server = node_ref(ck, p.server, "the aggregator")
        if not workers or server is None:
            return roles
        roles.worker_parties = workers
        roles.server_node = server[0]
        if roles.server_node.split(".")[0] in workers:
            ck.error(
                p.server.span, f"the aggregator `{roles.server_node}` must not be one of the workers"
            )
        if p.reduce is not None and p.reduce.value not in ("mean", "fedavg"):
            ck.unknown(p.reduce.span, "aggregation", p.reduce.value, ["mean", "fedavg"])
        if p.schedule.unit == "steps" and (p.schedule.count or 0) <= 0:
            ck.error(p.schedule.span, "the step count must be positive")
    elif isinstance(p, ast.DistributedPartition):
        chief = node_ref(ck, p.chief, "the chief")
        workers_ = node_ref(ck, p.workers, "the workers", family_ok=True)
        if chief is None or workers_ is None:
            return roles
        roles.chief_node = chief[0]
        roles.dist_workers = workers_
        if p.server is not None:
            srv = node_ref(ck, p.server, "the parameter server")
            if srv is None:
                return roles
            roles.server_node = srv[0]
        else:
            wparty = ck.parties[workers_[0].split(".")[0]]
            rest = [f"{wparty.name}.{n}" for n in wparty.nodes if f"{wparty.name}.{n}" not in workers_]
            if len(rest) != 1:
                ck.error(
                    p.workers.span,
                    f"cannot tell which node of `{wparty.name}` is the parameter server",
                    f"name it: `... to {p.workers.text} via {wparty.name}.ps shard ...`",
                )
                return roles
            roles.server_node = rest[0]
        if roles.chief_node in workers_ or roles.server_node in (*workers_, roles.chief_node):
            ck.error(p.span, "the chief, the workers and the parameter server must be different nodes")
        if p.strategy.value not in ("round_robin", "contiguous"):
            ck.unknown(
                p.strategy.span, "sharding strategy", p.strategy.value, ["round_robin", "contiguous"]
            )
    return roles
