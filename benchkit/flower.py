"""The Flower side of ``fldsl bench``'s ``flower`` mode: a Flower FedAvg server and one client per worker.

    python -m fldsl.bench.flower server --build B --address HOST:PORT --report R --clients N \
        --rounds R --rounds-per-epoch E [--weighting examples|mean]
    python -m fldsl.bench.flower client --build B --node ID --address HOST:PORT --report R

The comparison must be of the same training, so the clients reuse the compiled build, not a re-implemented
model: each client is one worker of a horizontal FedAvg plan and trains exactly what that worker trains in
``runtime/roles/horizontal.py``, through the same code, the worker core (``runtime/roles/worker_core.py``):
the same data set (its plan's reader and parameters), the same stratified holdout and preprocessing fit, the
same model (``build_segment`` from the plan, same seed), optimiser (kept across rounds), batch size,
per-epoch row order (driven by a local step cursor), local steps per round, the same TensorFlow thread
settings, and the same evaluation of the received global model at every epoch end. The server is Flower's
``FedAvg`` (weighted by examples unless the plan says ``mean``) with timestamps around every round; nothing
of fldsl's transport, attestation or checkpointing is used.

Flower is started the legacy way (``flwr.server.start_server`` / ``flwr.client.start_client``, gRPC
bidi stream, insecure on loopback): deprecated since flwr 1.13 but still shipped (1.42), it is one server
process plus one client process per worker, the same process layout as fldsl's run and the way
``shared/reference/baseline_perf.md`` measured Flower's 4.1–4.7 s per round. The SuperLink / SuperNode
deployment adds a SuperLink, a ServerApp process and per-run ClientApp processes on top.

Busy time of a client per round (what ``fldsl bench`` subtracts from the round time) is measured as the
fldsl worker's meter measures it: the local training steps only. Setting the received weights and reading
them back are part of the overhead in both (the issue's "transfer + aggregate + apply"), as is epoch-end
evaluation. Reports are JSON: the server's holds per-round
timestamps (``time.time()``) and every client's busy seconds and examples per round, plus the final
evaluation each client made of the last global model; every report holds its process' peak RSS.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fldsl.artifacts import Plan, Policy, load_model, node_dir

log = logging.getLogger("fldsl.bench.flower")


class NotFedAvg(Exception):
    """The build is not a horizontal FedAvg pipeline, so there is no Flower counterpart to run."""


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------------------
# the schedule, as fldsl's FedAvg server computes it
# ---------------------------------------------------------------------------------------------------------


def fedavg_workers(build: Path) -> list[Plan]:
    """The worker plans of a horizontal FedAvg build (in the server's worker order)."""
    plans = {p.parent.name: load_model(Plan, p) for p in sorted((build / "nodes").glob("*/plan.json"))}
    server = next((p for p in plans.values() if p.role == "horizontal.server"), None)
    if server is None or server.aggregation is None or server.aggregation.mode != "fedavg":
        raise NotFedAvg("the pipeline is not horizontal FedAvg (`partition horizontal ... with fedavg`)")
    return [plans[w] for w in server.aggregation.workers]


def train_rows(plan: Plan) -> int:
    """Rows a worker trains on (its data set less the holdout), loading the data as the worker does."""
    from fldsl.runtime.roles.common import load_tables
    from fldsl.runtime.roles.worker_core import WorkerData

    return len(WorkerData.load(plan, load_tables(plan)).train_rows)


def schedule(workers: Sequence[Plan]) -> tuple[int, int]:
    """(rounds, rounds per epoch) exactly as ``horizontal.server`` computes them for FedAvg."""
    plan = workers[0]
    agg = plan.aggregation
    assert agg is not None
    if agg.every_epoch or not agg.every_steps:
        rounds = plan.train.epochs  # no data needed: one round per epoch
    else:
        spe = max(1, math.ceil(max(train_rows(w) for w in workers) / plan.train.batch_size))
        rounds = math.ceil(spe * plan.train.epochs / agg.every_steps)
    return rounds, max(1, rounds // plan.train.epochs)


def local_steps_per_round(plan: Plan, n: int) -> int:
    """Local steps a FedAvg worker with ``n`` training rows takes per round (``horizontal.server``'s
    schedule: one local epoch of its own rows, or ``every_steps``)."""
    agg = plan.aggregation
    assert agg is not None
    local_spe = max(1, math.ceil(n / plan.train.batch_size))
    return local_spe if agg.every_epoch or not agg.every_steps else int(agg.every_steps)


def examples_after(steps: int, n: int, batch_size: int) -> int:
    """Rows a worker has trained after ``steps`` local steps over ``n`` rows: every epoch's last batch is
    partial (``epoch_batch``), so this is not ``steps * batch_size``."""
    spe = max(1, math.ceil(n / batch_size))
    epochs, rest = divmod(steps, spe)
    return epochs * n + min(rest * batch_size, n)


# ---------------------------------------------------------------------------------------------------------
# client: one fldsl worker's training, driven by Flower
# ---------------------------------------------------------------------------------------------------------


class WorkerTrainer:
    """What ``horizontal.worker`` does between rounds, without fldsl's transport (see the module doc): the
    worker core itself (:class:`fldsl.runtime.roles.worker_core.WorkerCore`), driven by Flower."""

    def __init__(self, build: Path, node: str) -> None:
        from fldsl.runtime.preprocess import fit_tables
        from fldsl.runtime.roles.common import configure_tf, input_specs, load_tables
        from fldsl.runtime.roles.worker_core import WorkerCore, WorkerData

        configure_tf()  # the same thread pools as a fldsl node
        d = node_dir(build, node)
        plan = load_model(Plan, d / "plan.json")
        policy = load_model(Policy, d / "policy.json")
        if plan.role != "horizontal.worker" or plan.aggregation is None or plan.loss is None:
            raise NotFedAvg(f"{node} is not a horizontal FedAvg worker")
        self.plan = plan
        tables = load_tables(plan)
        self.data = data = WorkerData.load(plan, tables)
        # The declared preprocessing, fitted on this worker's training rows (statistics the fldsl workers
        # pool through the aggregator are fitted locally here: Flower has no such exchange).
        fit_tables(plan.data, tables, *data.preprocessing_rows())
        specs = {k: v for k, v in input_specs(plan, policy).items() if k.startswith(f"{data.train_ds}.")}
        self.core = WorkerCore(data, data.model_specs(specs), local_optimizer=True)
        self.model = self.core.model
        self.local_steps = local_steps_per_round(plan, len(data.train_rows))

    @property
    def hold_rows(self) -> np.ndarray:
        return self.data.hold_rows

    def get_weights(self) -> list[np.ndarray]:
        return self.model.get_weights()

    def fit(self, weights: list[np.ndarray], round_index: int, rounds_per_epoch: int
            ) -> tuple[list[np.ndarray], int, float, dict[str, float]]:
        """One round from the global ``weights``: returns (new weights, examples, busy seconds, metrics of
        the global model when the previous round closed an epoch)."""
        self.model.set_weights(weights)
        metrics: dict[str, float] = {}
        if round_index > 0 and round_index % rounds_per_epoch == 0:
            # fldsl's worker evaluates the global model of an epoch's last round right after receiving it
            # (outside its busy meter); these weights are that model.
            metrics = self.evaluate()
        t0 = time.perf_counter()
        seen = self.core.local_steps(self.local_steps)
        busy = time.perf_counter() - t0
        return self.model.get_weights(), seen, busy, metrics

    def evaluate(self) -> dict[str, float]:
        """The worker's epoch-end metrics: mean training loss since the last call, holdout / test scores."""
        return self.core.end_epoch()[0]


def run_client(args: argparse.Namespace) -> dict[str, Any]:
    import flwr

    trainer = WorkerTrainer(args.build, args.node)
    node = args.node
    uniform = trainer.plan.aggregation is not None and trainer.plan.aggregation.weighting == "mean"
    evaluations: list[dict[str, float]] = []

    class Client(flwr.client.NumPyClient):
        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return trainer.get_weights()

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]
                ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            weights, seen, busy, metrics = trainer.fit(parameters, int(config["round"]) - 1,
                                                       int(config["rounds_per_epoch"]))
            if metrics:
                evaluations.append(metrics)
            # FedAvg weights results by num_examples; 1 each gives fldsl's `mean` weighting.
            return weights, 1 if uniform else seen, {"node": node, "busy_s": busy, "examples": seen}

        def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]
                     ) -> tuple[float, int, dict[str, Any]]:
            trainer.model.set_weights(parameters)
            metrics = trainer.evaluate()
            evaluations.append(metrics)
            n = len(trainer.hold_rows) or 1
            return float(metrics.get("loss", 0.0)), n, {"node": node, **metrics}

    flwr.client.start_client(server_address=args.address, client=Client().to_client(), insecure=True)
    return {"node": node, "evaluations": evaluations}


# ---------------------------------------------------------------------------------------------------------
# server: Flower's FedAvg with timestamps
# ---------------------------------------------------------------------------------------------------------


def run_server(args: argparse.Namespace) -> dict[str, Any]:
    import flwr
    from flwr.server.strategy import FedAvg

    rounds: list[dict[str, Any]] = []
    final: dict[str, dict[str, Any]] = {}

    class TimedFedAvg(FedAvg):
        """FedAvg that records when each round starts and ends and what every client reported."""

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            rounds.append({"round": server_round, "start": time.time()})
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            if failures:  # a missing client changes the average: not the run being compared
                raise RuntimeError(f"round {server_round}: {len(failures)} client(s) failed: {failures[0]!r}")
            rec = rounds[-1]
            rec["clients"] = {str(res.metrics["node"]): {"busy_s": float(res.metrics["busy_s"]),
                                                          "examples": int(res.metrics["examples"])}
                              for _, res in results}
            out = super().aggregate_fit(server_round, results, failures)
            rec["end"] = time.time()  # the new global model exists; next: send it out
            return out

        def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            # The clients evaluate every epoch's global model inside the next fit (as fldsl's workers do,
            # without a second download); only the last model needs an evaluation round of its own.
            if server_round < args.rounds:
                return []
            return super().configure_evaluate(server_round, parameters, client_manager)

        def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
            for _, res in results:
                m = dict(res.metrics)
                final[str(m.pop("node"))] = m
            return super().aggregate_evaluate(server_round, results, failures)

    n = args.clients
    strategy = TimedFedAvg(
        fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=n, min_evaluate_clients=n,
        min_available_clients=n, accept_failures=False,
        on_fit_config_fn=lambda r: {"round": r, "rounds_per_epoch": args.rounds_per_epoch},
        fit_metrics_aggregation_fn=lambda _: {}, evaluate_metrics_aggregation_fn=lambda _: {})
    flwr.server.start_server(server_address=args.address,
                             config=flwr.server.ServerConfig(num_rounds=args.rounds), strategy=strategy)
    if len(rounds) != args.rounds or any("end" not in r for r in rounds):
        raise RuntimeError(f"Flower ran {len(rounds)} of {args.rounds} rounds")
    return {"rounds": rounds, "final": final}


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fldsl.bench.flower",
                                description=__doc__.splitlines()[0])
    p.add_argument("role", choices=["server", "client"])
    p.add_argument("--build", type=Path, required=True)
    p.add_argument("--address", required=True, help="HOST:PORT of the Flower server (loopback)")
    p.add_argument("--report", type=Path, required=True)
    p.add_argument("--node", help="client: the worker node id whose plan it trains")
    p.add_argument("--clients", type=int, default=2, help="server: number of clients")
    p.add_argument("--rounds", type=int, default=1, help="server: FedAvg rounds")
    p.add_argument("--rounds-per-epoch", type=int, default=1, help="server: rounds per epoch")
    p.add_argument("--xla", action="store_true", help="client: XLA, as `fldsl bench --xla`")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    if args.role == "client" and not args.node:
        print("error: client needs --node", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"role": args.role}
    code = 0
    if args.xla:
        from fldsl.bench.node import enable_xla

        enable_xla()
    try:
        report.update(run_server(args) if args.role == "server" else run_client(args))
    except Exception as e:  # the harness shows this line; the traceback goes to this process' log
        log.exception("flower %s failed", args.role)
        report["error"] = f"{type(e).__name__}: {e}"
        code = 1
    report["peak_rss_bytes"] = peak_rss_bytes()
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, sort_keys=True), encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.stdout.flush()
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # gRPC / TensorFlow threads must not keep a finished bench process alive
