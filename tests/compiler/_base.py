"""A small valid vertical pipeline (generated data, no files) that the tests mutate."""

BASE = """\
pipeline demo

param rows: int = 200

use std.models.{embed, mlp, dense, concat}

party media "passive" {
  node trainer
  data impressions = wide_n_deep(rows: rows, seed: 7, side: "follower", features: 8)
}

party shop "active" {
  node trainer
  data conversions = wide_n_deep(rows: rows, seed: 7, side: "leader", features: 8)
}

partition vertical {
  align media.impressions, shop.conversions on example_id using psi.ecdh
}

model {
  at media: act1 = mlp(embed(impressions.sparse, buckets: 101, dim: 4), units: [16])
  at shop:  act2 = mlp(embed(conversions.sparse, buckets: 101, dim: 4), units: [16])
  at shop:  logits = dense(concat(act2, act1), units: [8, 2])
  loss softmax_cross_entropy(logits, conversions.label)
}

train {
  epochs: 1
  batch_size: 32
  optimizer: adam(learning_rate: 0.001)
  metrics: [loss, auc]
  validation: 0.2
}

trust {
  enclave sgx(enclave_size: "8G", max_threads: 64, isv_prod_id: 1, isv_svn: 1)
  attestation sim
  allow media -> shop: act1 as float32[batch, 16]
  allow shop -> media: grad(act1)
  at_rest encrypted
}
"""


def mutate(old: str, new: str, src: str = BASE) -> str:
    assert src.count(old) == 1, f"{old!r} must occur exactly once"
    return src.replace(old, new)
