"""``addresses.json``: where each node listens, written by the launcher at run time.

Addresses are not a security property (a peer is identified by attestation, not by where it answers),
so they live outside the measured build artifacts: ``{node_id: {"host", "port", "bootstrap_port"}}``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, model_validator

from fldsl.artifacts import ArtifactError, dump_json


class NodeAddress(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str
    port: int = Field(ge=0, le=65535)  # secure (mutual TLS) port; 0 = pick a free one (tests)
    bootstrap_port: int = Field(ge=0, le=65535)  # Hello (certificate exchange) port

    @model_validator(mode="after")
    def _distinct(self) -> NodeAddress:
        if self.port and self.port == self.bootstrap_port:
            raise ValueError("port and bootstrap_port must differ")
        return self

    def secure_target(self) -> str:
        return f"{_host(self.host)}:{self.port}"

    def bootstrap_target(self) -> str:
        return f"{_host(self.host)}:{self.bootstrap_port}"


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
    path.write_text(dump_json(addresses.model_dump(mode="json")))
