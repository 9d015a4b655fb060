"""Shared scaffolding of the DeepGen-RL services and the client of the reward contract.

`deepgen_common.client` needs only gRPC and httpx (the trainer imports it); the serving modules
need the `server` extra.
"""

__version__ = "0.1.0"
