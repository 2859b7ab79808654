"""End to end in one process, with the real pieces the vertical runtime uses: two parties holding
differently ordered rows align them with PSI, the label owner makes the stratified split, both walk the
same ``epoch_batches``, and the split model (cut gradient passed by hand, lazy Adam on embedding tables)
ends with the same weights as ``train_central`` on the joined data."""

from __future__ import annotations

import queue
import threading

import numpy as np
import tensorflow as tf

from fldsl.artifacts import LossSpec, OptimizerSpec, TrainSpec, ValidationSpec
from fldsl.runtime.data import stratified_split
from fldsl.runtime.datagen import wide_n_deep
from fldsl.runtime.psi import psi_follower, psi_leader
from fldsl.stdlib.tf import build_segment, epoch_batches, loss_fn, make_optimizer, train_central

from .helpers import op, spec

F = 16
PASSIVE = [op("e_f", "embed", ["media.sparse"], F * 4, buckets=101, dim=4),
           op("act1", "mlp", ["e_f"], 16, units=[16])]
ACTIVE = [op("e_l", "embed", ["shop.sparse"], F * 4, party="shop", buckets=101, dim=4),
          op("own", "mlp", ["e_l"], 16, party="shop", units=[16]),
          op("cat", "concat", ["own", "act1"], 32, party="shop"),
          op("logits", "dense", ["cat"], 2, party="shop", units=[8, 2])]
LOSS = LossSpec(op="softmax_cross_entropy", logits="logits", label="shop.label", party="shop")
TRAIN = TrainSpec(epochs=2, batch_size=64, seed=3, metrics=["loss", "auc"],
                  optimizer=OptimizerSpec(name="adam", params={"learning_rate": 0.003}),
                  validation=ValidationSpec(fraction=0.2, seed=1))


def _psi(leader_ids: list[str], follower_ids: list[str]) -> tuple[list[str], list[str]]:
    a: queue.Queue[bytes] = queue.Queue()
    b: queue.Queue[bytes] = queue.Queue()
    out: dict[str, list[str]] = {}
    t = threading.Thread(target=lambda: out.setdefault("f", psi_follower(follower_ids, b.put, a.get)))
    t.start()
    out["l"] = psi_leader(leader_ids, a.put, b.get)
    t.join()
    return out["l"], out["f"]


def test_split_training_over_psi_aligned_rows_equals_central_training() -> None:
    shop = wide_n_deep(600, 5, "leader", F)
    media = wide_n_deep(600, 5, "follower", F)
    common_l, common_f = _psi(shop.ids.tolist(), media.ids.tolist())
    assert common_l == common_f and len(common_l) == 540

    # Label owner: split by id; the passive party receives the chosen ids (here: shares the lists).
    shop_rows = shop.select(common_l)
    train_ids, hold_ids = stratified_split(shop_rows.ids, shop_rows.fields["label"], 0.2, seed=1)
    assert len(train_ids) + len(hold_ids) == 540 and not set(train_ids) & set(hold_ids)
    s_train, m_train = shop.select(train_ids), media.select(train_ids)

    active = build_segment(ACTIVE, {"shop.sparse": spec(F, "int64"), "act1": spec(16)}, TRAIN.seed)
    passive = build_segment(PASSIVE, {"media.sparse": spec(F, "int64")}, TRAIN.seed)
    a_opt, p_opt = make_optimizer(TRAIN.optimizer), make_optimizer(TRAIN.optimizer)
    av, pv = list(active.trainable_variables), list(passive.trainable_variables)
    loss = loss_fn(LOSS)

    @tf.function
    def passive_forward(x: tf.Tensor) -> tf.Tensor:
        return passive({"media.sparse": x})["act1"]

    @tf.function
    def passive_backward(x: tf.Tensor, grad: tf.Tensor) -> None:
        with tf.GradientTape() as tape:
            act = passive({"media.sparse": x})["act1"]
        p_opt.apply(tape.gradient(act, pv, output_gradients=grad), pv)

    @tf.function
    def active_step(x: tf.Tensor, act: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(act)
            value = loss(active({"shop.sparse": x, "act1": act})["logits"], y)
        grads = tape.gradient(value, [*av, act])
        a_opt.apply(grads[:-1], av)
        return grads[-1]

    for epoch in range(TRAIN.epochs):
        for idx in epoch_batches(len(train_ids), TRAIN.batch_size, TRAIN.seed, epoch):
            act = passive_forward(m_train.fields["sparse"][idx]).numpy()  # -> wire
            grad = active_step(s_train.fields["sparse"][idx], act, s_train.fields["label"][idx]).numpy()
            passive_backward(m_train.fields["sparse"][idx], grad)  # <- wire

    # Central reference on the joined rows, given in yet another order.
    joined_ids = shop_rows.ids[::-1]
    data = {"shop.sparse": shop.select(joined_ids).fields["sparse"],
            "media.sparse": media.select(joined_ids).fields["sparse"]}
    central = train_central(PASSIVE + ACTIVE, LOSS, TRAIN, data, shop.select(joined_ids).fields["label"],
                            ids=joined_ids)
    split = {**dict(zip(passive.weight_names, passive.get_weights(), strict=True)),
             **dict(zip(active.weight_names, active.get_weights(), strict=True))}
    inputs = {"shop.sparse": spec(F, "int64"), "media.sparse": spec(F, "int64")}
    initial = build_segment(PASSIVE + ACTIVE, inputs, TRAIN.seed)
    assert sorted(split) == sorted(initial.weight_names)
    for name, w, w0 in zip(initial.weight_names, central.weights, initial.get_weights(), strict=True):
        assert not np.allclose(w, w0), f"{name} did not train: the comparison would be vacuous"
        np.testing.assert_allclose(split[name], w, atol=2e-5, err_msg=name)
