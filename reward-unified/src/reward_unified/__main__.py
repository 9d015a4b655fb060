"""`python -m reward_unified`: serve UnifiedReward-Think rewards over gRPC (GRPC_PORT) and HTTP (HTTP_PORT)."""

from deepgen_common.reward_api import reward_component
from deepgen_common.server import main
from reward_unified.backend import UnifiedBackend
from reward_unified.settings import UnifiedSettings

if __name__ == "__main__":
    main(UnifiedSettings, reward_component(UnifiedBackend))
