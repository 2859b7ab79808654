"""``addresses.json``: where each node listens, written by the launcher at run time.

Addresses are not a security property (a peer is identified by attestation, not by where it answers),
so they live outside the measured build artifacts: ``{node_id: {"host", "port", "bootstrap_port"}}`` (and
optionally ``"listen"``: the address the node binds, e.g. ``0.0.0.0`` in a container), plus,
for a node that reads encrypted data inside Gramine, ``"key_service": "HOST:PORT"`` (its data owner's
``fldsl keys serve``). The key service is not a security property either: the reply is encrypted to the
enclave's attested key, and a wrong service can only give a wrong key, under which the data files fail
Gramine's integrity check (docs/keys.md).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    ValidationError,
    field_validator,
    model_validator,
)

from fldsl.artifacts import ArtifactError, dump_json


class NodeAddress(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str
    port: int = Field(ge=0, le=65535)  # secure (mutual TLS) port; 0 = pick a free one (tests)
    bootstrap_port: int = Field(ge=0, le=65535)  # Hello (certificate exchange) port
    key_service: str | None = None  # HOST:PORT of the data owner's key service (encrypted data only)
    # Where the node itself binds, when not where peers reach it (a container: 0.0.0.0; behind NAT). Read
    # only by that node; `--listen` overrides it. Default: loopback, so nothing is exposed unless asked.
    listen: str | None = None

    @field_validator("key_service")
    @classmethod
    def _key_service(cls, value: str | None) -> str | None:
        return None if value is None else check_host_port(value)

    @model_validator(mode="after")
    def _distinct(self) -> NodeAddress:
        if self.port and self.port == self.bootstrap_port:
            raise ValueError("port and bootstrap_port must differ")
        return self

    def secure_target(self) -> str:
        return f"{_host(self.host)}:{self.port}"

    def bootstrap_target(self) -> str:
        return f"{_host(self.host)}:{self.bootstrap_port}"


def check_host_port(value: str) -> str:
    """``value`` if it is ``HOST:PORT``, port 1..65535, an IPv6 host in brackets; else ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port in 1..65535, got {value!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"an IPv6 host goes in brackets, e.g. [::1]:7443; got {value!r}")
    return value


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class Addresses(RootModel[dict[str, NodeAddress]]):
    def __getitem__(self, node_id: str) -> NodeAddress:
        try:
            return self.root[node_id]
        except KeyError:
            known = ", ".join(sorted(self.root))
            raise KeyError(f"addresses.json has no entry for {node_id} (known: {known})") from None

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.root


def load_addresses(path: Path) -> Addresses:
    try:
        return Addresses.model_validate_json(path.read_bytes())
    except FileNotFoundError as e:
        raise ArtifactError(f"{path}: missing (the launcher writes addresses.json)") from e
    except ValidationError as e:
        raise ArtifactError(f"{path}: not a valid addresses file: {e}") from e


def save_addresses(addresses: Addresses, path: Path) -> None:
    # No "key_service": null entries: files without key services stay as they were.
    path.write_text(dump_json(addresses.model_dump(mode="json", exclude_none=True)))
