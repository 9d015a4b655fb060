"""`python -m eval_unigenbench`: serve UniGenBench evaluation over gRPC (GRPC_PORT) and HTTP (HTTP_PORT)."""

from deepgen_common.server import main
from eval_unigenbench.api import eval_component
from eval_unigenbench.settings import EvalSettings

if __name__ == "__main__":
    main(EvalSettings, eval_component)
