"""What every role shares, re-exported from the modules that hold it (one job each):

* :mod:`~fldsl.runtime.roles.errors`: the exceptions a role raises;
* :mod:`~fldsl.runtime.roles.context`: :class:`RoleContext` (flows, control messages, waiting on peers);
* :mod:`~fldsl.runtime.roles.resume_agreement`: the resume agreement and its landed notices;
* :mod:`~fldsl.runtime.roles.training`: TensorFlow set-up, input specs, batch order, meter, epoch metrics;
* :mod:`~fldsl.runtime.roles.checkpoints`: checkpoint steps, landing one, the background writer;
* :mod:`~fldsl.runtime.roles.exports`: the sealed model export;
* :mod:`~fldsl.runtime.roles.tables`: loading a node's data sets, fitting their preprocessing;
* :mod:`~fldsl.runtime.roles.chunks`: blob channels, chunked transfers, array bundles.

Message keys are :mod:`fldsl.runtime.transport.keys`'.
"""

from __future__ import annotations

from fldsl.runtime.roles.checkpoints import (
    CheckpointWriter,
    announce_training,
    is_checkpoint_step,
    save_checkpoint,
    with_checkpoint_writer,
)
from fldsl.runtime.roles.chunks import (
    PSI_BASE,
    blob_channel,
    pack_arrays,
    recv_chunked,
    send_chunked,
    unpack_arrays,
)
from fldsl.runtime.roles.context import (
    RoleContext,
    artifacts_digest,
)
from fldsl.runtime.roles.errors import (
    Interrupted,
    PeerLimitExceeded,
    PeerProtocolError,
    PeerRestarted,
    ResumeRefused,
    RoleError,
    RollbackRequested,
)
from fldsl.runtime.roles.exports import (
    export_model,
    seal_preprocessing,
)
from fldsl.runtime.roles.tables import (
    fit_preprocessing,
    label_rule,
    load_tables,
)
from fldsl.runtime.roles.training import (
    Meter,
    batches,
    build_model,
    configure_tf,
    cyclic_batch,
    epoch_batch,
    epoch_order,
    field_inputs,
    input_specs,
    label_ref,
    report_epoch,
    score_metrics,
)

__all__ = [
    "PSI_BASE",
    "CheckpointWriter",
    "Interrupted",
    "Meter",
    "PeerLimitExceeded",
    "PeerProtocolError",
    "PeerRestarted",
    "ResumeRefused",
    "RoleContext",
    "RoleError",
    "RollbackRequested",
    "announce_training",
    "artifacts_digest",
    "batches",
    "blob_channel",
    "build_model",
    "configure_tf",
    "cyclic_batch",
    "epoch_batch",
    "epoch_order",
    "export_model",
    "field_inputs",
    "fit_preprocessing",
    "input_specs",
    "is_checkpoint_step",
    "label_ref",
    "label_rule",
    "load_tables",
    "pack_arrays",
    "recv_chunked",
    "report_epoch",
    "save_checkpoint",
    "score_metrics",
    "seal_preprocessing",
    "send_chunked",
    "unpack_arrays",
    "with_checkpoint_writer",
]
